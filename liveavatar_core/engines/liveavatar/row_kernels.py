"""One pass per chain: Triton kernels for the fp8 chains whose rows fit in one program's registers.

Compiled by inductor, a chain that feeds an fp8 linear runs as several kernels (statistics, normalise
and modulate, row maximum, quantise; docs/engine-speed.md round 6), each reading or writing the whole
activation, because inductor keeps a 5,120- or 13,824-wide reduction in a loop. Here one program holds
one token's row: it reads the inputs once and writes e4m3 values and the row's scale once.

* `modulated_norm_rows`: bf16 x -> layer norm (rounded to bf16, as `chains.layer_norm32`) ->
  `· (1 + scale) + shift` in float32 -> e4m3 rows (`chains.modulated_norm` with `dtype=FP8`);
* `add_then_modulated_norm_rows`: the float32 stream + bf16 y -> the new stream and its modulated norm
  (`chains.add_then_modulated_norm`);
* `gelu_rows`: tanh GELU in float32, rounded to bf16 (as `nn.GELU` on bf16) -> e4m3 rows
  (`chains.gelu`).

Each gives the eager chain's rows within one e4m3 step (a bf16 rounding that lands the other way), the
stream exactly. Opt-in (`GenerationConfig.row_kernels`) until measured end to end on a GPU.

Under Triton's interpreter (TRITON_INTERPRET=1: tests on a CPU) the kernels write float32 and torch
casts to e4m3: the interpreter's own conversion loses the carry when a value rounds up into the next
power of two (124 -> 64), which the GPU's does not.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chains import FP8, FP8_MAX, Fp8Rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton reads it


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
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
    if not ADD:  # the norm of a bf16 input is rounded to bf16; that of the float32 stream is not
        normed = normed.to(tl.bfloat16).to(tl.float32)
    group = row // rows_per_group
    gain = 1.0 + tl.load(scale_ptr + group * D + cols, mask=mask, other=0.0)
    out = normed * gain + tl.load(shift_ptr + group * D + cols, mask=mask, other=0.0)
    _store_row(out, mask, q_ptr + row * D + cols, s_ptr + row, fp8_max)


@triton.jit
def _gelu_kernel(x_ptr, q_ptr, s_ptr, D, fp8_max, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    out = (x * tl.sigmoid(2.0 * u)).to(tl.bfloat16).to(tl.float32)  # 0.5·x·(1 + tanh u) = x·sigmoid(2u)
    _store_row(out, mask, q_ptr + row * D + cols, s_ptr + row, fp8_max)


@triton.jit
def _store_row(out, mask, q_ptrs, s_ptr, fp8_max):
    """e4m3 values of a float32 row, scaled by its own max |value| / 448, and that scale."""
    row_scale = tl.maximum(tl.max(tl.where(mask, tl.abs(out), 0.0), axis=0), 1e-12) / fp8_max
    tl.store(q_ptrs, (out / row_scale).to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(s_ptr, row_scale)


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


def gelu_rows(x: torch.Tensor) -> Fp8Rows:
    """`chains.gelu(x, FP8)`: x bf16 [..., features]."""
    x = x.contiguous()
    out, finish = _rows_like(x)
    d = x.shape[-1]
    block = triton.next_power_of_2(d)
    _gelu_kernel[(x.numel() // d,)](
        x, out.values, out.scale, d, FP8_MAX, BLOCK=block, num_warps=_warps(block)
    )
    return finish(out)


def _modulated_norm(x, y, shift, scale, eps) -> tuple[torch.Tensor, Fp8Rows]:
    b, n, d = x.shape
    add = y is not None
    x = x.contiguous()
    stream = torch.empty_like(x) if add else x
    out, finish = _rows_like(x)
    block = triton.next_power_of_2(d)
    _modulated_norm_kernel[(b * n,)](
        x, y.contiguous() if add else x, stream, shift.contiguous(), scale.contiguous(), out.values,
        out.scale, d, n // shift.shape[1], eps, FP8_MAX, ADD=add, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return stream, finish(out)


def _rows_like(x: torch.Tensor):
    """Uninitialised rows for x, and what turns the kernel's output into `Fp8Rows` (see the module
    docstring for the interpreter's float32 values)."""
    values = torch.empty(x.shape, dtype=torch.float32 if INTERPRETED else FP8, device=x.device)
    rows = Fp8Rows(values, torch.empty(*x.shape[:-1], 1, device=x.device))
    if INTERPRETED:
        return rows, lambda r: Fp8Rows(r.values.to(FP8), r.scale)
    return rows, lambda r: r


def _warps(block: int) -> int:
    """Warps per program: 16-32 values of the row per thread (8,192-wide rows: 8 warps; 16,384: 16)."""
    return max(4, min(16, block // 512))


__all__ = ["add_then_modulated_norm_rows", "gelu_rows", "modulated_norm_rows"]
