"""A GPU worker's warm-up with an empty compile cache against one that a previous process filled.

Runs `--runs` fresh processes one after another (default 2), each as a restarted worker: point torch's
compile caches at one directory (`use_compile_cache`, as `flows/worker.py` does), build the engine with
seeded random full-size weights, then `warm_up` at `--size` / `--precision` (two short segments, what a
worker does before it takes work). The first process finds the directory empty (a worker whose cache
lived in the container's temp dir after a restart, as before), the later ones find it filled. Reported
per process: engine load seconds, warm-up seconds, Inductor's FX graph cache hits and misses.

    PYTHONPATH=. python benchmarks/warmup_bench.py OUT [--size 704x384] [--precision bf16] [--runs 2]
    PYTHONPATH=. python benchmarks/warmup_bench.py OUT --tiny --size 64x64     # CPU check (compiles)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def child(args: argparse.Namespace) -> dict:
    from liveavatar_core.engines.warmup import use_compile_cache

    use_compile_cache(args.cache)  # before anything compiles, as in the worker
    import torch
    from torch._dynamo.utils import counters

    from liveavatar_core.engines.base import GenerationConfig
    from liveavatar_core.engines.liveavatar.engine import LiveAvatarEngine
    from liveavatar_core.engines.warmup import warm_up

    t0 = time.perf_counter()
    engine = LiveAvatarEngine(random_weights=True, tiny=args.tiny)
    load = time.perf_counter() - t0
    config = GenerationConfig.for_output(args.size, args.precision)
    if args.tiny:
        config = config.replace(compile=True)  # a CPU engine does not compile by default
    done = warm_up(engine, config)
    return {
        "load_s": load,
        "warmup_s": done.seconds,
        "rung": done.rung,
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--size", default="704x384")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cache", help="(child) the compile cache directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or tempfile.mkdtemp(prefix="compile-cache-")
    rows = []
    for i in range(args.runs):
        command = [sys.executable, __file__, "--child", "--cache", cache, "--size", args.size]
        command += ["--precision", args.precision] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"warm-up run {i} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        row = {"run": i, "cache": "empty" if i == 0 else "filled by run 0", **json.loads(lines[-1][7:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"size": args.size, "precision": args.precision, "rows": rows}
    (args.out / "warmup_bench.json").write_text(json.dumps(result, indent=1))
    table = [
        f"Worker warm-up at {args.size} {args.precision} ({rows[0]['device']}), fresh process each",
        "",
        "| run | compile cache | engine load s | warm-up s | FX graph hits / misses |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['run']} | {r['cache']} | {r['load_s']:.1f} | {r['warmup_s']:.1f} | "
            f"{r['fxgraph_cache_hit']} / {r['fxgraph_cache_miss']} |"
        )
    (args.out / "warmup_bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
