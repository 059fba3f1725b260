"""`liveavatar-batch produce` end to end: the real flow on a real Prefect API, real media, real files.

Runs the CLI in-process (`main(argv)`) against the session's Prefect test server; the kill-and-resume
test runs it as a subprocess so it can be killed.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from liveavatar_core import media

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "examples" / "lecture.mp3"
IMAGE = ROOT / "examples" / "portrait.jpg"
PROMPT = (
    (ROOT / "examples" / "prompt.txt").read_text() if (ROOT / "examples" / "prompt.txt").exists() else "x"
)
SMALL = ["--size", "144x256"]  # WIDTHxHEIGHT: a portrait-shaped small video


def produce(tmp_path, *extra, audio=AUDIO, image=IMAGE, out=None, work=None):
    out = out or tmp_path / "out"
    argv = ["produce", "--audio", str(audio), "--image", str(image), "--prompt", PROMPT, "--out", str(out)]
    argv += ["--engine", "preview", "--work", str(work or tmp_path / "work"), *SMALL, *extra]
    return main(argv), out


@pytest.fixture(scope="module")
def produced(prefect_api, tmp_path_factory):
    """The sample lecture, produced once for the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("produced")
    code, out = produce(tmp, "--segment-seconds", "8", "--max-segment-seconds", "12")
    assert code == 0
    return tmp, out


def test_publishes_video_manifest_qc_and_report(produced):
    _, out = produced
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "qc.json", "report.html", "video.mp4"]
    manifest = json.loads((out / "manifest.json").read_text())
    qc = json.loads((out / "qc.json").read_text())
    assert qc["passed"] and manifest["qc"]["passed"]
    assert manifest["engine"]["name"] == "preview" and manifest["engine"]["weights"] == "none"
    segments = manifest["segments"]
    assert len(segments) >= 2 and not any(s["cached"] for s in segments)
    assert segments[0]["start_s"] == 0 and all(
        a["end_s"] == b["start_s"] for a, b in zip(segments, segments[1:], strict=False)
    )
    assert all(s["end_s"] - s["start_s"] <= 12 for s in segments)
    assert all(s["attempts"][-1]["error"] is None for s in segments)


def test_video_and_audio_cover_the_whole_lecture(produced):
    _, out = produced
    manifest = json.loads((out / "manifest.json").read_text())
    info = media.probe(out / "video.mp4")
    assert info.video.width == 144 and info.video.height == 256 and info.video.fps == 25
    assert info.video.frames == sum(s["frames"] for s in manifest["segments"])
    assert abs(info.video.duration_s - info.audio.duration_s) <= 0.04
    assert abs(info.audio.duration_s - manifest["inputs"]["audio"]["duration_s"]) <= 0.04
    assert manifest["segments"][-1]["end_s"] == pytest.approx(
        manifest["inputs"]["audio"]["duration_s"], abs=1e-3
    )


def test_report_shows_thumbnails_and_segment_table(produced):
    _, out = produced
    html = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert html.count("data:image/jpeg;base64,") >= 6
    assert all(s["key"][:8] in html or f"{s['start_s']:.1f}" in html for s in manifest["segments"])


def test_rerun_reuses_every_segment(produced):
    tmp, out = produced
    first = json.loads((out / "manifest.json").read_text())
    code, _ = produce(tmp, "--segment-seconds", "8", "--max-segment-seconds", "12")
    assert code == 0
    second = json.loads((out / "manifest.json").read_text())
    assert second["job_key"] == first["job_key"]
    assert all(s["cached"] for s in second["segments"])
    assert [s["key"] for s in second["segments"]] == [s["key"] for s in first["segments"]]


def test_memory_budget_walks_the_ladder(prefect_api, tmp_path):
    from liveavatar_core.engines.base import GenerationConfig
    from liveavatar_core.engines.preview import PreviewEngine

    engine = PreviewEngine()
    rungs = engine.ladder(GenerationConfig(height=256, width=144))
    fits_last = (
        (engine.estimate_memory(rungs[-2].config) + engine.estimate_memory(rungs[-1].config)) / 2 / 1024**3
    )
    code, out = produce(tmp_path, "--memory-budget-gb", f"{fits_last:.6f}")
    assert code == 0
    attempts = json.loads((out / "manifest.json").read_text())["segments"][0]["attempts"]
    assert [a["rung"] for a in attempts] == [r.name for r in rungs]
    assert attempts[0]["error"] and attempts[-1]["error"] is None
    assert media.probe(out / "video.mp4").video.height == 256  # output size stays fixed


