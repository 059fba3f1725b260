"""A self-contained HTML report of one finished lecture, for the course team that checks it.

Rendered from `templates/report.html.j2` (Jinja2, autoescaped): a player for the `video.mp4` beside
it that jumps to each cut and each flagged moment, the checks in plain words with units, settings,
segments, thumbnails (base64 JPEG), and a banner when the render is a draft. One file, no external
resources. Missing manifest keys show as "–", never fail.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from . import __version__
from .errors import MediaError
from .media import probe

DEFAULT_THUMBNAILS = 10
THUMB_WIDTH = 160
MISSING = "–"
TEMPLATE = "report.html.j2"

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("liveavatar_core", "templates"),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,  # a missing manifest key renders as a dash, never fails
    trim_blocks=True,
    lstrip_blocks=True,
)


def _ms(v: Any) -> str:
    return f"{v * 1000:.0f} ms"


def _plain(v: Any) -> str:
    return str(v)


# name: (what is checked, in words; the measured value with its unit; the limit with its unit)
CHECKS: dict[str, tuple[str, Any, Any]] = {
    "decodable": ("The video file decodes without errors", lambda v: f"{v} frames decoded", None),
    "frame_count": ("Every planned frame is there", lambda v: f"{v} frames", lambda v: f"{v} frames"),
    "starts_at_zero": ("Picture and sound start together", _ms, lambda v: f"at most {_ms(v)}"),
    "av_duration_match": ("Picture and sound end together", lambda v: f"{_ms(v)} apart", lambda v: f"under {_ms(v)} (one frame)"),
    "audio_duration": ("The whole lecture audio is in the video", lambda v: f"{_ms(v)} missing or extra", lambda v: f"under {_ms(v)}"),
    "no_black_in_speech": ("No black picture while the speaker talks", lambda v: f"{v} black moments", lambda v: f"{v}"),
    "loudness": ("Loudness", lambda v: f"{v:.1f} LUFS", lambda v: f"{v[0]:.1f} to {v[1]:.1f} LUFS"),
    "true_peak": ("Loudest peak (clipping guard)", lambda v: f"{v:.1f} dBTP", lambda v: f"at most {v:.1f} dBTP"),
    "identity": ("The face stays the portrait's person", None, None),
    "lip_sync": ("Lips move with the speech (estimate)", None, None),
    "no_frozen_speech": ("The picture moves while the speaker talks", None, None),
    "no_jump_at_cuts": ("No visible jump where segments join", None, None),
}  # fmt: skip


def describe_check(check: Mapping[str, Any]) -> dict[str, Any]:
    """One QC check in words: label, passed (True/False/None), value and limit with units, detail."""
    name = str(check.get("name") or MISSING)
    label, value_fmt, limit_fmt = CHECKS.get(name, (name.replace("_", " ").capitalize(), None, None))
    return {
        "name": name,
        "label": label,
        "passed": check.get("passed") if isinstance(check.get("passed"), bool) else None,
        "value": _formatted(check.get("value"), value_fmt),
        "limit": _formatted(check.get("limit"), limit_fmt),
        "detail": check.get("detail") or "",
    }


def _formatted(value: Any, fmt: Any) -> str:
    if value is None or value == "":
        return MISSING
    try:
        return (fmt or _plain)(value)
    except (TypeError, ValueError, IndexError, KeyError):
        return str(value)


def is_draft(manifest: Mapping[str, Any]) -> str | None:
    """Why this render is not the real thing (preview engine, random weights), or None."""
    engine = _get(manifest, "engine") or {}
    if engine.get("name") == "preview":
        return "made with the preview engine: a moving still of the portrait, not lip-synced"
    if engine.get("weights") == "random":
        return "made with random weights (a benchmark): the picture is noise"
    return None


def clock(seconds: Any) -> str:
    """m:ss.s (h:mm:ss.s from an hour on) for a time in seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return MISSING if seconds in (None, "") else str(seconds)
    minutes, rest = divmod(float(seconds), 60)
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{int(hours)}:{int(minutes):02d}:{rest:04.1f}"
    return f"{int(minutes)}:{rest:04.1f}"


def thumbnail_times(duration_s: float, count: int = DEFAULT_THUMBNAILS) -> list[float]:
    """`count` evenly spaced times, each in the middle of its share of the video."""
    if duration_s <= 0 or count <= 0:
        return []
    return [(i + 0.5) * duration_s / count for i in range(count)]


