"""The DiT's element-wise chains, run eagerly or compiled into fused kernels.

Between its matrix multiplications and attention calls, a block spends its time on short chains of
element-wise work: layer norm then modulation, gate then residual add, RMSNorm then RoPE, fp8
quantisation. Run eagerly, every step of a chain is a kernel that reads and writes the whole
activation (and mixed bf16/float32 steps take PyTorch's slow dynamic-cast path). Each chain here is one
function of tensors, so `compiled_chains()` can hand each to `torch.compile(fullgraph=True,
dynamic=False)`: inductor fuses it into one or two kernels per shape. The weights are arguments, not
captured constants, so weight offload can swap them under a compiled chain.

Eager chains compute exactly what the reference computes. Compiled ones may contract `a*b+c` into
one FMA, so a float32 intermediate can differ by rounding before it is stored (about 1 ulp of bf16
in a few elements).

A chain whose result feeds an fp8 linear is called with `dtype=FP8` and stores that result as e4m3
with one scale per token (`Fp8Rows`): compiled, the quantisation is part of the kernel that computes
the result, instead of a bf16 write, an amax pass and a divide pass per linear input.

A module that runs chains has a `chains` attribute (class default `EAGER`); `use_chains(model, ...)`
switches a whole model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .rope import RopeTable, apply_rope

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


class Fp8Rows(NamedTuple):
    """An fp8 linear's input, quantised: e4m3 values [..., features] and float32 scales [..., 1], one
    per token (row), so that values · scale is the activation."""

    values: torch.Tensor
    scale: torch.Tensor

    def reshape(self, *shape: int) -> Fp8Rows:
        """The same rows under another shape of their leading dimensions (`shape` ends in features)."""
        return Fp8Rows(self.values.reshape(*shape), self.scale.reshape(*shape[:-1], 1))


Stored = torch.Tensor | Fp8Rows  # what a chain stores: a tensor in `dtype`, or e4m3 rows for FP8


def quantise_rows(x: torch.Tensor) -> Fp8Rows:
    """x [..., features] (any float dtype) -> e4m3 rows, each scaled by its own max |x| / 448.

    The row maxima are one reduction (no |x| copy) and the division is in float32. No clamp before
    the cast: |x| / scale <= 448 up to rounding, and e4m3 rounds everything below 464 to at most 448
    (only inf/nan inputs would differ)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / FP8_MAX
    return Fp8Rows((x / scale).to(FP8), scale)


def store(x: torch.Tensor, dtype: torch.dtype) -> Stored:
    """x rounded to `dtype`, or quantised to e4m3 rows for FP8."""
    return quantise_rows(x) if dtype == FP8 else x.to(dtype)


# --- primitives (also used on their own by the layers) ---


def layer_norm32(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Layer norm over the last dimension in float32, rounded once to x's dtype."""
    shape = x.shape[-1:]
    if (
        x.is_cuda
        and x.dtype != torch.float32
        and all(p is None or p.dtype == x.dtype for p in (weight, bias))
    ):
        # CUDA's layer norm computes a bf16/fp16 input in float32 and rounds once on the way
        # out: the same bits as the float32 path below, in one kernel instead of three.
        return F.layer_norm(x, shape, weight, bias, eps)
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), shape, weight, bias, eps).to(x.dtype)


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> Stored:
    """x * scale + shift in float32, rounded once to `dtype` as it is stored (`Fp8Rows` for FP8).

    x may be bf16: multiplying by the float32 scale promotes it exactly inside the kernel, so this is
    `(x.float() * scale + shift).to(dtype)` bit for bit, in two kernels instead of four."""
    if dtype == FP8:
        return quantise_rows(x * scale + shift)
    return torch.add(x * scale, shift, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, round to x's dtype as it is stored, then scale by the weight."""
    x32 = x.float()
    rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    normed = torch.mul(x32, rms, out=torch.empty_like(x))
    if normed.dtype == weight.dtype:
        return normed.mul_(weight)
    return normed * weight


# --- the chains ---


def modulated_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype
) -> Stored:
    """Layer norm (no affine, rounded to x's dtype), then `· (1 + scale) + shift` in float32, stored
    as `dtype`. x [B, N, dim] holds G groups (latent frames) of tokens; shift/scale float32 [B, G, 1, dim]."""
    b, n, dim = x.shape
    normed = layer_norm32(x, None, None, eps).reshape(b, shift.shape[1], -1, dim)
    return scale_shift(normed, 1 + scale, shift, dtype).reshape(b, n, dim)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x + y · gate, computed in float32 (mixed operands are promoted exactly) and stored as `dtype`.
    x, y [B, N, dim]; gate float32 [B, G, 1, dim]."""
    b, n, dim = y.shape
    gated = (y.reshape(b, gate.shape[1], -1, dim) * gate).reshape(b, n, dim)
    return torch.add(x, gated, out=torch.empty((b, n, dim), dtype=dtype, device=y.device))


def residual_then_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Stored]:
    """After self-attention: the float32 residual stream x + y·gate, and its affine layer norm taken
    from the stream rounded to x's dtype (the text attention's input), stored as `dtype`."""
    x32 = gated_residual(x, y, gate, torch.float32)
    return x32, store(layer_norm32(x32.to(x.dtype), weight, bias, eps), dtype)


def add_then_modulated_norm(
    x32: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Stored]:
    """After text attention: the float32 stream x32 + y, and its modulated norm (the FFN's input)."""
    x32 = x32 + y
    return x32, modulated_norm(x32, shift, scale, eps, dtype)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, table: RopeTable, heads: int) -> torch.Tensor:
    """A self-attention query or key: RMSNorm over all heads, then RoPE. x [B, N, dim] -> [B, N, H, D]."""
    normed = rms_norm(x, weight, eps).unflatten(-1, (heads, -1))
    return apply_rope(normed, table, x.dtype)


