"""Attention kernels at the DiT's real shape: bf16 SDPA against fp8 candidates (issue 12, item 2).

One DiT block attends 3,168 queries (the block's tokens) to 15,312 keys (the block, its 9-frame window
and the 2,640 cond tokens), 40 heads of 128, batch 1. Each candidate runs on the same random q, k, v
(bf16, [1, heads, tokens, 128]); reported per candidate: median milliseconds over `--reps` runs (CUDA
events, after warm-up), TFLOP/s (4 * heads * queries * keys * 128 FLOP per call), and the error of its
output against bf16 SDPA and against a float32 reference, as ||out - ref|| / ||ref|| and the largest
absolute difference. Two input scales: x1 (scores of std 1, a near-flat softmax) and x2.5 (std ~6, peaked).

Candidates (each skipped with its reason when it cannot run here):
* `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`: torch SDPA in bf16 with one backend forced;
* `cudnn-fp8`: `nvidia-cudnn-frontend`'s fp8 SDPA graph (e4m3 q, k, v with per-tensor scales, softmax
  probabilities quantised to e4m3 inside, bf16 output); the quantisation of q, k, v is timed separately;
* `cudnn-fp8-fp8out`: the same with an e4m3 output (where cuDNN has no bf16-output fp8 kernel);
* `triton-int8qk-fp8pv`: `triton_fp8_attention.py` (int8 q, k per token, e4m3 v per channel and
  probabilities, bf16 output); its quantisation is timed separately.

`--split` instead times the DiT's self-attention over its three key sets (ring window, block, sink):
concatenated then attended, attended part by part and merged by log-sum-exp (`attend_parts`), or all
three parts in one pass of the Triton candidate.

    PYTHONPATH=. python benchmarks/attention_bench.py OUT [--reps 30] [--split]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, QUERIES, KEYS = 40, 128, 3168, 15312
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def flops(queries: int = QUERIES, keys: int = KEYS, heads: int = HEADS, dim: int = HEAD_DIM) -> float:
    return 4.0 * heads * queries * keys * dim


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = out.float() - ref.float()
    return {
        "rel_l2": (diff.norm() / ref.float().norm()).item(),
        "max_abs": diff.abs().max().item(),
        "finite": bool(torch.isfinite(out.float()).all().item()),
    }


def reference_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention, a few heads at a time (the full score matrix would be 7.8 GB)."""
    outs = []
    for h in range(0, q.shape[1], 4):
        s = q[:, h : h + 4].float() @ k[:, h : h + 4].float().transpose(-1, -2) * HEAD_DIM**-0.5
        outs.append(torch.softmax(s, dim=-1) @ v[:, h : h + 4].float())
    return torch.cat(outs, dim=1)


def sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: (x / scale) in fp8 and the float32 descale (= scale)."""
    scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale.reshape(1, 1, 1, 1)


class CudnnFp8:
    """cuDNN frontend fp8 SDPA forward (per-tensor scales), built once for the shape."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        self.q8, self.dq = quantise(q)
        self.k8, self.dk = quantise(k)
        self.v8, self.dv = quantise(v)
        one = torch.ones(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        # P in [0, 1] is stored as e4m3 times 448 inside the kernel; O's scale: |O| <= max |v|.
        self.scales = {
            "descale_s": one / FP8_MAX,
            "scale_s": one * FP8_MAX,
            "scale_o": one if out_dtype != FP8 else (FP8_MAX / (self.dv * FP8_MAX)).reshape(1, 1, 1, 1),
        }
        self.out_dtype = out_dtype
        self.o = torch.empty_like(q, dtype=out_dtype)
        self.amax_s = torch.zeros(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        self.amax_o = torch.zeros_like(self.amax_s)
        g = cudnn.pygraph(
            io_data_type=cudnn.data_type.FP8_E4M3,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=self.handle,
        )
        t = {name: g.tensor_like(x) for name, x in (("q", self.q8), ("k", self.k8), ("v", self.v8))}
        for name, x in (("descale_q", self.dq), ("descale_k", self.dk), ("descale_v", self.dv)):
            t[name] = g.tensor_like(x)
        for name, x in self.scales.items():
            t[name] = g.tensor_like(x)
        o, _, amax_s, amax_o = g.sdpa_fp8(
            q=t["q"],
            k=t["k"],
            v=t["v"],
            descale_q=t["descale_q"],
            descale_k=t["descale_k"],
            descale_v=t["descale_v"],
            descale_s=t["descale_s"],
            scale_s=t["scale_s"],
            scale_o=t["scale_o"],
            generate_stats=False,
            attn_scale=HEAD_DIM**-0.5,
            use_causal_mask=False,
        )
        o_type = cudnn.data_type.BFLOAT16 if out_dtype == torch.bfloat16 else cudnn.data_type.FP8_E4M3
        o.set_output(True).set_dim(list(self.o.shape)).set_stride(list(self.o.stride())).set_data_type(o_type)
        amax_s.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
            cudnn.data_type.FLOAT
        )
        amax_o.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
            cudnn.data_type.FLOAT
        )
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8)
        self.pack = {
            t["q"]: self.q8,
            t["k"]: self.k8,
            t["v"]: self.v8,
            t["descale_q"]: self.dq,
            t["descale_k"]: self.dk,
            t["descale_v"]: self.dv,
            **{t[name]: x for name, x in self.scales.items()},
            o: self.o,
            amax_s: self.amax_s,
            amax_o: self.amax_o,
        }

    def __call__(self) -> torch.Tensor:
        self.graph.execute(self.pack, self.workspace, handle=self.handle)
        return self.o

    def output_bf16(self) -> torch.Tensor:
        if self.out_dtype == FP8:
            return (self.o.float() / self.scales["scale_o"]).to(torch.bfloat16)
        return self.o


