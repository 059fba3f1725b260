"""Quality control of a finished lecture video: named checks, each with value, limit and detail.

Cost is kept far below a full decode (an hour is 90,000 frames):

* decoding: the first GOP and the last GOP are decoded in full; elsewhere only keyframes are
  decoded (every GOP starts with one: at least one a second, plus one at every segment start).
* black frames: judged on those keyframes that fall inside speech spans, so a black stretch of
  a second or more while someone speaks is always caught; a shorter flash between keyframes may
  not be.
* loudness: ffmpeg's `ebur128` filter (integrated loudness, true peak) streams the muxed audio
  track in a separate process while the keyframes are decoded here.
"""

from __future__ import annotations

import bisect
import math
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import av
import numpy as np

from .audio import Loudness, parse_ebur128_summary
from .errors import MediaError, QCFailed
from .media import MediaInfo, ffmpeg_exe, probe
from .timebase import FPS

if TYPE_CHECKING:
    from .qc_picture.picture import PictureQC

# A frame is black when 98% of its luma is at or under 10% of the limited range above black
# (16 + 0.10 * 219): the defaults of ffmpeg's blackdetect filter.
BLACK_LUMA = 16 + 0.10 * 219
BLACK_FRACTION = 0.98
START_TOLERANCE_S = 0.001
# Pixel formats whose first plane is 8-bit luma, read without conversion.
_PLANAR_8BIT = frozenset(
    {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "gray"}
)


class SpeechSpan(Protocol):
    @property
    def start_s(self) -> float: ...

    @property
    def end_s(self) -> float: ...


@dataclass
class QCCheck:
    """One named check. `value` is what was measured, `limit` what it is held to (see `detail`)."""

    name: str
    passed: bool
    value: Any
    limit: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; a non-finite number (true peak of silence: -inf) becomes None."""
        data = asdict(self)
        if isinstance(self.value, float) and not math.isfinite(self.value):
            data["value"] = None
        return data


@dataclass
class QCReport:
    video: str
    checks: list[QCCheck] = field(default_factory=list)
    seconds: float = 0.0
    picture: dict[str, Any] | None = None  # identity, lip sync, motion per segment (qc_picture)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[QCCheck]:
        return [check for check in self.checks if not check.passed]

    def check(self, name: str) -> QCCheck:
        """The check called `name` (KeyError when there is none)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "video": self.video,
            "passed": self.passed,
            "failed": [check.name for check in self.failures],
            "seconds": round(self.seconds, 3),
            "checks": [check.to_dict() for check in self.checks],
        }
        if self.picture is not None:
            data["picture"] = self.picture
        return data

    def raise_for_failures(self) -> None:
        """Raise QCFailed naming every failed check; return quietly when all passed."""
        if self.failures:
            text = "; ".join(f"{c.name}: {c.detail}" for c in self.failures)
            raise QCFailed(f"{self.video} failed QC ({len(self.failures)} checks): {text}")


def without_images(qc: dict[str, Any]) -> dict[str, Any]:
    """The QC dict without the report's pictures (for qc.json and the manifest: numbers only)."""
    picture = qc.get("picture")
    if not isinstance(picture, dict) or "images" not in picture:
        return qc
    return qc | {"picture": {k: v for k, v in picture.items() if k != "images"}}


def _start_loudness(path: Path) -> subprocess.Popen[str]:
    """Start measuring the first audio track (integrated loudness, true peak) in ffmpeg."""
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
        "-map", "0:a:0", "-af", "ebur128=peak=true:framelog=verbose", "-f", "null", "-",
    ]  # fmt: skip
    # framelog=verbose with the default log level keeps per-block lines out of stderr (they are
    # logged at verbose level); the summary is printed at info level.
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
    )


def _finish_loudness(proc: subprocess.Popen[str]) -> Loudness:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise MediaError(f"loudness analysis failed (ffmpeg exited with {proc.returncode}): {tail}")
    return parse_ebur128_summary(stderr)


