"""A segment prefers the GPU worker that made its predecessor (that worker keeps the state it continues
from), on a real Prefect server with two real task workers; without that worker it goes to any."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.fixtures.prefect_server import ROOT, start_process, stop_process, wait_subscribed


def _naps(
    prefect_server, tmp_path, slot: str, n: int, wait_s: float
) -> tuple[list[str], dict[str, int], list[int]]:
    """Run `n` naps preferring `slot` against workers "a" and "b": (task keys, slot -> pid, nap pids)."""
    logs = [tmp_path / f"worker-{s}.log" for s in "ab"]
    workers = [
        start_process(
            [sys.executable, "-m", "tests.fixtures.nap_worker", "serve", s], log, prefect_server.env
        )
        for s, log in zip("ab", logs, strict=True)
    ]
    for worker, log in zip(workers, logs, strict=True):
        worker.log_path = log  # type: ignore[attr-defined]
    naps = tmp_path / f"naps-{slot}.log"
    try:
        wait_subscribed(workers)
        command = [
            sys.executable,
            "-m",
            "tests.fixtures.nap_worker",
            "prefer",
            str(n),
            str(naps),
            slot,
            str(wait_s),
        ]
        done = subprocess.run(
            command, cwd=ROOT, env=prefect_server.env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        for w in workers:
            stop_process(w)
    pids = {}
    for log in logs:
        slot_name, pid = re.search(r"slot (\w+) pid (\d+)", log.read_text()).groups()
        pids[slot_name] = int(pid)
    started = [int(line.split()[1]) for line in naps.read_text().splitlines() if line.startswith("start")]
    return done.stdout.split(), pids, started


def test_segments_go_to_the_preferred_worker_while_it_is_idle(prefect_server, tmp_path):
    keys, pids, started = _naps(prefect_server, tmp_path, "b", 8, 5.0)
    assert len(started) == 8 and all(key.endswith("@b") for key in keys)
    assert started == [pids["b"]] * 8  # two idle workers: without the preference about half go to "a"


def test_without_the_preferred_worker_any_worker_takes_the_segment(prefect_server, tmp_path):
    keys, pids, started = _naps(prefect_server, tmp_path, "gone", 2, 0.5)
    assert len(started) == 2 and not any("@" in key for key in keys)
    assert set(started) <= set(pids.values())
