"""The Prefect UI path as a course team uses it, in Debian's headless chromium (Playwright, no download).

Against a real Prefect server on PostgreSQL (tests/fixtures/prefect_server.py) with the deployments
registered by `liveavatar-batch deploy` and a process worker on cpu-pool: open the produce-lecture form
in the UI, check the field order and labels, submit a malformed size and see it refused, submit the
sample lecture (preview engine, in-process dispatch, published to moto's S3), wait for the run, open
its result card and follow the link to the published report.

Set LIVEAVATAR_UI_SCREENSHOTS=docs/img to refresh the screenshots docs/ui.md shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tasks.artifacts import lecture_key
from tests.fixtures.prefect_server import BIN, ROOT, start_process, stop_process

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TITLE = "Sense and Sensibility, chapter 1"
FIELDS = [
    "Lecture audio", "Portrait", "Prompt", "Title (Optional)", "Destination", "Engine (Optional)",
    "Dispatch (Optional)", "Size (Optional)", "Precision (Optional)", "Segment length (s) (Optional)",
    "Longest segment (s) (Optional)", "Seed (Optional)", "Publish even if checks fail (Optional)",
    "Memory budget (GiB) (Optional)", "Work store (Optional)", "Checkpoint folder (Optional)",
    "Random weights (Optional)",
]  # fmt: skip


def _api(server, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _runs(server, deployment: dict) -> set[str]:
    """Ids of the deployment's flow runs."""
    body = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    return {run["id"] for run in _api(server, "/flow_runs/filter", body)}


@pytest.fixture(scope="module")
def ui_line(prefect_server, s3_server, tmp_path_factory):
    """Deployments on the server, a bucket to publish to, and a process worker on cpu-pool."""
    logs = tmp_path_factory.mktemp("ui-line")
    bucket = f"ui-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = dict(prefect_server.env)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})  # moto's endpoint
    env.update(LIVEAVATAR_WORK=str(logs / "work"), PREFECT_WORKER_QUERY_SECONDS="1")
    deploy = subprocess.run(
        [str(BIN / "liveavatar-batch"), "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    worker = start_process(
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--type", "process"],
        logs / "worker.log",
        env,
    )
    try:
        yield prefect_server, bucket, logs
    finally:
        stop_process(worker)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _shot(page, name: str, tmp: Path, full_page: bool = True) -> None:
    """A screenshot; into LIVEAVATAR_UI_SCREENSHOTS (for the docs) as a small 64-colour PNG."""
    folder = os.environ.get("LIVEAVATAR_UI_SCREENSHOTS")
    path = Path(folder or tmp) / name
    page.screenshot(path=str(path), full_page=full_page)
    if folder:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def _field(page, label: str):
    """The input a form label names."""
    return page.get_by_label(label, exact=True)


def _choose(page, name: str, option: str) -> None:
    """Pick `option` in the form's select for `name` (its popover may re-render: try again then)."""
    select = page.get_by_label(f"Select {name}", exact=True)
    for _ in range(5):
        if select.inner_text().strip() == option:
            return
        page.keyboard.press("Escape")
        select.click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5000)
        except PlaywrightTimeout:
            continue
    assert select.inner_text().strip() == option


