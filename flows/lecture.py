"""produce_lecture: lecture audio + portrait + prompt -> a published, checked avatar video.

stage -> prepare (audio, segment plan, portrait, prompt) -> generate segment by segment (handoff
state flows forward) -> assemble (no re-encode) -> QC -> report -> publish (manifest.json last).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run
from pydantic import Field, ValidationInfo, field_validator

from flows.dispatch import run_on_gpu_workers
from flows.forms import FormModel
from liveavatar_core import size as output_size
from liveavatar_core import storage
from liveavatar_core.course import Precision
from liveavatar_core.engines import GenerationConfig, registry
from liveavatar_core.errors import QCFailed
from liveavatar_core.keys import segment_key
from liveavatar_core.manifest import (
    AttemptRecord,
    AudioInput,
    EngineInfo,
    ImageInput,
    Inputs,
    Manifest,
    OutputInfo,
    PromptInput,
    SegmentRecord,
    Settings,
    job_key,
)
from liveavatar_core.qc import without_images
from liveavatar_core.timebase import AUDIO_SAMPLE_RATE
from tasks.artifacts import lecture_artifacts
from tasks.finish import assemble, encode_audio_track, probe_output, publish, quality_check, render_report
from tasks.generate import generate_segment
from tasks.models import EngineChoice, PlannedSegment, PortraitPrep, PromptPrep, SegmentJob, SegmentOutput
from tasks.prepare import plan_segments as plan_segments_task
from tasks.prepare import prepare_audio, prepare_portrait, prepare_prompt
from tasks.qc import picture_artifact
from tasks.results import result_storage
from tasks.size import choose_size
from tasks.stage import check_destination, stage_input

DEFAULT_WORK = "~/.cache/liveavatar-batch/work"
# The produce-lecture deployment sets it to "gpu-workers" for its runs (deployments/prefect.yaml): a
# deployment's parameter default would not survive a run that passes its own `params`.
DISPATCH_ENV = "LIVEAVATAR_DISPATCH"


WORKER_HOST = (
    " A path or file:// URL is read on the host of the worker that runs the flow, not on your computer;"
    " s3:// works from anywhere."
)


class LectureParams(FormModel):
    """One lecture: audio, portrait and prompt in; a checked video, its report and manifest out."""

    audio: str = Field(
        title="Lecture audio",
        description="wav, mp3, m4a, flac or ogg: a path, file:// or s3:// URL." + WORKER_HOST,
        min_length=1,
    )
    image: str = Field(
        title="Portrait",
        description="A photo of the speaker (jpg, png, webp): a path, file:// or s3:// URL." + WORKER_HOST,
        min_length=1,
    )
    prompt: str = Field(
        title="Prompt",
        description="Who, doing what, where, in what style (the box grows as you type; several lines "
        "are fine)",
        min_length=1,
    )
    title: str | None = Field(
        None,
        title="Title",
        description="Shown in the report and the run's name; empty: the audio file's name",
    )
    out: str = Field(
        title="Destination",
        description="Where video.mp4, report.html, qc.json and manifest.json are published: a folder, "
        "file:// or s3:// prefix." + WORKER_HOST,
        min_length=1,
    )
    engine: Literal["auto", "preview", "liveavatar"] = Field(
        "auto",
        title="Engine",
        description="liveavatar: the 14B model (GPU). preview: a quick CPU draft (a moving still, not "
        "lip-synced), for trying the line out. auto: liveavatar where its checkpoints are, else preview",
    )
    dispatch: Literal["in-process", "gpu-workers"] = Field(
        default_factory=lambda: os.environ.get(DISPATCH_ENV, "in-process"),  # type: ignore[arg-type]
        title="Dispatch",
        description="Where segments are generated. gpu-workers: on the long-lived GPU workers "
        "(liveavatar-batch worker --gpu N; on a machine without GPUs, worker --gpu 0 --engine "
        "preview). in-process: inside this flow run (a CPU try-out with the preview engine, or a GPU "
        "host without GPU workers). The deployment fills in its own default",
    )
    size: str = Field(
        output_size.AUTO,
        title="Size",
        description="auto: about 704x384 pixels' worth, shaped like the portrait (a landscape photo gives "
        "704x384, a portrait photo 384x704). Or an exact WIDTHxHEIGHT such as 1280x720: each side a "
        "multiple of 16 (64 for liveavatar) from 64 to 2048",
        json_schema_extra={"pattern": output_size.PATTERN},
    )
    precision: Precision = Field(
        "bf16",
        title="Precision",
        description="fp8: LiveAvatar's block linears in e4m3 (about 1.3x faster on fp8 GPUs such as "
        "H100, L40S; slightly different pictures). Other engines ignore it",
    )
    segment_seconds: float = Field(
        30.0,
        gt=2,
        title="Segment length (s)",
        description="Target segment length; cuts fall in pauses near it",
    )
    max_segment_seconds: float = Field(
        40.0, gt=2, title="Longest segment (s)", description="No segment is longer; at least the target"
    )
    seed: int = Field(0, ge=0, title="Seed", description="Same inputs and seed, same video")
    allow_qc_fail: bool = Field(
        False, title="Publish even if checks fail", description="Publish even when quality checks fail"
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, title="Memory budget (GiB)", description="Per-segment memory budget; empty: the device's"
    )
    work: str | None = Field(
        None,
        title="Work store",
        description="Folder or s3:// prefix for intermediate files; empty: $LIVEAVATAR_WORK on the worker",
    )
    checkpoint_dir: str | None = Field(
        None,
        title="Checkpoint folder",
        description="LiveAvatar checkpoints on the worker's host; empty: $LIVEAVATAR_CHECKPOINT_DIR",
    )
    random_weights: bool = Field(
        False,
        title="Random weights",
        description="LiveAvatar with random full-size weights (benchmarks only)",
    )

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        return output_size.normalise(value)

    @field_validator("max_segment_seconds")
    @classmethod
    def _max_at_least_target(cls, value: float, info: ValidationInfo) -> float:
        target = info.data.get("segment_seconds")
        if target is not None and value < target:
            raise ValueError(
                f"{value:g} s is shorter than the segment length ({target:g} s); make it at least that"
            )
        return value

    @field_validator("title", "work", "checkpoint_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def display_title(self) -> str:
        """The lecture's title, or its audio file's name."""
        return self.title or PurePosixPath(self.audio).stem

    def work_store(self) -> str:
        work = self.work or os.environ.get("LIVEAVATAR_WORK") or DEFAULT_WORK
        return work if storage.is_remote(work) else str(storage.local_path(work))

    def checkpoints(self) -> str | None:
        return self.checkpoint_dir or os.environ.get("LIVEAVATAR_CHECKPOINT_DIR")


def lecture_run_name() -> str:
    """A lecture run is named after the lecture (its title, else its audio file's name)."""
    params = flow_run.parameters.get("params")
    if isinstance(params, dict):
        params = LectureParams.model_validate(params)
    return params.display_title() if isinstance(params, LectureParams) else "lecture"


@flow(name="produce_lecture", flow_run_name=lecture_run_name)
def produce_lecture(params: LectureParams) -> dict[str, str]:
    """Produce one lecture video and publish it to `params.out`; returns the published URLs."""
    log = get_run_logger()
    work = params.work_store()
    timings: dict[str, float] = {}
    stage = _stage_timer(timings)

    with stage("stage"):
        check_destination(params.out)
        audio_in = stage_input(params.audio, "--audio", work)
        image_in = stage_input(params.image, "--image", work)
    engine = choose_engine(params)
    log.info("engine: %s %s (%s)", engine.name, engine.version, engine.reason)

    with stage("prepare"):
        prep = prepare_audio(audio_in, work)
        # AAC encoding of the whole lecture (a minute of CPU per hour) overlaps generation.
        audio_track = encode_audio_track.submit(prep)
        plan = plan_segments_task(prep, params.segment_seconds, params.max_segment_seconds)
        config = choose_size(image_in, params.size, params.precision)
        face = prepare_portrait(image_in, config.height, config.width, work)
        text = prepare_prompt(params.prompt, engine)

    with stage("generate"):
        outputs, records = generate_segments(plan, face, text, engine, config, params, work)

    inputs = Inputs(
        audio=AudioInput(url=params.audio, sha256=audio_in.sha256, duration_s=prep.duration_s,
                         sample_rate=prep.sample_rate, channels=prep.channels, codec=prep.codec),
        image=ImageInput(url=params.image, sha256=image_in.sha256, faces_found=face.faces_found),
        prompt=PromptInput(text=text.text, tokens=text.tokens, truncated=text.truncated),
    )  # fmt: skip
    settings = lecture_settings(params)
    key = job_key(inputs, settings)

    with stage("assemble"):
        video_url = assemble(outputs, audio_track.result(), work, key)
    with stage("qc"):
        qc_report = quality_check(video_url, prep, [p.frames for p in plan], face, engine)
        picture_artifact(qc_report, key)
        info = probe_output(video_url)

    manifest = Manifest(
        job_key=key,
        lecture={"title": params.display_title(), "destination": params.out},
        inputs=inputs,
        settings=settings,
        engine=EngineInfo(
            name=engine.name, version=engine.version, weights=engine.weights, reason=engine.reason
        ),
        audio={
            "loudness_in": prep.loudness_in,
            "loudness_out": prep.loudness_out,
            "speech_spans": len(prep.speech),
            "speech_s": round(sum(s.end_s - s.start_s for s in prep.speech), 3),
        },
        segments=records,
        output=OutputInfo(
            duration_s=info.duration_s,
            audio_duration_s=info.audio.duration_s if info.audio else 0.0,
            frames=info.video.frames,
            fps=info.video.fps,
            width=info.video.width,
            height=info.video.height,
        ),
        qc=without_images(qc_report),
        warnings=face.warnings + text.warnings,
        timings_s={name: round(seconds, 3) for name, seconds in timings.items()},
    )
    with stage("report"):
        record = manifest.model_dump(by_alias=True)
        html = render_report(video_url, record, qc_report)
    if not qc_report["passed"] and not params.allow_qc_fail:
        failed = ", ".join(c["name"] for c in qc_report["checks"] if not c["passed"])
        report_url = storage.join(work, "lectures", key, "report.html")
        storage.write_bytes(report_url, html.encode())
        lecture_artifacts({"report.html": report_url, "video.mp4": video_url}, record, qc_report, False)
        raise QCFailed(f"quality check failed ({failed}); nothing was published; report: {report_url}")

    qc_json = json.dumps(without_images(qc_report), indent=2)
    published = publish(params.out, video_url, qc_json, html, manifest.to_json())
    lecture_artifacts(published, record, qc_report, True)
    log.info("published %s", ", ".join(published.values()))
    return published


def lecture_settings(params: LectureParams) -> Settings:
    """The job's settings as the manifest records them (part of its job key)."""
    return Settings(
        engine=params.engine,
        size=params.size,
        precision=params.precision,
        segment_seconds=params.segment_seconds,
        max_segment_seconds=params.max_segment_seconds,
        seed=params.seed,
        memory_budget_gb=params.memory_budget_gb,
    )


def choose_engine(params: LectureParams) -> EngineChoice:
    """Resolve --engine auto|NAME into a concrete engine, and say why."""
    name, reason = registry.resolve(params.engine, params.checkpoints(), params.random_weights)
    weights = "none" if name == "preview" else ("random" if params.random_weights else "checkpoint")
    return EngineChoice(
        name=name,
        version=registry.engine_version(name),
        weights=weights,
        reason=reason,
        checkpoint_dir=params.checkpoints() if name != "preview" else None,
        random_weights=params.random_weights and name != "preview",
    )


def generate_segments(
    plan: list[PlannedSegment],
    face: PortraitPrep,
    text: PromptPrep,
    engine: EngineChoice,
    config: GenerationConfig,
    params: LectureParams,
    work: str,
) -> tuple[list[SegmentOutput], list[SegmentRecord]]:
    """Generate the segments in order; each starts from the handoff state the previous one ended with."""
    task = generate_segment.with_options(result_storage=result_storage(work))
    budget = int(params.memory_budget_gb * 1024**3) if params.memory_budget_gb else None
    progress = _Progress(plan)
    outputs, records = [], []
    previous: SegmentOutput | None = None
    previous_cached = False
    for seg in plan:
        job = SegmentJob(
            key=segment_key(
                audio_sha=seg.audio_sha256,
                portrait_sha=face.sha256,
                prompt=text.text,
                engine=engine.name,
                engine_version=engine.version,
                weights=engine.weights,
                config=config.to_dict(),
                seed=params.seed,
                # The previous key hashes everything that shaped the previous segment, so it names
                # the handoff state it produced without reading that state.
                handoff_sha=previous.key if previous else None,
            ),
            index=seg.index,
            audio_url=seg.audio_url,
            frames=seg.frames,
            portrait_url=face.url,
            face_box=face.face_box,
            prompt=text.text,
            engine=engine,
            config=config.to_dict(),
            seed=params.seed,
            handoff_url=previous.handoff_url if previous else None,
            memory_budget_bytes=budget,
            work=work,
        )
        prefer = previous.details.get("worker") if previous and not previous_cached else None
        output, cached = _run_segment(task, job, params.dispatch, prefer)
        outputs.append(output)
        records.append(
            SegmentRecord(
                index=seg.index,
                start_s=seg.start_sample / AUDIO_SAMPLE_RATE,
                end_s=seg.end_sample / AUDIO_SAMPLE_RATE,
                frames=seg.frames,
                cut=seg.cut,
                key=job.key,
                cached=cached,
                attempts=[AttemptRecord(**a) for a in output.attempts],
                engine={"peak_memory_bytes": output.peak_memory_bytes, **output.details},
            )
        )
        progress.done(seg, cached, output.seconds)
        previous, previous_cached = output, cached
    return outputs, records


def _run_segment(
    task, job: SegmentJob, dispatch: str, prefer: str | None = None
) -> tuple[SegmentOutput, bool]:
    """Run (or reuse) one segment here or on a GPU worker (`prefer`: the one that made the previous
    segment, if idle); returns its output and whether it was cached."""
    if dispatch == "gpu-workers":
        state = run_on_gpu_workers(task, job, prefer)
    else:
        state = task(job, return_state=True)
    output: SegmentOutput = state.result()
    cached = state.name == "Cached"
    if cached and not storage.exists(output.video_url):
        # The cache record outlived the files it points to (a cleaned work store): make them again.
        get_run_logger().warning("segment %d: cached video missing, generating it again", job.index)
        return _run_segment(task.with_options(refresh_cache=True), job, dispatch, prefer)[0], False
    return output, cached


class _Progress:
    """Segments done / total, lecture seconds done, elapsed and ETA: in the log and as a UI artifact."""

    def __init__(self, plan: list[PlannedSegment]):
        self.total = len(plan)
        self.total_s = sum(p.end_sample - p.start_sample for p in plan) / AUDIO_SAMPLE_RATE
        self.count = 0
        self.done_s = 0.0
        self.generated_s = 0.0  # lecture seconds generated (not cached) in this run
        self.generation_wall = 0.0
        self.start = time.monotonic()
        self.artifact = create_progress_artifact(progress=0.0, description=f"0 of {self.total} segments")

    def done(self, seg: PlannedSegment, cached: bool, seconds: float) -> None:
        length = (seg.end_sample - seg.start_sample) / AUDIO_SAMPLE_RATE
        self.count += 1
        self.done_s += length
        if not cached:
            self.generated_s += length
            self.generation_wall += seconds
        rate = self.generation_wall / self.generated_s if self.generated_s else None
        if self.count == self.total:
            eta = _clock(0)
        else:
            eta = _clock(rate * (self.total_s - self.done_s)) if rate is not None else "?"
        get_run_logger().info(
            "segment %d/%d %s · %.0f/%.0f s of lecture · elapsed %s · ETA %s",
            self.count,
            self.total,
            "reused (cached)" if cached else f"generated in {seconds:.1f} s",
            self.done_s,
            self.total_s,
            _clock(time.monotonic() - self.start),
            eta,
        )
        update_progress_artifact(
            self.artifact,
            progress=100.0 * self.count / self.total,
            description=f"{self.count} of {self.total} segments ({100 * self.count // self.total}%) · "
            f"{self.done_s:.0f} of {self.total_s:.0f} s of lecture · ETA {eta}",
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _stage_timer(timings: dict[str, float]):
    @contextmanager
    def stage(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return stage
