"""VideoWriter, probe and assemble against real files made by PyAV/libx264 and ffmpeg."""

from __future__ import annotations

import hashlib
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from liveavatar_core.audio import publish_track
from liveavatar_core.engines.base import Engine, GenerationConfig, Rung, SegmentRequest, SegmentResult
from liveavatar_core.engines.ladder import generate_with_ladder
from liveavatar_core.errors import MediaError, OutOfMemory
from liveavatar_core.media import THREADS_ENV, VideoWriter, assemble, ffmpeg_exe, probe
from liveavatar_core.timebase import SAMPLES_PER_FRAME
from tests.fixtures.media import synthetic_frames, write_segment

W, H = 96, 128


def _decode_rgb(path: Path) -> tuple[np.ndarray, list[int], list[int]]:
    """All frames as RGB, their timestamps in frames, and the indices of keyframes."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, pts, keys = [], [], []
        for i, frame in enumerate(container.decode(stream)):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(round(float(frame.pts * stream.time_base) * 25))
            if frame.key_frame:
                keys.append(i)
    return np.stack(frames), pts, keys


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def test_writer_encodes_h264_with_fixed_closed_gop(segment_factory):
    path = segment_factory(60)
    info = probe(path)
    assert info.audio is None
    v = info.video
    assert (v.codec, v.width, v.height, v.fps, v.frames) == ("h264", W, H, 25.0, 60)
    assert v.start_s == 0.0 and v.duration_s == pytest.approx(2.4, abs=1e-9)
    frames, pts, keys = _decode_rgb(path)
    assert pts == list(range(60))  # constant 25 fps, no gaps or repeats
    assert keys == [0, 25, 50]  # one keyframe a second, no scene-cut extras
    assert _psnr(frames, synthetic_frames(60, H, W)) > 30  # faithful, colours not swapped
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert not list(path.parent.glob(".*.part*"))


def test_writer_keeps_rgb_channel_order(tmp_path):
    red = np.zeros((3, H, W, 3), np.uint8)
    red[..., 0] = 220
    with VideoWriter(tmp_path / "red.mp4", W, H) as writer:
        writer.write(red)
    frames, _, _ = _decode_rgb(tmp_path / "red.mp4")
    r, g, b = frames[..., 0].mean(), frames[..., 1].mean(), frames[..., 2].mean()
    assert r > 200 and g < 30 and b < 30


def test_writer_keeps_to_the_process_thread_cap(tmp_path, monkeypatch):
    frames = synthetic_frames(30, H, W)
    monkeypatch.setenv(THREADS_ENV, "1")
    with VideoWriter(tmp_path / "capped.mp4", W, H) as writer:
        assert writer._stream.codec_context.thread_count == 1
        writer.write(frames)
    monkeypatch.delenv(THREADS_ENV)
    with VideoWriter(tmp_path / "free.mp4", W, H) as writer:
        assert writer._stream.codec_context.thread_count == 0  # the codec's own choice
        writer.write(frames)
    decoded, _, _ = _decode_rgb(tmp_path / "capped.mp4")
    assert len(decoded) == 30 and _psnr(decoded, frames) > 30


def test_writer_resizes_frames_of_another_size(tmp_path):
    small = synthetic_frames(10, H // 2, W // 2)
    path = tmp_path / "resized.mp4"
    with VideoWriter(path, W, H) as writer:
        writer.write(small)
        writer.write(small[0])  # a single [h, w, 3] frame is accepted
        assert writer.frames_written == 11
    info = probe(path)
    assert (info.video.width, info.video.height, info.video.frames) == (W, H, 11)
    frames, _, _ = _decode_rgb(path)
    # Same picture, scaled: compare at the small size.
    shrunk = np.stack([frames[i, ::2, ::2] for i in range(10)])
    assert _psnr(shrunk, small) > 24


def test_abort_removes_everything(tmp_path):
    path = tmp_path / "seg.mp4"
    writer = VideoWriter(path, W, H)
    writer.write(synthetic_frames(30, H, W))
    assert list(tmp_path.iterdir())  # something is being written
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        writer.write(synthetic_frames(1, H, W))


def test_context_manager_aborts_on_error(tmp_path):
    path = tmp_path / "seg.mp4"
    with pytest.raises(RuntimeError), VideoWriter(path, W, H) as writer:
        writer.write(synthetic_frames(5, H, W))
        raise RuntimeError("engine failed")
    assert list(tmp_path.iterdir()) == []


def test_close_without_frames_is_an_error_and_leaves_nothing(tmp_path):
    writer = VideoWriter(tmp_path / "empty.mp4", W, H)
    with pytest.raises(MediaError):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "odd.mp4", 95, H)
    writer = VideoWriter(tmp_path / "seg.mp4", W, H)
    with pytest.raises(ValueError):
        writer.write(np.zeros((2, H, W, 3), np.float32))
    with pytest.raises(ValueError):
        writer.write(np.zeros((2, H, W), np.uint8))
    writer.abort()


def test_probe_reads_a_file_made_by_ffmpeg(tmp_path):
    path = tmp_path / "ref.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "2", "-ac", "2",
         "-c:v", "libx264", "-c:a", "aac", str(path)],
        check=True,
    )  # fmt: skip
    info = probe(path)
    v, a = info.video, info.audio
    assert (v.codec, v.width, v.height, v.fps, v.frames) == ("h264", 320, 240, 30.0, 60)
    assert v.start_s == 0.0 and v.duration_s == pytest.approx(2.0, abs=1e-6)
    assert (a.codec, a.sample_rate, a.channels) == ("aac", 48000, 2)
    assert a.start_s == 0.0 and a.duration_s == pytest.approx(2.0, abs=0.03)
    assert info.duration_s == pytest.approx(2.0, abs=0.03)
    assert info.to_dict()["video"]["frames"] == 60


def test_probe_wav(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(16_000 + 320, np.float32), 16_000)
    info = probe(tmp_path / "a.wav")
    assert info.video is None
    assert (info.audio.codec, info.audio.sample_rate, info.audio.channels) == ("pcm_s16le", 16_000, 1)
    assert info.audio.duration_s == pytest.approx(1.02, abs=1e-9)


def test_probe_of_garbage_is_a_media_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(MediaError):
        probe(bad)
    with pytest.raises(MediaError):
        probe(tmp_path / "missing.mp4")


def _audio_offset(original: np.ndarray, muxed: Path) -> tuple[int, np.ndarray]:
    """Lag (samples) of the muxed audio track against the original, by cross-correlation."""
    with av.open(str(muxed)) as container:
        decoded = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    n = min(len(original), len(decoded)) - 4000
    ref = original[2000:n]
    lags = range(-400, 401)
    scores = [float(np.dot(ref, decoded[2000 + lag : n + lag])) for lag in lags]
    return lags[int(np.argmax(scores))], decoded


@pytest.fixture
def three_segments(tmp_path):
    """Three segments with lengths that are not whole GOPs, continuing one picture sequence."""
    lengths = [60, 37, 113]
    paths, start = [], 0
    for k, n in enumerate(lengths):
        paths.append(write_segment(tmp_path / f"seg{k}.mp4", n, start=start))
        start += n
    return paths, lengths


def test_assemble_three_segments_keeps_sync(tmp_path, three_segments, speechlike_wav_factory):
    paths, lengths = three_segments
    total = sum(lengths)
    samples = total * SAMPLES_PER_FRAME - 300  # last frame only partly covered, as in production
    speech = speechlike_wav_factory(samples / 16_000)
    assert speech.samples == samples
    out = tmp_path / "out" / "lecture.mp4"
    info = assemble(paths, speech.path, out)
    assert info == probe(out)
    v, a = info.video, info.audio
    assert (v.codec, v.width, v.height, v.frames) == ("h264", W, H, total)
    assert (a.codec, a.sample_rate, a.channels) == ("aac", 16_000, 1)
    assert v.start_s == 0.0 and a.start_s == 0.0
    assert v.duration_s == pytest.approx(total / 25, abs=1e-9)
    assert a.duration_s == pytest.approx(samples / 16_000, abs=1e-6)  # priming trimmed by the edit list
    assert 0 <= v.duration_s - a.duration_s < 0.04

    frames, pts, keys = _decode_rgb(out)
    assert pts == list(range(total))  # joined without gaps, repeats or re-timing
    assert keys == [0, 25, 50, 60, 85, 97, 122, 147, 172, 197]  # the segments' own GOPs: not re-encoded
    assert _psnr(frames, synthetic_frames(total, H, W)) > 30

    original, _ = sf.read(speech.path, dtype="float32")
    lag, decoded = _audio_offset(original, out)
    assert lag == 0  # measured: the muxed audio lines up with the lecture audio to the sample
    assert len(decoded) >= samples
    assert not list(out.parent.glob(".*")) and not list(out.parent.glob("*.txt"))


def _slices(files: list[Path | str]) -> list[bytes]:
    """The coded pictures of all video packets: length-prefixed NAL units minus parameter sets.

    The concat demuxer repeats SPS/PPS in band at keyframes (its auto_convert); the pictures
    themselves must come through byte for byte.
    """
    out = []
    for f in files:
        with av.open(str(f)) as container:
            for packet in container.demux(video=0):
                data, pos, kept = bytes(packet), 0, b""
                while pos < len(data):
                    size = int.from_bytes(data[pos : pos + 4], "big")
                    nal = data[pos + 4 : pos + 4 + size]
                    if nal and nal[0] & 0x1F not in (7, 8):  # 7: SPS, 8: PPS
                        kept += nal
                    pos += 4 + size
                if kept:
                    out.append(hashlib.sha1(kept).digest())
    return out


def test_assemble_is_lossless_for_video(tmp_path, three_segments, speechlike_wav_factory):
    paths, lengths = three_segments
    speech = speechlike_wav_factory(sum(lengths) / 25)
    out = assemble(paths, speech.path, tmp_path / "lecture.mp4")
    joined = _slices([out.path])
    assert len(joined) == sum(lengths)
    assert joined == _slices(paths)


def test_assemble_copies_preencoded_aac(tmp_path, three_segments, speechlike_wav_factory):
    paths, lengths = three_segments
    speech = speechlike_wav_factory(sum(lengths) / 25 - 0.01)
    m4a = probe(publish_track(speech.path, tmp_path / "audio.m4a").path)
    assert m4a.audio.codec == "aac" and m4a.audio.start_s == 0.0
    info = assemble(paths, m4a.path, tmp_path / "lecture.mp4")
    assert info.audio.start_s == 0.0
    assert info.audio.duration_s == pytest.approx(speech.duration_s, abs=1e-6)
    with av.open(m4a.path) as a, av.open(info.path) as b:
        assert [bytes(p) for p in a.demux(audio=0) if p.size] == [
            bytes(p) for p in b.demux(audio=0) if p.size
        ]
    original, _ = sf.read(speech.path, dtype="float32")
    assert _audio_offset(original, Path(info.path))[0] == 0


def test_assemble_handles_quotes_in_paths(tmp_path, speechlike_wav_factory):
    odd = tmp_path / "it's a 'segment'.mp4"
    write_segment(odd, 30)
    speech = speechlike_wav_factory(2.4)
    info = assemble([odd, odd], speech.path, tmp_path / "out.mp4")
    assert info.video.frames == 60


def test_assemble_refuses_audio_of_another_length(tmp_path, speechlike_wav_factory):
    seg = write_segment(tmp_path / "seg.mp4", 50)
    long_audio = speechlike_wav_factory(2.0 + 0.08)
    with pytest.raises(MediaError, match="within one frame"):
        assemble([seg], long_audio.path, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_assemble_refuses_mismatched_segments(tmp_path, speechlike_wav_factory):
    a = write_segment(tmp_path / "a.mp4", 25)
    b = write_segment(tmp_path / "b.mp4", 25, width=W + 16)
    speech = speechlike_wav_factory(2.0)
    with pytest.raises(MediaError, match="unlike"):
        assemble([a, b], speech.path, tmp_path / "out.mp4")
    with pytest.raises(MediaError):
        assemble([], speech.path, tmp_path / "out.mp4")


def test_stream_time_base_is_exact_for_25_fps(segment_factory):
    path = segment_factory(3)
    with av.open(str(path)) as c:
        tb = c.streams.video[0].time_base
    assert (Fraction(1, 25) / tb).denominator == 1  # every frame boundary is a whole number of ticks


class _TwoRungEngine(Engine):
    """A stand-in engine: the full rung runs out of memory half way, the small rung succeeds."""

    name = "two-rung"
    version = "test"

    def estimate_memory(self, config: GenerationConfig, num_frames: int | None = None) -> int:
        return 0

    def ladder(self, config: GenerationConfig) -> list[Rung]:
        return [
            Rung("full", config, "nothing"),
            Rung("small", config.replace(height=64, width=48), "quality"),
        ]

    def _generate(self, request: SegmentRequest, sink) -> SegmentResult:
        cfg = request.config
        if cfg.height == H:
            sink.write(synthetic_frames(request.num_frames // 2, cfg.height, cfg.width))
            raise OutOfMemory("CUDA out of memory (simulated)")
        for first in range(0, request.num_frames, 12):
            sink.write(synthetic_frames(min(12, request.num_frames - first), cfg.height, cfg.width, first))
        return SegmentResult(request.num_frames, b"", 0.0, 0)


def test_writer_is_an_attempt_sink_for_the_ladder(tmp_path):
    path = tmp_path / "segment.mp4"
    request = SegmentRequest(
        audio=np.zeros(50 * SAMPLES_PER_FRAME - 100, np.float32),
        num_frames=50,
        portrait=np.zeros((H, W, 3), np.uint8),
        prompt="",
        seed=0,
        config=GenerationConfig(height=H, width=W),
    )
    outcome = generate_with_ladder(_TwoRungEngine(), request, lambda: VideoWriter(path, W, H))
    assert [(a.rung, a.error is None) for a in outcome.attempts] == [("full", False), ("small", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segment.mp4"]  # the failed attempt left nothing
    info = probe(path)
    assert (info.video.width, info.video.height, info.video.frames) == (W, H, 50)  # output size kept
