"""Completion notifications: a Prefect automation that POSTs to a webhook when a run ends.

A webhook URL is given per course (`notify_webhook:` in the course manifest) or per deployment
(`liveavatar-batch deploy --notify-webhook URL`). Either way the server does the work: a Webhook block
holds the URL, and an automation fires on the flow run's final state (Completed, Failed, Crashed,
Cancelled) and calls it with a small JSON body (`PAYLOAD`). Nothing of ours runs when a run ends, so
the notification also comes for a run that crashed. Needs the server's event services (every Prefect
server runs them, the local one too). Setting it up again replaces the previous URL.
"""

from __future__ import annotations

import re
from uuid import UUID

FINAL_EVENTS = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Crashed", "Cancelled")}
# Jinja, rendered by the server from the triggering event and the flow run it names.
PAYLOAD = """{
  "flow_run_id": "{{ flow_run.id }}",
  "flow_run_name": {{ flow_run.name | tojson }},
  "state": "{{ flow_run.state.name }}",
  "message": {{ (flow_run.state.message or "") | tojson }},
  "tags": {{ flow_run.tags | list | tojson }},
  "occurred": "{{ event.occurred }}"
}"""


def ensure_webhook(
    name: str, url: str, *, runs: str = "*", related: dict[str, str | list[str]] | None = None
) -> UUID:
    """Create or replace the automation `name`: POST `PAYLOAD` to `url` when flow run `runs` (an id,
    or "*"), related to `related` if given (e.g. {"prefect.resource.id": "prefect.deployment.ID"}),
    reaches a final state.

    Match a run by its id or its deployment, not by a tag added while it runs: the server's events
    name the tags a run had at its first state change."""
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    block_name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    block_id = Webhook(url=url, headers={"Content-Type": "application/json"}).save(block_name, overwrite=True)
    automation = AutomationCore(
        name=name,
        description=f"liveavatar-batch: POST each run's end to {host_of(url)}",
        trigger=EventTrigger(
            expect=FINAL_EVENTS,
            match={"prefect.resource.id": f"prefect.flow-run.{runs}"},
            match_related=related or {},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):
            client.delete_automation(old.id)
        return client.create_automation(automation)


def host_of(url: str) -> str:
    """The URL without its path or query (which may hold a secret token)."""
    head, sep, rest = url.partition("://")
    return f"{head}{sep}{rest.split('/', 1)[0]}" if sep else "the webhook"
