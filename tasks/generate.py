"""Generate one segment through the engine's degrade ladder. Cached by content across runs.

The engine is loaded once per process (the registry keeps it), so a flow or a long-lived worker
pays for loading only once. Frames stream into an H.264 writer; the finished segment video and the
handoff state are stored under the segment's content key.

In a GPU worker (`liveavatar-batch worker --gpu K`, which sets $LIVEAVATAR_GPU_SLOT) every generation
holds that GPU's strict Prefect concurrency limit (limit 1), beats a heartbeat in the work store so the
waiting flow can tell a dead worker from a slow one, and loads checkpoints from the worker's own
$LIVEAVATAR_CHECKPOINT_DIR (checkpoints are local to each GPU host).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext

from liveavatar_core import audio, storage
from liveavatar_core.engines import GenerationConfig, SegmentRequest, generate_with_ladder, registry
from liveavatar_core.media import VideoWriter

from .common import TRANSIENT_RETRIES
from .heartbeat import Heartbeat, heartbeat_url
from .models import SegmentJob, SegmentOutput

GPU_SLOT_ENV = "LIVEAVATAR_GPU_SLOT"  # set by the GPU worker: the name of its GPU's concurrency limit
# Prefect's minimum lease: a killed worker's slot is freed by the server within about a minute (a
# restarted worker reclaims its own GPU's slot at once; see flows/worker.py).
SLOT_LEASE_S = 60


def segment_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Prefect cache key: the job's content key (audio, portrait, prompt, engine, config, seed, handoff)."""
    return f"segment-{parameters['job'].key}"


@task(name="generate-segment", cache_key_fn=segment_cache_key, persist_result=True, **TRANSIENT_RETRIES)
def generate_segment(job: SegmentJob) -> SegmentOutput:
    """Run the segment down the ladder, store its video and handoff state, return where they are."""
    slot = os.environ.get(GPU_SLOT_ENV)
    with ExitStack() as stack:
        checkpoint_dir = job.engine.checkpoint_dir
        if slot:
            run = TaskRunContext.get()
            run_id = str(run.task_run.id) if run else "unknown"
            # The heartbeat starts before the slot is taken: waiting for the GPU is being alive too.
            stack.enter_context(Heartbeat(heartbeat_url(job.work, run_id), slot=slot, segment=job.key))
            asked = time.monotonic()
            stack.enter_context(concurrency(slot, occupy=1, strict=True, lease_duration=SLOT_LEASE_S))
            waited = time.monotonic() - asked
            checkpoint_dir = os.environ.get("LIVEAVATAR_CHECKPOINT_DIR") or checkpoint_dir
            get_run_logger().info(
                "segment %d: generating on %s (key %s)%s", job.index, slot, job.key[:12],
                f", after waiting {waited:.1f} s for the slot" if waited >= 1 else "",
            )  # fmt: skip
        output = _generate(job, checkpoint_dir)
        if slot:  # the worker that keeps this segment's state for the next one (flows/dispatch.py)
            output = output.model_copy(update={"details": {**output.details, "worker": slot}})
        return output


def _generate(job: SegmentJob, checkpoint_dir: str | None) -> SegmentOutput:
    config = GenerationConfig.from_dict(job.config)
    engine = registry.load(
        registry.EngineSpec(job.engine.name, checkpoint_dir, job.engine.random_weights, job.engine.device),
        memory_budget_bytes=job.memory_budget_bytes,  # a device limit from loading on, not an estimate
        prepare_for=config,
    )
    with storage.local_file(job.audio_url) as wav:
        samples = audio.read_samples(wav, 0, None)
    portrait = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(storage.read_bytes(job.portrait_url), np.uint8), cv2.IMREAD_COLOR),
        cv2.COLOR_BGR2RGB,
    )
    handoff = storage.read_bytes(job.handoff_url) if job.handoff_url else None
    request = SegmentRequest(
        audio=samples,
        num_frames=job.frames,
        portrait=portrait,
        prompt=job.prompt,
        seed=job.seed,
        config=config,
        face_box=job.face_box,
        handoff=handoff,
        memory_budget_bytes=job.memory_budget_bytes,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "segment.mp4"
        outcome = generate_with_ladder(
            engine, request, lambda: VideoWriter(path, width=config.width, height=config.height)
        )
        video_url = storage.join(job.work, "segments", f"{job.key}.mp4")
        handoff_url = storage.join(job.work, "segments", f"{job.key}.handoff")
        storage.upload(path, video_url)
        storage.write_bytes(handoff_url, outcome.result.handoff)
    last = outcome.attempts[-1]
    get_run_logger().info(
        "segment %d: %d frames on rung %s in %.1f s", job.index, job.frames, last.rung, last.seconds
    )
    return SegmentOutput(
        index=job.index,
        key=job.key,
        video_url=video_url,
        handoff_url=handoff_url,
        frames=outcome.result.frames_written,
        attempts=[a.to_dict() for a in outcome.attempts],
        seconds=outcome.result.seconds,
        peak_memory_bytes=outcome.result.peak_memory_bytes,
        details=outcome.result.details,
    )
