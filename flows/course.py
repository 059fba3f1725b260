"""produce_course: every lecture of a course manifest that is not already published, side by side.

For each lecture: if `{out}/manifest.json` exists and its `job_key` equals the key this run would give
the lecture (same input hashes, prompt and settings), the lecture is skipped; otherwise it runs as a
`produce_lecture` subflow. Lectures fan out on a thread pool inside this flow run (one Prefect task per
lecture, each calling the lecture flow as a subflow), and their segments go to the long-lived GPU
workers, so the fan-out costs threads, not processes. (Prefect 3.8.8: a subflow called from a task that
a ThreadPoolTaskRunner runs is tracked as that task's child; `run_deployment` per lecture would also
work but needs a deployment and a CPU-worker process per lecture, and not at all on the embedded API.)

A failing lecture does not stop the others. At the end `summary.json` is written under the course's
output prefix, a table artifact (lecture, status, duration, GPU seconds, QC) is attached to the run,
and the run fails if any lecture failed.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, get_run_context
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, ValidationError, field_validator

from flows.dispatch import require_server
from flows.forms import FormModel
from flows.lecture import WORKER_HOST, LectureParams, choose_engine, lecture_settings, produce_lecture
from flows.notify import ensure_webhook, host_of
from liveavatar_core import size as output_size
from liveavatar_core import storage
from liveavatar_core.course import Course, LectureSpec, load_course, parse_course
from liveavatar_core.engines import registry
from liveavatar_core.errors import LiveAvatarError
from liveavatar_core.manifest import AudioInput, ImageInput, Inputs, Manifest, PromptInput, job_key
from tasks.prepare import prepare_prompt
from tasks.stage import stage_input

SUMMARY_SCHEMA = "liveavatar-batch/course-summary/v1"
Status = Literal["produced", "skipped", "failed"]


class CourseFailed(LiveAvatarError):
    """At least one lecture of the course failed (the others were produced or skipped)."""


class CourseParams(FormModel):
    """A course: every lecture of its manifest not yet published with the same inputs and settings."""

    course: str = Field(
        title="Course manifest",
        description="The course's YAML: a path, file:// or s3:// URL." + WORKER_HOST,
        min_length=1,
    )
    dispatch: Literal["in-process", "gpu-workers"] = Field(
        "gpu-workers",
        title="Dispatch",
        description="gpu-workers: segments go to the long-lived GPU workers, lectures run side by side; "
        "in-process: generate in this process, one lecture after another (one GPU, one model)",
    )
    max_parallel: int = Field(
        8,
        ge=1,
        le=256,
        title="Lectures at once",
        description="Lectures in flight at once (gpu-workers); 2x the GPU workers or more",
    )
    size: str | None = Field(
        None,
        title="Size",
        description="Override every lecture's profile size: auto (shaped like each portrait) or "
        "WIDTHxHEIGHT, e.g. 256x144 for a smoke run; empty: the profiles' sizes",
        json_schema_extra={"pattern": output_size.PATTERN},
    )
    segment_seconds: float | None = Field(
        None, gt=2, title="Segment length (s)", description="Override the profiles' segment target"
    )
    max_segment_seconds: float | None = Field(
        None, gt=2, title="Longest segment (s)", description="Override the profiles' maximum"
    )
    allow_qc_fail: bool = Field(
        False, title="Publish even if checks fail", description="Publish lectures even when QC fails"
    )
    force: bool = Field(
        False, title="Produce all again", description="Produce every lecture, even those already published"
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, title="Memory budget (GiB)", description="Per-segment memory budget"
    )
    work: str | None = Field(
        None,
        title="Work store",
        description="Folder or s3:// prefix for intermediate files; empty: $LIVEAVATAR_WORK on the worker",
    )
    checkpoint_dir: str | None = Field(
        None, title="Checkpoint folder", description="LiveAvatar checkpoints (in-process dispatch)"
    )
    random_weights: bool = Field(
        False, title="Random weights", description="LiveAvatar with random full-size weights (benchmarks)"
    )

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else output_size.normalise(value)

    @field_validator("work", "checkpoint_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def lecture_params(self, spec: LectureSpec) -> LectureParams:
        """The lecture flow's parameters for one lecture of the course."""
        fields: dict[str, Any] = spec.job_fields()
        for name in ("size", "segment_seconds", "max_segment_seconds"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return LectureParams(
            **fields,
            work=self.work,
            dispatch=self.dispatch,
            memory_budget_gb=self.memory_budget_gb,
            allow_qc_fail=self.allow_qc_fail,
            checkpoint_dir=self.checkpoint_dir,
            random_weights=self.random_weights,
        )


class LectureOutcome(BaseModel):
    """One line of the course summary."""

    lecture: str
    title: str | None = None
    status: Status
    out: str
    wall_s: float
    duration_s: float | None = None  # of the published video
    gpu_seconds: float = 0.0  # generation seconds this run spent (segments not cached)
    segments: int = 0
    cached_segments: int = 0
    qc: str = "-"  # pass, FAIL (check names), or - when there is no video
    job_key: str | None = None
    error: str | None = None


def read_course(url: str) -> Course:
    """Load and validate the course manifest at a local path, file:// or s3:// URL."""
    if storage.is_remote(url):
        return parse_course(storage.read_text(url), source=url)
    return load_course(url)


def published_manifest(out: str) -> Manifest | None:
    """The manifest published at `out`, or None when there is none (or it cannot be read as one)."""
    url = storage.join(out, storage.MANIFEST)
    try:
        if not storage.exists(url):
            return None
        return Manifest.model_validate_json(storage.read_bytes(url))
    except (LiveAvatarError, ValidationError, ValueError) as exc:
        get_run_logger().warning(
            "%s: not a readable manifest, so the lecture is produced again (%s)", url, exc
        )
        return None


def expected_job_key(params: LectureParams) -> str:
    """The job key `produce_lecture` would give this lecture: staged input hashes, prompt, settings."""
    work = params.work_store()
    audio = stage_input(params.audio, "--audio", work)
    image = stage_input(params.image, "--image", work)
    text = prepare_prompt(params.prompt, choose_engine(params))
    # job_key reads the hashes, the prompt text and the settings; the rest describes the output.
    inputs = Inputs(
        audio=AudioInput(url=params.audio, sha256=audio.sha256, duration_s=0, sample_rate=0, channels=0, codec=""),
        image=ImageInput(url=params.image, sha256=image.sha256, faces_found=0),
        prompt=PromptInput(text=text.text, tokens=text.tokens, truncated=text.truncated),
    )  # fmt: skip
    return job_key(inputs, lecture_settings(params))


@task(name="lecture", task_run_name="lecture-{spec.lecture_id}", cache_policy=NO_CACHE)
def run_lecture(spec: LectureSpec, params: LectureParams, force: bool) -> LectureOutcome:
    """Skip the lecture when it is published with identical inputs, else produce it (a subflow)."""
    log = get_run_logger()
    start = time.monotonic()
    published = None if force else published_manifest(params.out)
    if published is not None and published.job_key == expected_job_key(params):
        log.info("lecture %s: already published with identical inputs at %s", spec.lecture_id, params.out)
        return _outcome(spec, params, "skipped", start, published, this_run=False)
    produce_lecture.with_options(flow_run_name=f"{spec.course_id}-{spec.lecture_id}")(params)
    manifest = published_manifest(params.out)
    if manifest is None:  # publish writes manifest.json last; a lecture flow that returned wrote it
        raise CourseFailed(f"lecture {spec.lecture_id}: no manifest.json at {params.out} after producing it")
    return _outcome(spec, params, "produced", start, manifest, this_run=True)


def _outcome(
    spec: LectureSpec, params: LectureParams, status: Status, start: float, manifest: Manifest, this_run: bool
) -> LectureOutcome:
    generated = [s for s in manifest.segments if not s.cached]
    failed = [c["name"] for c in manifest.qc.get("checks", []) if not c.get("passed")]
    return LectureOutcome(
        lecture=spec.lecture_id,
        title=spec.title,
        status=status,
        out=params.out,
        wall_s=round(time.monotonic() - start, 3),
        duration_s=manifest.output.duration_s,
        gpu_seconds=round(sum(a.seconds for s in generated for a in s.attempts), 3) if this_run else 0.0,
        segments=len(manifest.segments),
        cached_segments=len(manifest.segments) - len(generated) if this_run else len(manifest.segments),
        qc="pass" if manifest.qc.get("passed") else f"FAIL ({', '.join(failed) or '?'})",
        job_key=manifest.job_key,
    )


def notify_when_done(course_id: str, url: str) -> None:
    """Have the server POST to `url` when this flow run ends (the course's automation, which watched its
    previous run, now watches this one)."""
    run_id = FlowRunContext.get().flow_run.id
    ensure_webhook(f"liveavatar course {course_id} done", url, runs=str(run_id))
    get_run_logger().info("course %s: the end of this run is POSTed to %s", course_id, host_of(url))


@flow(name="produce_course")
def produce_course(params: CourseParams) -> dict[str, Any]:
    """Produce every lecture of the course not already published; write summary.json; fail if any failed."""
    log = get_run_logger()
    started_at = datetime.now(UTC)
    start = time.monotonic()
    course = read_course(params.course)
    if params.dispatch == "gpu-workers":
        require_server()
    if course.notify_webhook:
        notify_when_done(course.id, course.notify_webhook)
    specs = course.lectures_resolved()
    lectures = [(spec, params.lecture_params(spec)) for spec in specs]
    parallel = params.max_parallel if params.dispatch == "gpu-workers" else 1
    if params.dispatch == "gpu-workers" and any(lp.engine == "auto" for _, lp in lectures):
        name, reason = registry.resolve("auto", params.checkpoint_dir, params.random_weights)
        if name == "preview":
            log.warning(
                "engine auto resolves where this flow runs: %s. Name the engine (engine: liveavatar) "
                "for LiveAvatar on the GPU workers",
                reason,
            )
    log.info(
        "course %s: %d lectures, %d at a time, segments %s",
        course.id,
        len(lectures),
        parallel,
        "on the GPU workers" if params.dispatch == "gpu-workers" else "generated in this process",
    )

    outcomes: list[LectureOutcome] = []
    with ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [
            runner.submit(run_lecture, parameters={"spec": spec, "params": lp, "force": params.force})
            for spec, lp in lectures
        ]
        for (spec, lp), future in zip(lectures, futures, strict=True):
            future.wait()
            state = future.state
            if state.is_completed():
                outcomes.append(state.result())
                continue
            error = state.result(raise_on_failure=False)
            outcomes.append(
                LectureOutcome(
                    lecture=spec.lecture_id,
                    title=spec.title,
                    status="failed",
                    out=lp.out,
                    wall_s=_run_seconds(future.task_run_id),
                    error=one_line(error)
                    if isinstance(error, BaseException)
                    else state.message or state.name,
                )
            )

    summary = _summary(course, params, outcomes, started_at, time.monotonic() - start)
    storage.write_json(course.summary_url, summary)
    create_table_artifact(
        key="course-" + re.sub(r"[^a-z0-9-]+", "-", course.id),
        table=[_row(o) for o in outcomes],
        description=f"Course {course.id}: {_counts_line(outcomes)}. Summary: {course.summary_url}",
    )
    log.info("course %s: %s; summary %s", course.id, _counts_line(outcomes), course.summary_url)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = "; ".join(f"{o.lecture}: {o.error}" for o in failed)
        raise CourseFailed(
            f"{len(failed)} of {len(outcomes)} lectures failed ({names}); summary: {course.summary_url}"
        )
    return summary


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads (known errors carry their own message)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, LiveAvatarError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _run_seconds(task_run_id) -> float:
    try:
        client = get_run_context().client
        run = client.read_task_run(task_run_id)
        return round(run.total_run_time.total_seconds(), 3)
    except Exception:  # the duration of a failed lecture is a nicety
        return 0.0


def _summary(
    course: Course, params: CourseParams, outcomes: list[LectureOutcome], started_at: datetime, wall: float
) -> dict[str, Any]:
    counts = {
        status: sum(o.status == status for o in outcomes) for status in ("produced", "skipped", "failed")
    }
    try:
        flow_run_id = str(get_run_context().flow_run.id)
    except Exception:
        flow_run_id = None
    return {
        "schema": SUMMARY_SCHEMA,
        "course": course.id,
        "title": course.title,
        "manifest": params.course,
        "output_prefix": course.output_prefix,
        "flow_run_id": flow_run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_s": round(wall, 3),
        "dispatch": params.dispatch,
        "counts": counts,
        "lecture_minutes_published": round(sum(o.duration_s or 0 for o in outcomes if o.status != "failed") / 60, 3),
        "gpu_seconds": round(sum(o.gpu_seconds for o in outcomes), 3),
        "lectures": [o.model_dump() for o in outcomes],
    }  # fmt: skip


def _row(o: LectureOutcome) -> dict[str, Any]:
    return {
        "lecture": o.lecture,
        "status": o.status,
        "duration": _clock(o.duration_s) if o.duration_s is not None else "-",
        "GPU seconds": round(o.gpu_seconds, 1),
        "QC": o.qc,
        "wall seconds": round(o.wall_s, 1),
        "error": o.error or "",
    }


def summary_table(summary: dict[str, Any]) -> str:
    """summary.json as a plain-text table (what `liveavatar-batch course` prints)."""
    rows = [_row(LectureOutcome.model_validate(o)) for o in summary["lectures"]]
    header = ["lecture", "status", "duration", "GPU seconds", "QC", "wall seconds"]
    cells = [header] + [[str(r[h]) for h in header] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r["error"]:
            lines.append(f"{r['lecture']}: {r['error']}")
    counts = summary["counts"]
    lines.append(
        f"{counts['produced']} produced, {counts['skipped']} skipped, {counts['failed']} failed · "
        f"{summary['gpu_seconds']:.1f} GPU s · {summary['wall_s']:.1f} s wall"
    )
    return "\n".join(lines)


def _counts_line(outcomes: list[LectureOutcome]) -> str:
    return ", ".join(f"{sum(o.status == s for o in outcomes)} {s}" for s in ("produced", "skipped", "failed"))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
