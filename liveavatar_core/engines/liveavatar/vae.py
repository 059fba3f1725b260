"""The Wan2.1 video VAE: official checkpoint into diffusers' AutoencoderKLWan, streaming encode/decode.

Shapes (full size, 704x384): pixels [1, 3, T, 704, 384] in [-1, 1]  <->  latents [1, 16, t, 88, 48] with
T = 1 + 4 (t - 1): the first latent frame stands for one video frame, every later one for four.
Latents are always *normalised* here, (mu - mean) / std with Wan2.1's per-channel statistics, because that
is what the DiT reads and writes.

Both halves of the VAE are causal: every temporal conv keeps the last two frames of its input (diffusers'
`feat_cache` list) and the reference drives them one chunk at a time (encoder: 1 frame, then 4 at a time;
decoder: 1 latent at a time). `StreamingEncoder` / `StreamingDecoder` run exactly that loop (or, for the
decoder, the faster one of `vae_decode.py` over the same cache: `decode_options`) but keep the cache
between calls, so a lecture is coded incrementally and nothing is coded twice; their state can be
saved to bytes and restored (segment handoff).

A constant clip (the portrait repeated) drives the caches into a fixed point after a few chunks; once the
cache stops changing every further chunk gives the same output, so `push_repeated` / `prime_repeated`
stop computing there. That turns the reference's 365-frame motion-buffer encode into 29 chunk
encodes with identical results (see `encode_motion`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from ...errors import InputError
from .config import CheckpointError, rename_state_dict
from .vae_decode import DIFFUSERS, DecodeOptions, FusedDecoder

# Wan2.1 latent statistics (per channel), the same numbers as diffusers' AutoencoderKLWan defaults.
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

Z_DIM = 16
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
NUM_RES_BLOCKS = 2  # Wan2.1: 2 per encoder level, 3 (= 2 + 1) per decoder level
NUM_LEVELS = 4  # dim_mult (1, 2, 4, 4)
REFERENCE_REPEAT = 5  # the reference encodes the portrait as a 5-frame clip and keeps latent 1
MOTION_FRAMES = 5 * 73  # its motion buffer: that 5-frame clip repeated 73 times (92 latents)
MOTION_LATENTS = 19  # of which FramePack reads the last 19
# The decoder's caches reach back a finite number of latents (about 37: 12 kernel-3 temporal convs at the
# latent rate, 7 at twice, 13 at four times). A fresh decoder fed the last 40 latents of any sequence ends
# in the same cache, bit for bit, as one that decoded the whole sequence (tested): those 40 latents are a
# complete, small decoder state (5.4 MB bf16 at 704x384, against a 1.2 GB cache).
DECODER_CONTEXT_LATENTS = 40

# ---------------------------------------------------------------------------------------------------------
# Checkpoint names: original Wan (vae2_1.py) -> diffusers (autoencoder_kl_wan.py)
# ---------------------------------------------------------------------------------------------------------

# ResidualBlock: original nn.Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv) + shortcut.
_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
# Resample (ZeroPad2d|Upsample at .0, Conv2d at .1) and AttentionBlock keep their names in diffusers.
_SAME = {
    "resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias",
    "norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias",
}  # fmt: skip
_TOP = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.2": "decoder.conv_out",
}


def _part(part: str, original: str) -> str:
    if part in _RESIDUAL:
        return _RESIDUAL[part]
    if part in _SAME:
        return part
    raise KeyError(f"unknown VAE tensor {original!r}")


def original_to_diffusers_key(name: str) -> str:
    """Diffusers' name for one tensor of the official Wan2.1_VAE.pth (KeyError for names it has not)."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP and leaf in ("weight", "bias"):
        return f"{_TOP[module]}.{leaf}"
    if m := re.fullmatch(r"(encoder|decoder)\.head\.0\.gamma", name):
        return f"{m[1]}.norm_out.gamma"
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.([012])\.(.+)", name):
        side, index, part = m[1], int(m[2]), m[3]
        if index == 1:  # the attention block between the two residual blocks
            return f"{side}.mid_block.attentions.0.{_part(part, name)}"
        return f"{side}.mid_block.resnets.{index // 2}.{_part(part, name)}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", name):
        # Both keep one flat list: per level 2 residual blocks, then a Resample (not after the last level).
        return f"encoder.down_blocks.{m[1]}.{_part(m[2], name)}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", name):
        # Original: one flat list, per level 3 residual blocks then a Resample (not after the last level).
        # Diffusers: up_blocks[level].resnets[0..2] and up_blocks[level].upsamplers[0].
        flat, part = int(m[1]), m[2]
        per_level = NUM_RES_BLOCKS + 2
        level, j = divmod(flat, per_level)
        if level >= NUM_LEVELS or (level == NUM_LEVELS - 1 and j > NUM_RES_BLOCKS):
            raise KeyError(f"unknown VAE tensor {name!r}")
        if j <= NUM_RES_BLOCKS:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_part(part, name)}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{_part(part, name)}"
    raise KeyError(f"unknown VAE tensor {name!r}")


