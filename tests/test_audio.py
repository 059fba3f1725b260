"""Audio preparation on real speech: any format in, 16 kHz mono PCM16 at -16 LUFS out, nothing clipped.

Inputs are the bundled sample lecture, re-encoded with the ffmpeg binary; truths are checked with
tools other than the code under test where that is possible (numpy for peaks and alignment,
soundfile for sample counts, a sine of known loudness for the meter).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from liveavatar_core import audio
from liveavatar_core.errors import InputError
from tests.fixtures.speech import SAMPLE_SECONDS, _ffmpeg, encode_audio

TARGET = -16.0
CEILING = -1.5


def true_peak_db(x: np.ndarray) -> float:
    """Peak of the 4x band-limited interpolation (FFT zero-padding), in dB: an independent TP meter."""
    up = np.fft.irfft(np.fft.rfft(x.astype(np.float64)), 4 * len(x)) * 4
    return 20 * math.log10(np.abs(up).max())


def lag_samples(x: np.ndarray, ref: np.ndarray, seconds: float = 20.0) -> int:
    """Shift of x against ref (positive: x is late), from the cross-correlation of their first seconds."""
    n = int(seconds * 16000)
    a, b = x[:n].astype(np.float64), ref[:n].astype(np.float64)
    c = np.fft.irfft(np.fft.rfft(a, 2 * n) * np.conj(np.fft.rfft(b, 2 * n)))
    k = int(np.argmax(c))
    return k if k < n else k - 2 * n


def check_normalized(result: audio.NormalizedAudio) -> np.ndarray:
    """The common promises of normalize_to_wav; returns the written samples."""
    info = sf.info(str(result.path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
    assert info.frames == result.samples
    y, _ = sf.read(str(result.path), dtype="float32")
    assert abs(result.loudness_out.integrated_lufs - TARGET) <= 1.0, result.loudness_out
    assert result.loudness_out.true_peak_dbtp <= CEILING, result.loudness_out
    assert true_peak_db(y) <= CEILING + 0.1  # numpy's interpolation, not ffmpeg's meter
    assert np.abs(y).max() < 32767 / 32768  # nothing at full scale: no clipping
    assert not list(result.path.parent.glob(".*"))  # no temporary files left behind
    return y


def test_probe_sample(sample_mp3: Path):
    info = audio.probe_audio(sample_mp3)
    assert info.codec.startswith("mp3")
    assert (info.sample_rate, info.channels) == (16000, 1)
    assert info.duration_s == pytest.approx(SAMPLE_SECONDS, abs=0.05)


@pytest.mark.parametrize(
    "suffix, rate, channels",
    [(".wav", 44100, 2), (".mp3", 22050, 2), (".m4a", 48000, 2), (".flac", 8000, 1), (".ogg", 32000, 1)],
)
def test_normalize_any_format(lecture_wav: Path, tmp_path: Path, suffix: str, rate: int, channels: int):
    src = encode_audio(lecture_wav, tmp_path / f"in{suffix}", sample_rate=rate, channels=channels)
    result = audio.normalize_to_wav(src, tmp_path / "out" / "lecture.wav")
    y = check_normalized(result)
    assert (result.source.sample_rate, result.source.channels) == (rate, channels)
    ref, _ = sf.read(str(lecture_wav), dtype="float32")
    # The whole lecture, no more, no less (codecs' priming and padding are trimmed on decode) ...
    assert abs(result.samples - len(ref)) <= 16, (result.samples, len(ref))
    # ... and every sample where it was: lip sync depends on it.
    assert lag_samples(y, ref) == 0


def test_gain_alone_would_clip_but_the_limiter_holds(lecture_wav: Path, tmp_path: Path):
    # Speech peaks ~20 dB over its loudness: bringing a quiet take to -16 LUFS by gain alone would
    # put its peaks over 0 dBFS. The output must still be at the target and unclipped.
    src = encode_audio(lecture_wav, tmp_path / "quiet.flac", gain_db=-6.0)
    result = audio.normalize_to_wav(src, tmp_path / "out.wav")
    assert result.loudness_in.true_peak_dbtp + result.gain_db > 0.0  # the premise: gain alone clips
    check_normalized(result)


def test_inter_sample_peaks_are_held_under_the_ceiling(lecture_wav: Path, tmp_path: Path):
    # A loud 4 kHz burst sampled at 45 degrees: samples sit 3 dB under the waveform's true peaks.
    x, _ = sf.read(str(lecture_wav), dtype="float32")
    n = np.arange(16000 * 5, 16000 * 6)
    x[n] += 0.5 * np.sin(np.pi * n / 2 + np.pi / 4).astype(np.float32)
    sf.write(str(tmp_path / "burst.wav"), x, 16000, subtype="FLOAT")
    result = audio.normalize_to_wav(tmp_path / "burst.wav", tmp_path / "out.wav")
    check_normalized(result)


def test_hot_input_is_turned_down(lecture_wav: Path, tmp_path: Path):
    src = encode_audio(lecture_wav, tmp_path / "hot.wav", gain_db=14.0)  # clips: peaks at 0 dBFS
    result = audio.normalize_to_wav(src, tmp_path / "out.wav")
    assert result.gain_db < 0
    check_normalized(result)


def test_stereo_is_averaged_to_mono(lecture_wav: Path, tmp_path: Path):
    x, _ = sf.read(str(lecture_wav), dtype="float32")
    mono = audio.normalize_to_wav(lecture_wav, tmp_path / "mono.wav")
    sf.write(str(tmp_path / "dual.wav"), np.stack([x, x], axis=1), 16000, subtype="FLOAT")
    dual = audio.normalize_to_wav(tmp_path / "dual.wav", tmp_path / "d.wav")
    # Two identical channels average to the same signal: the same loudness, not 3 dB more or less.
    assert dual.loudness_in.integrated_lufs == pytest.approx(mono.loudness_in.integrated_lufs, abs=0.15)
    # One silent channel: the average is the speech at half amplitude (-6 dB).
    sf.write(str(tmp_path / "left.wav"), np.stack([x, np.zeros_like(x)], axis=1), 16000, subtype="FLOAT")
    left = audio.normalize_to_wav(tmp_path / "left.wav", tmp_path / "l.wav")
    assert left.loudness_in.integrated_lufs == pytest.approx(mono.loudness_in.integrated_lufs - 6.0, abs=0.3)


def test_surround_downmixes(lecture_wav: Path, tmp_path: Path):
    src = encode_audio(lecture_wav, tmp_path / "six.wav", sample_rate=48000, channels=6)
    result = audio.normalize_to_wav(src, tmp_path / "out.wav")
    assert result.source.channels == 6
    check_normalized(result)


def test_measure_loudness_of_a_known_sine(tmp_path: Path):
    # BS.1770: a 997 Hz sine in one channel reads its peak level minus 3.01 dB (LUFS).
    t = np.arange(48000 * 5) / 48000
    sf.write(str(tmp_path / "sine.wav"), (0.1 * np.sin(2 * np.pi * 997 * t)).astype(np.float32), 48000)
    loud = audio.measure_loudness(tmp_path / "sine.wav")
    assert loud.integrated_lufs == pytest.approx(-20.0 - 3.01, abs=0.2)
    assert loud.true_peak_dbtp == pytest.approx(-20.0, abs=0.2)
    assert loud.lra == pytest.approx(0.0, abs=0.2)


def test_read_samples_and_blocks(lecture_wav: Path):
    ref, _ = sf.read(str(lecture_wav), dtype="float32")
    part = audio.read_samples(lecture_wav, 1000, 17000)
    assert part.dtype == np.float32 and part.shape == (16000,)
    assert np.array_equal(part, ref[1000:17000])
    assert np.array_equal(audio.read_samples(lecture_wav), ref)
    blocks = list(audio.iter_blocks(lecture_wav, 10_000, start=5, stop=len(ref) - 7))
    assert all(len(b) == 10_000 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 10_000
    assert np.array_equal(np.concatenate(blocks), ref[5 : len(ref) - 7])
    with pytest.raises(ValueError, match="outside"):
        audio.read_samples(lecture_wav, 0, len(ref) + 1)


def test_write_slice(lecture_wav: Path, tmp_path: Path):
    ref, _ = sf.read(str(lecture_wav), dtype="int16")
    out = audio.write_slice(lecture_wav, 16000, 3 * 16000 + 123, tmp_path / "seg" / "0.wav")
    got, rate = sf.read(str(out), dtype="int16")
    assert rate == 16000 and np.array_equal(got, ref[16000 : 3 * 16000 + 123])  # sample-exact
    for suffix in (".mp3", ".m4a", ".flac", ".ogg"):
        info = audio.probe_audio(audio.write_slice(lecture_wav, 0, 32000, tmp_path / f"s{suffix}"))
        assert info.duration_s == pytest.approx(2.0, abs=0.08), suffix
    with pytest.raises(ValueError, match="cannot write"):
        audio.write_slice(lecture_wav, 0, 10, tmp_path / "x.aiff")


# ---------------------------------------------------------------------------------------------
# Bad input: InputError naming the input as the user gave it, and nothing written.


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, lecture_wav: Path, sample_mp3: Path):
    """Each case: (path, words the problem must contain)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty.mp3").write_bytes(b"")
    (tmp / "random.mp3").write_bytes(np.random.default_rng(0).bytes(50_000))
    (tmp / "notes.wav").write_text("these are lecture notes, not audio\n" * 50)
    (tmp / "head.mp3").write_bytes(sample_mp3.read_bytes()[:3000])  # an upload cut short
    (tmp / "half.mp3").write_bytes(sample_mp3.read_bytes()[: sample_mp3.stat().st_size // 2])
    x, _ = sf.read(str(lecture_wav), dtype="float32")
    sf.write(str(tmp / "short.wav"), x[:8000], 16000)
    sf.write(str(tmp / "silent.wav"), np.zeros(48000, np.float32), 16000)
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=25",
        "-t",
        "1",
        "-c:v",
        "libx264",
        str(tmp / "video.mp4"),
    )
    (tmp / "folder.mp3").mkdir()
    return {
        "missing": (tmp / "nope.mp3", "not found"),
        "folder": (tmp / "folder.mp3", "folder"),
        "empty": (tmp / "empty.mp3", "empty"),
        "random bytes": (tmp / "random.mp3", "not an audio file"),
        "text": (tmp / "notes.wav", "not an audio file"),
        "truncated": (tmp / "head.mp3", "truncated"),
        "half an upload": (tmp / "half.mp3", "truncated"),
        "no audio stream": (tmp / "video.mp4", "no audio stream"),
        "too short": (tmp / "short.wav", "at least 1 second"),
        "silence": (tmp / "silent.wav", "silent"),
    }


BAD = ["missing", "folder", "empty", "random bytes", "text", "truncated", "half an upload", "no audio stream"]
BAD += ["too short", "silence"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_input_error(case: str, bad_inputs: dict[str, tuple[Path, str]], tmp_path: Path):
    path, words = bad_inputs[case]
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        audio.normalize_to_wav(path, out / "lecture.wav", subject=f"--audio {path.name}")
    assert err.value.subject == f"--audio {path.name}"
    assert words in err.value.problem
    assert not out.exists() or not any(out.iterdir())  # no output, no temporary files