@dataclass
class _Decoded:
    """What the partial decode saw."""

    keyframe_times: list[float] = field(default_factory=list)
    black_times: list[float] = field(default_factory=list)  # keyframes judged black
    indexed_keyframes: int | None = None  # keyframes the container's index lists, where it has one
    first_gop: int = 0
    last_gop: int = 0
    last_index: int | None = None  # frame index of the last frame, from its timestamp
    corrupt: int = 0
    errors: list[str] = field(default_factory=list)


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """The luma plane, read in place for planar YUV (a conversion costs as much as the decode)."""
    if frame.format.name in _PLANAR_8BIT:
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        return rows[:, : plane.width]
    return frame.to_ndarray(format="gray")


def _is_black(frame: av.VideoFrame) -> bool:
    full_range = frame.format.name.startswith("yuvj") or frame.color_range == 2  # 2: AVCOL_RANGE_JPEG
    threshold = 0.10 * 255 if full_range else BLACK_LUMA
    luma = _luma(frame)[::2, ::2]
    return float(np.mean(luma <= threshold)) >= BLACK_FRACTION


def _decode(stream: av.VideoStream, packet: av.Packet | None, seen: _Decoded) -> list[av.VideoFrame]:
    """Decode one packet (None: flush); a decoding error is recorded and yields no frames."""
    try:
        frames = stream.decode(packet)
    except av.error.FFmpegError as exc:
        where = (
            ""
            if packet is None or packet.pts is None
            else f" at {float(packet.pts * stream.time_base):.2f} s"
        )
        seen.errors.append(f"{type(exc).__name__}{where}: {exc}")
        return []
    seen.corrupt += sum(frame.is_corrupt for frame in frames)
    return frames


def _first_gop(path: Path, seen: _Decoded) -> None:
    """Decode every frame up to the second keyframe."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            for frame in _decode(stream, packet if packet.size else None, seen):
                if frame.key_frame and seen.first_gop:
                    return
                seen.first_gop += 1


def _keyframes(path: Path, seen: _Decoded, fps: int, picture: PictureQC | None = None) -> int | None:
    """Decode keyframes, judging each black or not, and the GOPs `picture` asks for; return the last
    keyframe's timestamp."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        ctx = stream.codec_context
        ctx.skip_frame = "NONKEY"
        if len(stream.index_entries):
            seen.indexed_keyframes = sum(1 for entry in stream.index_entries if entry.is_keyframe)
        last_key_pts = None
        whole_gop = False
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None and picture is not None:
                whole_gop = picture.wants_gop(round(float(packet.pts * tb) * fps))
                ctx.skip_frame = "DEFAULT" if whole_gop else "NONKEY"
            if not packet.is_keyframe and packet.size and not whole_gop:
                continue  # never handed to the decoder: this is what makes QC cheap
            for frame in _decode(stream, packet if packet.size else None, seen):
                t = float(frame.pts * tb)
                if frame.key_frame:
                    seen.keyframe_times.append(t)
                    if _is_black(frame):
                        seen.black_times.append(t)
                if picture is not None:
                    picture.feed(round(t * fps), frame, _luma(frame), frame.key_frame)
            if packet.size and packet.pts is not None and packet.is_keyframe:
                last_key_pts = packet.pts
        return last_key_pts


