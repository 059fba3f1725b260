"""One pass per chain: Triton kernels for the chains whose rows fit in one program's registers.

Compiled by inductor, a chain runs as several kernels (statistics, normalise and modulate, row maximum,
quantise; docs/engine-speed.md round 6), each reading or writing the whole activation, because
inductor keeps a 5,120- or 13,824-wide reduction in a loop. Here one program holds one token's row
at a time: it reads the inputs once and writes the result (e4m3 values and the row's scale) once.

* `modulated_norm_rows`: bf16 x -> layer norm (rounded to bf16, as `chains.layer_norm32`) ->
  `· (1 + scale) + shift` in float32 -> e4m3 rows (`chains.modulated_norm` with `dtype=FP8`);
* `add_then_modulated_norm_rows`: the float32 stream + bf16 y -> the new stream and its modulated norm
  (`chains.add_then_modulated_norm`);
* `residual_then_norm_rows`: bf16 x + y · gate -> the float32 stream, and the affine layer norm of
  the stream rounded to bf16 (rounded again) -> e4m3 rows (`chains.residual_then_norm`);
* `gelu_rows`: tanh GELU in float32, rounded to bf16 (as `nn.GELU` on bf16) -> e4m3 rows
  (`chains.gelu`);
* `rms_rope`: a bf16 query or key -> RMSNorm (rounded to bf16, then times the bf16 weight, rounded)
  -> RoPE in float32 -> bf16 [B, N, heads, head_dim] (`chains.rms_rope`);
* `merge_attention_rows`: two or three attention parts and their log-sum-exps -> the merged
  attention as e4m3 rows of the output projection's input (`chains.merge_attention` with `dtype=FP8`).

Each gives the eager chain's e4m3 rows within one step (a bf16 rounding that lands the other way), the
add's stream exactly (the residual's within a rounding: a GPU contracts x + y·gate into one FMA), the
RoPE'd bf16 within a bf16 rounding. `KERNELS` says which calls each answers;
`chains.row_kernel_chains()` sends those calls here and every other call to the compiled chains.

Under Triton's interpreter (TRITON_INTERPRET=1: tests on a CPU) the kernels write float32 and torch
casts to e4m3: the interpreter's own conversion loses the carry when a value rounds up into the next
power of two (124 -> 64), which the GPU's does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .chains import FP8, FP8_MAX, Fp8Rows
from .rope import RopeTable

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton reads it
BF16 = torch.bfloat16


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bf16 (ties to even), kept in float32 (exact when stored as
    bf16). Integer arithmetic instead of `.to(tl.bfloat16)`: Triton's interpreter truncates that cast,
    the GPU rounds; this rounds in both, so the tests on a CPU check what the GPU computes."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_row(out, mask, q_ptrs, s_ptr, fp8_max):
    """e4m3 values of a float32 row, scaled by its own max |value| / 448, and that scale."""
    row_scale = tl.maximum(tl.max(tl.where(mask, tl.abs(out), 0.0), axis=0), 1e-12) / fp8_max
    tl.store(q_ptrs, (out / row_scale).to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(s_ptr, row_scale)


@triton.jit
def _layer_norm(x, mask, D, eps):
    """A float32 row's layer norm (no affine), masked columns 0."""
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    return centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)


