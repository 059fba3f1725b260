"""Prepare: normalise and analyse the audio, plan segments, crop the portrait, normalise the prompt.

Each product is stored in the work store under a content key, so a re-run reuses it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
from prefect import get_run_logger, task

from liveavatar_core import audio, portrait, prompt, segments, storage, vad
from liveavatar_core.engines import registry
from liveavatar_core.errors import InputError
from liveavatar_core.keys import content_key, sha256_bytes, sha256_file

from .common import TRANSIENT_RETRIES
from .models import (
    AudioPrep,
    EngineChoice,
    PlannedSegment,
    PortraitPrep,
    PromptPrep,
    SpeechSpanRecord,
    StagedFile,
)

# Bump when the audio preparation changes what it produces (it is part of the content key).
AUDIO_PREP_VERSION = 2
# The line's loudness: -16 LUFS integrated, as course and streaming platforms play speech; true peaks
# under -1.5 dBTP in the model's WAV and under QC's -1 dBTP cap in the published AAC (docs/audio.md).
TARGET_LUFS = -16.0
TRUE_PEAK_DB = -1.5
PUBLISHED_TRUE_PEAK_DB = -1.0


@task(name="prepare-audio", **TRANSIENT_RETRIES)
def prepare_audio(staged: StagedFile, work: str) -> AudioPrep:
    """Decode to 16 kHz mono, loudness-normalise, find speech. Reused when already prepared."""
    key = content_key(
        "audio-prep", sha=staged.sha256, v=AUDIO_PREP_VERSION, lufs=TARGET_LUFS, tp=TRUE_PEAK_DB
    )
    base = storage.join(work, "audio", key)
    record_url = storage.join(base, "prep.json")
    if storage.exists(record_url):
        return AudioPrep.model_validate(storage.read_json(record_url))
    subject = f"--audio {staged.source}"
    with storage.local_file(staged.url) as src, tempfile.TemporaryDirectory() as tmp:
        detector = vad.SpeechDetector()  # fed while the normalised samples are written: one pass
        try:
            norm = audio.normalize_to_wav(
                src,
                Path(tmp) / "audio.wav",
                target_lufs=TARGET_LUFS,
                true_peak_db=TRUE_PEAK_DB,
                subject=subject,
                tap=detector,
            )
            speech = detector.spans(subject=subject)
        except InputError as exc:
            raise exc.relabel(subject) from None
        wav_url = storage.join(base, "audio.wav")
        storage.upload(norm.path, wav_url)
    prep = AudioPrep(
        source=staged,
        wav_url=wav_url,
        samples=norm.samples,
        duration_s=norm.samples / audio.SAMPLE_RATE,
        sample_rate=norm.source.sample_rate,
        channels=norm.source.channels,
        codec=norm.source.codec,
        loudness_in=norm.loudness_in.to_dict(),
        loudness_out=norm.loudness_out.to_dict(),
        speech=[SpeechSpanRecord(start_s=s.start_s, end_s=s.end_s) for s in speech],
    )
    storage.write_json(record_url, prep.model_dump())
    get_run_logger().info(
        "audio: %.1f s, %d speech spans, loudness %.1f -> %.1f LUFS",
        prep.duration_s,
        len(prep.speech),
        norm.loudness_in.integrated_lufs,
        norm.loudness_out.integrated_lufs,
    )
    return prep


@task(name="plan-segments", **TRANSIENT_RETRIES)
def plan_segments(prep: AudioPrep, target_s: float, max_s: float) -> list[PlannedSegment]:
    """Cut the lecture in pauses near `target_s` (never over `max_s`), and write each segment's audio."""
    plan = segments.plan_segments(prep.samples, prep.speech, target_s=target_s, max_s=max_s)
    base = prep.wav_url.rsplit("/", 1)[0]
    planned = []
    with storage.local_file(prep.wav_url) as wav, tempfile.TemporaryDirectory() as tmp:
        for seg in plan:
            url = storage.join(base, "segments", f"{seg.start_sample}-{seg.end_sample}.wav")
            local = Path(tmp) / f"{seg.index}.wav"
            audio.write_slice(wav, seg.start_sample, seg.end_sample, local)
            sha = sha256_file(local)
            if not storage.exists(url):
                storage.upload(local, url)
            local.unlink()
            planned.append(
                PlannedSegment(
                    index=seg.index,
                    start_sample=seg.start_sample,
                    end_sample=seg.end_sample,
                    frames=seg.num_frames,
                    cut=seg.cut,
                    audio_url=url,
                    audio_sha256=sha,
                )
            )
    get_run_logger().info("plan: %d segments (target %.0f s, max %.0f s)", len(planned), target_s, max_s)
    return planned


@task(name="prepare-portrait", **TRANSIENT_RETRIES)
def prepare_portrait(staged: StagedFile, height: int, width: int, work: str) -> PortraitPrep:
    """Find the face, crop to the output aspect around it, resize; store the crop as PNG."""
    subject = f"--image {staged.source}"
    with storage.local_file(staged.url) as path:
        try:
            result = portrait.prepare_portrait(path, height=height, width=width, subject=subject)
        except InputError as exc:
            raise exc.relabel(subject) from None
    ok, png = cv2.imencode(".png", cv2.cvtColor(result.image, cv2.COLOR_RGB2BGR))
    data = png.tobytes()
    sha = sha256_bytes(data)
    url = storage.join(work, "portraits", f"{sha}.png")
    if not storage.exists(url):
        storage.write_bytes(url, data)
    for warning in result.warnings:
        get_run_logger().warning("portrait: %s", warning)
    return PortraitPrep(
        url=url,
        sha256=sha,
        face_box=tuple(int(v) for v in result.face_box),
        faces_found=result.faces_found,
        warnings=list(result.warnings),
    )


@task(name="prepare-prompt")
def prepare_prompt(text: str, engine: EngineChoice) -> PromptPrep:
    """Normalise the prompt and cap it at the text encoder's 512 tokens (a warning, not an error)."""
    count_tokens = registry.token_counter(engine.name, engine.checkpoint_dir)
    result = prompt.normalize_prompt(text, count_tokens=count_tokens)
    for warning in result.warnings:
        get_run_logger().warning("prompt: %s", warning)
    return PromptPrep(
        text=result.text, tokens=result.tokens, truncated=result.truncated, warnings=list(result.warnings)
    )
