"""A lecture run as the Prefect UI shows it: named after the lecture, ending in artifacts one can act on.

The flow runs in-process against the suite's real Prefect API, publishing to moto's S3 over HTTP; the
artifacts are read back from the API and their presigned links fetched.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.lecture import LectureParams, produce_lecture
from tasks.artifacts import lecture_key, result_markdown, share_link
from tests.fixtures.media import write_speechlike_wav

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(prefect_api, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    bucket = "ui-artifacts"
    s3_server.client().create_bucket(Bucket=bucket)
    audio = write_speechlike_wav(tmp / "talk.wav", 5.0, seed=11).path
    params = LectureParams(
        audio=str(audio),
        image=str(ROOT / "examples" / "portrait.jpg"),
        prompt="A teacher in a studio",
        title="Week 3: Entropy & you",
        out=f"s3://{bucket}/physics/week-3",
        engine="preview",
        size="144x256",
        segment_seconds=3,
        max_segment_seconds=4,
        work=str(tmp / "work"),
        dispatch="in-process",
    )
    state = produce_lecture(params, return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    return run, {a.key or a.type: a for a in artifacts}, params


def _table(data) -> list[dict]:
    return json.loads(data) if isinstance(data, str) else data


def test_run_is_named_after_the_lecture(finished_run):
    run, _, _ = finished_run
    assert run.name == "Week 3: Entropy & you"


def test_result_card_links_to_the_published_files(finished_run):
    _, artifacts, params = finished_run
    key = lecture_key("Week 3: Entropy & you", params.out)
    assert key.startswith("week-3-entropy-you-")
    card = artifacts[key]
    assert card.type == "markdown" and "published" in card.description
    assert "**DRAFT, not for publication:** made with the preview engine" in card.data
    links = dict(
        line.split("](", 1) for line in card.data.splitlines() if line.startswith("| ") and "](" in line
    )
    report_link = links["| report.html | [report.html"].rstrip(") |")
    with urllib.request.urlopen(report_link, timeout=10) as response:  # presigned: no credentials needed
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "Week 3: Entropy &amp; you" in page and "DRAFT – NOT FOR PUBLICATION" in page
    video_link = links["| video.mp4 | [video.mp4"].rstrip(") |")
    with urllib.request.urlopen(video_link, timeout=10) as response:
        assert response.read(12)[4:8] == b"ftyp"


def test_qc_and_segment_tables_are_keyed_for_the_artifacts_page(finished_run):
    _, artifacts, params = finished_run
    key = lecture_key("Week 3: Entropy & you", params.out)
    qc = artifacts[f"{key}-qc"]
    assert qc.type == "table"
    rows = _table(qc.data)
    assert {r["check"] for r in rows} >= {"Picture and sound end together", "Loudness"}
    assert all(r["result"] == "pass" for r in rows)
    segments = artifacts[f"{key}-segments"]
    seg_rows = _table(segments.data)
    assert len(seg_rows) >= 2 and seg_rows[-1]["ends"] == "end" and seg_rows[0]["start"] == "0:00.0"


def test_progress_card_carries_the_count(finished_run):
    _, artifacts, _ = finished_run
    progress = artifacts["progress"]
    assert progress.data == 100.0
    assert re.match(
        r"^(\d+) of \1 segments \(100%\) · 5 of 5 s of lecture · ETA 0:00:00$", progress.description
    )


def test_local_files_are_shown_as_paths_on_the_worker(tmp_path):
    target = tmp_path / "out" / "report.html"
    link = share_link(str(target))
    assert link == str(target.resolve())
    text = result_markdown(
        "T", {"report.html": link}, {"engine": {"name": "liveavatar"}}, {"checks": []}, True
    )
    assert f"| report.html | `{link}` |" in text and "host of the worker" in text and "DRAFT" not in text


def test_a_refused_lecture_says_so_and_names_the_failed_checks():
    qc = {"checks": [{"name": "loudness", "passed": False}, {"name": "frame_count", "passed": True}]}
    manifest = {"engine": {"name": "liveavatar", "weights": "checkpoint"}, "settings": {"seed": 4}}
    text = result_markdown("Week 9", {"report.html": "/w/report.html"}, manifest, qc, False)
    assert text.startswith("## Week 9: not published")
    assert "**1 of 2 checks failed:** Loudness." in text and "seed 4" in text
