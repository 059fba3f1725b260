"""Send one segment to the long-lived GPU workers and wait for it, surviving a worker that dies.

`generate_segment.delay(job)` creates a deferred task run; the Prefect server hands it to one of the
task workers serving `generate_segment` (`liveavatar-batch worker --gpu K`). Its parameters and its
result travel through the task's result storage (the work store), so the worker may be on any host.

Waiting is a loop, not `future.wait()`: Prefect's waiter (3.8 and 3.9) listens for Completed/Failed/
Crashed/Cancelled events only, so a run that ends "Cached" would be waited on forever. And a task run
whose worker was killed stays "Running" on the server for good (Prefect has heartbeats for flow runs,
not task runs); the worker's heartbeat in the work store (`tasks/heartbeat.py`) tells the two apart.
A segment whose heartbeat stops is put back in the queue (the same task run, state Scheduled, so its
stored parameters are reused) for whichever worker is free, the restarted one or another. Its
finished predecessors are untouched: they are cache hits.

A segment that no GPU worker is there to take (none subscribed, none busy holding its GPU's leased
slot) for $LIVEAVATAR_WORKER_WAIT_S seconds (default 600) is taken out of the queue and the lecture
fails with a message that says how to start a worker, or to generate in-process.

A segment prefers the worker that made its predecessor: that worker keeps the state the segment
continues from exactly (the LiveAvatar engine's step rings; elsewhere the engine replays an
approximation). Every GPU worker also serves `generate_segment` under its own task key
(`worker_task`); if the preferred worker is idle within `PREFER_WAIT_S` the segment is queued for it
alone, else for any worker, and a preferred worker that goes away hands the segment back to any.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, get_current_settings, temporary_settings
from prefect.states import Cancelled, Scheduled, State

from liveavatar_core import storage
from liveavatar_core.envnum import positive_seconds
from liveavatar_core.errors import InputError, LiveAvatarError
from tasks.heartbeat import heartbeat_url, read_beat, stale_after
from tasks.models import SegmentJob

POLL_S = (0.25, 0.5, 1.0, 2.0)  # waits between looks at the task run's state: soon at first, then every 2 s
NO_WORKER_WARNING_S = 60.0  # warn when a segment has been queued this long with no worker serving it
WORKER_CHECK_S = 5.0  # how often a queued segment asks whether any GPU worker is there at all
MAX_LOSSES = 3  # a segment whose worker dies this many times fails the lecture
# How long a queued segment waits with no GPU worker at all (none connected, none busy) before the
# lecture fails; the deployments set it (deployments/prefect.yaml), `course --worker-wait` too.
WORKER_WAIT_ENV = "LIVEAVATAR_WORKER_WAIT_S"
DEFAULT_WORKER_WAIT_S = 600.0
GPU_SLOT_PREFIX = "gpu-"  # the GPU workers' concurrency limits (flows/worker.py: gpu-<host>-<K>)
PREFER_WAIT_S = 2.0  # how long a segment waits for the worker that made its predecessor to be idle


class WorkerLost(LiveAvatarError):
    """A segment's GPU worker died too often, or the workers could not take the segment at all."""


class NoGpuWorker(WorkerLost):
    """No GPU worker served the segment's task within the bounded wait."""


class SegmentFailed(LiveAvatarError):
    """A segment failed on a GPU worker with an error that could not be unpickled here (see `_failure`)."""


def require_server(flag: str = "--dispatch gpu-workers") -> None:
    """GPU workers reach the flow only through a Prefect server; the embedded (ephemeral) API has none."""
    if not get_current_settings().api.url:
        raise InputError(flag, "needs a Prefect server that the GPU workers also use: set PREFECT_API_URL")


def worker_wait_s() -> float:
    """$LIVEAVATAR_WORKER_WAIT_S: seconds a segment waits with no GPU worker before the lecture fails."""
    return positive_seconds(WORKER_WAIT_ENV, DEFAULT_WORKER_WAIT_S)


def worker_task(task, slot: str):
    """`task` as only the GPU worker `slot` serves it (each GPU worker serves this and `task`)."""
    own = task.with_options()
    own.task_key = f"{task.task_key}@{slot}"
    return own


