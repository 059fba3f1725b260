"""Media I/O at the line's edge: encode segments, probe files, join segments and mux the audio once.

* `VideoWriter` encodes frames as they are made (PyAV, libx264) into one video-only segment. Every
  segment of a lecture uses identical settings, so segments join without re-encoding.
* `probe` reads container and stream facts with PyAV, without decoding.
* `assemble` joins segments with ffmpeg's concat demuxer (`-c copy`) and muxes the whole lecture
  audio once (the published AAC track is copied; +faststart). Muxing the audio once keeps lip sync: per-segment AAC would add
  priming samples at every cut.

See docs/media.md for which library does what and why.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import imageio_ffmpeg
import numpy as np

from .errors import MediaError
from .timebase import FPS

# Encoder settings shared by every segment. veryfast/crf 20: near-transparent for talking heads at
# several times real time on two cores (docs/media.md has the measurements). A fixed, closed GOP
# of one second puts a keyframe at every second of every segment (QC samples those).
DEFAULT_PRESET = "veryfast"
DEFAULT_CRF = 20
# A process's CPU-thread cap for the encoder (0 or unset: the codec's own choice, every core). GPU
# workers set it to their share of the host (cores / GPUs), so N encoders do not each take every core.
THREADS_ENV = "LIVEAVATAR_CPU_THREADS"
GOP = FPS
# AAC for a WAV given to `assemble` as is (tests; the flow hands it audio.publish_track's AAC, copied).
AUDIO_BITRATE = "96k"


def ffmpeg_exe() -> str:
    """Path of the static ffmpeg binary shipped by imageio-ffmpeg (there is no system ffmpeg)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def _part_path(path: Path) -> Path:
    """A fresh hidden file beside `path` to write into until complete (same folder: atomic rename).

    Unique per call, so two writers of one target never share a part file; the suffix is kept
    because PyAV and ffmpeg pick the container format by it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


class VideoWriter:
    """Encode RGB frames incrementally to a video-only H.264 file (an engine's AttemptSink).

    Frames go to a hidden part file next to `path`; `close()` finalises and renames it to `path`,
    `abort()` deletes it. Frames of another size than (height, width) are resized to it: a degraded
    rung may generate a smaller area while the lecture's output size stays fixed. Resizing stretches
    to fill; it does not preserve a differing aspect ratio.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        fps: int = FPS,
        *,
        preset: str = DEFAULT_PRESET,
        crf: int = DEFAULT_CRF,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"yuv420p needs positive, even dimensions, got {width}x{height}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self._frames = 0
        self._state = "open"
        self._part = _part_path(self.path)
        try:
            self._container = av.open(str(self._part), mode="w")
            stream = self._container.add_stream("libx264", rate=fps)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            threads = int(os.environ.get(THREADS_ENV) or 0)
            if threads > 0:
                stream.codec_context.thread_count = threads
            stream.options = {
                "preset": preset,
                "crf": str(crf),
                # Fixed closed GOP, no scene-cut keyframes: identical structure in every segment.
                "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0:open-gop=0",
            }
            self._stream = stream
        except av.error.FFmpegError as exc:
            self._discard()
            raise MediaError(f"cannot start encoding {self.path}: {exc}") from exc

    @property
    def frames_written(self) -> int:
        return self._frames

    def write(self, frames: np.ndarray) -> None:
        """Encode uint8 RGB frames [n, h, w, 3] (a single [h, w, 3] frame is accepted too)."""
        if self._state != "open":
            raise ValueError(f"VideoWriter for {self.path} is {self._state}")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [n, h, w, 3], got {frames.dtype} {frames.shape}")
        try:
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(self._to_i420(rgb), format="yuv420p")
                frame.pts = self._frames
                frame.time_base = Fraction(1, self.fps)
                self._container.mux(self._stream.encode(frame))
                self._frames += 1
        except av.error.FFmpegError as exc:
            raise MediaError(f"encoding {self.path} failed at frame {self._frames}: {exc}") from exc

    def _to_i420(self, rgb: np.ndarray) -> np.ndarray:
        """Resize to the output size if needed, then convert to planar YUV 4:2:0 (BT.601, limited)."""
        h, w = rgb.shape[:2]
        if (h, w) != (self.height, self.width):
            shrink = h >= self.height and w >= self.width
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (self.width, self.height), interpolation=interp)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420)

    def close(self) -> None:
        """Flush the encoder, finish the file and move it to `path`. No-op when already closed."""
        if self._state == "closed":
            return
        if self._state != "open":
            raise ValueError(f"VideoWriter for {self.path} is {self._state}")
        if self._frames == 0:
            self.abort()
            raise MediaError(f"no frames were written to {self.path}")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
        except av.error.FFmpegError as exc:
            self._discard()
            raise MediaError(f"finishing {self.path} failed: {exc}") from exc
        os.replace(self._part, self.path)
        self._state = "closed"

    def abort(self) -> None:
        """Stop and delete what was written. No-op after close(): a finished file is kept."""
        if self._state == "open":
            self._discard()

    def _discard(self) -> None:
        self._state = "aborted"
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except (av.error.FFmpegError, ValueError):
                pass  # the file is deleted next; a failed flush does not matter
        self._part.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class VideoStreamInfo:
    codec: str
    width: int
    height: int
    fps: float
    frames: int  # from the container's index (mp4: sample table); packets counted where it has none
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class AudioStreamInfo:
    codec: str
    sample_rate: int
    channels: int
    start_s: float  # after the container's edit list (AAC priming is not counted)
    duration_s: float


