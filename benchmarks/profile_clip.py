"""Where a warm segment's GPU time goes: torch.profiler over it, kernels grouped by kind, and how much of
the wall time the GPU sat idle. The profiler slows the host down, so that idle share is an upper bound
(42% profiled for fp8 on an H200, where CUDA graphs, which remove all launch work, then gained 1%).

Writes OUT/profile_<size>[_fp8][_compiled].txt (the top ops) and .json: per kind of kernel (matrix
products, attention, Triton-fused chains, convolutions, copies, concatenations, other element-wise) its
GPU seconds per clip; the GPU's busy time (union of kernel intervals) against the profiled call's wall
time; and the number of host-blocking CUDA calls (synchronisations and pageable copies).

PYTHONPATH=. python benchmarks/profile_clip.py OUT [--size 704x384] [--fp8] [--compile] [--clips 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.engine_bench import FRAMES_PER_CLIP, CountingSink, request  # noqa: E402
from liveavatar_core.engines.base import GenerationConfig  # noqa: E402
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
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other element-wise"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def summarise(trace: dict, clips: int, wall: float) -> dict:
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kind_of(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"] / 1e6
    runtime = [e for e in trace["traceEvents"] if e.get("cat") == "cuda_runtime"]
    blocking = {name: sum(1 for e in runtime if e["name"].startswith(name)) for name in BLOCKING}
    busy = busy_seconds([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    return {
        "clips": clips,
        "wall_seconds_per_clip": round(wall / clips, 4),
        "gpu_busy_seconds_per_clip": round(busy / clips, 4),
        "gpu_idle_share": round(1 - busy / wall, 4),
        "kernels_per_clip": len(kernels) // clips,
        "gpu_seconds_per_clip_by_kind": {k: round(v / clips, 4) for k, v in sorted(by_kind.items())},
        "host_blocking_calls": blocking,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="704x384")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compiled element-wise chains")
    parser.add_argument("--clips", type=int, default=2, help="48-frame clips in the profiled segment")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = LiveAvatarEngine(random_weights=True, device="cuda")
    precision = "fp8" if args.fp8 else "bf16"
    config = GenerationConfig.for_output(args.size, precision).replace(compile=args.compile)
    for seed in (0, 1):  # warm: prompt, portrait, compiling, first calls
        engine.generate(request(config, FRAMES_PER_CLIP, seed=seed), CountingSink())
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        result = engine.generate(request(config, args.clips * FRAMES_PER_CLIP, seed=2), CountingSink())
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    name = f"profile_{args.size}{'_fp8' if args.fp8 else ''}{'_compiled' if args.compile else ''}"
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
