"""Lecture audio: probe, decode to 16 kHz mono, loudness-normalise, read back in blocks, write slices.

Everything streams: ffmpeg decodes and normalises in a subprocess, soundfile reads the result back
block by block, so memory stays flat however long the lecture is. docs/audio.md says which library
does what and why, and how fast it is.

Normalisation is two passes over the 16 kHz mono signal, both in the bundled ffmpeg:

1. decode + downmix + resample to 16 kHz (float, so nothing clips yet) and measure it with the
   EBU R128 meter (`ebur128`: integrated loudness, loudness range, true peak);
2. apply the gain that brings the measured loudness to the target, then a look-ahead peak limiter
   that holds peaks under the true-peak ceiling (with a margin for inter-sample peaks), and measure
   the result again; if its true peak is still over, redo pass 2 with a lower ceiling.

This is the measure-then-apply scheme of ffmpeg's two-pass `loudnorm`, without `loudnorm` itself:
that filter always works at 192 kHz and costs about a CPU-minute per hour of audio per pass on this
machine, which alone would blow the preparation budget (docs/audio.md has the numbers).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import soundfile as sf

from .errors import InputError, MediaError
from .media import ffmpeg_exe
from .timebase import AUDIO_SAMPLE_RATE

SAMPLE_RATE = AUDIO_SAMPLE_RATE  # the normalised WAV's rate (16 kHz mono PCM16)
MIN_DURATION_S = 1.0
_MIN_NEEDED = "a lecture needs at least 1 second of audio"
# Quieter than this (EBU R128's absolute gate is -70 LUFS) is silence: nothing to normalise or lip-sync.
SILENCE_LUFS = -69.0
# PyAV < 19 decodes container metadata strictly unless told otherwise (one odd tag in an upload would
# fail the probe); 19 always decodes it leniently (surrogateescape) and no longer takes the option.
_LENIENT_METADATA = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}
# The limiter runs at 2x the output rate and holds peaks this far under the true-peak target,
# leaving room for what 2x oversampling misses. The written file's true peak is measured (4x, as
# BS.1770 says), and pass 2 is redone with a lower ceiling in the rare case it is still over.
LIMITER_MARGIN_DB = 0.5
LIMITER_OVERSAMPLE = 2
# Decoding less than this fraction of the duration the header promises (less a second) means a
# truncated or damaged file, not encoder padding.
TRUNCATED_FRACTION = 0.9

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class AudioInfo:
    """Facts about a source's first audio stream, read without decoding it."""

    duration_s: float
    sample_rate: int
    channels: int
    codec: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Loudness:
    """EBU R128 measurements: integrated loudness (LUFS), true peak (dBTP), loudness range (LU)."""

    integrated_lufs: float
    true_peak_dbtp: float
    lra: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class NormalizedAudio:
    """The 16 kHz mono PCM16 WAV made by `normalize_to_wav`, and what was measured on the way."""

    path: Path
    samples: int
    source: AudioInfo
    loudness_in: Loudness  # of the 16 kHz mono downmix, before any gain
    loudness_out: Loudness  # of the written WAV
    gain_db: float  # linear gain applied before the true-peak limiter

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE


def probe_audio(path: PathLike, *, subject: str | None = None) -> AudioInfo:
    """Facts about the first audio stream of `path` (any container FFmpeg reads).

    Raises InputError naming `subject` (default: the path) when the file is missing, is not
    media, or has no audio stream.
    """
    path = Path(path)
    subject = subject or str(path)
    _check_file(path, subject)
    try:
        with av.open(str(path), **_LENIENT_METADATA) as container:
            if not container.streams.audio:
                raise InputError(subject, "has no audio stream (is it the right file?)")
            stream = container.streams.audio[0]
            codec = stream.codec_context.name
            rate = stream.codec_context.sample_rate or stream.rate or 0
            channels = stream.codec_context.channels or 0
            duration = _stream_duration(container, stream)
    except InputError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(subject, f"is not an audio file FFmpeg can read ({_av_reason(exc)})") from None
    if rate <= 0 or channels <= 0:
        raise InputError(subject, "has an audio stream without a sample rate or channels (corrupt header?)")
    return AudioInfo(duration_s=duration, sample_rate=rate, channels=channels, codec=codec)