def test_a_lecture_from_the_ui_form_to_the_published_report(ui_line, browser, tmp_path):
    server, bucket, logs = ui_line
    ui = server.url.removesuffix("/api")
    deployment = _api(server, "/deployments/name/produce_lecture/produce-lecture")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)  # generous: CI machines are small and may be busy

    before = _runs(server, deployment)  # the session's server may hold other tests' runs
    page.goto(f"{ui}/v2/deployments/deployment/{deployment['id']}/run")
    page.get_by_label("Lecture audio", exact=True).wait_for()
    labels = [t.strip() for t in page.locator("label").all_inner_texts()]
    assert labels[labels.index("params") + 1 :][: len(FIELDS)] == FIELDS
    assert "read on the host of the worker" in page.content()
    assert (
        page.get_by_label("Select Dispatch", exact=True).inner_text().strip() == "gpu-workers"
    )  # deployment's
    assert _field(page, "Size (Optional)").input_value() == "auto"

    prompt = (ROOT / "examples" / "prompt.txt").read_text().strip()
    _field(page, "Lecture audio").fill(str(ROOT / "examples" / "lecture.mp3"))
    _field(page, "Portrait").fill(str(ROOT / "examples" / "portrait.jpg"))
    box = _field(page, "Prompt")
    one_line = box.bounding_box()["height"]
    box.fill(f"{prompt}\nSecond line: calm, friendly.\nThird line: plain background.")
    assert box.bounding_box()["height"] > 2 * one_line  # the box grows with the prompt's lines
    _field(page, "Title (Optional)").fill(TITLE)
    _field(page, "Destination").fill(f"s3://{bucket}/austen/chapter-1")
    _choose(page, "Engine", "preview")
    _choose(page, "Dispatch", "in-process")
    _field(page, "Size (Optional)").fill("704 by 384")
    _field(page, "Segment length (s) (Optional)").fill("10")
    _field(page, "Longest segment (s) (Optional)").fill("15")
    _shot(page, "ui-form.png", tmp_path)

    page.get_by_role("button", name="Submit").click()
    refusal = page.locator("p.text-destructive", has_text="'704 by 384' does not match")
    refusal.wait_for()
    page.get_by_text("Validation failed for field 'params.size'").wait_for()  # the server's refusal
    text = page.locator("body").inner_text()  # the refusal sits under the Size field
    assert text.index("Size (Optional)") < text.index("'704 by 384' does not") < text.index("Precision (O")
    assert "/run" in page.url  # refused at submission: no run was created
    assert _runs(server, deployment) == before

    _field(page, "Size (Optional)").fill("144x256")
    # The form validates as one types (debounced); a Submit that still sees the old value is refused
    # again and creates nothing, so submit until the UI moves on to the deployment's runs.
    for _ in range(5):
        page.get_by_role("button", name="Submit").click()
        try:
            page.wait_for_url(
                re.compile(rf".*/deployments/deployment/{deployment['id']}\?tab=Runs"), timeout=8000
            )
            break
        except PlaywrightTimeout:
            continue
    assert "tab=Runs" in page.url, page.locator("body").inner_text()[-2000:]
    (run_id,) = _runs(server, deployment) - before

    deadline = time.monotonic() + 420
    while (run := _api(server, f"/flow_runs/{run_id}"))["state_type"] not in (
        "COMPLETED",
        "FAILED",
        "CRASHED",
    ):
        assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
        time.sleep(2)
    assert run["state_type"] == "COMPLETED", (logs / "worker.log").read_text()[-3000:]
    assert run["name"] == TITLE

    page.goto(f"{ui}/v2/runs/flow-run/{run_id}")
    page.get_by_text(TITLE).first.wait_for()
    page.get_by_role("tab", name=re.compile("Artifacts")).click()
    key = lecture_key(TITLE, f"s3://{bucket}/austen/chapter-1")
    card = page.get_by_text(key, exact=True)
    card.wait_for()
    page.get_by_text(re.compile(r"^3 of 3 segments \(100%\)")).wait_for()  # the progress card's count
    _shot(page, "ui-finished-run.png", tmp_path)
    card.click()  # the result card: its markdown, with the links
    link = page.get_by_role("link", name="report.html", exact=True)
    link.wait_for()
    _shot(page, "ui-result-card.png", tmp_path)
    href = link.get_attribute("href")
    assert href.startswith(f"{os.environ['AWS_ENDPOINT_URL']}/{bucket}/austen/chapter-1/report.html?")

    page.goto(href)
    page.get_by_text("DRAFT – NOT FOR PUBLICATION").wait_for()
    assert page.locator("h1").inner_text() == TITLE
    assert page.locator("video#player").get_attribute("src") == "video.mp4"
    cuts = page.locator("li.cut button.jump")
    assert cuts.count() == 2  # 27 s in segments of at most 15 s
    cuts.first.click()
    cut_at = float(cuts.first.get_attribute("data-t"))
    page.wait_for_function(f"Math.abs(document.getElementById('player').currentTime - {cut_at}) < 0.5")
    _shot(page, "ui-report.png", tmp_path, full_page=False)
    page.close()