def take_thumbnails(
    video_path: str | os.PathLike[str], count: int = DEFAULT_THUMBNAILS, width: int = THUMB_WIDTH
) -> list[tuple[float, bytes]]:
    """(time, JPEG bytes) pairs at evenly spaced times, taken with moviepy (clip closed after)."""
    from moviepy import VideoFileClip  # imported here: moviepy is slow to import and only used here

    try:
        clip = VideoFileClip(str(video_path), audio=False)
    except (OSError, KeyError, IndexError) as exc:
        raise MediaError(f"cannot read {video_path} for thumbnails: {exc}") from exc
    try:
        shots = []
        for t in thumbnail_times(clip.duration or 0.0, count):
            image = Image.fromarray(np.asarray(clip.get_frame(t), dtype=np.uint8))
            height = max(1, round(image.height * width / image.width))
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            shots.append((t, buffer.getvalue()))
        return shots
    finally:
        clip.close()


def render_report(
    video_path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    qc: Mapping[str, Any] | None = None,
    *,
    thumbnails: int = DEFAULT_THUMBNAILS,
    now: datetime | None = None,
) -> str:
    """The report page as one HTML string. `qc` defaults to the manifest's own "qc" entry."""
    video = Path(video_path)
    manifest = manifest if isinstance(manifest, Mapping) else {}
    qc = qc if isinstance(qc, Mapping) and qc else _get(manifest, "qc") or {}
    lecture = _get(manifest, "lecture") if isinstance(_get(manifest, "lecture"), Mapping) else {}
    segments = [s for s in _list(_get(manifest, "segments")) if isinstance(s, Mapping)]
    checks = [describe_check(c) for c in _list(_get(qc, "checks")) if isinstance(c, Mapping)]
    context = {
        "title": lecture.get("title") or lecture.get("name") or lecture.get("id") or video.name,
        "lecture": lecture,
        "video_name": video.name,
        "video_found": video.exists(),
        "passed": _get(qc, "passed") if isinstance(_get(qc, "passed"), bool) else None,
        "draft": is_draft(manifest),
        "checks": checks,
        "failed": [c for c in checks if c["passed"] is False],
        "picture": _get(qc, "picture") if isinstance(_get(qc, "picture"), Mapping) else None,
        "moments": moments(segments, qc),
        "segments": [_segment_row(s) for s in segments],
        "settings": _settings(manifest),
        "inputs": _get(manifest, "inputs") if isinstance(_get(manifest, "inputs"), Mapping) else {},
        "engine": _get(manifest, "engine") if isinstance(_get(manifest, "engine"), Mapping) else {},
        "output": _get(manifest, "output") if isinstance(_get(manifest, "output"), Mapping) else {},
        "file_facts": _file_facts(video) if video.exists() else None,
        "thumbs": _thumbs(video, thumbnails) if video.exists() else [],
        "warnings": _warnings(manifest),
        "tool_version": _get(manifest, "tool_version") or __version__,
        "job_key": _get(manifest, "job_key"),
        "rendered": (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC"),
        "MISSING": MISSING,
    }
    return _ENV.get_template(TEMPLATE).render(**context, clock=clock, num=_num)


def moments(segments: list[Mapping[str, Any]], qc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Where the player can jump: each cut between segments and each moment a check flagged, by time."""
    found = [
        {"at_s": s["start_s"], "kind": "cut", "what": f"cut before segment {s.get('index', '?')} "
         f"({_cut_words(prev.get('cut'))})"}
        for prev, s in zip(segments, segments[1:], strict=False)
        if isinstance(s.get("start_s"), int | float)
    ]  # fmt: skip
    found += [{"at_s": at, "kind": "flag", "what": what} for at, what in _flags(qc.get("picture"), "")]
    for flag in _list(qc.get("flagged")):
        if isinstance(flag, Mapping) and isinstance(flag.get("at_s"), int | float):
            found.append({"at_s": flag["at_s"], "kind": "flag", "what": str(flag.get("what") or "flagged")})
    return sorted(found, key=lambda m: m["at_s"])


_TIME_KEYS = ("at_s", "worst_at_s", "start_s")


def _flags(node: Any, where: str) -> list[tuple[float, str]]:
    """(time, what) of every entry of the picture section marked failed (passed false or flagged)."""
    out: list[tuple[float, str]] = []
    if isinstance(node, Mapping):
        bad = node.get("passed") is False or node.get("flagged") is True
        at = next((node[k] for k in _TIME_KEYS if isinstance(node.get(k), int | float)), None)
        if bad and at is not None:
            out.append((float(at), str(node.get("what") or node.get("name") or where or "flagged")))
        for key, value in node.items():
            if key != "images":
                out += _flags(value, key.replace("_", " "))
    elif isinstance(node, list):
        for item in node:
            out += _flags(item, where)
    return out


_CUTS = {
    "pause": "in a pause",
    "hard": "hard cut inside speech: no pause within the longest segment",
    "end": "end of the lecture",
}


def _cut_words(kind: Any) -> str:
    return _CUTS.get(str(kind), str(kind) if kind else MISSING)


def _segment_row(seg: Mapping[str, Any]) -> dict[str, Any]:
    start, end = seg.get("start_s"), seg.get("end_s")
    numbers = isinstance(start, int | float) and isinstance(end, int | float)
    attempts = [a for a in _list(seg.get("attempts")) if isinstance(a, Mapping)]
    seconds = [a.get("seconds") for a in attempts if isinstance(a.get("seconds"), int | float)]
    return {
        "index": seg.get("index", MISSING),
        "start_s": start if numbers else None,
        "start": clock(start),
        "end": clock(end),
        "duration": end - start if numbers else None,
        "frames": seg.get("frames", MISSING),
        "cut": seg.get("cut"),
        "cut_words": _cut_words(seg.get("cut")),
        "cached": seg.get("cached") if isinstance(seg.get("cached"), bool) else None,
        "attempts": attempts,
        "seconds": sum(seconds) if seconds else None,
    }


def _settings(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    s = _get(manifest, "settings") if isinstance(_get(manifest, "settings"), Mapping) else {}
    output = _get(manifest, "output") if isinstance(_get(manifest, "output"), Mapping) else {}
    lecture = _get(manifest, "lecture") if isinstance(_get(manifest, "lecture"), Mapping) else {}
    size = s.get("size")
    made = f"{output['width']}×{output['height']}" if "width" in output and "height" in output else None
    size_text = (
        f"{made} (auto: 704×384's area shaped like the portrait)" if size == "auto" and made else size or made
    )
    budget = s.get("memory_budget_gb")
    return [
        ("Size (width × height)", size_text or MISSING),
        ("Engine asked for", s.get("engine") or MISSING),
        ("Precision", s.get("precision") or MISSING),
        ("Segment length", _num(s.get("segment_seconds"), "{:g} s target")),
        ("Longest segment", _num(s.get("max_segment_seconds"), "{:g} s")),
        ("Seed", str(s.get("seed", MISSING))),
        ("Profile", str(lecture.get("profile") or "none (settings as given)")),
        ("Memory budget", _num(budget, "{:g} GiB") if budget is not None else "the device's"),
    ]


def _warnings(manifest: Mapping[str, Any]) -> list[str]:
    found = [str(w) for w in _list(_get(manifest, "warnings"))]
    return found + [f"prompt: {w}" for w in _list(_get(manifest, "inputs", "prompt", "warnings"))]


def _thumbs(video: Path, count: int) -> list[dict[str, Any]] | str:
    """[{at_s, data}] of base64 JPEG thumbnails, or the reason there are none."""
    try:
        shots = take_thumbnails(video, count)
    except MediaError as exc:
        return str(exc)
    return [{"at_s": t, "data": base64.b64encode(jpeg).decode("ascii")} for t, jpeg in shots]


def _file_facts(video: Path) -> str:
    """What the video file itself says (probe), to set beside what the manifest claims."""
    try:
        info = probe(video)
    except MediaError as exc:
        return str(exc)
    facts = [f"{video.name}, {clock(info.duration_s)}"]
    if info.video:
        v = info.video
        facts.append(f"{v.codec} {v.width}×{v.height}, {v.frames} frames at {v.fps:g} fps")
    if info.audio:
        a = info.audio
        facts.append(f"{a.codec} {a.sample_rate} Hz × {a.channels}")
    return "; ".join(facts)


def _get(data: Any, *keys: str) -> Any:
    """data[k1][k2]..., or None where any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING if value in (None, "") else str(value)
    return fmt.format(value)