def normalize_to_wav(
    src: PathLike,
    dst_wav: PathLike,
    *,
    target_lufs: float = -16.0,
    true_peak_db: float = -1.5,
    subject: str | None = None,
    tap: SampleTap | None = None,
) -> NormalizedAudio:
    """Decode `src` to a 16 kHz mono PCM16 WAV at `target_lufs`, true peaks under `true_peak_db`.

    `dst_wav` appears only when complete (written beside it, then renamed). `tap`, if given, is fed
    the written samples while they are written (pass `vad.SpeechDetector()` to find speech on the
    second core at no extra wall time). Raises InputError naming `subject` (default: the path) for a
    missing, unreadable, corrupt or truncated file, audio shorter than 1 s, or silence.
    """
    src, dst = Path(src), Path(dst_wav)
    subject = subject or str(src)
    info = probe_audio(src, subject=subject)
    if info.duration_s < MIN_DURATION_S:
        raise InputError(subject, f"is {info.duration_s:.2f} seconds long; {_MIN_NEEDED}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    decoded = _temp_path(dst, ".decoded.wav")
    part = _temp_path(dst, ".part.wav")
    try:
        loud_in = _decode_and_measure(src, decoded, info, subject)
        samples = sf.info(str(decoded)).frames
        if samples < MIN_DURATION_S * SAMPLE_RATE:
            hint = " (the file looks truncated or corrupt)" if info.duration_s >= MIN_DURATION_S else ""
            raise InputError(
                subject,
                f"decodes to only {samples / SAMPLE_RATE:.2f} seconds of audio; {_MIN_NEEDED}{hint}",
            )
        decoded_s = samples / SAMPLE_RATE
        if decoded_s < TRUNCATED_FRACTION * info.duration_s - 1.0:
            raise InputError(
                subject,
                f"decodes to only {decoded_s:.1f} seconds of audio but its header says "
                f"{info.duration_s:.1f} seconds; the file looks truncated or corrupt (was the upload complete?)",
            )
        if not loud_in.integrated_lufs > SILENCE_LUFS:
            raise InputError(
                subject, "is silent (no sound above -70 LUFS); it must contain the lecture's speech"
            )
        gain_db = target_lufs - loud_in.integrated_lufs
        margin = LIMITER_MARGIN_DB
        for _ in range(3):
            loud_out, out_samples = _apply_gain_and_limit(decoded, part, gain_db, true_peak_db - margin, tap)
            over = loud_out.true_peak_dbtp - true_peak_db
            if over <= 0:
                break
            # Inter-sample peaks rose past the ceiling more than the margin allowed for: lower it.
            margin += over + 0.2
        else:
            raise MediaError(
                f"normalising {src}: the true peak stays at {loud_out.true_peak_dbtp:+.1f} dBTP, "
                f"over the {true_peak_db:+.1f} dBTP ceiling"
            )
        if out_samples != samples:
            raise MediaError(f"normalising {src} changed its length: {samples} -> {out_samples} samples")
        os.replace(part, dst)
    finally:
        decoded.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return NormalizedAudio(
        path=dst, samples=samples, source=info, loudness_in=loud_in, loudness_out=loud_out, gain_db=gain_db
    )


# What a viewer hears: the lecture at its own rate (the AAC rate at or above it, 48 kHz at most), stereo
# when the source has two or more channels, mono otherwise; AAC bitrates by channel count.
PUBLISH_RATES = (16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
PUBLISH_BITRATES = {1: "96k", 2: "128k"}
# The published track is iterated until its integrated loudness, measured on the encoded AAC as QC
# measures it, is this close to the target (QC allows 1 LU).
PUBLISH_TOLERANCE_LU = 0.3
# The published track's limiter starts this far under the AAC's true-peak cap: the encoder overshoots
# the limited PCM's true peak by 0.5-2 dB (measured, docs/audio.md); a pass that still ends over the
# cap is redone with a lower ceiling.
PUBLISH_LIMITER_MARGIN_DB = 1.5
_PUBLISH_PASSES = 8


@dataclass(frozen=True)
class PublishedTrack:
    """The AAC track made by `publish_track` and how it was made."""

    path: Path
    sample_rate: int
    channels: int
    bitrate: str
    loudness_in: Loudness  # of the source in the published layout and rate, before any gain
    loudness_out: Loudness  # of the encoded AAC, decoded and measured as QC measures it
    gain_db: float  # gain before the true-peak limiter
    passes: int  # gain-and-limit passes it took (each measured)


def publish_layout(info: AudioInfo) -> tuple[int, int]:
    """(sample rate, channels) of the published track for a source described by `info`."""
    rate = next(
        (r for r in PUBLISH_RATES if r >= min(info.sample_rate, PUBLISH_RATES[-1])), PUBLISH_RATES[-1]
    )
    return rate, 2 if info.channels >= 2 else 1


def publish_track(
    src: PathLike,
    dst: PathLike,
    *,
    target_lufs: float = -16.0,
    max_true_peak_db: float = -1.0,
    subject: str | None = None,
) -> PublishedTrack:
    """Encode `src`'s first audio stream as the lecture's published AAC track (.m4a) at `target_lufs`.

    The source keeps its rate (`publish_layout`) and its stereo; the 16 kHz mono WAV of
    `normalize_to_wav` is for the model and the voice detector only. Loudness: measure, apply gain and
    the true-peak limiter, measure again and correct the gain for what the limiter took, until the
    result is within `PUBLISH_TOLERANCE_LU` of the target (the limiter can take 1-2 LU from peaky speech);
    then encode and measure the AAC itself, whose true peak must stay under `max_true_peak_db` (AAC
    overshoots what it is given; a pass over the cap is redone with a lower limiter ceiling). `dst`
    appears only when complete.
    """
    src, dst = Path(src), Path(dst)
    subject = subject or str(src)
    info = probe_audio(src, subject=subject)
    rate, channels = publish_layout(info)
    layout = "stereo" if channels == 2 else "mono"
    shape = f"aresample=osr={rate}:ochl={layout}"
    loud_in = _meter(src, shape, subject)
    if not loud_in.integrated_lufs > SILENCE_LUFS:
        raise InputError(subject, "is silent (no sound above -70 LUFS); it must contain the lecture's speech")
    bitrate = PUBLISH_BITRATES[channels]
    gain_db = target_lufs - loud_in.integrated_lufs
    ceiling_db = max_true_peak_db - PUBLISH_LIMITER_MARGIN_DB
    tried: list[tuple[float, float]] = []  # (gain, loudness) of each measured pass since the last encode
    part = _temp_path(dst, ".part.m4a")
    try:
        for passes in range(1, _PUBLISH_PASSES + 1):
            chain = f"{shape},{_gain_and_limit(gain_db, ceiling_db, rate)}"
            limited = _meter(src, chain, subject)
            tried.append((gain_db, limited.integrated_lufs))
            if not _near(limited.integrated_lufs, target_lufs) and passes < _PUBLISH_PASSES:
                gain_db += _gain_step(tried, target_lufs)
                continue
            _run_ffmpeg(
                ["-i", str(src), "-map", "0:a:0", "-af", chain, "-c:a", "aac", "-b:a", bitrate,
                 "-f", "mp4", str(part)],
                on_error=lambda reason: MediaError(f"encoding the audio track of {src} failed: {reason}"),
            )  # fmt: skip
            loud_out = measure_loudness(part)
            over = loud_out.true_peak_dbtp - max_true_peak_db
            if over <= 0 and _near(loud_out.integrated_lufs, target_lufs):
                break
            # The encoder's own overshoot or level shift: lower the ceiling, correct the gain, go again.
            if over > 0:
                ceiling_db -= over + 0.2
            gain_db += target_lufs - loud_out.integrated_lufs
            tried.clear()
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)
    return PublishedTrack(
        path=dst, sample_rate=rate, channels=channels, bitrate=bitrate, loudness_in=loud_in,
        loudness_out=loud_out, gain_db=gain_db, passes=passes,
    )  # fmt: skip


def _near(lufs: float, target: float) -> bool:
    return abs(target - lufs) <= PUBLISH_TOLERANCE_LU + 1e-9


def _gain_step(tried: list[tuple[float, float]], target: float) -> float:
    """The gain change that should bring the next pass to `target` (a secant step on the last two passes).

    Loudness after the limiter grows with the gain, but by less than the gain once peaks are limited.
    """
    gain, loud = tried[-1]
    slope = 1.0
    if len(tried) >= 2:
        g0, l0 = tried[-2]
        if gain != g0:
            slope = min(1.0, max(0.2, (loud - l0) / (gain - g0)))
    return (target - loud) / slope


def _meter(src: Path, chain: str, subject: str) -> Loudness:
    """EBU R128 loudness of `src`'s first audio stream after the filter `chain`."""
    stderr = _run_ffmpeg(
        ["-i", str(src), "-map", "0:a:0", "-af", f"{chain},{_EBUR128}", "-f", "null", "-"],
        on_error=lambda reason: InputError(subject, f"could not be decoded ({reason})"),
    )
    return parse_ebur128_summary(stderr)


def measure_loudness(path: PathLike, *, subject: str | None = None) -> Loudness:
    """EBU R128 loudness of the first audio stream of any media file, as it is (streaming)."""
    path = Path(path)
    subject = subject or str(path)
    _check_file(path, subject)
    stderr = _run_ffmpeg(
        ["-i", str(path), "-map", "0:a:0", "-af", _EBUR128, "-f", "null", "-"],
        on_error=lambda reason: InputError(
            subject, f"could not be decoded to measure its loudness ({reason})"
        ),
    )
    return parse_ebur128_summary(stderr)


def read_samples(wav_path: PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Samples [start, stop) of a mono WAV as float32 in [-1, 1]; `stop=None` reads to the end."""
    with sf.SoundFile(str(wav_path)) as f:
        total = f.frames
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(f"{wav_path}: samples [{start}, {stop}) are outside [0, {total})")
        if f.channels != 1:
            raise ValueError(f"{wav_path}: expected mono, found {f.channels} channels")
        f.seek(start)
        return f.read(stop - start, dtype="float32")


def iter_blocks(
    wav_path: PathLike, block_samples: int, *, start: int = 0, stop: int | None = None
) -> Iterator[np.ndarray]:
    """Consecutive float32 blocks of `block_samples` (the last may be shorter) of a mono WAV."""
    if block_samples <= 0:
        raise ValueError(f"block_samples must be positive, not {block_samples}")
    with sf.SoundFile(str(wav_path)) as f:
        if f.channels != 1:
            raise ValueError(f"{wav_path}: expected mono, found {f.channels} channels")
        stop = f.frames if stop is None else min(stop, f.frames)
        f.seek(start)
        pos = start
        while pos < stop:
            block = f.read(min(block_samples, stop - pos), dtype="float32")
            if len(block) == 0:
                return
            pos += len(block)
            yield block


# Container formats for `write_slice` by file suffix: (ffmpeg format, audio codec, bitrate).
_EXPORT_FORMATS: dict[str, tuple[str, str | None, str | None]] = {
    ".wav": ("wav", None, None),
    ".mp3": ("mp3", "libmp3lame", "96k"),
    ".m4a": ("ipod", "aac", "96k"),
    ".flac": ("flac", "flac", None),
    ".ogg": ("ogg", "libvorbis", "96k"),
}


def write_slice(wav_path: PathLike, start: int, stop: int, dst: PathLike) -> Path:
    """Write samples [start, stop) of a 16 kHz mono WAV to `dst`; the suffix picks the format.

    WAV slices are sample-exact PCM16 (a segment's own audio); .mp3/.m4a/.flac/.ogg go through
    pydub and the bundled ffmpeg (for listening to a segment, or for tests).
    """
    dst = Path(dst)
    fmt = _EXPORT_FORMATS.get(dst.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{dst}: cannot write {dst.suffix or 'files without a suffix'}; "
            f"use one of {sorted(_EXPORT_FORMATS)}"
        )
    with sf.SoundFile(str(wav_path)) as f:
        rate, channels = f.samplerate, f.channels
        if not 0 <= start <= stop <= f.frames:
            raise ValueError(f"{wav_path}: samples [{start}, {stop}) are outside [0, {f.frames})")
        f.seek(start)
        pcm = f.read(stop - start, dtype="int16")  # only the slice is read, never the whole lecture
    segment = _pydub_segment(pcm.tobytes(), rate, channels)
    fmt_name, codec, bitrate = fmt
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = _temp_path(dst, f".part{dst.suffix}")
    try:
        out = segment.export(str(part), format=fmt_name, codec=codec, bitrate=bitrate)
        out.close()
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)
    return dst


# ----------------------------------------------------------------------------------------------
# ffmpeg passes

# `framelog=verbose` keeps the per-100 ms lines out of stderr at the default log level; the summary
# is printed at info level. `peak=true`: true peak by 4x oversampling (ITU-R BS.1770).
_EBUR128 = "ebur128=peak=true:framelog=verbose"


def _decode_and_measure(src: Path, dst: Path, info: AudioInfo, subject: str) -> Loudness:
    """Pass 1: first audio stream -> mono -> 16 kHz float WAV, and its EBU R128 measurement.

    Two ffmpeg processes joined by a pipe, so they use both cores: one decodes once and writes the
    WAV and a raw copy to the pipe, the other meters the copy (true peak is the costly part).
    """
    graph = f"[0:a:0]{_downmix(info.channels)}aresample={SAMPLE_RATE},asplit=2[file][meter]"
    decode_args = [
        "-i", str(src), "-filter_complex", graph,
        "-map", "[file]", "-c:a", "pcm_f32le", "-f", "wav", str(dst),
        "-map", "[meter]", "-c:a", "pcm_f32le", "-f", "f32le", "pipe:1",
    ]  # fmt: skip
    meter_args = [
        "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ch_layout", "mono", "-i", "pipe:0",
        "-af", _EBUR128, "-f", "null", "-",
    ]  # fmt: skip
    with _Ffmpeg(decode_args, stdout=subprocess.PIPE) as decoder:
        with _Ffmpeg(meter_args, stdin=decoder.proc.stdout) as meter:
            decoder.proc.stdout.close()  # the meter owns the pipe now; the decoder sees it close
            meter.wait()
        decoder.wait()
    if meter.returncode != 0 and (decoder.returncode == 0 or "broken pipe" in decoder.stderr.lower()):
        # The meter died first (the decoder only lost its reader): our fault, not the input's.
        raise MediaError(f"measuring the loudness of {src} failed: {_ffmpeg_reason(meter.stderr)}")
    if decoder.returncode != 0:
        raise InputError(subject, f"could not be decoded ({_ffmpeg_reason(decoder.stderr)})")
    if meter.returncode != 0:
        raise MediaError(f"measuring the loudness of {src} failed: {_ffmpeg_reason(meter.stderr)}")
    return parse_ebur128_summary(meter.stderr)


class SampleTap(Protocol):
    """Receives the normalised samples as they are written (e.g. vad.SpeechDetector)."""

    def reset(self) -> None:
        """Forget everything fed so far (the samples are about to be written again)."""

    def feed(self, block: np.ndarray) -> None:
        """The next float32 [n] samples, exactly as `read_samples` will read them from the WAV."""


_PIPE_BLOCK = 1 << 16  # samples per read from ffmpeg's pipe (4 s; 128 KiB of PCM16)


def _apply_gain_and_limit(
    src: Path, dst: Path, gain_db: float, ceiling_db: float, tap: SampleTap | None
) -> tuple[Loudness, int]:
    """Pass 2: gain, a look-ahead limiter at `ceiling_db` (2x oversampled), to PCM16; measured.

    ffmpeg streams PCM16 to this process, which writes the WAV and feeds `tap` while ffmpeg keeps
    working (so a tap such as the voice detector runs on the second core). Returns the output's
    loudness and its length in samples.
    """
    chain = f"{_gain_and_limit(gain_db, ceiling_db, SAMPLE_RATE)},{_EBUR128}"
    args = ["-i", str(src), "-af", chain, "-c:a", "pcm_s16le", "-f", "s16le", "pipe:1"]
    if tap is not None:
        tap.reset()
    samples = 0
    with _Ffmpeg(args, stdout=subprocess.PIPE) as ff:
        with sf.SoundFile(
            str(dst), "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16", format="WAV"
        ) as out:
            while data := ff.proc.stdout.read(2 * _PIPE_BLOCK):
                pcm = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")  # int16 [n]
                out.write(pcm)
                samples += len(pcm)
                if tap is not None:
                    tap.feed(pcm.astype(np.float32) / 32768.0)  # as soundfile reads PCM16 back
        ff.wait()
    if ff.returncode != 0:
        raise MediaError(f"normalising {src} failed: {_ffmpeg_reason(ff.stderr)}")
    return parse_ebur128_summary(ff.stderr), samples


def _gain_and_limit(gain_db: float, ceiling_db: float, rate: int) -> str:
    """Filter chain: gain, then a look-ahead peak limiter at `ceiling_db`, oversampled, at `rate`."""
    ceiling = 10 ** (ceiling_db / 20)
    if not 0.0625 <= ceiling <= 1.0:
        raise ValueError(
            f"a limiter ceiling of {ceiling_db:+.1f} dB is outside what alimiter does (-24 to 0 dB)"
        )
    return ",".join(
        [
            f"volume={gain_db:.3f}dB:precision=float",
            # 2x oversampling: the limiter sees most inter-sample peaks (and its own gain changes'
            # splatter is filtered out on the way back down), for a fraction of the cost of 4x.
            f"aresample={rate * LIMITER_OVERSAMPLE}",
            # level=false: no make-up gain; latency=true: compensate the 5 ms look-ahead, so every
            # sample stays where it was (lip sync).
            f"alimiter=limit={ceiling:.6f}:attack=5:release=50:level=false:latency=true",
            f"aresample={rate}",
        ]
    )


def _downmix(channels: int) -> str:
    """Filter prefix that makes mono: the plain average for stereo, FFmpeg's ITU matrix for more."""
    if channels == 1:
        return ""
    if channels == 2:
        return "pan=mono|c0=0.5*c0+0.5*c1,"
    return "aresample=ochl=mono,"


def _run_ffmpeg(args: list[str], *, on_error) -> str:
    """Run the bundled ffmpeg; return its stderr, or raise `on_error(reason)` when it fails."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-y", *args]
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
        )
    except OSError as exc:
        raise MediaError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc
    if proc.returncode != 0:
        raise on_error(_ffmpeg_reason(proc.stderr))
    return proc.stderr


class _Ffmpeg:
    """A running ffmpeg whose stderr goes to a temporary file (no pipe to fill up and deadlock on).

    As a context manager it kills the process if the block is left early (an error, Ctrl-C).
    """

    def __init__(self, args: list[str], **popen: Any):
        self._err = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-y", *args]
        try:
            self.proc = subprocess.Popen(cmd, stderr=self._err, **popen)
        except OSError as exc:
            self._err.close()
            raise MediaError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc
        self.returncode: int | None = None
        self.stderr = ""

    def wait(self) -> int:
        self.returncode = self.proc.wait()
        self._err.seek(0)
        self.stderr = self._err.read().decode(errors="replace")
        return self.returncode

    def __enter__(self) -> _Ffmpeg:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


_NUMBER = r"(-?inf|-?nan|-?\d+(?:\.\d+)?)"


def parse_ebur128_summary(stderr: str) -> Loudness:
    """Integrated loudness, LRA and true peak from the summary that ebur128 prints at the end."""
    summary = stderr[stderr.rfind("Summary:") :] if "Summary:" in stderr else ""
    found_i = re.search(rf"I:\s+{_NUMBER} LUFS", summary)
    found_lra = re.search(rf"LRA:\s+{_NUMBER} LU", summary)
    found_tp = re.search(rf"True peak:\s+Peak:\s+{_NUMBER} dBFS", summary)
    if found_i is None or found_lra is None or found_tp is None:
        raise MediaError("ffmpeg's ebur128 meter printed no loudness summary")
    return Loudness(
        integrated_lufs=float(found_i.group(1)),
        true_peak_dbtp=float(found_tp.group(1)),
        lra=float(found_lra.group(1)),
    )


def _ffmpeg_reason(stderr: str) -> str:
    """The last few meaningful lines ffmpeg printed, joined on one line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Input #", "Output #", "Stream mapping", "Press [q]"))]
    return " | ".join(lines[-2:]) or "ffmpeg failed without saying why"


# ----------------------------------------------------------------------------------------------
# helpers


def _check_file(path: Path, subject: str) -> None:
    if not path.exists():
        raise InputError(subject, "file not found")
    if path.is_dir():
        raise InputError(subject, "is a folder, not an audio file")
    if not os.access(path, os.R_OK):
        raise InputError(subject, "cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(subject, "is empty (0 bytes)")


def _stream_duration(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float:
    """Seconds from the stream header, else the container's; NaN when neither knows."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return math.nan


def _av_reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.strip().rstrip(".") or type(exc).__name__


def _temp_path(dst: Path, suffix: str) -> Path:
    """A fresh hidden file beside `dst` (same filesystem, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=suffix, dir=dst.parent)
    os.close(fd)
    return Path(name)


def _pydub_segment(pcm: bytes, rate: int, channels: int):
    """A pydub AudioSegment of PCM16 bytes that encodes with the bundled ffmpeg."""
    import warnings

    with warnings.catch_warnings():
        # pydub looks for a system ffmpeg when imported and warns that there is none (we hand it
        # the bundled one per segment instead); on Python 3.11+ it also imports the deprecated audioop.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from pydub import AudioSegment

    segment = AudioSegment(data=pcm, sample_width=2, frame_rate=rate, channels=channels)
    segment.converter = ffmpeg_exe()  # instance attribute: no process-wide change
    return segment