def pick_task(task, prefer: str | None, client, wait_s: float = PREFER_WAIT_S):
    """`worker_task(task, prefer)` if that worker is idle (subscribed) within `wait_s`, else `task`."""
    if prefer:
        own = worker_task(task, prefer)
        deadline = time.monotonic() + wait_s
        while not _workers_serving(client, own.task_key, on_error=False):
            if time.monotonic() >= deadline:
                return task
            time.sleep(0.1)
        return own
    return task


def run_on_gpu_workers(task, job: SegmentJob, prefer: str | None = None) -> State:
    """Queue `job` for the GPU workers (for the worker `prefer` if it is idle) and return the task
    run's final state."""
    require_server()
    log = get_run_logger()
    # The worker runs its own copy of the task; it sees the submitter's settings (Prefect ships them
    # with the parameters), so a refresh asked for here reaches it as a setting, not a task option.
    refresh = {PREFECT_TASKS_REFRESH_CACHE: True} if task.refresh_cache else {}
    with get_client(sync_client=True) as client:
        target = pick_task(task, prefer, client)
    with temporary_settings(updates=refresh):
        future = target.delay(job)
    run_id: UUID = future.task_run_id
    beat_url = heartbeat_url(job.work, str(run_id))
    watch = _Liveness(beat_url)
    losses = 0
    queued_since = time.monotonic()
    warned_at = queued_since
    unserved = _Unserved(task.task_key, worker_wait_s())
    polls = 0
    with get_client(sync_client=True) as client:
        while True:
            future.wait(timeout=POLL_S[min(polls, len(POLL_S) - 1)])  # early on most final states, not Cached
            polls += 1
            try:
                run = client.read_task_run(run_id)
            except ObjectNotFound:
                raise WorkerLost(
                    f"segment {job.index}: the GPU workers dropped its task run (they could not read its "
                    f"parameters): flows and GPU workers must share the work store ({job.work})"
                ) from None
            state = run.state
            if state is None:
                continue
            if state.is_final():
                _forget(beat_url)
                if not state.is_completed():
                    raise _failure(state, job)
                return state
            if state.type in (StateType.RUNNING, StateType.PENDING):
                queued_since = time.monotonic()
                unserved.reset()
                if not watch.alive():
                    losses += 1
                    if losses >= MAX_LOSSES:
                        raise WorkerLost(
                            f"segment {job.index}: its GPU worker stopped {losses} times "
                            f"(no heartbeat for {stale_after():.0f} s at {beat_url})"
                        )
                    log.warning(
                        "segment %d: its GPU worker stopped (no heartbeat for %.0f s); "
                        "queuing it again for any worker",
                        job.index,
                        stale_after(),
                    )
                    _requeue(client, run_id)
                    watch = _Liveness(beat_url)
            else:
                watch = _Liveness(beat_url)  # queued (again): the clock starts when a worker takes it
                if unserved.expired(client):
                    _cancel(client, run_id)
                    raise NoGpuWorker(f"segment {job.index}: {unserved.advice()}")
                now = time.monotonic()
                if target is not task and now - queued_since > 2 * PREFER_WAIT_S:
                    if not _workers_serving(client, target.task_key, on_error=True):
                        # The preferred worker went away or took other work: any worker will do.
                        cancel = Cancelled(message="queued again for any worker")
                        if client.set_task_run_state(run_id, cancel).status != SetStateStatus.ACCEPT:
                            continue  # a worker took it meanwhile
                        target = task
                        with temporary_settings(updates=refresh):
                            future = task.delay(job)
                        run_id, beat_url = (
                            future.task_run_id,
                            heartbeat_url(job.work, str(future.task_run_id)),
                        )
                        watch, queued_since = _Liveness(beat_url), now
                        continue
                if now - queued_since > NO_WORKER_WARNING_S and now - warned_at > NO_WORKER_WARNING_S:
                    warned_at = now
                    if unserved.since is not None:
                        log.warning(
                            "segment %d: queued %.0f s and no GPU worker serves generate-segment; the "
                            "lecture fails if none comes within %.0f s. %s",
                            job.index, now - queued_since, unserved.wait_s, HOW_TO_SERVE,
                        )  # fmt: skip


