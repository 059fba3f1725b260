"""A self-contained HTML report of one finished lecture: inputs, engine, thumbnails, segments, QC.

One file, no external resources: inline CSS, thumbnails as base64 JPEG. Every value that comes
from the manifest or the QC result is escaped. Missing manifest keys show as "–", never fail.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import MediaError
from .media import probe

DEFAULT_THUMBNAILS = 10
THUMB_WIDTH = 160
MISSING = "–"

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:1.8rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#176b2c;font-weight:600}.fail{color:#b00020;font-weight:600}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;color:#fff;font-weight:600}
.badge.pass{background:#1e8e3e}.badge.fail{background:#c5221f}.badge.unknown{background:#777}
.strip{display:flex;gap:.4rem;overflow-x:auto;padding:.3rem 0}
figure{margin:0;text-align:center}figure img{display:block;border:1px solid #ccc}
figcaption{font-size:.8rem;color:#555}pre{white-space:pre-wrap;margin:0}
ul.warn li{color:#8a5300}.muted{color:#777}
"""


def _e(value: Any) -> str:
    """Escaped text of a value; None and missing become a dash."""
    if value is None or value == "":
        return MISSING
    return html.escape(str(value))


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
        return _e(value)
    return html.escape(fmt.format(value))


def _clock(seconds: Any) -> str:
    """m:ss.s (h:mm:ss.s from an hour on) for a time in seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return _e(seconds)
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
            frame = np.asarray(clip.get_frame(t), dtype=np.uint8)
            image = Image.fromarray(frame)
            height = max(1, round(image.height * width / image.width))
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            shots.append((t, buffer.getvalue()))
        return shots
    finally:
        clip.close()


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str = "none") -> str:
    """An HTML table from already-escaped cell markup."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    if not body:
        return f'<p class="muted">{html.escape(empty)}</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(markup: str, cls: str = "") -> str:
    return f'<td class="{cls}">{markup}</td>' if cls else f"<td>{markup}</td>"


def _kv(pairs: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


def _status(passed: Any) -> str:
    if passed is True:
        return '<span class="pass">pass</span>'
    if passed is False:
        return '<span class="fail">FAIL</span>'
    return '<span class="muted">–</span>'


def _attempts(attempts: list[Any]) -> str:
    lines = []
    for attempt in attempts:
        rung = _e(_get(attempt, "rung"))
        error = _get(attempt, "error")
        seconds = _get(attempt, "seconds")
        took = f" {_num(seconds, '{:.1f}')} s" if isinstance(seconds, int | float) else ""
        outcome = f'<span class="fail">{_e(error)}</span>' if error else '<span class="pass">ok</span>'
        lines.append(f"{rung}{took}: {outcome}")
    return "<br>".join(lines) if lines else MISSING


def _segment_rows(segments: list[Any]) -> list[list[str]]:
    rows = []
    for seg in segments:
        start, end = _get(seg, "start_s"), _get(seg, "end_s")
        duration = end - start if isinstance(start, int | float) and isinstance(end, int | float) else None
        attempts = _list(_get(seg, "attempts"))
        seconds = [a.get("seconds") for a in attempts if isinstance(a, Mapping)]
        total = sum(s for s in seconds if isinstance(s, int | float)) if seconds else None
        cached = _get(seg, "cached")
        rows.append(
            [
                _td(_e(_get(seg, "index")), "num"),
                _td(_clock(start), "num"),
                _td(_clock(end), "num"),
                _td(_num(duration), "num"),
                _td(_e(_get(seg, "frames")), "num"),
                _td("yes" if cached is True else "no" if cached is False else MISSING),
                _td(_attempts(attempts)),
                _td(_num(total, "{:.1f}"), "num"),
            ]
        )
    return rows


def _qc_rows(checks: list[Any]) -> list[list[str]]:
    rows = []
    for check in checks:
        limit = _get(check, "limit")
        if isinstance(limit, list | tuple):
            limit = " … ".join(str(x) for x in limit)
        rows.append(
            [
                _td(_e(_get(check, "name"))),
                _td(_status(_get(check, "passed"))),
                _td(_e(_get(check, "value")), "num"),
                _td(_e(limit), "num"),
                _td(_e(_get(check, "detail"))),
            ]
        )
    return rows


def _thumb_strip(video_path: Path, count: int) -> str:
    try:
        shots = take_thumbnails(video_path, count)
    except MediaError as exc:
        return f'<p class="fail">{html.escape(str(exc))}</p>'
    figures = []
    for t, jpeg in shots:
        data = base64.b64encode(jpeg).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/jpeg;base64,{data}" alt="frame at {_clock(t)}">'
            f"<figcaption>{_clock(t)}</figcaption></figure>"
        )
    return f'<div class="strip">{"".join(figures)}</div>'