def ada_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype
) -> Stored:
    """The audio injector's norm: float32 layer norm of x [G, S, dim], `· (1 + scale) + shift` with
    1 + scale formed in the projection's dtype, as the official model does; shift/scale [G, dim]."""
    gain = (1 + scale).float()
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return scale_shift(normed, gain[:, None], shift.float()[:, None], dtype)


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype) -> Stored:
    """Attention over several key sets from each set's own attention: outs [B, H, Nq, D] and their
    log-sum-exps float32 [B, H, Nq] -> [B, Nq, H, D] in `dtype`, weighted in float32 (for FP8: rows
    [B, Nq, H·D], the output projection's input)."""
    total = torch.logsumexp(torch.stack(lses), dim=0)
    merged = outs[0].float() * torch.exp(lses[0] - total).unsqueeze(-1)
    for out, lse in zip(outs[1:], lses[1:], strict=True):
        merged = merged + out.float() * torch.exp(lse - total).unsqueeze(-1)
    merged = merged.transpose(1, 2)
    return quantise_rows(merged.flatten(2)) if dtype == FP8 else merged.to(dtype)


def gelu(x: torch.Tensor, dtype: torch.dtype) -> Stored:
    """The FFN's tanh GELU (in x's dtype, as the reference's `nn.GELU`), stored as `dtype`."""
    return store(F.gelu(x, approximate="tanh"), dtype)


_CHAINS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        modulated_norm,
        gated_residual,
        residual_then_norm,
        add_then_modulated_norm,
        rms_norm,
        rms_rope,
        apply_rope,
        ada_norm,
        merge_attention,
        gelu,
        quantise_rows,
    )
}


class Chains:
    """The chains as one namespace, each function as it is or wrapped by `wrap`."""

    def __init__(self, name: str, wrap: Callable[[Callable], Callable] = lambda f: f):
        self.name = name
        for key, function in _CHAINS.items():
            setattr(self, key, wrap(function))

    def __repr__(self) -> str:
        return f"Chains({self.name})"


EAGER = Chains("eager")


def allow_recompiles(graphs: int = 64) -> None:
    """Let dynamo keep up to `graphs` graphs per compiled function (its default, 8, is fewer than a
    chain's shapes or the VAE norm's channel counts and clip lengths need; past it, fullgraph fails)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)


@functools.cache
def compiled_chains() -> Chains:
    """The chains under torch.compile (compiled per input shape on first use; a block sees a handful
    of shapes: sink and block token counts, the FFN width, audio tokens)."""
    allow_recompiles()
    return Chains("compiled", functools.partial(torch.compile, fullgraph=True, dynamic=False))


@functools.cache
def row_kernel_chains() -> Chains:
    """The compiled chains, except the calls a one-pass Triton kernel answers (`row_kernels.KERNELS`:
    the chains that store fp8 rows, RMSNorm + RoPE, the attention merge; needs a GPU Triton supports,
    or its interpreter)."""
    from .row_kernels import KERNELS

    compiled = compiled_chains()
    rows = Chains("rows", lambda f: getattr(compiled, f.__name__))
    for name, (kernel, answers) in KERNELS.items():
        setattr(rows, name, _kernel_or(getattr(compiled, name), kernel, answers))
    return rows


def _kernel_or(chain: Callable, kernel: Callable, answers: Callable[..., bool]) -> Callable:
    """A chain that runs `kernel` on the calls it `answers`, and `chain` on any other."""

    def run(*args):
        return kernel(*args) if answers(*args) else chain(*args)

    return run


def use_chains(model: nn.Module, chains: Chains) -> None:
    """Every module of `model` that runs chains runs these."""
    for module in model.modules():
        if hasattr(type(module), "chains"):
            module.chains = chains


__all__ = [
    "EAGER",
    "FP8",
    "FP8_MAX",
    "Chains",
    "Fp8Rows",
    "allow_recompiles",
    "compiled_chains",
    "quantise_rows",
    "row_kernel_chains",
    "use_chains",
]
