"""Small layers shared by the DiT blocks and the audio injectors.

Precision follows the official model as it runs under bf16 autocast: norms are computed in float32,
projections run in the weights' dtype (bf16 in production), and the caller does modulation math in
float32. With float32 weights (tests, parity) everything is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .chains import EAGER, FP8, Fp8Rows, Stored, layer_norm32, rms_norm
from .config import DiTConfig


def input_dtype(linear: nn.Module, x: torch.Tensor) -> torch.dtype:
    """How a chain stores `linear`'s input: e4m3 rows (FP8) for a layer that takes them
    (`backends.Fp8Linear`), else in x's dtype."""
    return FP8 if getattr(linear, "takes_fp8_rows", False) else x.dtype


class RMSNorm(nn.Module):
    """RMS norm over all heads at once (q/k norm of Wan); holds the weight, `rms_norm` computes."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input's dtype (Wan's `WanLayerNorm` under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm32(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """The q, k, v, o projections with RMS-normed q and k, shared by self-, text- and audio attention.

    Only projections live here; who attends to what (KV caches, RoPE) is decided by the caller.
    Shapes: x [B, N, dim] -> q/k/v [B, N, heads, head_dim].
    """

    chains = EAGER

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.chains.rms_norm(self.q(x), self.norm_q.weight, self.norm_q.eps).unflatten(
            -1, (self.num_heads, -1)
        )

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.chains.rms_norm(self.k(x), self.norm_k.weight, self.norm_k.eps).unflatten(
            -1, (self.num_heads, -1)
        )
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return k, v

    def out(self, attended: Stored) -> torch.Tensor:
        """[B, N, heads, head_dim] (or e4m3 rows [B, N, dim] for an fp8 `o`) -> [B, N, dim]."""
        return self.o(attended if isinstance(attended, Fp8Rows) else attended.flatten(2))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention. q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`attend` and the log-sum-exp of each query's scores: (out [B, H, Nq, D], float32 [B, H, Nq]),
    or None where torch has no attention kernel that returns it for these inputs.

    The kernels are the ones SDPA dispatches to (cuDNN for bf16/fp16 on CUDA, the flash kernel on the
    CPU, the memory-efficient one for float32 on CUDA), called through their aten ops, which also
    return the log-sum-exp that training's backward pass uses."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    elif q.is_cuda:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        return None
    b, h, n, _ = out.shape
    return out, lse.reshape(b, h, -1)[..., :n].float()  # cuDNN adds a unit dim, efficient pads n


def attend_parts(
    q: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    chains=EAGER,
    dtype: torch.dtype | None = None,
) -> Stored:
    """Attention of q [B, Nq, H, D] over the union of several key/value sets ([B, Nk_i, H, D] each)
    without concatenating them: each part is attended on its own, and the parts are merged by their
    log-sum-exps (softmax over the union = each part's softmax weighted by exp(lse_i - lse)). Same
    result as `attend` over the concatenation up to rounding; the K/V copy it saves is the size of the
    whole context. Where no kernel returns the log-sum-exp, it concatenates. The merge stores its
    result as `dtype` (default q's; FP8 for an fp8 output projection, see `Attention.out`)."""
    if len(parts) > 1:
        results = [attend_with_lse(q, k, v) for k, v in parts]
        if all(r is not None for r in results):
            outs, lses = zip(*results, strict=True)
            return chains.merge_attention(list(outs), list(lses), dtype or q.dtype)
    keys, values = zip(*parts, strict=True)
    return attend(q, torch.cat(keys, dim=1), torch.cat(values, dim=1))


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep features [cos | sin], computed in float64 as the official code does: [N, dim]."""
    half = dim // 2
    t = t.to(torch.float64).flatten()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
