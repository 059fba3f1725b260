"""A lecture sent to GPU workers when none is there says so and fails after a bounded wait, never hangs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from flows.dispatch import WORKER_WAIT_ENV, _gpu_slots_busy

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "examples" / "lecture.mp3"
IMAGE = ROOT / "examples" / "portrait.jpg"
WAIT_S = 4


def test_a_lecture_with_no_gpu_worker_fails_after_the_bound_and_says_what_to_start(cli_env, tmp_path):
    env = dict(cli_env, LIVEAVATAR_DISPATCH="gpu-workers", **{WORKER_WAIT_ENV: str(WAIT_S)})
    argv = [sys.executable, "-m", "flows.cli", "produce", "--audio", str(AUDIO), "--image", str(IMAGE)]
    argv += ["--prompt", "a teacher in a studio", "--out", str(tmp_path / "out"), "--engine", "preview"]
    argv += ["--size", "144x256", "--work", str(tmp_path / "work")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    screen = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    last = screen[-1]
    assert last.startswith("error: segment 0: no GPU worker served generate-segment"), last
    assert f"for {WAIT_S} s ({WORKER_WAIT_ENV})" in last
    assert "`liveavatar-batch worker --gpu 0 --engine preview`" in last
    assert "in-process" in last
    assert not (tmp_path / "out").exists()
    # The segment left the queue: a worker that starts later does not generate it for no one.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-segment"))
        )
    mine = [r for r in runs if r.state and r.state.message == "no GPU worker came to take it"]
    assert mine and all(r.state.is_cancelled() for r in mine)


def test_a_busy_gpu_slot_counts_as_a_worker_being_there(prefect_api):
    """A busy GPU worker is not subscribed (it takes one run at a time) but holds its GPU's leased slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"gpu-nogpu-test-{int(time.time())}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        try:
            assert not _gpu_slots_busy(client)
            lease = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=60
            )
            assert _gpu_slots_busy(client)
            client.release_concurrency_slots_with_lease(lease.json()["lease_id"])
            assert not _gpu_slots_busy(client)
        finally:
            client.delete_global_concurrency_limit_by_name(name)
