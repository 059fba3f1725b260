"""Where a warm segment's GPU time goes: torch.profiler over it, kernels grouped by kind, and how much of
the wall time the GPU sat idle. The profiler slows the host down, so that idle share is an upper bound
(42% profiled for fp8 on an H200, where CUDA graphs, which remove all launch work, then gained 1%).

Writes OUT/profile_<size>_<precision>_<chains>.txt (the top ops) and .json: per kind of kernel (matrix
products, attention, Triton-fused chains, convolutions, copies, concatenations, other element-wise) its
GPU seconds per clip; GPU seconds per launching op (the outermost and innermost host op around each
kernel's launch); the GPU's busy time (union of kernel intervals) against the profiled call's wall
time; its idle time by gap length and by the host op running in the middle of each gap; and the
number of host-blocking CUDA calls (synchronisations and copies).

PYTHONPATH=. python benchmarks/profile_clip.py OUT [--size 704x384] [--fp8] [--chains compiled] [--clips 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.engine_bench import FRAMES_PER_CLIP, CountingSink, request, run_config  # noqa: E402
from liveavatar_core.engines.liveavatar.engine import LiveAvatarEngine  # noqa: E402

# Kernel kinds by name fragments, first match wins (CUDA kernel names of torch 2.11 on Hopper).
KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("convolution", ("conv", "implicit", "fprop", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "_mm_", "wgmma")),
    ("triton (fused chains)", ("triton",)),
    ("concatenation", ("cat", "catarray")),
    ("copy / cast", ("copy", "memcpy", "memset")),
    ("reduction", ("reduce",)),
)
HOST_OPS = ("cpu_op", "user_annotation")  # aten ops, compiled regions, record_function ranges
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other element-wise"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    if not intervals:
        return 0.0
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return (span - sum(b - a for a, b in gaps(intervals))) / 1e6


def gaps(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The idle stretches between the union of [start, end) intervals."""
    out, reach = [], None
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            out.append((reach, start))
        reach = end if reach is None else max(reach, end)
    return out


def enclosing_ops(ops: list[dict], points: list[float]) -> list[list[str]]:
    """For each time point, the names of the host ops around it, outermost first (ops of one thread,
    properly nested, as the profiler records them)."""
    order = sorted(range(len(points)), key=points.__getitem__)
    events = sorted(ops, key=lambda e: (e["ts"], -e["dur"]))
    out: list[list[str]] = [[] for _ in points]
    stack: list[dict] = []
    i = 0
    for q in order:
        p = points[q]
        while i < len(events) and events[i]["ts"] <= p:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= events[i]["ts"]:
                stack.pop()
            stack.append(events[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= p:
            stack.pop()
        out[q] = [e["name"] for e in stack]
    return out


def label(names: list[str]) -> str:
    if not names:
        return "(no host op)"
    return names[0] if len(names) == 1 else f"{names[0]} > {names[-1]}"


def top(totals: Counter[str], clips: int, n: int) -> dict[str, float]:
    return {k: round(v / clips, 4) for k, v in totals.most_common(n)}


def summarise(trace: dict, clips: int, wall: float) -> dict:
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kind_of(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"] / 1e6
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]  # cuBLASLt, cuDNN and
    # Triton launch through the driver API
    blocking = {name: sum(1 for e in runtime if e["name"].startswith(name)) for name in BLOCKING}
    # the launching thread: the one that made the most CUDA calls
    threads = Counter(e["tid"] for e in runtime)
    main_tid = threads.most_common(1)[0][0] if threads else None
    host_ops = [e for e in events if e.get("cat") in HOST_OPS and e.get("tid") == main_tid]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    launched = [
        (launches[e["args"]["correlation"]], e)
        for e in kernels
        if e.get("args", {}).get("correlation") in launches
    ]
    by_op: Counter[str] = Counter()
    for names, (_, k) in zip(enclosing_ops(host_ops, [r["ts"] for r, _ in launched]), launched, strict=True):
        by_op[label(names)] += k["dur"] / 1e6
    intervals = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    idle = gaps(intervals)
    by_length = {"<20us": 0.0, "20-200us": 0.0, "0.2-2ms": 0.0, ">2ms": 0.0}
    for a, b in idle:
        d = b - a
        key = "<20us" if d < 20 else "20-200us" if d < 200 else "0.2-2ms" if d < 2000 else ">2ms"
        by_length[key] += d / 1e6
    by_host: Counter[str] = Counter()
    long_gaps = [(a, b) for a, b in idle if b - a >= 20]
    for names, (a, b) in zip(
        enclosing_ops(host_ops, [(a + b) / 2 for a, b in long_gaps]), long_gaps, strict=True
    ):
        by_host[label(names)] += (b - a) / 1e6
    busy = busy_seconds(intervals)
    return {
        "clips": clips,
        "wall_seconds_per_clip": round(wall / clips, 4),
        "gpu_busy_seconds_per_clip": round(busy / clips, 4),
        "gpu_idle_share": round(1 - busy / wall, 4),
        "kernels_per_clip": len(kernels) // clips,
        "gpu_seconds_per_clip_by_kind": {k: round(v / clips, 4) for k, v in sorted(by_kind.items())},
        "gpu_seconds_per_clip_by_launching_op": top(by_op, clips, 40),
        "idle_seconds_per_clip_by_gap_length": {k: round(v / clips, 4) for k, v in by_length.items()},
        "idle_seconds_per_clip_by_host_op": top(by_host, clips, 25),
        "host_blocking_calls": blocking,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="704x384")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument(
        "--chains", default="compiled", help="eager, compiled, graphs or overlap (as engine_bench.py's)"
    )
    parser.add_argument("--clips", type=int, default=2, help="48-frame clips in the profiled segment")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = LiveAvatarEngine(random_weights=True, device="cuda")
    precision = "fp8" if args.fp8 else "bf16"
    config = run_config(args.size, precision, args.chains, resident_encoders=False)
    for seed in (0, 1):  # warm: prompt, portrait, compiling, first calls
        engine.generate(request(config, FRAMES_PER_CLIP, seed=seed), CountingSink())
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        result = engine.generate(request(config, args.clips * FRAMES_PER_CLIP, seed=2), CountingSink())
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    name = f"profile_{args.size}_{precision}_{args.chains}"
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=90, max_name_column_width=70)
    (args.out / f"{name}.txt").write_text(table)
    trace_path = args.out / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    summary = summarise(json.loads(trace_path.read_text()), args.clips, wall)
    trace_path.unlink()
    summary["timings"] = result.details["timings"]
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
