"""One pass per chain: the Triton kernels of `row_kernels.py` against the compiled chains (issue 12).

The round-6 profile found each compiled chain that feeds an fp8 linear running as several kernels
(statistics, normalise and modulate, row maximum, quantise), each reading or writing the whole
activation. A token's row (5,120 or 13,824 values) fits in one program's registers, so a chain can read
its inputs once and write e4m3 values and one scale per row once. This measures that, at the
DiT's shapes (a 3,168-token block at 704x384, three latent frames of 1,056 tokens, dim 5,120, 40 heads
of 128, FFN 13,824), for six chains, each against `chains.compiled_chains()`'s version:

* `modulated_norm`: bf16 x -> layer norm (rounded to bf16) -> `· (1 + scale) + shift` -> e4m3 rows;
* `add_then_modulated_norm`: float32 stream + bf16 y -> the new stream (float32) and its modulated norm;
* `residual_then_norm`: bf16 x + y · gate -> the float32 stream and its affine layer norm -> e4m3 rows;
* `gelu`: the FFN's hidden (bf16) -> tanh GELU (rounded to bf16) -> e4m3 rows;
* `rms_rope`: a bf16 query -> RMSNorm -> RoPE -> bf16 [tokens, heads, 128];
* `merge_attention`: three attention parts (ring window, block, sink) and their log-sum-exps -> e4m3
  rows of the output projection's input.

Timed cold (each call reads inputs not touched since eight other input sets were read: 256 MB and more,
beyond the H200's 50 MB L2, as in a block forward) and hot (the same inputs again, as
fp8_rows_bench.py timed round 5's chains). Error against the eager chain: dequantised rows in e4m3
steps at the top of the row; rms_rope's bf16 values in bf16 steps at the top of the tensor. Writes
OUT/row_kernels_bench.json.

`--device cpu` runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by this script) at tiny
shapes: a check of the script and of the kernels' values, not of speed (the `triton` package is in the
dev extra; torch's CUDA wheels bring their own). Run that way on 2026-12-03 (round 7's kernels, which
round to bf16 by integer arithmetic as the GPU does): every kernel's values those of the eager chain
(the merge within 2e-4 of a step), the float32 streams exact.

    PYTHONPATH=. python benchmarks/row_kernels_bench.py OUT [--reps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liveavatar_core.engines.liveavatar import chains  # noqa: E402
from liveavatar_core.engines.liveavatar.chains import FP8, Fp8Rows  # noqa: E402
from liveavatar_core.engines.liveavatar.rope import RopeTable  # noqa: E402
from liveavatar_core.engines.liveavatar.row_kernels import (  # noqa: E402
    add_then_modulated_norm_rows,
    gelu_rows,
    merge_attention_rows,
    modulated_norm_rows,
    residual_then_norm_rows,
    rms_rope,
)

EPS = 1e-6
SETS = 8  # input sets rotated through for cold timings
BF16 = torch.bfloat16


def steps_off(result, reference) -> float:
    """Largest difference to the reference: for e4m3 rows in steps at the top of the reference's row
    (the row's scale · 32: e4m3's step between 256 and 448), for a bf16 tensor in bf16 steps at the
    top of the reference (its largest |value| · 2^-8)."""
    if isinstance(reference, Fp8Rows):
        got = result.values.float() * result.scale
        want = reference.values.float() * reference.scale
        return float(((got - want).abs() / (reference.scale * 32)).max())
    return float((result.float() - reference.float()).abs().max() / (reference.float().abs().max() * 2**-8))


def timed(calls: list[Callable[[], object]], reps: int, device: torch.device) -> float:
    """Milliseconds per call, cycling through `calls` (one per input set)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for call in calls:
        call()
    sync()
    start = time.perf_counter()
    for i in range(reps):
        calls[i % len(calls)]()
    sync()
    return round((time.perf_counter() - start) / reps * 1e3, 4)


