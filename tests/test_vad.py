"""Voice activity detection on real speech: the sample lecture's pauses, streaming, flat memory."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from liveavatar_core import audio, vad
from liveavatar_core.errors import InputError
from tests.fixtures.speech import JOIN_GAPS_S, SAMPLE_SECONDS


def inside(t: float, spans: list[vad.SpeechSpan]) -> bool:
    return any(s.start_s <= t < s.end_s for s in spans)


def test_finds_the_sample_lectures_sentences(lecture_wav: Path):
    spans = vad.detect_speech(lecture_wav)
    assert len(spans) == 5  # five read sentences
    assert all(a.end_s <= b.start_s for a, b in zip(spans, spans[1:], strict=False))  # ordered, disjoint
    for gap_start, gap_end in JOIN_GAPS_S:  # the silences between sentences are pauses
        assert not inside((gap_start + gap_end) / 2, spans)
    sentence_middles = [3.5, 9.1, 13.5, 20.2, 25.3]
    assert all(inside(t, spans) for t in sentence_middles)
    assert spans[0].start_s < 0.5 and spans[-1].end_s > SAMPLE_SECONDS - 0.5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # silero_vad's own loader
def test_matches_silero_reference(lecture_wav: Path):
    """Streaming with the batched model gives exactly what silero's own per-frame path gives."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    x, _ = sf.read(str(lecture_wav), dtype="float32")
    ref = get_speech_timestamps(torch.from_numpy(x), load_silero_vad(onnx=True))
    got = vad.detect_speech(lecture_wav)
    assert [(s.start_sample, s.end_sample) for s in got] == [(r["start"], r["end"]) for r in ref]


def test_block_size_and_feeding_do_not_change_the_result(lecture_wav: Path):
    probs, total = vad.speech_probabilities(lecture_wav)
    small, _ = vad.speech_probabilities(lecture_wav, block_frames=3)
    assert total == sf.info(str(lecture_wav)).frames and len(probs) == -(-total // 512)
    assert np.array_equal(probs, small)
    # Ragged blocks, as a pipe delivers them.
    x, _ = sf.read(str(lecture_wav), dtype="float32")
    detector = vad.SpeechDetector(block_frames=5)
    cuts = np.random.default_rng(0).integers(1, 9000, size=200).cumsum()
    for part in np.split(x, cuts[cuts < len(x)]):
        detector.feed(part)
    assert np.array_equal(detector.probabilities(), probs)


def test_detector_as_a_tap_sees_exactly_the_written_wav(sample_mp3: Path, tmp_path: Path):
    detector = vad.SpeechDetector()
    norm = audio.normalize_to_wav(sample_mp3, tmp_path / "lecture.wav", tap=detector)
    assert detector.samples == norm.samples
    assert detector.spans() == vad.detect_speech(norm.path)


def test_reset_starts_over(lecture_wav: Path):
    x, _ = sf.read(str(lecture_wav), dtype="float32")
    detector = vad.SpeechDetector()
    detector.feed(np.random.default_rng(1).standard_normal(50_000).astype(np.float32))
    detector.reset()
    detector.feed(x)
    assert detector.spans() == vad.detect_speech(lecture_wav)
    with pytest.raises(RuntimeError):
        detector.feed(x)


@pytest.mark.parametrize("kind", ["noise", "tone", "silence"])
def test_no_speech_is_an_input_error(kind: str, tmp_path: Path):
    n = 16000 * 5
    signal = {
        "noise": np.random.default_rng(2).standard_normal(n) * 0.05,
        "tone": 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000),
        "silence": np.zeros(n),
    }[kind]
    sf.write(str(tmp_path / "x.wav"), signal.astype(np.float32), 16000, subtype="PCM_16")
    with pytest.raises(InputError, match="no speech") as err:
        vad.detect_speech(tmp_path / "x.wav", subject="--audio x.wav")
    assert err.value.subject == "--audio x.wav"


def test_rejects_other_rates(tmp_path: Path):
    sf.write(str(tmp_path / "x.wav"), np.zeros(44100, np.float32), 44100)
    with pytest.raises(ValueError, match="16 kHz mono"):
        vad.detect_speech(tmp_path / "x.wav")


def test_memory_is_flat_in_length(make_lecture):
    """Peak Python allocations while scanning 1 and 5 minutes: the same, and small."""
    peaks = []
    for seconds in (60, 300):
        wav = make_lecture(seconds)
        vad.detect_speech(wav)  # warm: model and imports outside the measurement
        tracemalloc.start()
        spans = vad.detect_speech(wav)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert spans[-1].end_s > seconds - 2
    # A few blocks of model input (~2.4 MB each), not 5 minutes of samples (19 MB as float32).
    assert peaks[1] < 16 * 2**20, peaks
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_model_is_loaded_once():
    assert vad._session() is vad._session()


def test_importing_silero_leaves_torch_threads_alone(lecture_wav: Path):
    # silero_vad pins torch to one thread on import; the engines share the process and need theirs.
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from liveavatar_core import vad\n"
        f"vad.detect_speech({str(lecture_wav)!r})\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