class _Liveness:
    """Whether a running segment's heartbeat still changes, judged on this process's clock."""

    def __init__(self, url: str):
        self.url = url
        self.last_beat: int | None = None
        self.changed_at = time.monotonic()

    def alive(self) -> bool:
        beat = read_beat(self.url)
        if beat is not None and beat != self.last_beat:
            self.last_beat = beat
            self.changed_at = time.monotonic()
        return time.monotonic() - self.changed_at < stale_after()


def _failure(state: State, job: SegmentJob) -> BaseException:
    """The error a failed segment raised on its worker, to raise here as if it had run here.

    The worker stores it pickled with the result (our own errors define __reduce__ for this). A
    third-party exception that does not unpickle is rebuilt from the state's message (Prefect writes
    "Task run encountered an exception Kind: text").
    """
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        error = None
    if isinstance(error, BaseException):
        return error
    text = (state.message or state.name or "failed").removeprefix("Task run encountered an exception ")
    kind, sep, rest = text.partition(": ")
    return SegmentFailed(rest if sep and kind.isidentifier() else text)


HOW_TO_SERVE = (
    "Start one GPU worker per GPU (`liveavatar-batch worker --gpu N`, same code version as this flow); "
    "for a CPU try-out, `liveavatar-batch worker --gpu 0 --engine preview`; or generate in the flow's "
    "own process (Dispatch: in-process, `--dispatch in-process`)"
)


class _Unserved:
    """How long no GPU worker has been there for a queued segment: none subscribed to its task and
    none busy (every busy GPU worker holds its GPU's slot, a lease that a crashed worker loses)."""

    def __init__(self, task_key: str, wait_s: float):
        self.task_key = task_key
        self.wait_s = wait_s
        self.since: float | None = None
        self.checked_at = -WORKER_CHECK_S

    def reset(self) -> None:
        self.since = None

    def expired(self, client) -> bool:
        now = time.monotonic()
        if now - self.checked_at >= WORKER_CHECK_S:
            self.checked_at = now
            if _workers_serving(client, self.task_key) or _gpu_slots_busy(client):
                self.since = None
            elif self.since is None:
                self.since = now
        return self.since is not None and now - self.since >= self.wait_s

    def advice(self) -> str:
        return (
            f"no GPU worker served generate-segment for {self.wait_s:.0f} s ({WORKER_WAIT_ENV}), so the "
            f"lecture stops here. {HOW_TO_SERVE}"
        )


def _gpu_slots_busy(client) -> bool:
    """Whether a GPU worker is generating now: one of the gpu-* limits has its slot taken."""
    try:
        limits = client.read_global_concurrency_limits(limit=200)
    except Exception:  # cannot tell: count it as busy, so a lecture is not failed over a read error
        return True
    return any(lim.name.startswith(GPU_SLOT_PREFIX) and lim.active_slots > 0 for lim in limits)


def _cancel(client, run_id: UUID) -> None:
    """Take the segment out of the queue, so a worker that starts later does not generate it for no one."""
    try:
        client.set_task_run_state(run_id, Cancelled(message="no GPU worker came to take it"), force=True)
    except Exception:  # the lecture fails either way; a stale queued segment is a cache miss at most
        pass


def _requeue(client, run_id: UUID) -> None:
    """Put the task run back in the server's queue with its stored parameters (deferred Scheduled)."""
    parameters_id = next(
        (
            s.state_details.task_parameters_id
            for s in client.read_task_run_states(run_id)
            if s.state_details.task_parameters_id
        ),
        None,
    )
    if parameters_id is None:
        raise WorkerLost(f"task run {run_id}: no stored parameters to queue it again with")
    state = Scheduled(message="its GPU worker stopped; queued again")
    state.state_details.deferred = True
    state.state_details.task_parameters_id = parameters_id
    client.set_task_run_state(run_id, state, force=True)


def _workers_serving(client, task_key: str, on_error: bool = True) -> bool:
    """Whether a task worker is subscribed to `task_key` now (an idle one: a busy one disconnects)."""
    try:
        response = client._client.post(
            "/task_workers/filter", json={"task_worker_filter": {"task_keys": [task_key]}}
        )
        response.raise_for_status()
        return bool(response.json())
    except Exception:  # cannot tell: `on_error` (served, for the no-worker bound; not, for a preference)
        return on_error


def _forget(url: str) -> None:
    try:
        storage.delete(url)
    except Exception:  # a leftover heartbeat costs a few bytes
        pass