def inputs(tokens: int, dim: int, ffn: int, groups: int, heads: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, dtype=BF16, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    angles = torch.rand(tokens, dim // heads // 2, generator=g) * 100
    return {
        "x": rand(1, tokens, dim, std=3.0),
        "stream": rand(1, tokens, dim, dtype=torch.float32, std=3.0),
        "y": rand(1, tokens, dim),
        "shift": rand(1, groups, 1, dim, dtype=torch.float32, std=0.3),
        "scale": rand(1, groups, 1, dim, dtype=torch.float32, std=0.3),
        "hidden": rand(1, tokens, ffn, std=2.0),
        "weight": rand(dim, std=0.3) + 1,
        "bias": rand(dim, std=0.3),
        "table": RopeTable(angles.cos().to(device), angles.sin().to(device)),
        # three parts as cuDNN returns them: [B, H, N, D] views of [B, N, H, D]
        "outs": [rand(1, tokens, heads, dim // heads).transpose(1, 2) for _ in range(3)],
        "lses": [rand(1, heads, tokens, dtype=torch.float32, std=2.0) + 8 for _ in range(3)],
    }


def cases(compiled: chains.Chains, heads: int) -> dict[str, tuple[Callable, Callable, Callable]]:
    """name -> (eager chain, compiled chain, Triton kernel), each taking one input set."""

    def chain_of(c: chains.Chains) -> dict[str, Callable]:
        return {
            "modulated_norm": lambda s: c.modulated_norm(s["x"], s["shift"], s["scale"], EPS, FP8),
            "add_then_modulated_norm": lambda s: c.add_then_modulated_norm(
                s["stream"], s["y"], s["shift"], s["scale"], EPS, FP8
            ),
            "residual_then_norm": lambda s: c.residual_then_norm(
                s["x"], s["y"], s["scale"], s["weight"], s["bias"], EPS, FP8
            ),
            "gelu": lambda s: c.gelu(s["hidden"], FP8),
            "rms_rope": lambda s: c.rms_rope(s["x"], s["weight"], EPS, s["table"], heads),
            "merge_attention": lambda s: c.merge_attention(s["outs"], s["lses"], FP8),
        }

    kernels = {
        "modulated_norm": lambda s: modulated_norm_rows(s["x"], s["shift"], s["scale"], EPS),
        "add_then_modulated_norm": lambda s: add_then_modulated_norm_rows(
            s["stream"], s["y"], s["shift"], s["scale"], EPS
        ),
        "residual_then_norm": lambda s: residual_then_norm_rows(
            s["x"], s["y"], s["scale"], s["weight"], s["bias"], EPS
        ),
        "gelu": lambda s: gelu_rows(s["hidden"]),
        "rms_rope": lambda s: rms_rope(s["x"], s["weight"], EPS, s["table"], heads),
        "merge_attention": lambda s: merge_attention_rows(s["outs"], s["lses"]),
    }
    eager, fused = chain_of(chains.EAGER), chain_of(compiled)
    return {name: (eager[name], fused[name], kernels[name]) for name in kernels}


def result_of(result):
    """What a chain stores for the next layer (the rows of add_then_modulated_norm's (stream, rows))."""
    return result[1] if isinstance(result, tuple) else result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    tokens, dim, ffn, groups, heads = (12, 80, 200, 3, 5) if tiny else (3168, 5120, 13824, 3, 40)
    sets = [inputs(tokens, dim, ffn, groups, heads, device, seed) for seed in range(2 if tiny else SETS)]
    compiled = chains.EAGER if tiny else chains.compiled_chains()  # inductor on a CPU: not what is probed
    results = {"device": torch.cuda.get_device_name(device) if not tiny else "cpu (Triton interpreter)"}
    results["shapes"] = {"tokens": tokens, "dim": dim, "ffn": ffn, "groups": groups, "heads": heads}
    for name, (eager, fused, kernel) in cases(compiled, heads).items():
        reference = result_of(eager(sets[0]))
        row = {
            "compiled_steps_off_eager": steps_off(result_of(fused(sets[0])), reference),
            "triton_steps_off_eager": steps_off(result_of(kernel(sets[0])), reference),
        }
        if name in ("add_then_modulated_norm", "residual_then_norm"):
            stream = eager(sets[0])[0]
            row["triton_stream_max_diff"] = float((kernel(sets[0])[0] - stream).abs().max())
        if not tiny:
            reps = args.reps
            for label, call in (("compiled", fused), ("triton", kernel)):
                row[f"{label}_ms_cold"] = timed([lambda s=s, call=call: call(s) for s in sets], reps, device)
                row[f"{label}_ms_hot"] = timed([lambda call=call: call(sets[0])], reps, device)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "row_kernels_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
