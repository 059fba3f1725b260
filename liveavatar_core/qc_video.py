"""QC of any lecture video against its audio and portrait: what `liveavatar-batch qc` runs.

The same `run_qc` as the line's own QC stage; here the speech spans and the expected length come from
the given audio (normalised and searched for speech like the line does), the segments from the
lecture's manifest.json when given. qc.json and report.html appear in DIR only when QC has run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .audio import normalize_to_wav
from .errors import InputError, MediaError
from .media import probe
from .portrait import load_rgb
from .qc import QCReport, run_qc, without_images
from .report import render_report
from .timebase import AUDIO_SAMPLE_RATE, SAMPLES_PER_FRAME
from .vad import detect_speech


def check_video(
    video: str, audio: str, image: str, out: str, manifest: str | None = None, no_face: str | None = None
) -> QCReport:
    """Run every check on `video`, write DIR/qc.json and DIR/report.html, return the report.

    Raises InputError (naming the flag) for a missing or unusable input or destination.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out}", "exists and is not a directory")
    if not Path(video).is_file():
        raise InputError(f"--video {video}", "no such file")
    try:
        info = probe(video)
    except MediaError as exc:
        raise InputError(f"--video {video}", f"not a readable video ({exc})") from exc
    if info.video is None:
        raise InputError(f"--video {video}", "has no video stream")
    segments, record = _segments(manifest)
    portrait = load_rgb(image, f"--image {image}", []) if no_face is None else None
    with tempfile.TemporaryDirectory() as tmp:
        norm = normalize_to_wav(audio, Path(tmp) / "audio.wav", subject=f"--audio {audio}")
        spans = detect_speech(norm.path, subject=f"--audio {audio}")
        try:
            report = run_qc(
                video,
                expected_frames=-(-norm.samples // SAMPLES_PER_FRAME),
                audio_duration_s=norm.samples / AUDIO_SAMPLE_RATE,
                speech_spans=spans,
                portrait=portrait,
                segments=segments,
                skip_picture=no_face,
            )
        except InputError as exc:
            raise exc.relabel(f"--image {image}") from exc
    data = report.to_dict()
    html = render_report(video, record or {}, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("qc.json", json.dumps(without_images(data), indent=2)), ("report.html", html)):
        part = out_dir / f".{name}.part"
        part.write_text(text, encoding="utf-8")
        os.replace(part, out_dir / name)
    return report


def _segments(manifest: str | None) -> tuple[list[tuple[int, int]] | None, dict | None]:
    """Frame ranges of the manifest's segments (None without a manifest), and the manifest."""
    if manifest is None:
        return None, None
    try:
        record = json.loads(Path(manifest).read_text(encoding="utf-8"))
        frames = [int(s["frames"]) for s in record["segments"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--manifest {manifest}", f"not a lecture manifest.json ({exc})") from exc
    starts = [sum(frames[:k]) for k in range(len(frames))]
    return [(a, a + n) for a, n in zip(starts, frames, strict=True)], record
