"""`liveavatar-batch worker --gpu K`: one long-lived process per GPU that serves segment generation.

It is a Prefect task worker for `generate_segment`: any lecture's flow run, on any host, queues its
segments with `.delay()` and whichever GPU worker is free takes the next one. The process

* sets CUDA_VISIBLE_DEVICES=K for itself before anything loads CUDA, so the engine sees one device;
* (re)creates the strict global concurrency limit `gpu-<host>-<K>` (limit 1) on the Prefect server and
  sets $LIVEAVATAR_GPU_SLOT, which makes `generate_segment` hold it around every generation;
* takes its share of the host's CPUs (cores / GPUs, `--cpu-threads` to choose) for torch, OpenCV and
  the video encoder, so that co-located workers do not each run thread pools the size of the host;
* loads the engine once, at start, and keeps it for every segment it serves; before it takes work it
  warms the engine up at a course profile's settings (`--warmup`, default standard), so that its first
  segment does not pay for compiling kernels and the encoders' first calls;
* runs one segment at a time and takes the next one only when it is free (`one_at_a_time_task_worker`);
* survives a failing segment: that task run fails, the worker takes the next one.

Parameters and results travel through the work store's result storage (`tasks/results.py`): workers
and flows must use the same work store ($LIVEAVATAR_WORK, an s3:// prefix when hosts differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import socket
from dataclasses import dataclass
from functools import cache

log = logging.getLogger("liveavatar.worker")

HOST_ENV = "LIVEAVATAR_HOST_ID"


@dataclass(frozen=True)
class WorkerOptions:
    gpu: int
    engine: str = "auto"
    checkpoint_dir: str | None = None
    random_weights: bool = False
    work: str | None = None
    host: str | None = None
    cpu_threads: int | None = None  # None: cpu_share()
    warmup: str | None = "standard"  # a course profile to warm the engine up at; None: no warm-up
    memory_budget_gb: float | None = None  # caps the engine's device memory from loading on


# A Prefect server setting for the GPU limits: only its own worker takes a GPU's slot, so a refused take
# is a release the server does not show yet (seen on SQLite); retry within 2 s, not after the slot's
# average hold time (a segment, up to 30 s). infra/docker-compose.yml sets the same on its server.
SLOT_RETRY_SERVER_ENV = {"PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}


def host_id(explicit: str | None = None) -> str:
    """This host's name in concurrency limits: $LIVEAVATAR_HOST_ID or the hostname, as [a-z0-9-]."""
    raw = explicit or os.environ.get(HOST_ENV) or socket.gethostname()
    return re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-") or "host"


def gpu_slot(host: str, gpu: int) -> str:
    """The name of the strict concurrency limit that admits one generation at a time on a GPU."""
    return f"gpu-{host}-{gpu}"