@dataclass(frozen=True)
class MediaInfo:
    path: str
    format: str
    duration_s: float
    video: VideoStreamInfo | None
    audio: AudioStreamInfo | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _count_packets(path: Path, stream_index: int) -> int:
    """Frames of a stream whose container keeps no count: demux (no decoding) and count packets."""
    with av.open(str(path)) as container:
        stream = container.streams[stream_index]
        return sum(1 for packet in container.demux(stream) if packet.size)


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Container and first video/audio stream facts, read from metadata (nothing is decoded).

    Raises MediaError when the file cannot be opened or parsed. Callers probing a user's input
    should turn that into an InputError naming the input.
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            duration = _seconds(container.duration, Fraction(1, av.time_base)) or 0.0
            video = audio = None
            if container.streams.video:
                vs = container.streams.video[0]
                rate = vs.average_rate or vs.guessed_rate or vs.base_rate
                frames = vs.frames or _count_packets(path, vs.index)
                vstart = _seconds(vs.start_time, vs.time_base) or 0.0
                vdur = _seconds(vs.duration, vs.time_base)
                if vdur is None:
                    vdur = frames / float(rate) if rate else duration
                video = VideoStreamInfo(
                    codec=vs.codec_context.name,
                    width=vs.codec_context.width,
                    height=vs.codec_context.height,
                    fps=float(rate) if rate else 0.0,
                    frames=frames,
                    start_s=vstart,
                    duration_s=vdur,
                )
            if container.streams.audio:
                st = container.streams.audio[0]
                adur = _seconds(st.duration, st.time_base)
                audio = AudioStreamInfo(
                    codec=st.codec_context.name,
                    sample_rate=st.codec_context.sample_rate,
                    channels=st.codec_context.channels,
                    start_s=_seconds(st.start_time, st.time_base) or 0.0,
                    duration_s=duration if adur is None else adur,
                )
            return MediaInfo(str(path), container.format.name, duration, video, audio)
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot probe {path}: {exc}") from exc


def _aac_args(bitrate: str) -> list[str]:
    """ffmpeg's native AAC encoder (default 'twoloop' coder: its 'fast' coder is 4x faster but
    measurably worse at speech bitrates)."""
    return ["-c:a", "aac", "-b:a", bitrate]


