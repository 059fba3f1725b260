"""render_report on a real assembled lecture: player, plain checks, draft banner, escaped, tolerant."""

from __future__ import annotations

import base64
import io
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np
import pytest
from PIL import Image

from liveavatar_core import __version__, report
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
            {
                "index": 0,
                "start_s": 0.0,
                "end_s": 3.2,
                "frames": 80,
                "cut": "hard",
                "cached": True,
                "attempts": [],
            },
            {
                "index": 1,
                "start_s": 3.2,
                "end_s": 6.0,
                "frames": 70,
                "cut": "end",
                "cached": False,
                "attempts": [
                    {"rung": "full", "config": {}, "error": f"OutOfMemory {EVIL}", "seconds": 1.5},
                    {"rung": "offload-kv", "config": {}, "error": None, "seconds": 2.25},
                ],
            },
        ],
        "output": {"duration_s": 6.0, "frames": 150, "fps": 25, "width": 96, "height": 128},
        "settings": {
            "engine": "auto",
            "size": "auto",
            "precision": "fp8",
            "segment_seconds": 30.0,
            "max_segment_seconds": 40.0,
            "seed": 7,
            "memory_budget_gb": None,
        },  # fmt: skip
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


def _with_engine(manifest: dict, name: str, weights: str) -> dict:
    return {**manifest, "engine": {"name": name, "version": "1.0", "weights": weights, "reason": "test"}}


def test_report_shows_manifest_and_qc_in_plain_words(lecture):
    video, manifest, qc = lecture
    page = render_report(video, manifest, qc, now=datetime(2026, 3, 4, 5, 6, tzinfo=UTC))
    assert "s3://bucket/lecture.mp3" in page and "ab" * 32 in page
    assert "preview" in page and "no GPU" in page
    assert "h264 96×128, 150 frames at 25 fps; aac 16000 Hz × 1" in page  # the file's own facts
    assert page.count('<span class="pass">pass</span>') == len(qc["checks"])
    for check in qc["checks"]:  # labels in words, never the internal check names
        assert check["name"] not in page
    assert "Picture and sound end together" in page and "0 ms apart" in page
    assert "-16.0 LUFS" in page and "-17.0 to -15.0 LUFS" in page and "150 frames" in page
    segment_rows = re.search(r"<h2>Segments \(2\)</h2>\s*<table>.*?</table>", page, re.S)
    assert segment_rows and segment_rows.group(0).count("<tr>") == 3  # header + 2 segments
    assert "hard cut inside speech" in segment_rows.group(0) and "end of the lecture" in page
    assert "offload-kv 2.2 s" in page or "offload-kv 2.3 s" in page
    assert ">3.8<" in page  # the segment's total seconds over both attempts (1.5 + 2.25)
    assert "prompt was truncated to 512 tokens" in page and "audio was resampled" in page
    settings = re.search(r"<h2>Settings</h2>.*?</table>", page, re.S).group(0)
    for text in ("96×128 (auto", "Seed</th><td>7<", "30 s target", "40 s", "fp8", "none (settings as given)"):
        assert text in settings, text
    assert "rendered 2026-03-04 05:06 UTC" in page and f"liveavatar-batch {__version__}" in page


def test_player_jumps_to_each_cut_and_flagged_moment(lecture, monkeypatch):
    video, manifest, qc = lecture
    # Only the moments are under test: a stand-in partial takes this sketch of a picture section.
    partial = jinja2.DictLoader({"qc_picture.html.j2": "<section></section>"})
    monkeypatch.setattr(report._ENV, "loader", jinja2.ChoiceLoader([partial, report._ENV.loader]))
    report._ENV.cache.clear()
    picture = {
        "segments": [{"index": 0, "passed": True, "worst_at_s": 1.0}, {"index": 1, "passed": False,
                     "worst_at_s": 4.5, "what": "face drifts from the portrait"}],
        "cuts": [{"after_segment": 0, "at_s": 3.2, "passed": False}],
        "images": {"worst": [{"at_s": 9.9, "passed": False}]},  # pictures, not moments
    }  # fmt: skip
    page = render_report(video, manifest, {**qc, "picture": picture})
    assert re.search(r'<video id="player" controls preload="metadata" src="lecture.mp4">', page)
    moments = re.search(r'<ol class="moments">(.*?)</ol>', page, re.S).group(1)
    items = re.findall(
        r'<li class="(\w*)"><button[^>]*data-t="([\d.]+)"[^>]*>([^<]+)</button> ([^<]+)</li>', moments
    )
    assert [(kind, t, words) for kind, t, _, words in items] == [
        (
            "cut",
            "3.200",
            "cut before segment 1 (hard cut inside speech: no pause within the longest segment)",
        ),
        ("flag", "3.200", "cuts"),
        ("flag", "4.500", "face drifts from the portrait"),
    ]
    assert [clock for _, _, clock, _ in items] == ["0:03.2", "0:03.2", "0:04.5"]
    report._ENV.cache.clear()


def test_a_draft_is_unmistakable_and_a_real_render_is_not_marked(lecture):
    video, manifest, qc = lecture
    draft = render_report(video, manifest, qc, thumbnails=1)
    assert 'id="draft-banner"' in draft and "DRAFT – NOT FOR PUBLICATION" in draft
    assert 'class="banner pass"' not in draft and "(on a draft)" in draft
    real = render_report(video, _with_engine(manifest, "liveavatar", "checkpoint"), qc, thumbnails=1)
    assert "draft-banner" not in real and 'class="banner pass" id="qc-banner">All 8 checks passed.' in real
    noise = render_report(video, _with_engine(manifest, "liveavatar", "random"), qc, thumbnails=1)
    assert "random weights" in noise and 'id="draft-banner"' in noise


def test_picture_section_goes_through_its_partial(lecture, monkeypatch):
    video, manifest, qc = lecture
    partial = jinja2.DictLoader({"qc_picture.html.j2": '<section id="pic">{{ picture.note }}</section>'})
    monkeypatch.setattr(report._ENV, "loader", jinja2.ChoiceLoader([partial, report._ENV.loader]))
    report._ENV.cache.clear()
    page = render_report(video, manifest, {**qc, "picture": {"note": "identity <ok>"}}, thumbnails=1)
    assert '<section id="pic">identity &lt;ok&gt;</section>' in page
    assert '<section id="pic">' not in render_report(video, manifest, qc, thumbnails=1)
    report._ENV.cache.clear()


def test_report_escapes_user_text(lecture):
    video, manifest, qc = lecture
    page = render_report(video, manifest, qc)
    assert "<script>alert" not in page
    assert page.count("&lt;script&gt;") == 6  # title, heading, lecture table, prompt, error, warning
    assert "Physics &amp; &lt;Co&gt;" in page


def test_report_marks_failed_checks(lecture):
    video, manifest, qc = lecture
    failing = dict(qc, passed=False)
    failing["checks"] = [dict(qc["checks"][0], passed=False, detail="2 decoding errors")] + qc["checks"][1:]
    page = render_report(video, manifest, failing)
    assert '<span class="fail">FAIL</span>' in page
    assert "1 of 8 checks failed: The video file decodes without errors." in page


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
    assert "video file not found" in page and "All 0 checks passed" in page
