"""`liveavatar-batch produce --engine liveavatar`: the whole line with the LiveAvatar engine, loaded from a
tiny checkpoint in the official layout (CPU), through the real flow and a real Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

from flows.cli import main
from liveavatar_core import media

ROOT = Path(__file__).resolve().parents[2]


def test_a_lecture_is_published_segment_after_segment_through_the_handoff(
    prefect_api, tmp_path, liveavatar_checkpoint, make_lecture
):
    lecture = make_lecture(7.0)
    out = tmp_path / "out"
    argv = ["produce", "--audio", str(lecture), "--image", str(ROOT / "examples" / "portrait.jpg")]
    argv += ["--prompt", "A lecturer speaks to the camera in a bright office.", "--out", str(out)]
    argv += ["--work", str(tmp_path / "work"), "--engine", "liveavatar"]
    argv += ["--checkpoint-dir", str(liveavatar_checkpoint), "--size", "64x128"]
    argv += ["--segment-seconds", "3", "--max-segment-seconds", "4"]
    assert main(argv) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["name"] == "liveavatar" and manifest["engine"]["weights"] == "checkpoint"
    assert manifest["qc"]["passed"]
    segments = manifest["segments"]
    assert len(segments) >= 2
    assert [s["engine"]["handoff_in"] for s in segments] == ["none"] + ["continued"] * (len(segments) - 1)
    # One engine made them all, so each continued from the rings it kept: exactly one long segment.
    continuations = [s["engine"]["continuation"] for s in segments]
    assert continuations == ["independent"] + ["kept state"] * (len(segments) - 1)
    assert all(s["engine"]["weights"] == "checkpoint" for s in segments)
    info = media.probe(out / "video.mp4")
    assert (info.video.width, info.video.height) == (64, 128)
    assert info.video.frames == sum(s["frames"] for s in segments)


def test_precision_fp8_reaches_the_engine_and_the_manifest(
    prefect_api, tmp_path, liveavatar_checkpoint, make_lecture
):
    out = tmp_path / "out"
    argv = ["produce", "--audio", str(make_lecture(2.0)), "--image", str(ROOT / "examples" / "portrait.jpg")]
    argv += ["--prompt", "A lecturer speaks to the camera.", "--out", str(out), "--work", str(tmp_path / "w")]
    argv += ["--engine", "liveavatar", "--checkpoint-dir", str(liveavatar_checkpoint), "--size", "64x128"]
    argv += ["--precision", "fp8"]
    assert main(argv) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["precision"] == "fp8" and manifest["qc"]["passed"]
    assert all(a["config"]["fp8"] for s in manifest["segments"] for a in s["attempts"])