def _last_gop(path: Path, last_key_pts: int | None, fps: int, seen: _Decoded) -> None:
    """Decode from the last keyframe to the end; note the last frame's index by its timestamp."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if last_key_pts is not None:
            container.seek(last_key_pts, stream=stream, backward=True)
        last_pts = None
        for packet in container.demux(stream):
            for frame in _decode(stream, packet if packet.size else None, seen):
                if last_key_pts is not None and frame.pts < last_key_pts:
                    continue  # a seek may land a GOP early
                seen.last_gop += 1
                last_pts = frame.pts
        if last_pts is not None:
            seen.last_index = round(float(last_pts * stream.time_base) * fps)


def _decode_sampled(path: Path, fps: int, picture: PictureQC | None = None) -> _Decoded:
    """Decode the first GOP, every keyframe (and what `picture` asks for), and the last GOP."""
    seen = _Decoded()
    try:
        _first_gop(path, seen)
        last_key_pts = _keyframes(path, seen, fps, picture)
        _last_gop(path, last_key_pts, fps, seen)
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        seen.errors.append(f"{type(exc).__name__}: {exc}")
    return seen


def _in_spans(t: float, starts: Sequence[float], ends: Sequence[float]) -> bool:
    """Whether t lies in one of the spans (given as sorted, non-overlapping starts and ends)."""
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and t < ends[i]


def _merged(spans: Sequence[SpeechSpan]) -> tuple[list[float], list[float]]:
    """Spans sorted and merged where they overlap, as parallel start and end lists."""
    starts: list[float] = []
    ends: list[float] = []
    for span in sorted(spans, key=lambda s: s.start_s):
        if ends and span.start_s <= ends[-1]:
            ends[-1] = max(ends[-1], span.end_s)
        else:
            starts.append(span.start_s)
            ends.append(span.end_s)
    return starts, ends


def run_qc(
    video_path: str | os.PathLike[str],
    *,
    expected_frames: int,
    audio_duration_s: float,
    speech_spans: Iterable[SpeechSpan],
    target_lufs: float = -16.0,
    lufs_tolerance: float = 1.0,
    max_true_peak_db: float = -1.0,
    fps: int = FPS,
    portrait: np.ndarray | None = None,
    segments: Sequence[tuple[int, int]] | None = None,
    skip_picture: str | None = None,
) -> QCReport:
    """Check a muxed lecture video; every check runs (a failure does not stop the others).

    Checks: decodable, frame_count, starts_at_zero, av_duration_match, audio_duration,
    no_black_in_speech, loudness, true_peak; with a `portrait` (RGB) also the picture checks
    identity, lip_sync, no_frozen_speech and no_jump_at_cuts, per segment (`segments`: frame ranges
    [start, end); None: 30-s stretches, no cuts). `skip_picture` says why the video shows no face
    (random weights): the picture gates then pass with that reason, never silently. Raises
    MediaError only when the file cannot be probed at all; a file that probes but does not decode
    fails `decodable` instead; InputError when the portrait shows no face.
    """
    path = Path(video_path)
    spans = list(speech_spans)
    started = time.perf_counter()
    frame_s = 1.0 / fps
    info = probe(path)
    report = QCReport(str(path))
    picture = None
    if info.video is not None and (portrait is not None or skip_picture is not None):
        from .qc_picture.picture import PictureQC  # dlib loads only when the picture is checked

        picture = PictureQC(
            portrait, segments if segments is not None else expected_frames, _merged(spans),
            fps=fps, skip_reason=skip_picture,
        )  # fmt: skip
    loud_proc = _start_loudness(path) if info.audio is not None else None
    try:
        decoded = _decode_sampled(path, fps, picture) if info.video is not None else None
        picture_checks, report.picture = picture.finish(str(path)) if picture else ([], None)
    except BaseException:
        if loud_proc is not None:
            loud_proc.kill()
            loud_proc.wait()
        if picture is not None:
            picture.close()
        raise
    report.checks += _video_checks(info, decoded, expected_frames)
    report.checks += _timing_checks(info, audio_duration_s, frame_s)
    report.checks.append(_black_check(decoded, spans))
    report.checks += _loudness_checks(loud_proc, target_lufs, lufs_tolerance, max_true_peak_db)
    report.checks += picture_checks
    report.seconds = time.perf_counter() - started
    return report


def _video_checks(info: MediaInfo, decoded: _Decoded | None, expected_frames: int) -> list[QCCheck]:
    if info.video is None or decoded is None:
        return [
            QCCheck("decodable", False, 0, None, "the file has no video stream"),
            QCCheck("frame_count", False, 0, expected_frames, "the file has no video stream"),
        ]
    metadata = info.video.frames
    decoded_count = None if decoded.last_index is None else decoded.last_index + 1
    keyframes = len(decoded.keyframe_times)
    problems = []
    if decoded.errors:
        shown = "; ".join(decoded.errors[:3]) + (" …" if len(decoded.errors) > 3 else "")
        problems.append(f"{len(decoded.errors)} decoding errors ({shown})")
    if decoded.corrupt:
        problems.append(f"{decoded.corrupt} corrupt frames")
    if not decoded.first_gop or not decoded.last_gop:
        problems.append("the first or last GOP yielded no frames")
    if decoded.indexed_keyframes is not None and keyframes != decoded.indexed_keyframes:
        problems.append(f"the index lists {decoded.indexed_keyframes} keyframes, {keyframes} decoded")
    if decoded_count != metadata:
        problems.append(f"decoding ends at frame {decoded_count}, the container holds {metadata}")
    frames_decoded = decoded.first_gop + keyframes + decoded.last_gop
    detail = (
        f"decoded the first GOP ({decoded.first_gop} frames), {keyframes} keyframes "
        f"and the last GOP ({decoded.last_gop} frames)"
    )
    detail += "; " + "; ".join(problems) if problems else "; no errors"
    ok = not problems
    decodable = QCCheck("decodable", ok, frames_decoded, None, detail)
    count_ok = metadata == expected_frames and decoded_count == expected_frames
    count = QCCheck(
        "frame_count",
        count_ok,
        metadata,
        expected_frames,
        f"container holds {metadata} frames, the last decoded frame is number {decoded_count} "
        f"by its timestamp; expected {expected_frames}",
    )
    return [decodable, count]


def _timing_checks(info: MediaInfo, audio_duration_s: float, frame_s: float) -> list[QCCheck]:
    v, a = info.video, info.audio
    if v is None or a is None:
        missing = "video" if v is None else "audio"
        return [
            QCCheck(name, False, None, limit, f"the file has no {missing} stream")
            for name, limit in (
                ("starts_at_zero", START_TOLERANCE_S),
                ("av_duration_match", frame_s),
                ("audio_duration", frame_s),
            )
        ]
    start = max(abs(v.start_s), abs(a.start_s))
    gap = abs(v.duration_s - a.duration_s)
    audio_gap = abs(a.duration_s - audio_duration_s)
    return [
        QCCheck(
            "starts_at_zero",
            start <= START_TOLERANCE_S,
            round(start, 6),
            START_TOLERANCE_S,
            f"video starts at {v.start_s:.6f} s, audio at {a.start_s:.6f} s",
        ),
        QCCheck(
            "av_duration_match",
            gap < frame_s,
            round(gap, 6),
            frame_s,
            f"video lasts {v.duration_s:.3f} s, audio {a.duration_s:.3f} s; must differ by under one frame",
        ),
        QCCheck(
            "audio_duration",
            audio_gap < frame_s,
            round(audio_gap, 6),
            frame_s,
            f"muxed audio lasts {a.duration_s:.3f} s, the lecture audio {audio_duration_s:.3f} s",
        ),
    ]


def _black_check(decoded: _Decoded | None, spans: Sequence[SpeechSpan]) -> QCCheck:
    if decoded is None:
        return QCCheck("no_black_in_speech", False, None, 0, "the file has no video stream")
    starts, ends = _merged(spans)
    sampled = [t for t in decoded.keyframe_times if _in_spans(t, starts, ends)]
    black = [t for t in decoded.black_times if _in_spans(t, starts, ends)]
    detail = f"{len(black)} of {len(sampled)} keyframes inside {len(spans)} speech spans are black"
    if black:
        detail += (
            " (at " + ", ".join(f"{t:.2f}" for t in black[:5]) + (" …" if len(black) > 5 else "") + " s)"
        )
    return QCCheck("no_black_in_speech", not black, len(black), 0, detail)


def _loudness_checks(
    proc: subprocess.Popen[str] | None, target: float, tolerance: float, max_tp: float
) -> list[QCCheck]:
    limits = [target - tolerance, target + tolerance]
    if proc is None:
        return [
            QCCheck("loudness", False, None, limits, "the file has no audio stream"),
            QCCheck("true_peak", False, None, max_tp, "the file has no audio stream"),
        ]
    try:
        loud = _finish_loudness(proc)
    except MediaError as exc:
        return [
            QCCheck("loudness", False, None, limits, str(exc)),
            QCCheck("true_peak", False, None, max_tp, str(exc)),
        ]
    return [
        QCCheck(
            "loudness",
            limits[0] <= loud.integrated_lufs <= limits[1],
            loud.integrated_lufs,
            limits,
            f"integrated {loud.integrated_lufs:.1f} LUFS, target {target:.1f} ± {tolerance:.1f} LU",
        ),
        QCCheck(
            "true_peak",
            loud.true_peak_dbtp <= max_tp,
            loud.true_peak_dbtp,
            max_tp,
            f"true peak {loud.true_peak_dbtp:.1f} dBTP, cap {max_tp:.1f} dBTP",
        ),
    ]
