"""render_report on a real assembled lecture: self-contained, escaped, tolerant of missing keys."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liveavatar_core.media import assemble
from liveavatar_core.qc import run_qc
from liveavatar_core.report import render_report, thumbnail_times
from tests.fixtures.media import write_segment, write_speechlike_wav

EVIL = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def lecture(tmp_path_factory) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("report")
    speech = write_speechlike_wav(folder / "speech.wav", 6.0, seed=5)
    segs = [write_segment(folder / "s0.mp4", 80), write_segment(folder / "s1.mp4", 70, start=80)]
    video = folder / "lecture.mp4"
    assemble(segs, speech.path, video)
    qc = run_qc(video, expected_frames=150, audio_duration_s=6.0, speech_spans=speech.spans).to_dict()
    manifest = {
        "lecture": {"title": f"Week 1 {EVIL}", "course": "Physics & <Co>"},
        "inputs": {
            "audio": {"url": "s3://bucket/lecture.mp3", "sha256": "ab" * 32},
            "image": {"url": "file:///portrait.jpg", "sha256": "cd" * 32},
            "prompt": {"text": f"A teacher {EVIL}", "warnings": ["prompt was truncated to 512 tokens"]},
        },
        "engine": {"name": "preview", "version": "0.1.0", "reason": "no GPU"},
        "segments": [
            {"index": 0, "start_s": 0.0, "end_s": 3.2, "frames": 80, "cached": True, "attempts": []},
            {
                "index": 1,
                "start_s": 3.2,
                "end_s": 6.0,
                "frames": 70,
                "cached": False,
                "attempts": [
                    {"rung": "full", "config": {}, "error": f"OutOfMemory {EVIL}", "seconds": 1.5},
                    {"rung": "offload-kv", "config": {}, "error": None, "seconds": 2.25},
                ],
            },
        ],
        "output": {"duration_s": 6.0, "frames": 150, "fps": 25, "width": 96, "height": 128},
        "qc": qc,
        "warnings": [f"audio was resampled {EVIL}"],
    }
    return video, manifest, qc


def _thumbs(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def _ffmpeg_children() -> int:
    """ffmpeg processes that are children of this one (moviepy readers left open)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and "ffmpeg" in name:
            count += 1
    return count


def test_report_is_self_contained_with_thumbnails(lecture):
    video, manifest, qc = lecture
    page = render_report(video, manifest, qc)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<link" not in page and "http://" not in page and "https://" not in page
    thumbs = _thumbs(page)
    assert len(thumbs) == 10
    assert all(t.format == "JPEG" and t.size == (160, 213) for t in thumbs)
    pixels = [np.asarray(t, dtype=np.float32) for t in thumbs]
    assert all(p.mean() > 40 for p in pixels)  # real frames, not black
    assert np.abs(pixels[0] - pixels[5]).mean() > 1  # taken at different times
    for t in thumbnail_times(6.0, 10):  # captions give the evenly spaced times
        assert f"{int(t // 60)}:{t % 60:04.1f}" in page
    assert _ffmpeg_children() == 0  # moviepy's readers were closed


def test_report_shows_manifest_and_qc(lecture):
    video, manifest, qc = lecture
    page = render_report(video, manifest, qc)
    assert "QC passed" in page
    assert "s3://bucket/lecture.mp3" in page and "ab" * 32 in page
    assert "preview" in page and "no GPU" in page
    assert "h264 96×128, 150 frames at 25 fps; aac 16000 Hz × 1" in page  # the file's own facts
    assert page.count('<span class="pass">pass</span>') == len(qc["checks"])
    for check in qc["checks"]:
        assert f"<td>{check['name']}</td>" in page
    segment_rows = re.search(r"<h2>Segments \(2\)</h2>\s*<table>.*?</table>", page, re.S)
    assert segment_rows and segment_rows.group(0).count("<tr>") == 3  # header + 2 segments
    assert "offload-kv 2.2 s" in page or "offload-kv 2.3 s" in page
    assert ">3.8<" in page  # the segment's total seconds over both attempts (1.5 + 2.25)
    assert "prompt was truncated to 512 tokens" in page and "audio was resampled" in page


def test_report_escapes_user_text(lecture):
    video, manifest, qc = lecture
    page = render_report(video, manifest, qc)
    assert "<script" not in page
    assert page.count("&lt;script&gt;") == 6  # title, heading, lecture table, prompt, error, warning
    assert "Physics &amp; &lt;Co&gt;" in page


def test_report_marks_failed_checks(lecture):
    video, manifest, qc = lecture
    failing = dict(qc, passed=False)
    failing["checks"] = [dict(qc["checks"][0], passed=False, detail="2 decoding errors")] + qc["checks"][1:]
    page = render_report(video, manifest, failing)
    assert "QC failed" in page and '<span class="fail">FAIL</span>' in page


@pytest.mark.parametrize(
    "manifest",
    [
        {},
        {"lecture": None, "inputs": {"audio": "not a dict"}, "segments": [{"attempts": [None, {}]}, 7]},
        {"engine": {}, "output": {"duration_s": "n/a"}, "warnings": None, "segments": None},
    ],
)
def test_report_survives_missing_or_odd_keys(lecture, manifest):
    video, _, _ = lecture
    page = render_report(video, manifest, {}, thumbnails=2)
    assert "QC not run" in page and "lecture.mp4" in page
    assert len(_thumbs(page)) == 2


def test_report_on_a_missing_video(tmp_path):
    page = render_report(tmp_path / "gone.mp4", {"qc": {"passed": True, "checks": []}}, None)
    assert "video file not found" in page and "QC passed" in page