def convert_original_state_dict(
    original: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename every tensor of an official checkpoint to diffusers' names; exactly `expected`'s keys, shapes.

    Raises CheckpointError naming `source` and the tensor on any unknown, duplicate, missing or misshaped one.
    """
    return rename_state_dict(
        original,
        lambda name: [original_to_diffusers_key(name)],
        expected,
        source=source,
        model="AutoencoderKLWan",
    )


def load_vae(path: str | Path) -> AutoencoderKLWan:
    """Load the official `Wan2.1_VAE.pth` (or a tiny one of the same layout) into AutoencoderKLWan.

    The model is built on the meta device and takes the checkpoint's (memory-mapped) tensors as its
    parameters, so there is no second copy; it stays on the CPU in the file's dtype, in eval mode.
    Move it with `.to(device, dtype)`. The width (base_dim) is read from the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "VAE checkpoint not found")
    original = _load_torch_file(path)
    if "encoder.conv1.weight" not in original:
        raise CheckpointError(
            str(path), "not a Wan2.1 VAE checkpoint (tensor missing)", "encoder.conv1.weight"
        )
    base_dim = int(original["encoder.conv1.weight"].shape[0])
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=base_dim, z_dim=Z_DIM)
    converted = convert_original_state_dict(original, model.state_dict(), str(path))
    model.load_state_dict(converted, strict=True, assign=True)
    _check_materialised(model, str(path))
    return model.eval().requires_grad_(False)


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # Files written by torch < 1.6 (legacy format) cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def _check_materialised(model: torch.nn.Module, source: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(source, "model tensor left uninitialised by the checkpoint", name)


# ---------------------------------------------------------------------------------------------------------
# The VAE as the pipeline uses it
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantClipLatents:
    """Latents of one image repeated for a whole clip, stored compactly.

    head: [1, 16, k, h, w], the latents up to the encoder's fixed point; every later latent equals
    head[:, :, -1]. length: how many latents the whole clip has (1 + (frames - 1) // 4).
    """

    head: torch.Tensor
    length: int

    def last(self, n: int) -> torch.Tensor:
        """The last `n` latents of the clip, [1, 16, n, h, w]."""
        k = self.head.shape[2]
        if n > self.length:
            raise ValueError(f"clip has {self.length} latents, asked for the last {n}")
        start = self.length - n
        own = self.head[:, :, min(start, k) :]
        tail = self.head[:, :, -1:].expand(-1, -1, n - own.shape[2], -1, -1)
        return torch.cat([own, tail], dim=2).contiguous()

    def full(self) -> torch.Tensor:
        return self.last(self.length)


