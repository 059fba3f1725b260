"""Completion webhooks: the Prefect server's automation POSTs to a local HTTP receiver when a run ends."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.notify import ensure_webhook

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "portrait.jpg"
WAIT_S = 120  # the server's trigger and action services run every few seconds; a busy 2-core machine


@pytest.fixture
def receiver():
    """An HTTP server on 127.0.0.1 that queues (path, headers, JSON body) of every POST."""
    got: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got.put((self.path, dict(self.headers), json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.got = got  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def test_a_course_with_a_webhook_posts_its_run_end(cli_env, tmp_path, receiver):
    """The course's lecture cannot be read, so the course run fails: the webhook says Failed, and why."""
    course = tmp_path / "course.yaml"
    course.write_text(
        "id: notify-101\n"
        f"output_prefix: {tmp_path / 'published'}\n"
        f"notify_webhook: {receiver.url}/hooks/course?token=s3cret\n"
        f"defaults:\n  portrait: {IMAGE}\n  prompt: a teacher in a studio\n"
        f"lectures:\n  - id: week-1\n    audio: {tmp_path / 'not-recorded-yet.mp3'}\n"
    )
    argv = [sys.executable, "-m", "flows.cli", "course", str(course), "--dispatch", "in-process"]
    done = subprocess.run(argv, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    path, headers, body = receiver.got.get(timeout=WAIT_S)
    assert path == "/hooks/course?token=s3cret"
    assert headers.get("Content-Type") == "application/json"
    assert body["state"] == "Failed"
    assert body["flow_run_name"] in done.stdout + done.stderr  # this run, not its lecture's subflow
    assert "week-1" in body["message"], body
    assert "s3cret" not in done.stdout + done.stderr  # the URL's token is not printed


def test_a_deployment_webhook_posts_when_a_run_of_it_ends(prefect_api, receiver):
    """Per deployment: any final state of a run of the matched deployments, here a cancelled one."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("notify-test-flow")
        deployment_id = client.create_deployment(flow_id=flow_id, name="notify-test")
        ensure_webhook(
            "liveavatar notify test",
            f"{receiver.url}/hooks/deploy",
            related={"prefect.resource.id": [f"prefect.deployment.{deployment_id}"]},
        )
        # Setting it up again replaces the URL: only the second receiver path is called.
        ensure_webhook(
            "liveavatar notify test",
            f"{receiver.url}/hooks/deploy2",
            related={"prefect.resource.id": [f"prefect.deployment.{deployment_id}"]},
        )
        run = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(run.id, Cancelled(message="called off"), force=True)
    path, _, body = receiver.got.get(timeout=WAIT_S)
    assert path == "/hooks/deploy2"
    assert (body["flow_run_id"], body["state"], body["message"]) == (str(run.id), "Cancelled", "called off")
    with pytest.raises(queue.Empty):
        receiver.got.get(timeout=5)
