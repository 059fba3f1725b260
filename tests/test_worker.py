"""GPU-worker pieces: its share of the host's CPUs, its options, and its concurrency limit on a real
Prefect server (set up by racing processes, reclaimed on restart)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from flows.worker import cpu_share, warm_up_at_profile
from liveavatar_core.engines.base import GiB
from liveavatar_core.engines.preview import PreviewEngine
from liveavatar_core.errors import InputError, OutOfMemory
from tests.fixtures.nap_worker import LONG_S
from tests.fixtures.prefect_server import BIN, ROOT, start_process, stop_process, wait_subscribed

# Imports Prefect first, then waits for a common start time so that the calls really race.
RACER = """
import sys, time
from flows.worker import ensure_gpu_limit
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(ensure_gpu_limit(sys.argv[2], reclaim=sys.argv[3] == "reclaim"))
"""

INSPECT = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    if sys.argv[2] == "take":
        client.increment_concurrency_slots_with_lease([sys.argv[1]], slots=1, mode="concurrency", lease_duration=600)
    limit = client.read_global_concurrency_limit_by_name(sys.argv[1])
    print(json.dumps({"id": str(limit.id), "limit": limit.limit, "active_slots": limit.active_slots}))
"""


def test_each_worker_takes_its_share_of_the_hosts_cores():
    assert cpu_share(cores=64, gpus=4) == 16
    assert cpu_share(cores=64, gpus=1) == 64
    assert cpu_share(cores=4, gpus=8) == 2  # never fewer than 2
    assert cpu_share(cores=6) == 6  # no GPU device nodes on this machine: one worker


def test_a_bad_cpu_thread_count_is_refused_in_one_line():
    command = [str(BIN / "liveavatar-batch"), "worker", "--gpu", "0", "--cpu-threads", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --cpu-threads 0: must be at least 1"]


def test_a_warm_up_that_fits_no_rung_names_the_flag_and_the_way_out(monkeypatch, caplog):
    engine = PreviewEngine()
    caplog.set_level("INFO", logger="liveavatar.worker")
    warm_up_at_profile(engine, "draft")
    assert "warmed up at 384x256 bf16 (profile draft)" in caplog.text

    def out_of_memory(self, request, sink):  # as a GPU too small for every rung
        raise OutOfMemory("CUDA out of memory", needed_bytes=200 * GiB, budget_bytes=80 * GiB)

    monkeypatch.setattr(PreviewEngine, "_generate", out_of_memory)
    with pytest.raises(
        InputError, match=r"^--warmup standard: 704x384 does not fit this GPU .*--warmup none$"
    ):
        warm_up_at_profile(engine, "standard")


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _inspect(name: str, env: dict[str, str], action: str = "read") -> dict:
    proc = _python(INSPECT, name, action, env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_workers_and_deploy_setting_up_one_limit_at_once_all_succeed(prefect_server):
    name = "gpu-race-host-0"
    start = time.time() + 20  # after every racer has imported Prefect (2 cores)
    modes = ["reclaim", "reclaim", "keep", "keep"]  # two workers, two `deploy` runs
    racers = [_python(RACER, str(start), name, mode, env=prefect_server.env) for mode in modes]
    results = [p.communicate(timeout=180) for p in racers]
    for proc, (_, err) in zip(racers, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    answers = sorted(out.strip().splitlines()[-1] for out, _ in results)
    assert answers.count("created") == 1, answers
    limit = _inspect(name, prefect_server.env)
    assert (limit["limit"], limit["active_slots"]) == (1, 0)


def test_a_starting_worker_reclaims_a_slot_left_taken_by_a_dead_process(prefect_server):
    name = "gpu-reclaim-host-0"
    assert (
        _python(RACER, "0", name, "keep", env=prefect_server.env).communicate(timeout=120)[0].strip()
        == "created"
    )
    before = _inspect(name, prefect_server.env, "take")  # a worker that died mid-generation
    assert before["active_slots"] == 1

    out, err = _python(RACER, "0", name, "reclaim", env=prefect_server.env).communicate(timeout=120)
    assert out.strip() == "reclaimed from a previous process on this GPU", err[-2000:]
    after = _inspect(name, prefect_server.env)
    assert after["active_slots"] == 0 and after["limit"] == 1 and after["id"] != before["id"]

    out, _ = _python(RACER, "0", name, "keep", env=prefect_server.env).communicate(timeout=120)
    assert out.strip() == "exists"


def test_a_busy_worker_leaves_the_next_run_to_an_idle_one(prefect_server, tmp_path):
    """Two workers; a long run, then a short one while it runs: the idle worker must take the short one
    at once. (A busy worker that holds a connection to the server can be handed the next run, which then
    waits for it.)"""
    serve = [sys.executable, "-m", "tests.fixtures.nap_worker", "serve"]
    logs = [tmp_path / f"worker-{k}.log" for k in range(2)]
    workers = [start_process(serve, log, prefect_server.env) for log in logs]
    for worker, log in zip(workers, logs, strict=True):
        worker.log_path = log  # type: ignore[attr-defined]
    try:
        wait_subscribed(workers)
        naps = tmp_path / "naps.log"
        rounds = 6
        command = [sys.executable, "-m", "tests.fixtures.nap_worker", "rounds", str(rounds), str(naps)]
        done = subprocess.run(
            command, cwd=ROOT, env=prefect_server.env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        for w in workers:
            stop_process(w)
    events = [line.split() for line in naps.read_text().splitlines()]
    starts = [(int(pid), float(t)) for kind, pid, t in events if kind == "start"]
    assert len(starts) == 2 * rounds
    for k in range(rounds):
        (long_pid, long_start), (short_pid, short_start) = starts[2 * k], starts[2 * k + 1]
        assert short_pid != long_pid, f"round {k}: the busy worker took the short run"
        assert short_start < long_start + LONG_S, f"round {k}: the short run waited for the long one"
