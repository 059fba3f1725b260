"""Start-up of `liveavatar-batch produce`: seconds from the command to the flow's first progress line.

Runs the CLI as a person does (a subprocess, no PREFECT_API_URL) on the bundled sample with the preview
engine, in a fresh PREFECT_HOME: the first run is cold (it starts the local Prefect server and creates
its database), the next ones are warm (they reuse it). Also times a misspelt audio path (refused before
any server) and, for comparison, a warm run's imports alone. Stops the local server at the end.

    .venv/bin/python benchmarks/startup_bench.py --warm-runs 3 --out benchmarks/results

Target (issue 9): the first progress line within 5 s on a 2-core machine (warm). Wall times depend on
what else the machine runs, so the command's own CPU seconds up to that line are recorded too, and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from flows import local_server

ROOT = Path(__file__).resolve().parents[1]
FIRST_LINE = "Beginning flow run"  # the flow's first progress line


def timed_produce(home: Path, tmp: Path, audio: Path, checkout: Path = ROOT) -> dict:
    """Run `produce` once; seconds to the first progress line and to the end, and the exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "flows.cli", "produce", "--audio", str(audio)]
    argv += ["--image", str(ROOT / "examples/portrait.jpg"), "--prompt", "a teacher in a studio"]
    argv += ["--out", str(tmp / f"out-{time.time_ns()}"), "--engine", "preview", "--size", "256x144"]
    argv += ["--work", str(tmp / "work")]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watch = psutil.Process(proc.pid)
    first = first_cpu = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and FIRST_LINE in line:
            first = time.monotonic() - start
            cpu = watch.cpu_times()
            first_cpu = cpu.user + cpu.system
    code = proc.wait()
    return {
        "first_line_s": first,
        "first_line_cpu_s": first_cpu,  # the command's own CPU time: what it costs on an idle machine
        "total_s": time.monotonic() - start,
        "exit": code,
        "tail": lines[-3:],
    }


def import_seconds(checkout: Path) -> float:
    """What a warm run pays before it talks to any server: Python, the CLI and the flow's imports."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import flows.cli, flows.lecture"], cwd=checkout, check=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write startup_bench.json here")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        help="run the CLI of this checkout (e.g. an earlier commit's worktree, for comparison)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "prefect-home"
        try:
            sample = ROOT / "examples/lecture.mp3"
            missing = timed_produce(home, tmp, tmp / "no-such-lecture.mp3", args.checkout)
            cold = timed_produce(home, tmp, sample, args.checkout)
            warm = [timed_produce(home, tmp, sample, args.checkout) for _ in range(args.warm_runs)]
            imports = [import_seconds(args.checkout) for _ in range(args.warm_runs)]
        finally:
            local_server.stop(home)
    result = {
        "checkout": str(args.checkout),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "load_average_at_end": os.getloadavg(),
        "misspelt_path_refused_s": round(missing["total_s"], 2),
        "cold_first_line_s": cold["first_line_s"],
        "warm_first_line_s": [r["first_line_s"] for r in warm],
        "warm_first_line_median_s": statistics.median(r["first_line_s"] for r in warm),
        "cold_first_line_cpu_s": cold["first_line_cpu_s"],
        "warm_first_line_cpu_s": [r["first_line_cpu_s"] for r in warm],
        "warm_total_s": [round(r["total_s"], 1) for r in warm],
        "imports_only_median_s": statistics.median(imports),
        "exits": [missing["exit"], cold["exit"], *[r["exit"] for r in warm]],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
