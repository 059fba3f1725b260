"""run_qc on real assembled lectures: a good one passes every check; each defect fails its check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from liveavatar_core.audio import measure_loudness
from liveavatar_core.errors import QCFailed
from liveavatar_core.media import assemble
from liveavatar_core.qc import run_qc
from liveavatar_core.timebase import SAMPLES_PER_FRAME
from tests.fixtures.media import Span, write_segment, write_speechlike_wav

LENGTHS = [90, 60, 50]  # keyframes at frames 0 25 50 75 | 90 115 140 | 150 175
FRAMES = sum(LENGTHS)
SAMPLES = FRAMES * SAMPLES_PER_FRAME - 200
CHECKS = [
    "decodable",
    "frame_count",
    "starts_at_zero",
    "av_duration_match",
    "audio_duration",
    "no_black_in_speech",
    "loudness",
    "true_peak",
]


def _lecture(folder: Path, *, black: range = range(0), lufs: float = -16.0) -> tuple[Path, list[Span]]:
    folder.mkdir(parents=True, exist_ok=True)
    speech = write_speechlike_wav(folder / "speech.wav", SAMPLES / 16_000, lufs=lufs, seed=3)
    paths, start = [], 0
    for k, n in enumerate(LENGTHS):
        local = [i - start for i in black if start <= i < start + n]
        paths.append(write_segment(folder / f"seg{k}.mp4", n, start=start, black=local))
        start += n
    out = folder / "lecture.mp4"
    assemble(paths, speech.path, out)
    return out, speech.spans


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, list[Span]]:
    return _lecture(tmp_path_factory.mktemp("good"))


def _qc(path: Path, spans, **kw):
    args = {"expected_frames": FRAMES, "audio_duration_s": SAMPLES / 16_000, "speech_spans": spans}
    return run_qc(path, **(args | kw))


def test_good_lecture_passes_every_check(good):
    path, spans = good
    report = _qc(path, spans)
    assert [c.name for c in report.checks] == CHECKS
    assert report.passed, report.to_dict()
    report.raise_for_failures()
    assert report.check("frame_count").value == FRAMES
    assert report.check("starts_at_zero").value == 0.0
    assert report.check("av_duration_match").value == pytest.approx(200 / 16_000, abs=1e-6)
    assert report.check("loudness").value == pytest.approx(-16.0, abs=0.5)
    assert report.check("true_peak").value < -1.0
    # Sampling: far fewer frames are decoded than the video holds.
    decoded = report.check("decodable").value
    assert 25 + 9 <= decoded <= 25 + 9 + 25 < FRAMES
    key_times = [0, 1, 2, 3, 3.6, 4.6, 5.6, 6, 7]
    inside = sum(any(sp.start_s <= t < sp.end_s for sp in spans) for t in key_times)
    assert inside > 0
    assert report.check("no_black_in_speech").detail.startswith(f"0 of {inside} keyframes")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True and len(data["checks"]) == len(CHECKS)
    assert set(data["checks"][0]) == {"name", "passed", "value", "limit", "detail"}


def test_wrong_expectations_fail_their_checks(good):
    path, spans = good
    report = _qc(path, spans, expected_frames=FRAMES + 1, audio_duration_s=SAMPLES / 16_000 + 0.1)
    failed = {c.name for c in report.failures}
    assert failed == {"frame_count", "audio_duration"}
    with pytest.raises(QCFailed, match="frame_count"):
        report.raise_for_failures()
    strict = _qc(path, spans, target_lufs=-23.0, max_true_peak_db=-30.0)
    assert {c.name for c in strict.failures} == {"loudness", "true_peak"}


def test_black_frames_fail_only_while_someone_speaks(tmp_path):
    path, _ = _lecture(tmp_path, black=range(100, 150))  # 4.0 s to 6.0 s, keyframes at 4.6 and 5.6 s
    speaking = _qc(path, [Span(0.5, 3.5), Span(4.2, 5.8)])
    black = speaking.check("no_black_in_speech")
    assert not black.passed and black.value == 2
    assert "4.60" in black.detail and "5.60" in black.detail
    assert {c.name for c in speaking.failures} == {"no_black_in_speech"}
    pausing = _qc(path, [Span(0.5, 3.5), Span(6.2, 7.5)])
    assert pausing.passed, pausing.to_dict()


def test_quiet_audio_fails_loudness(tmp_path):
    path, spans = _lecture(tmp_path, lufs=-30.0)
    report = _qc(path, spans)
    assert {c.name for c in report.failures} == {"loudness"}
    assert report.check("loudness").value == pytest.approx(-30.0, abs=0.5)


def test_meter_agrees_with_bs1770_for_a_sine(tmp_path):
    # BS.1770: a full-scale 1 kHz sine in one channel reads -3.01 LUFS; its true peak is its amplitude.
    t = np.arange(16_000 * 5) / 16_000
    for amplitude in (0.2239, 0.9):
        sf.write(tmp_path / "sine.wav", amplitude * np.sin(2 * np.pi * 1000 * t), 16_000, subtype="FLOAT")
        loud = measure_loudness(tmp_path / "sine.wav")
        assert loud.integrated_lufs == pytest.approx(-3.01 + 20 * np.log10(amplitude), abs=0.3)
        assert loud.true_peak_dbtp == pytest.approx(20 * np.log10(amplitude), abs=0.3)


def test_truncated_file_fails_decoding_without_raising(good, tmp_path):
    path, spans = good
    broken = tmp_path / "broken.mp4"
    shutil.copy(path, broken)
    with open(broken, "r+b") as f:
        f.truncate(int(broken.stat().st_size * 0.6))
    report = _qc(broken, spans)
    assert not report.check("decodable").passed
    assert not report.check("frame_count").passed
    assert "keyframes" in report.check("decodable").detail


def test_corrupt_keyframes_fail_decoding(good, tmp_path):
    import av

    path, spans = good
    broken = tmp_path / "corrupt.mp4"
    shutil.copy(path, broken)
    with av.open(str(path)) as c:
        keys = [(p.pos, p.size) for p in c.demux(video=0) if p.is_keyframe and p.size]
    rng = np.random.default_rng(0)
    with open(broken, "r+b") as f:
        for pos, size in keys[2:4]:
            f.seek(pos + size // 3)
            f.write(rng.integers(0, 256, size // 3, dtype=np.uint8).tobytes())
    decodable = _qc(broken, spans).check("decodable")
    assert not decodable.passed and "decoding errors" in decodable.detail


def test_video_without_audio_fails_audio_checks(tmp_path):
    seg = write_segment(tmp_path / "seg.mp4", 30)
    report = run_qc(seg, expected_frames=30, audio_duration_s=1.2, speech_spans=[])
    assert {c.name for c in report.failures} == {
        "starts_at_zero",
        "av_duration_match",
        "audio_duration",
        "loudness",
        "true_peak",
    }
    assert report.check("decodable").passed and report.check("frame_count").passed


def test_silent_audio_reports_json_safe_values(tmp_path):
    seg = write_segment(tmp_path / "seg.mp4", 50)
    sf.write(tmp_path / "silence.wav", np.zeros(50 * SAMPLES_PER_FRAME, np.float32), 16_000)
    out = tmp_path / "silent.mp4"
    assemble([seg], tmp_path / "silence.wav", out)
    report = run_qc(out, expected_frames=50, audio_duration_s=2.0, speech_spans=[Span(0.5, 1.5)])
    assert {c.name for c in report.failures} == {"loudness"}
    assert report.check("true_peak").value == float("-inf")  # silence never clips
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["checks"][-1]["value"] is None