def cpu_share(cores: int | None = None, gpus: int | None = None) -> int:
    """One worker's share of this host's CPUs: the cores this process may use over the host's GPUs (the
    /dev/nvidiaN devices it sees; one worker per GPU), at least 2."""
    cores = cores or len(os.sched_getaffinity(0))
    gpus = gpus or len(glob.glob("/dev/nvidia[0-9]*")) or 1
    return max(2, cores // gpus)


def ensure_gpu_limit(name: str, *, reclaim: bool) -> str:
    """Make sure the strict limit `name` exists with limit 1; returns what was done.

    With `reclaim`, a limit whose slot is taken is created afresh: a starting worker owns its GPU, so
    a taken slot belongs to a process that died on this GPU (its lease would hold it for a minute).
    Recreating (not resetting) the limit keeps that old lease from ever freeing the new one's slot.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    # Workers and `deploy` may race on the same name: losing a create or a delete to another process
    # only means the limit changed under us, so read it again.
    with get_client(sync_client=True) as client:
        for _ in range(5):
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except ObjectAlreadyExists:
                    continue
                return "created"
            if reclaim and limit.active_slots > 0:
                try:
                    client.delete_global_concurrency_limit_by_name(name)
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except (ObjectNotFound, ObjectAlreadyExists):
                    continue
                return "reclaimed from a previous process on this GPU"
            if limit.limit != 1 or not limit.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
                )
                return "set to limit 1"
            return "exists"
    raise RuntimeError(f"concurrency limit {name} kept changing while it was being set up")


def serve_gpu(options: WorkerOptions) -> None:
    """Run the GPU worker until it is stopped (SIGTERM or Ctrl-C). Raises InputError on bad setup."""
    # Before anything imports torch: the engine must see exactly this GPU, as cuda:0.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(options.gpu)
    # Also before torch loads: its OpenMP pool is sized once, from OMP_NUM_THREADS.
    threads = options.cpu_threads or cpu_share()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if options.checkpoint_dir:
        os.environ["LIVEAVATAR_CHECKPOINT_DIR"] = options.checkpoint_dir
    # Before anything compiles: torch.compile's caches where a restarted worker finds them again.
    from liveavatar_core.engines.warmup import use_compile_cache

    compile_cache = use_compile_cache()

    from prefect.settings import get_current_settings

    from flows.dispatch import worker_task
    from flows.lecture import DEFAULT_WORK
    from liveavatar_core import storage
    from liveavatar_core.engines import registry
    from liveavatar_core.errors import InputError
    from liveavatar_core.media import THREADS_ENV
    from tasks.generate import GPU_SLOT_ENV, generate_segment
    from tasks.results import result_storage

    if not get_current_settings().api.url:
        raise InputError("worker", "needs a Prefect server: set PREFECT_API_URL (as for the flows)")
    _limit_threads(threads)
    os.environ[THREADS_ENV] = str(threads)
    log.info("GPU %d: %d CPU threads for torch, OpenCV and the video encoder", options.gpu, threads)
    log.info(
        "GPU %d: compile cache %s",
        options.gpu,
        compile_cache or "temporary ($LIVEAVATAR_COMPILE_CACHE unset)",
    )
    work = options.work or os.environ.get("LIVEAVATAR_WORK") or DEFAULT_WORK
    work = work if storage.is_remote(work) else str(storage.local_path(work))
    if not storage.is_remote(work):
        log.warning("work store %s is local: only flows on this host can use this worker", work)

    slot = gpu_slot(host_id(options.host), options.gpu)
    log.info("GPU %d: concurrency limit %s %s", options.gpu, slot, ensure_gpu_limit(slot, reclaim=True))
    os.environ[GPU_SLOT_ENV] = slot

    checkpoints = options.checkpoint_dir or os.environ.get("LIVEAVATAR_CHECKPOINT_DIR")
    name, reason = registry.resolve(options.engine, checkpoints, options.random_weights)
    preview = name == "preview"
    engine = registry.load(
        registry.EngineSpec(
            name, None if preview else checkpoints, options.random_weights and not preview, None
        ),
        memory_budget_bytes=int(options.memory_budget_gb * 2**30) if options.memory_budget_gb else None,
        prepare_for=profile_config(options.warmup) if options.warmup else None,
    )
    log.info("engine %s loaded (%s)", name, reason)
    if options.warmup:
        warm_up_at_profile(engine, options.warmup)
    log.info("serving generate-segment from %s", work)

    task = generate_segment.with_options(result_storage=result_storage(work))
    try:
        # Also under this worker's own key: the next segment of a lecture prefers the worker that made
        # the previous one (it keeps the state to continue from: flows/dispatch.py).
        asyncio.run(serve_one_at_a_time(task, worker_task(task, slot)))
    except BaseException as exc:  # noqa: B036 - a stop arrives as one of these, maybe grouped
        if not _expected_stop(exc):
            raise
    log.info("GPU %d: worker stopped", options.gpu)


def profile_config(profile_name: str):
    """The GenerationConfig a course profile asks for (what the worker loads and warms up for)."""
    from liveavatar_core.course import PROFILES
    from liveavatar_core.engines import GenerationConfig

    profile = PROFILES[profile_name]
    return GenerationConfig.for_output(profile.size, profile.precision)


def warm_up_at_profile(engine, profile_name: str) -> None:
    """Warm `engine` up at a course profile's size and precision; InputError if no rung fits the GPU."""
    from liveavatar_core.course import PROFILES
    from liveavatar_core.engines.warmup import warm_up
    from liveavatar_core.errors import InputError, OutOfMemory

    profile = PROFILES[profile_name]
    try:
        done = warm_up(engine, profile_config(profile_name))
    except OutOfMemory as exc:
        raise InputError(
            f"--warmup {profile_name}",
            f"{profile.size} does not fit this GPU ({exc}); warm up at a smaller profile or --warmup none",
        ) from None
    log.info(
        "warmed up at %s %s (profile %s) in %.1f s, rung %s",
        profile.size, profile.precision, profile_name, done.seconds, done.rung,
    )  # fmt: skip


def _limit_threads(threads: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


async def serve_one_at_a_time(*tasks) -> None:
    """Serve `tasks`' background runs from this process, one at a time, until stopped."""
    worker = one_at_a_time_task_worker()(*tasks, limit=1)
    for served, task in zip(worker.tasks, tasks, strict=True):
        served.task_key = task.task_key  # its copies get the function's key: keep a worker's own key
    await worker.astart()


def _expected_stop(exc: BaseException) -> bool:
    from prefect.task_worker import StopTaskWorker

    expected = (StopTaskWorker, asyncio.CancelledError, KeyboardInterrupt, SystemExit)
    if isinstance(exc, BaseExceptionGroup):
        return all(_expected_stop(e) for e in exc.exceptions)
    return isinstance(exc, expected)


@cache
def one_at_a_time_task_worker() -> type:
    """The `OneAtATimeTaskWorker` class (built on first use: Prefect loads after CUDA_VISIBLE_DEVICES)."""
    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription
    from prefect.settings import get_current_settings
    from prefect.task_worker import TaskWorker
    from websockets.exceptions import WebSocketException

    class OneAtATimeTaskWorker(TaskWorker):
        """Prefect's TaskWorker, except that it takes a run from the server only when it can start it.

        The stock worker acknowledges the next run as soon as the server sends it and then waits for
        a free slot: killed meanwhile, that run is lost (acknowledged, so the server will not send it
        again, and still "Scheduled", so no one notices). Here the worker is connected to the server only
        while it is free, and takes (acknowledges) one run per connection: a busy worker is handed
        nothing, so the next run goes to an idle worker or waits on the server for the first one free.

        SIGTERM (docker stop) lets the segment in flight finish, takes no new one, then exits; a second
        SIGTERM, or one while idle, exits at once.
        """

        _stop_requested = False

        def handle_sigterm(self, signum: object = None, frame: object = None) -> None:
            busy = self._limiter is not None and self._limiter.available_tokens < 1
            if not busy or self._stop_requested:
                raise SystemExit(0)
            self._stop_requested = True
            log.info("SIGTERM: finishing the segment in flight, then stopping (SIGTERM again to stop now)")

        async def _subscribe_to_task_scheduling(self) -> None:
            base_url = get_current_settings().api.url
            if base_url is None:
                raise ValueError("PREFECT_API_URL must be set to use the task worker")
            logging.getLogger("prefect.task_worker").info(
                "Subscribing to runs of task(s): %s (one at a time)", ", ".join(sorted(self.task_keys))
            )
            while True:
                while self._limiter is not None and self._limiter.available_tokens < 1:
                    await asyncio.sleep(0.05)
                if self._stop_requested:
                    return
                task_run = await self._next_run(base_url)
                logging.getLogger("prefect.task_worker").info(
                    "Received task run: %s - %s", task_run.id, task_run.name
                )
                if await self._acquire_token(task_run.id):
                    assert self._runs_task_group is not None
                    self._runs_task_group.start_soon(self._safe_submit_scheduled_task_run, task_run)

        async def _next_run(self, base_url: str) -> TaskRun:
            """Connect, take one run, disconnect. The server hands a run to whichever connected worker
            asks first, and a connection asks again as soon as its last run is acknowledged: a busy
            worker that stayed connected would be handed the next run while another worker sits idle.
            A run sent in the moment before the disconnect goes back to the server's queue."""
            subscription = Subscription(
                model=TaskRun,
                path="/task_runs/subscriptions/scheduled",
                keys=self.task_keys,
                client_id=self.client_id,
                base_url=base_url,
            )
            try:
                return await subscription.__anext__()
            finally:
                with contextlib.suppress(RuntimeError, OSError, WebSocketException):
                    await subscription.websocket.close()

    return OneAtATimeTaskWorker
