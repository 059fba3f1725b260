"""FramePack: the motion context as few tokens.

The last 19 motion latents are split, nearest first, into buckets of 1, 2 and 16 frames, and each bucket
is patchified more coarsely the farther it is: kernels (1,2,2), (2,4,4), (4,8,8). At 704x384
(fsl = 1056 tokens per latent frame) that is 1056 + 264 + 264 = 1.5·fsl tokens for 19 frames.
Fewer than 19 motion latents are zero-padded at the far end.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DiTConfig


def motion_token_count(config: DiTConfig, latent_height: int, latent_width: int) -> int:
    """Tokens FramePack makes for one sample (bucket k packs 2^k:1 in time, height and width)."""
    h = latent_height // config.patch_size[1]
    w = latent_width // config.patch_size[2]
    return sum((f // 2**k) * (h // 2**k) * (w // 2**k) for k, f in enumerate(config.framepack_buckets))


def cond_token_count(config: DiTConfig, latent_height: int, latent_width: int) -> int:
    """Tokens of the sink: one reference latent frame plus FramePack's tokens (2.5·fsl)."""
    return config.tokens_per_frame(latent_height, latent_width) + motion_token_count(
        config, latent_height, latent_width
    )


class FramePack(nn.Module):
    """Motion latents [B, C, T, H, W] -> motion tokens [B, M, dim], nearest bucket first."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.buckets = config.framepack_buckets
        c, dim = config.in_dim, config.dim
        # Official names: proj (nearest bucket), proj_2x, proj_4x (farthest).
        self.proj = nn.Conv3d(c, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = motion_latents.shape
        needed = sum(self.buckets)
        x = motion_latents.to(self.proj.weight.dtype)
        if t < needed:
            x = torch.cat([x.new_zeros(b, c, needed - t, h, w), x], dim=2)
        x = x[:, :, -needed:]
        far, mid, near = x.split(list(reversed(self.buckets)), dim=2)  # 16, 2, 1 frames
        parts = [self.proj(near), self.proj_2x(mid), self.proj_4x(far)]  # [B, dim, f, h', w'] each
        return torch.cat([p.flatten(2).transpose(1, 2) for p in parts], dim=1)