def _file_facts(video: Path) -> str:
    """What the video file itself says (probe), to set beside what the manifest claims."""
    try:
        info = probe(video)
    except MediaError as exc:
        return f'<span class="fail">{html.escape(str(exc))}</span>'
    facts = [f"{html.escape(video.name)}, {_clock(info.duration_s)}"]
    if info.video:
        v = info.video
        facts.append(f"{_e(v.codec)} {v.width}×{v.height}, {v.frames} frames at {v.fps:g} fps")
    if info.audio:
        a = info.audio
        facts.append(f"{_e(a.codec)} {a.sample_rate} Hz × {a.channels}")
    return "; ".join(facts)


def _picture_section(picture: Any) -> str:
    """QC's picture part (identity, lip-sync proxy, motion), from templates/qc_picture.html.j2."""
    if not isinstance(picture, Mapping):
        return ""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("liveavatar_core", "templates"), autoescape=True)
    return env.get_template("qc_picture.html.j2").render(picture=picture)


def render_report(
    video_path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    qc: Mapping[str, Any] | None = None,
    *,
    thumbnails: int = DEFAULT_THUMBNAILS,
) -> str:
    """The report page as one HTML string. `qc` defaults to the manifest's own "qc" entry."""
    video = Path(video_path)
    manifest = manifest if isinstance(manifest, Mapping) else {}
    qc = qc if isinstance(qc, Mapping) and qc else _get(manifest, "qc") or {}
    lecture = _get(manifest, "lecture")
    lecture = lecture if isinstance(lecture, Mapping) else {}
    title = lecture.get("title") or lecture.get("name") or lecture.get("id") or video.name
    passed = _get(qc, "passed")
    badge = {True: ("pass", "QC passed"), False: ("fail", "QC failed")}.get(passed, ("unknown", "QC not run"))

    inputs = _get(manifest, "inputs")
    prompt_warnings = _list(_get(inputs, "prompt", "warnings"))
    input_rows = [
        (
            "audio",
            f"{_e(_get(inputs, 'audio', 'url'))}<br><small>sha256 {_e(_get(inputs, 'audio', 'sha256'))}</small>",
        ),
        (
            "image",
            f"{_e(_get(inputs, 'image', 'url'))}<br><small>sha256 {_e(_get(inputs, 'image', 'sha256'))}</small>",
        ),
        ("prompt", f"<pre>{_e(_get(inputs, 'prompt', 'text'))}</pre>"),
    ]
    engine_rows = [(k, _e(_get(manifest, "engine", k))) for k in ("name", "version", "reason")]
    duration = _get(manifest, "output", "duration_s")
    output_rows = [
        ("duration", f"{_num(duration)} s" if isinstance(duration, int | float) else _e(duration)),
        ("frames", _e(_get(manifest, "output", "frames"))),
        ("fps", _e(_get(manifest, "output", "fps"))),
        ("size", f"{_e(_get(manifest, 'output', 'width'))} × {_e(_get(manifest, 'output', 'height'))}"),
        ("file", _file_facts(video)),
    ]
    lecture_rows = [(str(k), _e(v)) for k, v in lecture.items()]
    warnings = [*_list(_get(manifest, "warnings")), *(f"prompt: {w}" for w in prompt_warnings)]
    warn_html = (
        '<ul class="warn">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else '<p class="muted">none</p>'
    )
    segments = _list(_get(manifest, "segments"))
    seg_headers = [
        "#",
        "start",
        "end",
        "duration (s)",
        "frames",
        "cached",
        "attempts (rung, time: outcome)",
        "seconds",
    ]
    qc_headers = ["check", "result", "value", "limit", "detail"]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)} – LiveAvatar report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p><span class="badge {badge[0]}">{badge[1]}</span> <span class="muted">{_e(video.name)}</span></p>',
        "<h2>Lecture</h2>",
        _kv(lecture_rows) if lecture_rows else '<p class="muted">no lecture details</p>',
        "<h2>Inputs</h2>",
        _kv(input_rows),
        "<h2>Engine</h2>",
        _kv(engine_rows),
        "<h2>Output</h2>",
        _kv(output_rows),
        "<h2>Frames</h2>",
        _thumb_strip(video, thumbnails) if video.exists() else '<p class="fail">video file not found</p>',
        f"<h2>Segments ({len(segments)})</h2>",
        _table(seg_headers, _segment_rows(segments), "no segments recorded"),
        "<h2>Quality control</h2>",
        _table(qc_headers, _qc_rows(_list(_get(qc, "checks"))), "no QC results"),
        _picture_section(_get(qc, "picture")),
        "<h2>Warnings</h2>",
        warn_html,
        "</body></html>",
    ]
    return "\n".join(parts)