class WanVideoVAE:
    """AutoencoderKLWan plus Wan2.1's latent normalisation and the reference's conventions.

    Device and dtype follow the model (`vae.to(device, dtype)`); inputs are moved to them, normalisation
    runs in float32. `decode_options` says how new decoder streams run (`vae_decode.py`): diffusers'
    loop by default; the engine picks the fast one where it compiles.
    """

    def __init__(self, model: AutoencoderKLWan, decode_options: DecodeOptions = DIFFUSERS):
        self.model = model
        self.decode_options = decode_options
        self.mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32).view(1, Z_DIM, 1, 1, 1)
        self.std = torch.tensor(LATENTS_STD, dtype=torch.float32).view(1, Z_DIM, 1, 1, 1)
        self.encoder_convs = sum(isinstance(m, WanCausalConv3d) for m in model.encoder.modules())
        self.decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())

    @classmethod
    def load(cls, path: str | Path) -> WanVideoVAE:
        return cls(load_vae(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WanVideoVAE:
        self.model.to(device=device, dtype=dtype)
        return self

    # normalisation: the DiT's latent space <-> the VAE's
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(mu.device), self.std.to(mu.device)
        return (mu.float() - mean) * (1.0 / std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(z.device), self.std.to(z.device)
        return z.float() / (1.0 / std) + mean  # the reference divides by its stored 1/std

    # one-shot, the reference's way (fresh cache per call)
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[1, 3, T, H, W] in [-1, 1], T = 1 + 4k  ->  normalised latents [1, 16, 1 + k, H/8, W/8]."""
        _check_video(video, "video to encode")
        if (video.shape[2] - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"video to encode: frames must be 1 + 4k, got {video.shape[2]}")
        return StreamingEncoder(self).push(video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, 16, t, h, w] -> video [1, 3, 1 + 4 (t - 1), 8h, 8w] in [-1, 1]."""
        return StreamingDecoder(self).decode(latents)

    def encoder_stream(self) -> StreamingEncoder:
        return StreamingEncoder(self)

    def decoder_stream(self) -> StreamingDecoder:
        return StreamingDecoder(self)

    # the portrait, as the reference's single-GPU path encodes it
    def encode_reference(self, image: np.ndarray) -> torch.Tensor:
        """Reference latent [1, 16, 1, h, w]: the portrait as a 5-frame still clip, its 2nd latent.

        That is the latent of a 4-frame still (frames 1..4), not the single-frame latent of frame 0: the
        reference's single-GPU path keeps `encode(portrait x 5)[:, :, 1:]`.
        """
        frame = image_to_tensor(image)
        latents = self.encoder_stream().push_repeated(frame, REFERENCE_REPEAT)
        return latents.last(1)

    def encode_motion(self, image: np.ndarray, frames: int = MOTION_FRAMES) -> ConstantClipLatents:
        """The reference's initial motion buffer: the portrait repeated `frames` times (365: 92 latents).

        FramePack reads `.last(19)`; a streaming decoder is primed with `.full()` semantics through
        `StreamingDecoder.prime_constant_clip`. Costs ~29 chunk encodes, not 92 (fixed point).
        """
        return self.encoder_stream().push_repeated(image_to_tensor(image), frames)


class StreamingEncoder:
    """Causal encode with a persistent cache: frames in (any count), latents out as chunks complete.

    The first frame forms a chunk of its own (-> 1 latent), then every 4 frames form one (-> 1 latent);
    frames that do not complete a chunk wait for the next call. Output is identical to encoding the
    concatenation of all pushed frames in one call (the reference's `encode`).
    """

    def __init__(self, vae: WanVideoVAE):
        self.vae = vae
        self.cache: list[torch.Tensor | None] = [None] * vae.encoder_convs
        self.pending: torch.Tensor | None = None  # [1, 3, n < chunk, H, W] frames waiting for a chunk
        self.latents_out = 0

    def _chunk_size(self) -> int:
        return 1 if self.latents_out == 0 else TEMPORAL_STRIDE

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        model = self.vae.model
        out = model.encoder(chunk, feat_cache=self.cache, feat_idx=[0])
        mu = model.quant_conv(out)[:, :Z_DIM]  # [1, 16, 1, h, w]; the log-variance half is unused
        self.latents_out += 1
        return self.vae.normalize(mu)

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, n, H, W] in [-1, 1] -> the latents completed by them [1, 16, k, h, w] (k >= 0)."""
        _check_video(frames, "frames to encode")
        frames = frames.to(self.vae.device, self.vae.dtype)
        if self.pending is not None:
            frames = torch.cat([self.pending, frames], dim=2)
            self.pending = None
        out = []
        with torch.no_grad():
            while frames.shape[2] >= self._chunk_size():
                size = self._chunk_size()
                out.append(self._encode_chunk(frames[:, :, :size]))
                frames = frames[:, :, size:]
        if frames.shape[2]:
            self.pending = frames
        if not out:
            b, _, _, h, w = frames.shape
            return torch.zeros(b, Z_DIM, 0, h // SPATIAL_STRIDE, w // SPATIAL_STRIDE, device=frames.device)
        return torch.cat(out, dim=2)

    def push_repeated(self, frame: torch.Tensor, count: int) -> ConstantClipLatents:
        """Push `frame` [1, 3, 1, H, W] `count` times on a fresh stream; stop computing at the fixed point."""
        if self.latents_out or self.pending is not None:
            raise RuntimeError("push_repeated needs a fresh StreamingEncoder")
        if count < 1 or (count - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"repeat count must be 1 + 4k, got {count}")
        _check_video(frame, "frame to repeat")
        frame = frame.to(self.vae.device, self.vae.dtype)
        length = 1 + (count - 1) // TEMPORAL_STRIDE
        chunk = frame.expand(-1, -1, TEMPORAL_STRIDE, -1, -1)
        with torch.no_grad():
            latents = [self._encode_chunk(frame)]
            while len(latents) < length:
                before = list(self.cache)
                latents.append(self._encode_chunk(chunk))
                if _same_cache(before, self.cache):
                    break  # every further chunk would return latents[-1] and leave the cache as it is
        self.latents_out = length
        return ConstantClipLatents(head=torch.cat(latents, dim=2), length=length)


class StreamingDecoder:
    """Causal decode with a persistent cache: a block of latents in, its video frames out.

    The stream's first latent gives 1 frame, every later one 4. Decoding blocks one after another gives
    exactly the frames of one decode over their concatenation, with no context latent decoded twice.
    The cache is the whole state: `state_bytes()` / `load_state_bytes()` carry it across segments.
    """

    def __init__(self, vae: WanVideoVAE):
        self.vae = vae
        self.options = vae.decode_options
        self.fused = FusedDecoder(vae.model.decoder, self.options) if self.options.fused else None
        self.reset()

    def reset(self) -> None:
        # Per causal conv: None (nothing seen), "Rep" (diffusers' marker: the temporal upsampler has seen
        # the first latent only) or a tensor, the last <= 2 frames of that conv's input.
        self.cache: list[torch.Tensor | str | None] = [None] * self.vae.decoder_convs
        self.latents_in = 0

    def _decode_latent(self, latent: torch.Tensor, first: bool) -> torch.Tensor:
        """Latents [1, 16, k, h, w] (denormalised, model dtype) through the decoder; `first`: the stream's."""
        model = self.vae.model
        x = model.post_quant_conv(latent)  # 1x1x1 conv: per frame, no cache
        if self.fused is not None:
            return self.fused(x, self.cache).clamp_(-1.0, 1.0)
        out = model.decoder(x, feat_cache=self.cache, feat_idx=[0], first_chunk=first)
        return out.clamp(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, 16, t, h, w] -> frames [1, 3, n, H, W] in [-1, 1] (model dtype).

        A stream's first latent goes through alone (it is not upsampled in time); the others
        `options.chunk` at a time."""
        if latents.ndim != 5 or latents.shape[1] != Z_DIM:
            raise ValueError(f"latents: expected [1, 16, t, h, w], got {tuple(latents.shape)}")
        z = self.vae.denormalize(latents).to(self.vae.device, self.vae.dtype)
        out = []
        i = 0
        with torch.no_grad():
            while i < z.shape[2]:
                k = 1 if self.latents_in == 0 else self.options.chunk
                out.append(self._decode_latent(z[:, :, i : i + k], first=self.latents_in == 0))
                self.latents_in += z[:, :, i : i + k].shape[2]
                i += k
        return torch.cat(out, dim=2)

    def decode_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Like `decode`, as uint8 frames [n, H, W, 3] on the CPU."""
        return to_uint8(self.decode(latents))

    def prime(self, latents: torch.Tensor) -> None:
        """Run latents through the decoder for their context only (their frames are dropped).

        On a fresh decoder only the last DECODER_CONTEXT_LATENTS of them can reach the final cache, so
        only those are decoded.
        """
        total = latents.shape[2]
        if self.latents_in == 0 and total > DECODER_CONTEXT_LATENTS:
            self.decode(latents[:, :, -DECODER_CONTEXT_LATENTS:])
            self.latents_in = total
        else:
            self.decode(latents)

    def prime_repeated(self, latent: torch.Tensor, count: int) -> None:
        """`prime` with `latent` [1, 16, 1, h, w] repeated `count` times; stops at the cache's fixed point."""
        end = self.latents_in + count
        if self.latents_in == 0:
            count = min(count, DECODER_CONTEXT_LATENTS)
        z = self.vae.denormalize(latent).to(self.vae.device, self.vae.dtype)
        with torch.no_grad():
            for _ in range(count):
                before = list(self.cache)
                self._decode_latent(z, first=self.latents_in == 0)
                self.latents_in += 1
                if _same_cache(before, self.cache):
                    break  # decoding it again would leave the cache as it is
        self.latents_in = end

    def prime_constant_clip(self, clip: ConstantClipLatents) -> None:
        """Prime with all of `clip`'s latents (e.g. the reference's 92-latent motion buffer), cheaply."""
        end = self.latents_in + clip.length
        steady = clip.length - clip.head.shape[2] + 1  # trailing latents equal to head[-1]
        if self.latents_in == 0 and steady >= DECODER_CONTEXT_LATENTS:
            self.prime_repeated(clip.head[:, :, -1:], DECODER_CONTEXT_LATENTS)
        else:
            self.prime(clip.head[:, :, :-1])
            self.prime_repeated(clip.head[:, :, -1:], steady)
        self.latents_in = end

    # state for handoff / checkpointing
    def state_bytes(self) -> bytes:
        """The decoder's whole state, serialised (tensors on the CPU in the model's dtype)."""
        cache = [t.cpu() if isinstance(t, torch.Tensor) else t for t in self.cache]
        buffer = io.BytesIO()
        torch.save({"cache": cache, "latents_in": self.latents_in}, buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        cache = state["cache"]
        if len(cache) != self.vae.decoder_convs:
            raise ValueError(
                f"decoder state has {len(cache)} entries, this VAE needs {self.vae.decoder_convs}"
            )
        device, dtype = self.vae.device, self.vae.dtype
        self.cache = [t.to(device, dtype) if isinstance(t, torch.Tensor) else t for t in cache]
        self.latents_in = int(state["latents_in"])

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [1, 3, 1, H, W] in [-1, 1] (x / 255 * 2 - 1, as the reference)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError("portrait", f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
        raise InputError("portrait", f"height and width must be multiples of {SPATIAL_STRIDE}, got {h}x{w}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
    return (x * 2.0 - 1.0)[None, :, None]


def uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] where the video is, rounding to nearest.

    (The reference truncates, (x + 1) / 2 * 255 cast to uint8, which darkens by half a level on average.)
    """
    x = ((video[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """`uint8_frames` on the host, as numpy."""
    return uint8_frames(video).cpu().numpy()


def decoder_state_nbytes(
    height: int, width: int, dtype: torch.dtype = torch.bfloat16, base_dim: int = 96
) -> int:
    """Bytes of a StreamingDecoder's state for `height` x `width` output, from shapes alone (meta device)."""
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=base_dim, z_dim=Z_DIM)
    stream = StreamingDecoder(WanVideoVAE(model))
    # Two latents: from the second on, every cache entry holds its steady two frames.
    stream.decode(torch.zeros(1, Z_DIM, 2, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE, device="meta"))
    elements = sum(t.numel() for t in stream.cache if isinstance(t, torch.Tensor))
    return elements * dtype.itemsize


def _check_video(x: torch.Tensor, what: str) -> None:
    if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected [1, 3, T, H, W], got {tuple(x.shape)}")
    if x.shape[3] % SPATIAL_STRIDE or x.shape[4] % SPATIAL_STRIDE:
        raise ValueError(f"{what}: height and width must be multiples of 8, got {x.shape[3]}x{x.shape[4]}")


def _same_cache(a: list, b: list) -> bool:
    """True when two feature caches hold the same entries, bit for bit."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


__all__ = [
    "DECODER_CONTEXT_LATENTS",
    "LATENTS_MEAN",
    "LATENTS_STD",
    "MOTION_FRAMES",
    "MOTION_LATENTS",
    "ConstantClipLatents",
    "StreamingDecoder",
    "StreamingEncoder",
    "WanVideoVAE",
    "convert_original_state_dict",
    "decoder_state_nbytes",
    "image_to_tensor",
    "load_vae",
    "original_to_diffusers_key",
    "to_uint8",
    "uint8_frames",
]
