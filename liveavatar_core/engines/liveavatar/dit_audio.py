"""Audio conditioning of the DiT: the causal audio encoder and the per-block audio injectors.

Encoder: 25 wav2vec2 hidden states at video rate (25 fps) are mixed with learned softmax-free weights
(SiLU of a parameter, normalised by its sum), then causal 1-D convolutions downsample 4x to the latent
rate. A "local" branch yields `num_audio_token` tokens per latent frame (plus a learned padding token,
5 in all); a "global" branch yields one vector per latent frame that drives the injectors' norm.

Injector (after blocks 0, 4, 8, …, 39): an AdaLayerNorm whose shift/scale come from the global vector,
then cross-attention of each latent frame's tokens to that frame's 5 audio tokens, added back.

Like the official model, the encoder runs in float32 (its weights are kept in float32 at load).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .chains import EAGER, Stored
from .config import DiTConfig
from .layers import Attention, attend, input_dtype


class AudioTokens(NamedTuple):
    """Audio conditioning of some latent frames (batch B, latent frames F)."""

    tokens: torch.Tensor  # [B, F, num_audio_token + 1, dim]: local tokens, then the padding token
    global_: torch.Tensor  # [B, F, dim]: drives the injectors' AdaLayerNorm

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AudioTokens:
        return AudioTokens(self.tokens.to(device, dtype), self.global_.to(device, dtype))


class CausalConv1d(nn.Conv1d):
    """Conv1d left-padded with kernel-1 copies of the first step, so output t only sees inputs <= t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0), mode="replicate"))


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels (no affine, eps 1e-6) then SiLU, for x [B, C, T]."""
    x = x.transpose(1, 2)
    x = F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))
    return x.transpose(1, 2)


class CausalAudioEncoder(nn.Module):
    """wav2vec2 hidden states [B, layers, audio_dim, T] at 25 fps -> AudioTokens at the latent rate."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, n = config.dim, config.num_audio_token
        self.num_tokens = n
        self.layer_weights = nn.Parameter(torch.full((1, config.audio_layers, 1, 1), 0.01))
        self.conv1_local = CausalConv1d(config.audio_dim, dim // 4 * n, 3)
        self.conv1_global = CausalConv1d(config.audio_dim, dim // 4, 3)
        # conv2/conv3 are shared by both branches: each halves the time axis (4x in all).
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.global_proj = nn.Linear(dim, dim)
        self.padding_token = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[B', dim/4, T] (after conv1) -> [B', T', dim]."""
        x = self.conv3(_norm_silu(self.conv2(_norm_silu(x))))
        return _norm_silu(x).transpose(1, 2)

    def forward(self, features: torch.Tensor) -> AudioTokens:
        features = features.to(self.layer_weights.device, self.layer_weights.dtype)
        b = features.shape[0]
        weights = F.silu(self.layer_weights)  # [1, layers, 1, 1]
        mixed = (features * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]

        # Local branch: conv1 yields n token streams side by side in the channels; run them as batch.
        local = self.conv1_local(mixed)  # [B, n·dim/4, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B·n, dim/4, T]
        local = self._downsample(local)  # [B·n, T', dim]
        local = local.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        padding = self.padding_token.expand(b, local.shape[1], 1, -1)
        tokens = torch.cat([local, padding], dim=2)  # [B, T', n + 1, dim]

        global_ = self.global_proj(self._downsample(self.conv1_global(mixed)))  # [B, T', dim]
        return AudioTokens(tokens, global_)


class AudioAdaNorm(nn.Module):
    """LayerNorm (no affine) whose shift and scale are a linear map of SiLU(global audio vector)."""

    chains = EAGER

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.eps = config.audio_norm_eps
        self.linear = nn.Linear(config.dim, 2 * config.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, dtype: torch.dtype = torch.float32) -> Stored:
        """x [G, S, dim], cond [G, dim] -> [G, S, dim], computed in float32 and stored once as `dtype`
        (e4m3 rows for FP8)."""
        shift, scale = self.linear(F.silu(cond)).chunk(2, dim=-1)
        return self.chains.ada_norm(x, shift, scale, self.eps, dtype)


class AudioInjector(nn.Module):
    """Adds audio to a block's output: every latent frame's tokens attend to that frame's audio tokens."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = AudioAdaNorm(config)
        self.attn = Attention(config)

    def forward(self, x: torch.Tensor, audio: AudioTokens) -> torch.Tensor:
        """x [B, F·S, dim] (F latent frames of S tokens), audio for those F frames."""
        b, n, dim = x.shape
        frames = audio.tokens.shape[1]
        per_frame = x.reshape(b * frames, n // frames, dim)  # [B·F, S, dim]
        h = self.norm(per_frame, audio.global_.reshape(b * frames, dim), input_dtype(self.attn.q, x))
        q = self.attn.queries(h)  # [B·F, S, H, D]
        k, v = self.attn.keys_values(audio.tokens.flatten(0, 1))  # [B·F, 5, H, D]
        residual = self.attn.out(attend(q, k, v))
        return x + residual.reshape(b, n, dim)