@triton.jit
def _modulated_norm_kernel(
    x_ptr, y_ptr, stream_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr,
    D, rows_per_group, eps, fp8_max,
    ADD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x = x + tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(stream_ptr + row * D + cols, x, mask=mask)
    normed = _layer_norm(x, mask, D, eps)
    if not ADD:  # the norm of a bf16 input is rounded to bf16; that of the float32 stream is not
        normed = _round_bf16(normed)
    group = row // rows_per_group
    gain = 1.0 + tl.load(scale_ptr + group * D + cols, mask=mask, other=0.0)
    out = normed * gain + tl.load(shift_ptr + group * D + cols, mask=mask, other=0.0)
    _store_row(out, mask, q_ptr + row * D + cols, s_ptr + row, fp8_max)


@triton.jit
def _residual_norm_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, stream_ptr, q_ptr, s_ptr,
    D, rows_per_group, eps, fp8_max,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(gate_ptr + (row // rows_per_group) * D + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32) + y * gate
    tl.store(stream_ptr + row * D + cols, x, mask=mask)
    normed = _layer_norm(_round_bf16(x), mask, D, eps)  # of the stream rounded to bf16
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _round_bf16(normed * weight + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32))
    _store_row(out, mask, q_ptr + row * D + cols, s_ptr + row, fp8_max)


@triton.jit
def _gelu_kernel(x_ptr, q_ptr, s_ptr, D, fp8_max, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    out = _round_bf16(x * tl.sigmoid(2.0 * u))  # 0.5·x·(1 + tanh u) = x·sigmoid(2u)
    _store_row(out, mask, q_ptr + row * D + cols, s_ptr + row, fp8_max)


@triton.jit
def _rms_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, N, D, PAIRS, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # over B·N tokens
    token = row % N
    pair = tl.arange(0, BLOCK)  # channel pairs (2i, 2i+1) of all heads; the table has PAIRS per head
    mask = pair < D // 2
    even = tl.load(x_ptr + row * D + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + row * D + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    rms = tl.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / D + eps)
    w_even = tl.load(w_ptr + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptr + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    even = _round_bf16(_round_bf16(even * rms) * w_even)
    odd = _round_bf16(_round_bf16(odd * rms) * w_odd)
    cos = tl.load(cos_ptr + token * PAIRS + pair % PAIRS, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + token * PAIRS + pair % PAIRS, mask=mask, other=0.0)
    tl.store(out_ptr + row * D + 2 * pair, _round_bf16(even * cos - odd * sin), mask=mask)
    tl.store(out_ptr + row * D + 2 * pair + 1, _round_bf16(even * sin + odd * cos), mask=mask)


@triton.jit
def _merge_kernel(
    o0_ptr, o1_ptr, o2_ptr, l0_ptr, l1_ptr, l2_ptr, q_ptr, s_ptr,
    N, H, stride_b, stride_h, stride_n, fp8_max,
    PARTS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # over B·N queries
    b = row // N
    n = row % N
    heads = tl.arange(0, HEADS)
    dims = tl.arange(0, HEAD_DIM)
    head_mask = heads < H
    mask = head_mask[:, None] & (dims[None, :] < HEAD_DIM)
    at = b * stride_b + heads[:, None] * stride_h + n * stride_n + dims[None, :]  # [heads, dim]
    lse_at = (b * H + heads) * N + n  # log-sum-exps are [B, H, N]
    lse0 = tl.load(l0_ptr + lse_at, mask=head_mask, other=0.0)
    lse1 = tl.load(l1_ptr + lse_at, mask=head_mask, other=0.0)
    top = tl.maximum(lse0, lse1)
    if PARTS == 3:
        lse2 = tl.load(l2_ptr + lse_at, mask=head_mask, other=0.0)
        top = tl.maximum(top, lse2)
    total = tl.exp(lse0 - top) + tl.exp(lse1 - top)
    if PARTS == 3:
        total += tl.exp(lse2 - top)
    total = top + tl.log(total)
    merged = tl.load(o0_ptr + at, mask=mask, other=0.0).to(tl.float32) * tl.exp(lse0 - total)[:, None]
    merged += tl.load(o1_ptr + at, mask=mask, other=0.0).to(tl.float32) * tl.exp(lse1 - total)[:, None]
    if PARTS == 3:
        merged += tl.load(o2_ptr + at, mask=mask, other=0.0).to(tl.float32) * tl.exp(lse2 - total)[:, None]
    out_at = row * H * HEAD_DIM + heads[:, None] * HEAD_DIM + dims[None, :]
    _store_row(  # as one row of HEADS · HEAD_DIM (= ROW) values
        tl.reshape(merged, [ROW]), tl.reshape(mask, [ROW]), q_ptr + tl.reshape(out_at, [ROW]), s_ptr + row,
        fp8_max,
    )  # fmt: skip


def modulated_norm_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Fp8Rows:
    """`chains.modulated_norm(x, shift, scale, eps, FP8)`: x bf16 [B, N, dim], shift/scale float32
    [B, G, 1, dim] for G groups of N / G tokens."""
    return _modulated_norm(x, None, shift, scale, eps)[1]


def add_then_modulated_norm_rows(
    x32: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Fp8Rows]:
    """`chains.add_then_modulated_norm(x32, y, shift, scale, eps, FP8)`: the float32 stream x32 + y and
    its modulated norm as e4m3 rows."""
    return _modulated_norm(x32, y, shift, scale, eps)


def residual_then_norm_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, Fp8Rows]:
    """`chains.residual_then_norm(x, y, gate, weight, bias, eps, FP8)`: x, y bf16 [B, N, dim], gate
    float32 [B, G, 1, dim], weight and bias bf16 [dim] -> the float32 stream x + y·gate and the affine
    layer norm of the stream rounded to bf16, as e4m3 rows."""
    b, n, d = x.shape
    x, y = x.contiguous(), y.contiguous()
    stream = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out, finish = _rows_like(x.shape, x.device)
    block = triton.next_power_of_2(d)
    _residual_norm_kernel[(b * n,)](
        x, y, gate.contiguous(), weight, bias, stream, out.values, out.scale, d, n // gate.shape[1], eps,
        FP8_MAX, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return stream, finish(out)


def gelu_rows(x: torch.Tensor) -> Fp8Rows:
    """`chains.gelu(x, FP8)`: x bf16 [..., features]."""
    x = x.contiguous()
    out, finish = _rows_like(x.shape, x.device)
    d = x.shape[-1]
    block = triton.next_power_of_2(d)
    _gelu_kernel[(x.numel() // d,)](
        x, out.values, out.scale, d, FP8_MAX, BLOCK=block, num_warps=_warps(block)
    )
    return finish(out)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, table: RopeTable, heads: int) -> torch.Tensor:
    """`chains.rms_rope`: x bf16 [B, N, dim], weight bf16 [dim], table [N, head_dim / 2] ->
    bf16 [B, N, heads, head_dim]."""
    b, n, d = x.shape
    x = x.contiguous()
    out = torch.empty(b, n, heads, d // heads, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d // 2)
    _rms_rope_kernel[(b * n,)](
        x, weight, table.cos.contiguous(), table.sin.contiguous(), out, n, d, table.cos.shape[-1], eps,
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out


def merge_attention_rows(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> Fp8Rows:
    """`chains.merge_attention(outs, lses, FP8)` for two or three parts: outs bf16 [B, H, Nq, D] sharing
    one layout (head_dim contiguous), lses float32 [B, H, Nq] -> rows [B, Nq, H·D]."""
    b, h, n, d = outs[0].shape
    lses = [lse.contiguous() for lse in lses]
    out, finish = _rows_like((b, n, h * d), outs[0].device)
    parts = len(outs)
    o, lse = [*outs, outs[0]][:3], [*lses, lses[0]][:3]
    heads = triton.next_power_of_2(h)
    _merge_kernel[(b * n,)](
        *o, *lse, out.values, out.scale, n, h, *outs[0].stride()[:3], FP8_MAX,
        PARTS=parts, HEADS=heads, HEAD_DIM=d, ROW=heads * d, num_warps=_warps(heads * d),
    )  # fmt: skip
    return finish(out)


def _modulated_norm(x, y, shift, scale, eps) -> tuple[torch.Tensor, Fp8Rows]:
    b, n, d = x.shape
    add = y is not None
    x = x.contiguous()
    stream = torch.empty_like(x) if add else x
    out, finish = _rows_like(x.shape, x.device)
    block = triton.next_power_of_2(d)
    _modulated_norm_kernel[(b * n,)](
        x, y.contiguous() if add else x, stream, shift.contiguous(), scale.contiguous(), out.values,
        out.scale, d, n // shift.shape[1], eps, FP8_MAX, ADD=add, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return stream, finish(out)


def _rows_like(shape: tuple[int, ...], device: torch.device):
    """Uninitialised rows of `shape`, and what turns the kernel's output into `Fp8Rows` (see the module
    docstring for the interpreter's float32 values)."""
    values = torch.empty(shape, dtype=torch.float32 if INTERPRETED else FP8, device=device)
    rows = Fp8Rows(values, torch.empty(*shape[:-1], 1, device=device))
    if INTERPRETED:
        return rows, lambda r: Fp8Rows(r.values.to(FP8), r.scale)
    return rows, lambda r: r


def _warps(block: int) -> int:
    """Warps per program: 16 values of the row per thread, at most 16 warps (a 4,096-wide block: 8
    warps; 8,192: 16; 16,384: 16 warps of 32 values)."""
    return max(4, min(16, block // 512))


def _fp8_from(dtype: torch.dtype) -> Callable[..., bool]:
    """Calls `(x, ..., stored dtype)` that store FP8 from an x of `dtype`."""
    return lambda x, *args: args[-1] == FP8 and x.dtype == dtype


def _merges(outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """Merges of two or three bf16 parts in one layout into FP8 rows (a power-of-two head_dim)."""
    first = outs[0]
    d = first.shape[-1]
    return (
        dtype == FP8
        and len(outs) in (2, 3)
        and d & (d - 1) == 0
        and first.stride(-1) == 1
        and all(o.dtype == BF16 and o.stride() == first.stride() for o in outs)
    )


# chain name -> (its kernel, and which calls it answers; both take the chain's arguments)
KERNELS: dict[str, tuple[Callable, Callable[..., bool]]] = {
    "modulated_norm": (
        lambda x, shift, scale, eps, dtype: modulated_norm_rows(x, shift, scale, eps),
        _fp8_from(BF16),
    ),
    "add_then_modulated_norm": (
        lambda x32, y, shift, scale, eps, dtype: add_then_modulated_norm_rows(x32, y, shift, scale, eps),
        _fp8_from(torch.float32),
    ),
    "residual_then_norm": (
        lambda x, y, gate, weight, bias, eps, dtype: residual_then_norm_rows(x, y, gate, weight, bias, eps),
        lambda x, y, gate, weight, bias, *args: (
            args[-1] == FP8 and x.dtype == weight.dtype == bias.dtype == BF16
        ),
    ),
    "gelu": (lambda x, dtype: gelu_rows(x), _fp8_from(BF16)),
    "rms_rope": (rms_rope, lambda x, weight, *args: x.dtype == weight.dtype == BF16),
    "merge_attention": (lambda outs, lses, dtype: merge_attention_rows(outs, lses), _merges),
}

__all__ = [
    "KERNELS",
    "add_then_modulated_norm_rows",
    "gelu_rows",
    "merge_attention_rows",
    "modulated_norm_rows",
    "residual_then_norm_rows",
    "rms_rope",
]