def test_budget_below_every_rung_fails_naming_budget_and_estimate(prefect_api, tmp_path, capsys):
    code, out = produce(tmp_path, "--memory-budget-gb", "0.000001")
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "memory budget" in err[0] and "smallest estimate" in err[0]
    assert not out.exists()


def test_progress_is_logged_per_segment(prefect_api, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    code, _ = produce(tmp_path, "--segment-seconds", "8", "--max-segment-seconds", "12")
    assert code == 0
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("segment ") and "ETA" in r.getMessage()
    ]
    assert lines and lines[0].startswith("segment 1/") and "elapsed" in lines[-1]


@pytest.mark.slow
def test_kill_mid_lecture_then_resume_regenerates_nothing_finished(cli_env, tmp_path, long_lecture):
    """SIGKILL the CLI after a few segments are stored; the re-run reuses each of them untouched."""
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [sys.executable, "-m", "flows.cli", "produce", "--audio", str(long_lecture), "--image", str(IMAGE)]
    argv += ["--prompt", PROMPT, "--out", str(out), "--engine", "preview", "--work", str(work), *SMALL]
    argv += ["--segment-seconds", "4", "--max-segment-seconds", "6"]
    proc = subprocess.Popen(argv, env=cli_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    segments_dir = work / "segments"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(segments_dir.glob("*.handoff"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    finished = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in segments_dir.glob("*.mp4")}
    assert len(finished) >= 3

    resumed = subprocess.run(argv, env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    cached = {s["key"] for s in manifest["segments"] if s["cached"]}
    # Every segment whose video was stored before the kill was reused, and its file never rewritten.
    # (A segment killed between storing its video and its cache record is regenerated: not "finished".)
    reused = {name for name in finished if name.removesuffix(".mp4") in cached}
    assert len(reused) >= len(finished) - 1 >= 2
    for name in reused:
        p = segments_dir / name
        assert (p.stat().st_mtime_ns, p.stat().st_ino) == finished[name]
    assert not all(s["cached"] for s in manifest["segments"])  # the rest was generated by the re-run


def test_s3_inputs_outputs_and_work_store(prefect_api, tmp_path, s3_server, s3_bucket):
    """Inputs read from S3, the work store (segments, handoffs, Prefect results) and DEST in S3."""
    s3 = s3_server.client()
    s3.upload_file(str(AUDIO), s3_bucket, "in/lecture.mp3")
    s3.upload_file(str(IMAGE), s3_bucket, "in/portrait.jpg")
    dest = f"s3://{s3_bucket}/courses/demo/lecture-1"
    code, _ = produce(
        tmp_path,
        "--segment-seconds", "10", "--max-segment-seconds", "15",
        audio=f"s3://{s3_bucket}/in/lecture.mp3",
        image=f"s3://{s3_bucket}/in/portrait.jpg",
        out=dest,
        work=f"s3://{s3_bucket}/work",
    )  # fmt: skip
    assert code == 0
    listed = {
        o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="courses/demo/lecture-1/")["Contents"]
    }
    assert listed == {
        f"courses/demo/lecture-1/{n}" for n in ("video.mp4", "manifest.json", "qc.json", "report.html")
    }
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="work/")["Contents"]}
    assert any(k.startswith("work/segments/") and k.endswith(".handoff") for k in keys)
    assert any(k.startswith("work/prefect-results/") for k in keys)
    manifest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="courses/demo/lecture-1/manifest.json")["Body"].read()
    )
    assert manifest["qc"]["passed"] and manifest["inputs"]["audio"]["url"].startswith("s3://")
    assert not (tmp_path / "work").exists()  # nothing went to local disk outside temp files


def test_s3_destination_that_denies_access(prefect_api, tmp_path, s3_server, s3_bucket, capsys):
    dest = f"s3://{s3_bucket}/lecture"
    with s3_server.auth_enforced():
        code, _ = produce(tmp_path, out=dest)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --out {dest}")
    assert "testing" not in err[0]  # credentials are never echoed
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket)


@pytest.mark.slow
def test_ten_minute_lecture_passes_qc(prefect_api, tmp_path, make_lecture):
    lecture = make_lecture(600, suffix=".mp3")
    code, out = produce(tmp_path, audio=lecture)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qc"]["passed"]
    assert abs(manifest["output"]["duration_s"] - 600) < 0.05
    assert all(s["end_s"] - s["start_s"] <= 40 for s in manifest["segments"])
    assert len(manifest["segments"]) >= 15
