"""Finish: assemble the lecture (no re-encode), check it, write the report, publish atomically."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from prefect import get_run_logger, task

from liveavatar_core import audio, media, qc, report, storage
from liveavatar_core.portrait import load_rgb
from liveavatar_core.qc_picture import MIN_SIDE

from .common import TRANSIENT_RETRIES
from .models import AudioPrep, EngineChoice, PortraitPrep, SegmentOutput
from .prepare import PUBLISHED_TRUE_PEAK_DB, TARGET_LUFS


@task(name="encode-audio-track", **TRANSIENT_RETRIES)
def encode_audio_track(prep: AudioPrep) -> str:
    """The lecture as viewers hear it: the upload at its own rate (48 kHz at most) and stereo, brought
    to the line's loudness and encoded as AAC once (the flow runs this during generation)."""
    url = storage.join(prep.wav_url.rsplit("/", 1)[0], "published.m4a")
    if storage.exists(url):
        return url
    subject = f"--audio {prep.source.source}"
    with storage.local_file(prep.source.url) as src, tempfile.TemporaryDirectory() as tmp:
        track = audio.publish_track(
            src,
            Path(tmp) / "audio.m4a",
            target_lufs=TARGET_LUFS,
            max_true_peak_db=PUBLISHED_TRUE_PEAK_DB,
            subject=subject,
        )
        storage.upload(track.path, url)
    get_run_logger().info(
        "audio track: %d Hz, %d channel(s), AAC %s, loudness %.1f -> %.1f LUFS (true peak %.1f dBTP), %d passes",
        track.sample_rate,
        track.channels,
        track.bitrate,
        track.loudness_in.integrated_lufs,
        track.loudness_out.integrated_lufs,
        track.loudness_out.true_peak_dbtp,
        track.passes,
    )
    return url


@task(name="assemble", **TRANSIENT_RETRIES)
def assemble(outputs: list[SegmentOutput], audio_track_url: str, work: str, job_key: str) -> str:
    """Concatenate the video-only segments and mux the encoded audio track once, all by copying."""
    url = storage.join(work, "lectures", job_key, "video.mp4")
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        paths = [stack.enter_context(storage.local_file(o.video_url)) for o in outputs]
        track = stack.enter_context(storage.local_file(audio_track_url))
        out = Path(tmp) / "video.mp4"
        media.assemble(paths, track, out)
        storage.upload(out, url)
    return url


@task(name="quality-check", **TRANSIENT_RETRIES)
def quality_check(
    video_url: str,
    prep: AudioPrep,
    segment_frames: list[int],
    face: PortraitPrep | None = None,
    engine: EngineChoice | None = None,
) -> dict:
    """Run QC on the assembled lecture; returns the QC report as a dict (passed, failed, checks, picture).

    With the portrait, the picture is checked per segment against it; random weights show no face, and
    a video under MIN_SIDE px on a side is too small to find one, so then the picture gates are
    skipped, and qc.json says why.
    """
    starts = [sum(segment_frames[:k]) for k in range(len(segment_frames))]
    segments = [(a, a + n) for a, n in zip(starts, segment_frames, strict=True)]
    skip = (
        "random weights: the video shows no face"
        if engine is not None and engine.weights == "random"
        else None
    )
    with ExitStack() as stack:
        path = stack.enter_context(storage.local_file(video_url))
        portrait = None
        if face is not None and skip is None:
            portrait = load_rgb(stack.enter_context(storage.local_file(face.url)), "portrait", [])
            if min(portrait.shape[:2]) < MIN_SIDE:
                height, width = portrait.shape[:2]
                skip = f"the video is {width}x{height}: too small for the face checks (a side under {MIN_SIDE} px)"
                portrait = None
        result = qc.run_qc(
            path,
            expected_frames=sum(segment_frames),
            audio_duration_s=prep.duration_s,
            speech_spans=prep.speech,
            portrait=portrait,
            segments=segments,
            skip_picture=skip,
        )
    log = get_run_logger()
    for check in result.checks:
        (log.info if check.passed else log.error)(
            "qc %s: %s (%s)", check.name, "pass" if check.passed else "FAIL", check.detail
        )
    return result.to_dict()


@task(name="probe-output", **TRANSIENT_RETRIES)
def probe_output(video_url: str) -> media.MediaInfo:
    with storage.local_file(video_url) as path:
        return media.probe(path)


@task(name="render-report", **TRANSIENT_RETRIES)
def render_report(video_url: str, manifest: dict, qc_report: dict) -> str:
    """The HTML report (thumbnail strip, per-segment table, QC) as a string."""
    with storage.local_file(video_url) as path:
        return report.render_report(path, manifest, qc_report)


@task(name="publish", **TRANSIENT_RETRIES)
def publish(out: str, video_url: str, qc_json: str, report_html: str, manifest_json: str) -> dict[str, str]:
    """Copy the finished files to DEST, manifest.json last; returns the published URLs."""
    with storage.local_file(video_url) as video, tempfile.TemporaryDirectory() as tmp:
        files = [("video.mp4", Path(video))]
        for name, text in (
            ("qc.json", qc_json),
            ("report.html", report_html),
            ("manifest.json", manifest_json),
        ):
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            files.append((name, path))
        storage.publish(files, out)
    return {name: storage.join(out, name) for name, _ in files}
