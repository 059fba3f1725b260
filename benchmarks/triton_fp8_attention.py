"""A candidate low-precision attention kernel for the DiT (issue 12, item 2), written to be measured by
attention_bench.py before the engine takes it. Round 3 measured cuDNN's fp8 SDPA: 1.41x faster than
bf16, but 6e-2 relative error with one scale per tensor and an e4m3 output.

Flash-attention style, one program per block of 128 queries of one head, over up to three key/value
parts (the ring's window, the block, the sink) in one pass, so no merge by log-sum-exp follows:

* q and k in int8 with one scale per token and head (`quantise_tokens`), as SageAttention does: the
  score tile is the int8 product (exact, int32) times the outer product of the two scale vectors (the
  softmax scale and log2 e folded into q's). Hopper multiplies int8 as fast as e4m3, and int8's
  uniform steps keep scores far closer: emulated at the DiT's shape on peaked inputs (x2.5), q and k in
  e4m3 per token give 0.115 relative error, in int8 0.027;
* v in e4m3 with one scale per head and channel over all keys of all parts, stored transposed
  ([B, H, D, keys], keys contiguous: the layout Hopper's fp8 matrix instructions take the second
  operand in); 0.026 on its own;
* the probabilities (in [0, 1] after the running maximum is taken off) times 448 in e4m3 for the
  second product, as FlashAttention-3 and cuDNN do; 0.009 on its own;
* the output in bf16, [B, Nq, H, D] as the DiT's layers take it.

All three emulated together: 0.039 against float32 attention (`_emulated_error`; bf16 SDPA: 0.002).

`python benchmarks/triton_fp8_attention.py --device cpu` checks the algorithm (parts, masks, scales,
online softmax, layouts) in Triton's interpreter at tiny shapes against float32 attention, with fp16 in
place of e4m3 (the interpreter rounds float32 -> e4m3 wrongly, docs/engine-speed.md round 6, and
mishandles bf16 in `tl.dot`), and prints the emulated error; the e4m3 path runs on a GPU only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

if __name__ == "__main__":  # run as a script, it is the CPU check: the interpreter, before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_M, BLOCK_N = 128, 64


@triton.jit
def _attend_part(
    acc, m_i, l_i, q, q_scale, k_ptr, ks_ptr, vt_ptr, n_keys, dims,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, P_SCALE: tl.constexpr,
):  # fmt: skip
    """The online softmax over one part's keys: int8 k [n_keys, D], its scales [n_keys], v transposed
    [D, n_keys] (this head's, each contiguous)."""
    for start in range(0, n_keys, BLOCK):
        keys = start + tl.arange(0, BLOCK)
        valid = keys < n_keys
        k = tl.load(k_ptr + keys[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
        k_scale = tl.load(ks_ptr + keys, mask=valid, other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * (q_scale[:, None] * k_scale[None, :])  # log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(vt_ptr + dims[:, None] * n_keys + keys[None, :], mask=valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot((p * P_SCALE).to(vt.dtype), tl.trans(vt))
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fp8_attention_kernel(
    q_ptr, qs_ptr, out_ptr, vs_ptr,
    k0, ks0, vt0, n0, k1, ks1, vt1, n1, k2, ks2, vt2, n2,
    n_queries, heads,
    PARTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    P_SCALE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)  # batch · heads + head
    queries = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    valid = queries < n_queries
    q = tl.load(q_ptr + (bh * n_queries + queries)[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None])
    q_scale = tl.load(qs_ptr + bh * n_queries + queries, mask=valid, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_part(
        acc, m_i, l_i, q, q_scale, k0 + bh * n0 * HEAD_DIM, ks0 + bh * n0, vt0 + bh * HEAD_DIM * n0, n0, dims,
        HEAD_DIM, BLOCK_N, P_SCALE,
    )  # fmt: skip
    if PARTS > 1:
        acc, m_i, l_i = _attend_part(
            acc, m_i, l_i, q, q_scale, k1 + bh * n1 * HEAD_DIM, ks1 + bh * n1, vt1 + bh * HEAD_DIM * n1, n1,
            dims, HEAD_DIM, BLOCK_N, P_SCALE,
        )  # fmt: skip
    if PARTS > 2:
        acc, m_i, l_i = _attend_part(
            acc, m_i, l_i, q, q_scale, k2 + bh * n2 * HEAD_DIM, ks2 + bh * n2, vt2 + bh * HEAD_DIM * n2, n2,
            dims, HEAD_DIM, BLOCK_N, P_SCALE,
        )  # fmt: skip
    v_scale = tl.load(vs_ptr + bh * HEAD_DIM + dims)
    out = acc * (v_scale[None, :] / P_SCALE) / l_i[:, None]
    b, h = bh // heads, bh % heads
    at = ((b * n_queries + queries) * heads + h)[:, None] * HEAD_DIM + dims[None, :]  # [B, Nq, H, D]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def quantise_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, H, D] -> (int8 values [B, H, N, D], float32 scales [B, H, N]), one scale per token and
    head (its max |x| / 127)."""
    x = x.transpose(1, 2).float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127
    return torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


def quantise_values(
    parts: list[torch.Tensor], dtype: torch.dtype = FP8
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Values [B, N_i, H, D] of every part -> (each transposed [B, H, D, N_i] in `dtype`, float32 scales
    [B, H, D]: one per head and channel over all keys)."""
    amax = torch.stack([v.abs().amax(dim=1) for v in parts]).amax(dim=0)  # [B, H, D]
    scale = amax.float().clamp_min(1e-12) / FP8_MAX
    return [(v.float() / scale[:, None]).permute(0, 2, 3, 1).to(dtype).contiguous() for v in parts], scale


def quantise(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = FP8):
    """Everything `attend_quantised` takes, from bf16 q [B, Nq, H, D] and (k, v) parts [B, N_i, H, D]:
    q and k in int8, v in `dtype`."""
    q8, q_scale = quantise_tokens(q)
    q_scale = q_scale * (math.log2(math.e) / math.sqrt(q.shape[-1]))  # the softmax scale, in log2 units
    keys = [quantise_tokens(k) for k, _ in parts]
    values, v_scale = quantise_values([v for _, v in parts], dtype)
    return q8, q_scale, keys, values, v_scale


def attend_quantised(q8, q_scale, keys, values, v_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Attention of the quantised queries over 1-3 quantised parts -> [B, Nq, H, D] in `out_dtype`."""
    b, heads, n_queries, head_dim = q8.shape
    out = torch.empty(b, n_queries, heads, head_dim, dtype=out_dtype, device=q8.device)
    parts = [(k, ks, vt, k.shape[2]) for (k, ks), vt in zip(keys, values, strict=True)]
    padded = [*parts, *[parts[0]] * (3 - len(parts))]
    grid = (triton.cdiv(n_queries, BLOCK_M), b * heads)
    _fp8_attention_kernel[grid](
        q8, q_scale, out, v_scale, *[a for part in padded for a in part], n_queries, heads,
        PARTS=len(parts), HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, P_SCALE=FP8_MAX,
        num_warps=8, num_stages=3,
    )  # fmt: skip
    return out


def check_algorithm() -> list[float]:
    """The algorithm in the interpreter (fp16 in place of e4m3: the interpreter's `tl.dot` mishandles
    bf16 operands in triton 3.9) against float32 attention of the same quantised q, k and v over the
    concatenated parts: one, two and three parts, lengths that are not multiples of the blocks. Returns
    the relative L2 errors."""
    g = torch.Generator().manual_seed(0)
    heads, head_dim, n_queries = 2, 32, 150

    def rand(n: int, scale: float) -> torch.Tensor:
        return (torch.randn(1, n, heads, head_dim, generator=g) * scale).to(torch.bfloat16)

    q = rand(n_queries, 2.0)
    parts = [(rand(n, 2.0), rand(n, 1.0)) for n in (70, 130, 40)]
    errors = []
    for count in (1, 2, 3):
        q8, q_scale, keys, values, v_scale = quantise(q, parts[:count], torch.float16)
        k = torch.cat([k.float() * ks[..., None] for k, ks in keys], dim=2)  # [B, H, keys, D]
        v = torch.cat([vt.float() for vt in values], dim=3).transpose(-1, -2) * v_scale[:, :, None]
        s = (q8.float() @ k.transpose(-1, -2)) * q_scale[..., None] / math.log2(math.e)
        want = (torch.softmax(s, dim=-1) @ v).transpose(1, 2)
        got = attend_quantised(q8, q_scale, keys, values, v_scale, out_dtype=torch.float32)
        errors.append(((got - want).norm() / want.norm()).item())
    return errors


def _emulated_error(heads: int = 2, n_queries: int = 3168, n_keys: int = 15312, scale: float = 2.5) -> float:
    """This kernel's roundings in torch on a CPU (int8 q, k per token, e4m3 v per channel, probabilities
    times 448 in e4m3 against the row's final maximum) against float32 attention, on random inputs at
    the DiT's shape for `heads` heads; `scale` as attention_bench.py's peaked inputs (x2.5)."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, n, heads, 128, generator=g) * scale for n in (n_queries, n_keys))
    v = torch.randn(1, n_keys, heads, 128, generator=g)
    q8, q_scale, ((k8, k_scale),), (vt8,), v_scale = quantise(q, [(k, v)])
    s = (q8.float() @ k8.float().transpose(-1, -2)) * q_scale[..., None] * k_scale[..., None, :]
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * FP8_MAX).to(FP8).float()
    got = (p8 @ vt8.float().transpose(-1, -2)) * v_scale[:, :, None] / p.sum(-1, keepdim=True) / FP8_MAX
    exact = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(128), dim=-1)
    want = exact @ v.transpose(1, 2)
    return ((got - want).norm() / want.norm()).item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu: check the algorithm in the interpreter")
    args = parser.parse_args()
    if args.device != "cpu":
        sys.exit("triton_fp8_attention: the GPU path is measured by attention_bench.py")
    errors = check_algorithm()
    for count, error in enumerate(errors, start=1):
        print(f"{count} part(s): relative L2 error {error:.2e} against float32 attention of the same inputs")
    print(f"the numerics emulated in torch at the DiT's shape: relative L2 error {_emulated_error():.2e}")
    sys.exit(0 if max(errors) < 2e-3 else 1)