def _run_ffmpeg(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run the bundled ffmpeg quietly; raise MediaError with its last lines when it fails."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    except OSError as exc:
        raise MediaError(f"{what}: cannot run ffmpeg: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise MediaError(f"{what}: ffmpeg exited with {proc.returncode}: {tail}")
    return proc


def _concat_line(path: Path) -> str:
    """One concat-demuxer list entry; single quotes in paths are escaped the way the demuxer reads."""
    quoted = str(path.resolve()).replace("'", "'\\''")
    return f"file '{quoted}'\n"


def assemble(
    segment_paths: list[str | os.PathLike[str]],
    audio_wav: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    audio_bitrate: str = AUDIO_BITRATE,
) -> MediaInfo:
    """Join video-only segments without re-encoding, mux the lecture audio once; return the probe.

    Segments must share codec, size and frame rate (they do when written by VideoWriter with one
    lecture's settings). Audio and joined video must last the same to within one frame (the video
    has ceil(samples / 640) frames, so it runs up to one frame past the audio). Both
    streams start at 0 (the mp4 edit list hides AAC priming). The output is written to a temporary
    file and renamed, so `out_path` only ever holds a complete file.

    `audio_wav` may also be AAC already (`audio.publish_track`, run while segments are generated):
    it is then copied, and assembling an hour takes seconds instead of a minute of AAC encoding.
    """
    segments = [Path(p) for p in segment_paths]
    out = Path(out_path)
    if not segments:
        raise MediaError(f"no segments to assemble into {out}")
    infos = [probe(p) for p in segments]
    for seg, info in zip(segments, infos, strict=True):
        if info.video is None or info.audio is not None:
            raise MediaError(f"segment {seg} must hold exactly one video stream and no audio")
    first = infos[0].video
    assert first is not None
    for seg, info in zip(segments, infos, strict=True):
        v = info.video
        assert v is not None
        if (v.codec, v.width, v.height, v.fps) != (first.codec, first.width, first.height, first.fps):
            raise MediaError(
                f"segment {seg} is {v.codec} {v.width}x{v.height} @ {v.fps} fps, "
                f"unlike {segments[0]} ({first.codec} {first.width}x{first.height} @ {first.fps} fps)"
            )
    frames = sum(info.video.frames for info in infos if info.video)
    video_s = frames / first.fps
    audio = probe(audio_wav)
    if audio.audio is None:
        raise MediaError(f"{audio_wav} has no audio stream")
    audio_codec = ["-c:a", "copy"] if audio.audio.codec == "aac" else _aac_args(audio_bitrate)
    gap = video_s - audio.audio.duration_s
    if abs(gap) >= 1.0 / first.fps:
        raise MediaError(
            f"audio {audio_wav} lasts {audio.audio.duration_s:.3f} s but the {len(segments)} segments "
            f"hold {frames} frames ({video_s:.3f} s); they must agree to within one frame"
        )

    part = _part_path(out)
    with tempfile.NamedTemporaryFile(
        "w", prefix=f".{out.stem}.", suffix=".concat.txt", dir=out.parent, delete=False
    ) as listing:
        listing.writelines(_concat_line(p) for p in segments)
    try:
        # Fragments of the command, in order: the joined segments, the audio, stream choice, copy
        # the video, encode the audio once, put the index first for progressive playback.
        _run_ffmpeg(
            [
                "-loglevel", "error", "-y",
                "-f", "concat", "-safe", "0", "-i", listing.name,
                "-i", str(audio_wav),
                "-map", "0:v:0", "-map", "1:a:0",
                "-c:v", "copy",
                *audio_codec,
                "-movflags", "+faststart",
                "-f", "mp4", str(part),
            ],
            f"assembling {out}",
        )  # fmt: skip
        os.replace(part, out)
    finally:
        Path(listing.name).unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return probe(out)
