"""A faster forward for the Wan2.1 VAE decoder: same weights, same cache, fewer passes over memory.

diffusers' `WanDecoder3d` runs one latent at a time in the reference loop, and every causal conv
copies its input twice (`cat` with the cached frames, then `F.pad` for the spatial border); every
RMS norm makes a float32 copy and then takes five element-wise passes; every 2-D upsample permutes
the video to frames, upsamples in float32 and permutes back. `FusedDecoder` walks the same modules
with the same cache list (same slots, same "Rep" marker: states are interchangeable with diffusers'
loop) but

* takes several latents per call (the convs see longer clips: fewer, larger launches);
* lets the conv pad the border itself (one copy per conv: the `cat` with the cache);
* runs each RMS norm (+ SiLU) as one chain (`torch.compile`d into one kernel when asked);
* on a GPU, where PyTorch adds a 3-D conv's bias in a pass of its own after cuDNN's kernel, adds a
  residual block's conv biases inside the chains that follow (the second norm; the residual add),
  rounded where that pass rounds: the same values, two passes fewer per block;
* runs the per-frame 2-D convs as 1x3x3 3-D convs, with no permutes, and upsamples in the model dtype
  (nearest neighbour copies values, so that is exact);
* optionally keeps activations channels-last (NDHWC), the layout cuDNN's tensor-core kernels use.

Same function as diffusers' loop, rounded at the same steps; only the convs' algorithms may differ (other
clip lengths, the border padded inside the conv), so values differ by rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
)

from .chains import allow_recompiles

NormAct = Callable[..., torch.Tensor]  # rms_act's signature


@dataclass(frozen=True)
class DecodeOptions:
    """How `StreamingDecoder` runs the decoder. The default is diffusers' own loop, one latent a call.

    chunk: latents per decoder call (after a stream's first latent, which is always alone);
    fused: this module's forward instead of diffusers'; compiled: its norm chains through
    torch.compile; channels_last: NDHWC activations and weights (fused only).
    """

    chunk: int = 1
    fused: bool = False
    compiled: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"decode chunk must be >= 1 latent, got {self.chunk}")
        if (self.compiled or self.channels_last) and not self.fused:
            raise ValueError("compiled / channels_last decode needs fused=True")


DIFFUSERS = DecodeOptions()
# What the engine runs where it compiles (CUDA): a pipeline block (3 latents) per call, 4 when priming.
FAST = DecodeOptions(chunk=4, fused=True, compiled=True, channels_last=True)
# The same, one latent a call: on the rungs that save memory (a quarter of FAST's working memory).
FAST_LEAN = DecodeOptions(chunk=1, fused=True, compiled=True, channels_last=True)


def decode_options(compiled: bool, saving_memory: bool) -> DecodeOptions:
    """How the engine decodes: the fast path goes with compiled chains (rounding-level differences),
    one latent a call where the rung saves memory."""
    if not compiled:
        return DIFFUSERS
    return FAST_LEAN if saving_memory else FAST


def rms_act(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Wan's RMS norm over channels (dim 1), times gamma, then SiLU if asked; of x + bias (the bias of
    the conv that made x, per channel) where a bias is given.

    Rounds to x's dtype where diffusers' eager steps do (after the bias, the normalisation, each
    product, the SiLU), so that one compiled kernel gives the same values as those steps."""
    dtype = x.dtype
    if bias is not None:
        x = (x.float() + bias.float().view(1, -1, 1, 1, 1)).to(dtype)
    y = x.float()
    y = (y / torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp_min(1e-12)).to(dtype)
    y = (y.float() * scale).to(dtype)
    y = (y.float() * gamma.float()).to(dtype)
    return F.silu(y.float()).to(dtype) if silu else y


def add_bias_residual(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(x + bias per channel) + h, rounded to x's dtype after each add, as a conv's bias pass and the
    residual block's add round."""
    x = (x.float() + bias.float().view(1, -1, 1, 1, 1)).to(x.dtype)
    return (x.float() + h.float()).to(x.dtype)


def _compile_rounding_as_eager(function: Callable) -> Callable:
    """torch.compile for the decoder's chains: sizes dynamic (clip lengths, levels) but what the caller
    marks static, rounding where eager rounds (`emulate_precision_casts`: inductor otherwise keeps
    float32 between steps), one graph per channel count and clip length (hence the recompile limit)."""
    allow_recompiles()
    return torch.compile(function, fullgraph=True, dynamic=True, options={"emulate_precision_casts": True})


@functools.cache
def compiled_add_bias_residual() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`add_bias_residual` through torch.compile: one pass, the channels static, as the norm's."""
    compiled = _compile_rounding_as_eager(add_bias_residual)

    def add(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_static(x, 1)
        torch._dynamo.mark_static(bias, 0)
        return compiled(x, bias, h)

    return add


@functools.cache
def compiled_rms_act() -> NormAct:
    """`rms_act` through torch.compile: one kernel per channel count (three in Wan2.1's decoder; the
    channels static, so the norm's reduction over them runs in one pass over memory), other sizes
    dynamic, so clip lengths and levels share it."""
    compiled = _compile_rounding_as_eager(rms_act)

    def norm_act(
        x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        torch._dynamo.mark_static(x, 1)
        torch._dynamo.mark_static(gamma, 1)
        if bias is not None:
            torch._dynamo.mark_static(bias, 0)
        return compiled(x, gamma, scale, silu, bias)

    return norm_act


class FusedDecoder:
    """`decoder(x, cache)` over a diffusers `WanDecoder3d`'s modules (see module docstring)."""

    def __init__(self, decoder: WanDecoder3d, options: DecodeOptions, fold_biases: bool | None = None):
        """fold_biases: add the residual blocks' conv biases in the chains that follow; None: on a GPU,
        where that saves a pass (on a CPU the conv adds its bias before rounding, so folding would
        round once more)."""
        self.decoder = decoder
        self.options = options
        self.fold_biases = fold_biases
        self.norm_act: NormAct = compiled_rms_act() if options.compiled else rms_act
        self.add_bias_residual = compiled_add_bias_residual() if options.compiled else add_bias_residual
        self.layout = torch.channels_last_3d if options.channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, cache: list) -> torch.Tensor:
        """Decoder input [1, 16, t, h, w] (after post_quant_conv) -> video [1, 3, 4t or 4t - 3, 8h, 8w]."""
        d = self.decoder
        slot = iter(range(len(cache)))
        x = x.contiguous(memory_format=self.layout)
        x = self._conv(d.conv_in, x, cache, next(slot))
        x = self._resnet(d.mid_block.resnets[0], x, cache, slot)
        for attention, resnet in zip(d.mid_block.attentions, d.mid_block.resnets[1:], strict=True):
            x = attention(x).contiguous(memory_format=self.layout)
            x = self._resnet(resnet, x, cache, slot)
        for block in d.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x, cache, slot)
            if block.upsamplers is not None:
                x = self._upsample(block.upsamplers[0], x, cache, slot)
        x = self._norm(d.norm_out, x, silu=True)
        return self._conv(d.conv_out, x, cache, next(slot))

    # pieces -------------------------------------------------------------------------------------------

    def _norm(
        self, norm: WanRMS_norm, x: torch.Tensor, silu: bool, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(norm.bias, float) or norm.bias != 0.0:
            raise ValueError("fused VAE decode: RMS norm with a bias is not Wan2.1's")
        return self.norm_act(x, norm.gamma.view(1, -1, 1, 1, 1), norm.scale, silu, bias)

    def _resnet(self, block: WanResidualBlock, x: torch.Tensor, cache: list, slot) -> torch.Tensor:
        shortcut = block.conv_shortcut
        h = x if isinstance(shortcut, torch.nn.Identity) else self._pointwise(shortcut, x)
        conv1, conv2 = block.conv1, block.conv2
        fold = x.is_cuda if self.fold_biases is None else self.fold_biases
        fold = fold and conv1.bias is not None and conv2.bias is not None
        x = self._conv(conv1, self._norm(block.norm1, x, silu=True), cache, next(slot), with_bias=not fold)
        x = self._norm(block.norm2, x, silu=True, bias=conv1.bias if fold else None)
        x = self._conv(conv2, x, cache, next(slot), with_bias=not fold)
        return self.add_bias_residual(x, conv2.bias, h) if fold else x.add_(h)

    def _pointwise(self, conv: WanCausalConv3d, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self._weight(conv.weight), conv.bias)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.contiguous(memory_format=self.layout)

    def _conv(
        self, conv: WanCausalConv3d, x: torch.Tensor, cache: list, i: int, with_bias: bool = True
    ) -> torch.Tensor:
        """Causal conv over [cached frames, x]; the slot keeps x's last two frames, as diffusers does.
        with_bias=False leaves the bias to the caller."""
        previous = cache[i]
        cache[i] = _next_cache(previous, x)
        return self._causal(conv, x, previous if isinstance(previous, torch.Tensor) else None, with_bias)

    def _causal(
        self, conv: WanCausalConv3d, x: torch.Tensor, previous: torch.Tensor | None, with_bias: bool = True
    ) -> torch.Tensor:
        pad_w, _, pad_h, _, pad_t, _ = conv._padding  # (w, w, h, h, 2 * kt_half, 0)
        front = [] if previous is None else [previous.to(x.dtype)]
        missing = pad_t - sum(f.shape[2] for f in front)
        if missing > 0:
            front.insert(0, x.new_zeros(*x.shape[:2], missing, *x.shape[3:]))
        if front:
            x = torch.cat([*front, x], dim=2)
        bias = conv.bias if with_bias else None
        return F.conv3d(x, self._weight(conv.weight), bias, padding=(0, pad_h, pad_w))

    def _upsample(self, resample: WanResample, x: torch.Tensor, cache: list, slot) -> torch.Tensor:
        if resample.mode == "upsample3d":
            i = next(slot)
            previous = cache[i]
            if previous is None:  # the stream's first latent: no temporal upsampling (diffusers' "Rep")
                cache[i] = "Rep"
            else:
                cache[i] = _next_cache(None if isinstance(previous, str) else previous, x, zeros=True)
                y = self._causal(resample.time_conv, x, None if isinstance(previous, str) else previous)
                b, c2, t, h, w = y.shape
                # channels [0, c) make frame 2k, [c, 2c) frame 2k + 1
                y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
                x = y.contiguous(memory_format=self.layout)
        elif resample.mode != "upsample2d":
            raise ValueError(f"fused VAE decode: unexpected resample mode {resample.mode!r}")
        x = upsample_nearest_2x(x)
        conv = resample.resample[1]
        return F.conv3d(x, self._weight(conv.weight.unsqueeze(2)), conv.bias, padding=(0, 1, 1))


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 in height and width of [B, C, T, H, W], in x's memory layout (contiguous or
    channels-last), as one copy: each value repeated into its 2x2 cell (F.interpolate's kernel is ~10x
    slower than memory bandwidth on channels-last video)."""
    b, c, t, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        cells = x.permute(0, 2, 3, 4, 1)[:, :, :, None, :, None, :].expand(b, t, h, 2, w, 2, c)
        return cells.reshape(b, t, 2 * h, 2 * w, c).permute(0, 4, 1, 2, 3)
    cells = x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2)
    return cells.reshape(b, c, t, 2 * h, 2 * w)


def _next_cache(previous, x: torch.Tensor, zeros: bool = False) -> torch.Tensor:
    """The last CACHE_T frames of a conv's input, topped up from the previous entry (diffusers' rule).

    zeros: the temporal upsampler's rule after its first latent ("Rep"), which tops up with zeros."""
    last = x[:, :, -CACHE_T:].clone()
    if last.shape[2] >= CACHE_T:
        return last
    if isinstance(previous, torch.Tensor):
        return torch.cat([previous[:, :, -1:].to(last.dtype), last], dim=2)
    if zeros:
        return torch.cat([torch.zeros_like(last), last], dim=2)
    return last


__all__ = [
    "FAST",
    "add_bias_residual",
    "compiled_add_bias_residual",
    "FAST_LEAN",
    "DIFFUSERS",
    "decode_options",
    "DecodeOptions",
    "FusedDecoder",
    "compiled_rms_act",
    "rms_act",
    "upsample_nearest_2x",
]
