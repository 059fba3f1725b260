"""fp8 with one scale per token, stored by the chain that produces a linear's input (issue 12, round 5).

At the DiT's real shapes (a 3,168-token block at 704x384, dim 5,120, FFN 13,824, 40 heads of 128):

* `_scaled_mm` with one scale per tensor against row-wise scales (a column per token, a row per output
  channel), with a bias, for the block's three linear shapes; and the row-wise product's error against
  float32;
* each chain whose result feeds an fp8 linear: the way before this round (the chain stores bf16, then a
  compiled per-tensor quantisation: an amax pass and a divide pass) against the chain storing e4m3
  rows itself (`dtype=FP8`, `chains.Fp8Rows`). Both compiled; the merge's inputs come from the real
  attention by parts (ring window 9,504 keys, block 3,168, sink 2,640).

Milliseconds per call, mean of `--reps` after 5 warm-up calls. Writes OUT/fp8_rows_bench.json.
`--device cpu` checks the script end to end (its times mean nothing there).

    PYTHONPATH=. python benchmarks/fp8_rows_bench.py OUT [--reps 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liveavatar_core.engines.liveavatar.chains import FP8, FP8_MAX, compiled_chains  # noqa: E402
from liveavatar_core.engines.liveavatar.layers import attend_with_lse  # noqa: E402

TOKENS, DIM, FFN, HEADS, HEAD_DIM = 3168, 5120, 13824, 40, 128
BF16 = torch.bfloat16


def milliseconds(call: Callable[[], object], reps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(5):
        call()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    sync()
    return round((time.perf_counter() - start) / reps * 1e3, 4)


def per_tensor_quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantisation before this round: one scale for the whole [tokens, features] input."""
    x2 = x.reshape(-1, x.shape[-1])
    scale = torch.linalg.vector_norm(x2, ord=float("inf")).float().clamp(min=1e-12) / FP8_MAX
    return (x2 / scale.to(x2.dtype)).to(FP8), scale


def matmuls(reps: int, device: str) -> dict:
    results = {}
    one = torch.ones((), device=device)
    for k, n in ((DIM, DIM), (DIM, FFN), (FFN, DIM)):
        a = torch.randn(TOKENS, k, device=device).to(FP8)
        b = torch.randn(n, k, device=device).to(FP8)
        bias = torch.randn(n, device=device, dtype=BF16)
        rows, columns = torch.rand(TOKENS, 1, device=device), torch.rand(1, n, device=device)

        def product(scale_a, scale_b, a=a, b=b, bias=bias):
            return torch._scaled_mm(
                a, b.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=BF16, use_fast_accum=True
            )

        want = (a.float() * rows) @ (b.float() * columns.t()).t() + bias.float()
        got = product(rows, columns).float()
        results[f"{TOKENS}x{k}x{n}"] = {
            "per_tensor_ms": milliseconds(lambda: product(one, one), reps),
            "rowwise_ms": milliseconds(lambda r=rows, c=columns: product(r, c), reps),
            "rowwise_relative_error": float((got - want).norm() / want.norm()),
        }
    return results


def chains(reps: int, device: str) -> dict:
    c = compiled_chains()
    old_quantise = torch.compile(per_tensor_quantise, fullgraph=True, dynamic=False)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=BF16):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    x, y, x32 = rand(1, TOKENS, DIM), rand(1, TOKENS, DIM), rand(1, TOKENS, DIM, dtype=torch.float32)
    mod = rand(1, 3, 1, DIM, dtype=torch.float32) * 0.1
    weight, bias = 1 + rand(DIM) * 0.1, rand(DIM) * 0.1
    hidden = rand(1, TOKENS, FFN)
    q = rand(1, TOKENS, HEADS, HEAD_DIM)
    parts = [(rand(1, n, HEADS, HEAD_DIM), rand(1, n, HEADS, HEAD_DIM)) for n in (9504, 3168, 2640)]
    outs, lses = zip(*(attend_with_lse(q, k, v) for k, v in parts), strict=True)
    outs, lses = list(outs), list(lses)
    per_frame, cond = rand(3, TOKENS // 3, DIM), rand(3, DIM)
    gelu = torch.nn.GELU(approximate="tanh")
    cases = {
        "modulated_norm": (
            lambda: old_quantise(c.modulated_norm(x, mod, mod, 1e-6, BF16)),
            lambda: c.modulated_norm(x, mod, mod, 1e-6, FP8),
        ),
        "residual_then_norm": (
            lambda: old_quantise(c.residual_then_norm(x, y, mod, weight, bias, 1e-6, BF16)[1]),
            lambda: c.residual_then_norm(x, y, mod, weight, bias, 1e-6, FP8),
        ),
        "add_then_modulated_norm": (
            lambda: old_quantise(c.add_then_modulated_norm(x32, y, mod, mod, 1e-6, BF16)[1]),
            lambda: c.add_then_modulated_norm(x32, y, mod, mod, 1e-6, FP8),
        ),
        "gelu": (lambda: old_quantise(gelu(hidden)), lambda: c.gelu(hidden, FP8)),
        "merge_attention": (
            lambda: old_quantise(c.merge_attention(outs, lses, BF16).flatten(2)),
            lambda: c.merge_attention(outs, lses, FP8),
        ),
        "ada_norm": (
            lambda: old_quantise(c.ada_norm(per_frame, cond, cond, 1e-6, BF16)),
            lambda: c.ada_norm(per_frame, cond, cond, 1e-6, FP8),
        ),
        "quantise alone (text attention output)": (lambda: old_quantise(y), lambda: c.quantise_rows(y)),
        "gelu alone, bf16 (module / chain)": (lambda: gelu(hidden), lambda: c.gelu(hidden, BF16)),
    }
    return {
        name: {"before_ms": milliseconds(before, reps), "rows_ms": milliseconds(rows, reps)}
        for name, (before, rows) in cases.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "matmuls": matmuls(args.reps, args.device),
        "chains": chains(args.reps, args.device),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_rows_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
