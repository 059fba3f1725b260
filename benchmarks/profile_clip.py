"""Where one 48-frame clip's GPU time goes: torch.profiler over a warm clip, top kernels and ops.

PYTHONPATH=. python benchmarks/profile_clip.py OUT [--size 704x384] [--fp8] [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.engine_bench import CountingSink, request  # noqa: E402
from liveavatar_core.engines.base import GenerationConfig  # noqa: E402
from liveavatar_core.engines.liveavatar.engine import LiveAvatarEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="704x384")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compiled element-wise chains")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = LiveAvatarEngine(random_weights=True, device="cuda")
    precision = "fp8" if args.fp8 else "bf16"
    config = GenerationConfig.for_output(args.size, precision).replace(
        offload_encoders=True, compile=args.compile
    )
    engine.generate(request(config, 48, seed=0), CountingSink())  # warm: prompt, portrait, first calls
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        engine.generate(request(config, 48, seed=1), CountingSink())
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=35, max_name_column_width=70)
    name = f"profile_{args.size}{'_fp8' if args.fp8 else ''}{'_compiled' if args.compile else ''}.txt"
    (args.out / name).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
