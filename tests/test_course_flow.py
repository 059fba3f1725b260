"""`liveavatar-batch course` in-process (embedded Prefect API, local files): which lectures are skipped,
what a failing lecture does to the others and to the exit code, and what the summary says.

The whole line (server, deployments, GPU workers, S3) is tested in test_course_line.py.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--size", "144x256", "--segment-seconds", "8", "--max-segment-seconds", "12"]


def write_course(folder: Path, second_audio: str) -> Path:
    shutil.copy(ROOT / "examples" / "lecture.mp3", folder / "lecture.mp3")
    shutil.copy(ROOT / "examples" / "portrait.jpg", folder / "portrait.jpg")
    path = folder / "course.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            id: unit-course
            output_prefix: out
            defaults:
              portrait: portrait.jpg
              prompt: A friendly lecturer in a bright office speaks to the camera, realistic style.
              engine: preview
              profile: draft
            lectures:
              - id: first
                audio: lecture.mp3
              - id: second
                audio: {second_audio}
                seed: 3
            """)
    )
    return path


def course(path: Path, work: Path, *extra: str) -> int:
    return main(["course", str(path), "--work", str(work), *SMALL, *extra])


def test_bad_manifest_fails_in_one_line_naming_file_line_and_field(prefect_api, tmp_path, capsys):
    # (prefect_api: Prefect's console logging is set up before capsys, as in the other tests)
    path = write_course(tmp_path, "lecture.mp3")
    path.write_text(path.read_text().replace("profile: draft", "profile: huge"))
    assert course(path, tmp_path / "work") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}:7 defaults.profile:"), err
    assert "'draft', 'standard', 'fast' or 'spot'" in err[0]


def test_failing_lecture_does_not_stop_the_others_and_a_rerun_skips_what_is_published(
    prefect_api, tmp_path, capsys
):
    path = write_course(tmp_path, "missing.mp3")
    out, work = tmp_path / "out", tmp_path / "work"

    assert course(path, work) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and captured.err.strip().endswith(errors[0])  # Prefect's log lines above it
    assert "1 of 2 lectures failed" in errors[0] and "missing.mp3" in errors[0]
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["lectures"]
    assert (first["lecture"], first["status"], first["qc"]) == ("first", "produced", "pass")
    assert first["gpu_seconds"] > 0 and first["duration_s"] == pytest.approx(26.96, abs=0.1)
    assert (second["lecture"], second["status"]) == ("second", "failed")
    assert second["error"].startswith(f"--audio {tmp_path / 'missing.mp3'}")
    assert summary["counts"] == {"produced": 1, "skipped": 0, "failed": 1}
    assert sorted(p.name for p in (out / "first").iterdir()) == [
        "manifest.json",
        "qc.json",
        "report.html",
        "video.mp4",
    ]
    assert not (out / "second").exists()
    table = {line.split()[0]: line.split()[1] for line in captured.out.splitlines()[2:4]}
    assert table == {"first": "produced", "second": "failed"}, captured.out
    rows = latest_table_artifact("course-unit-course")
    assert [(r["lecture"], r["status"], r["QC"]) for r in rows] == [
        ("first", "produced", "pass"),
        ("second", "failed", "-"),
    ]
    assert rows[0]["duration"] == "0:27" and rows[0]["GPU seconds"] > 0 and "missing.mp3" in rows[1]["error"]

    # The missing audio appears; the published lecture is skipped, the other one produced.
    shutil.copy(tmp_path / "lecture.mp3", tmp_path / "missing.mp3")
    manifest_before = (out / "first" / "manifest.json").stat().st_mtime_ns
    assert course(path, work) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(o["lecture"], o["status"]) for o in summary["lectures"]] == [
        ("first", "skipped"),
        ("second", "produced"),
    ]
    assert summary["lectures"][0]["gpu_seconds"] == 0
    assert (out / "first" / "manifest.json").stat().st_mtime_ns == manifest_before
    assert "1 produced, 1 skipped, 0 failed" in capsys.readouterr().out

    # A changed setting changes the job key: the lecture is produced again (its segments differ too).
    assert course(path, work, "--segment-seconds", "9") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [o["status"] for o in summary["lectures"]] == ["produced", "produced"]


def latest_table_artifact(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert artifacts and artifacts[0].type == "table"
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data