def run_scale(input_scale: float, reps: int) -> list[dict]:
    """Every candidate on one draw of q, k, v whose scores have about `input_scale**2` times unit std."""
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q, shape_kv = (1, HEADS, QUERIES, HEAD_DIM), (1, HEADS, KEYS, HEAD_DIM)
    q = (torch.randn(shape_q, device=device, generator=gen) * input_scale).to(torch.bfloat16)
    k = (torch.randn(shape_kv, device=device, generator=gen) * input_scale).to(torch.bfloat16)
    v = torch.randn(shape_kv, device=device, generator=gen).to(torch.bfloat16)
    exact = reference_fp32(q, k, v)
    bf16 = sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)
    rows: list[dict] = []

    def add(name: str, ms: float | None, out: torch.Tensor | None, note: str = "") -> None:
        row = {"candidate": name, "input_scale": input_scale, "ms": ms, "note": note}
        if ms is not None:
            row["tflops"] = flops() / (ms * 1e-3) / 1e12
        if out is not None:
            row["vs_bf16_sdpa"] = errors(out, bf16)
            row["vs_fp32"] = errors(out, exact)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, backend in (
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            fn = sdpa(backend)
            add(name, median_ms(lambda fn=fn: fn(q, k, v), reps), fn(q, k, v))
        except Exception as exc:  # a backend this build or GPU lacks
            add(name, None, None, f"skipped: {type(exc).__name__}: {exc}"[:300])
    ms_quant = median_ms(lambda: (quantise(q), quantise(k), quantise(v)), reps)
    add("fp8-quantise-qkv (per tensor)", ms_quant, None, "amax + scale + cast of q, k and v")
    try:
        add_triton_candidate(add, q.transpose(1, 2), [(k.transpose(1, 2), v.transpose(1, 2))], reps)
    except Exception as exc:
        traceback.print_exc()
        add("triton-int8qk-fp8pv", None, None, f"skipped: {type(exc).__name__}: {exc}"[:300])
    for name, out_dtype in (("cudnn-fp8", torch.bfloat16), ("cudnn-fp8-fp8out", FP8)):
        try:
            kernel = CudnnFp8(q, k, v, out_dtype)
            add(name, median_ms(kernel, reps), kernel.output_bf16())
        except Exception as exc:
            traceback.print_exc()
            add(name, None, None, f"skipped: {type(exc).__name__}: {exc}"[:300])
    return rows


def add_triton_candidate(add: Callable, q: torch.Tensor, parts: list[tuple], reps: int) -> None:
    """Time `triton_fp8_attention` (its quantisation apart) on q [B, Nq, H, D] and the parts, and
    `add` its rows; its output goes back to SDPA's [B, H, Nq, D]."""
    from benchmarks import triton_fp8_attention as candidate

    quantised = candidate.quantise(q, parts)
    ms_quant = median_ms(lambda: candidate.quantise(q, parts), reps)
    add("triton-int8qk-fp8pv: quantise q, k, v", ms_quant, None, "torch")
    out = candidate.attend_quantised(*quantised)
    add(
        "triton-int8qk-fp8pv",
        median_ms(lambda: candidate.attend_quantised(*quantised), reps),
        out.transpose(1, 2),
    )


def run_split(reps: int) -> list[dict]:
    """The block's self-attention as the DiT runs it, in the DiT's [B, N, H, D] layout: keys from the
    ring's window (9 frames), the block itself (3 frames) and the sink, concatenated then attended
    (before issue 12), or attended part by part and merged by log-sum-exp (`attend_parts`)."""
    from liveavatar_core.engines.liveavatar.chains import EAGER, compiled_chains
    from liveavatar_core.engines.liveavatar.layers import attend, attend_parts

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(1)

    def rand(n: int, scale: float = 2.5) -> torch.Tensor:
        return (torch.randn(1, n, HEADS, HEAD_DIM, device=device, generator=gen) * scale).to(torch.bfloat16)

    q = rand(QUERIES)
    parts = [(rand(n), rand(n, 1.0)) for n in (KEYS - QUERIES - 2640, QUERIES, 2640)]
    variants = {
        "concat + SDPA (before)": lambda: attend(
            q, torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
        ),
        "3 parts + merge, eager": lambda: attend_parts(q, parts, EAGER),
        "3 parts + merge, compiled": lambda: attend_parts(q, parts, compiled_chains()),
        "2 parts (ring | own + sink) + merge, compiled": lambda: attend_parts(
            q,
            [parts[0], (torch.cat([parts[1][0], parts[2][0]], 1), torch.cat([parts[1][1], parts[2][1]], 1))],
            compiled_chains(),
        ),
    }
    from benchmarks import triton_fp8_attention as candidate

    quantised = candidate.quantise(q, parts)
    variants["3 parts in one pass, triton-int8qk-fp8pv (quantised beforehand)"] = lambda: (
        candidate.attend_quantised(*quantised)
    )
    before = variants["concat + SDPA (before)"]()
    rows = []
    for name, fn in variants.items():
        row = {"candidate": name, "input_scale": 2.5, "ms": median_ms(fn, reps), "note": "split"}
        row["tflops"] = flops() / (row["ms"] * 1e-3) / 1e12
        row["vs_bf16_sdpa"] = errors(fn(), before)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"Attention at 40 heads x 128, {QUERIES} queries x {KEYS} keys, batch 1 ({device})",
        "",
        "| candidate | input scale | ms | TFLOP/s | rel. L2 vs bf16 SDPA | rel. L2 vs fp32 | max abs vs fp32 | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        vb = f"{r['vs_bf16_sdpa']['rel_l2']:.2e}" if "vs_bf16_sdpa" in r else "-"
        ve = f"{r['vs_fp32']['rel_l2']:.2e}" if "vs_fp32" in r else "-"
        ma = f"{r['vs_fp32']['max_abs']:.3f}" if "vs_fp32" in r else "-"
        lines.append(
            f"| {r['candidate']} | x{r['input_scale']} | {ms} | {tf} | {vb} | {ve} | {ma} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--split", action="store_true", help="the DiT's context: concatenated or by parts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench: needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    if args.split:
        rows = run_split(args.reps)
    else:
        rows = [row for scale in (1.0, 2.5) for row in run_scale(scale, args.reps)]
    name = "attention_split" if args.split else "attention_bench"
    (args.out / f"{name}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    table = markdown(rows, device)
    (args.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
