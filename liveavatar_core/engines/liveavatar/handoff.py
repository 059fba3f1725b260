"""The state a segment ends with, so the next segment continues the same motion across the cut.

What the generator carries from block to block, and how much of it travels:

* the **sink** inputs: the portrait latent (the sink of the first clip), the rolling-sink latent (the
  first generated latent, the sink from the second clip on) and the 19 FramePack motion latents. The
  cond K/V cache is recomputed from them with one sink forward (2.5·fsl tokens, cheap).
* the four **KV ring caches** (one per denoising step, 12 latent frames of keys/values in every layer:
  41.5 GB at 704x384) cannot travel. Instead the state keeps what wrote them: for each of the last
  `ring_frames / block_frames` blocks, the noisy latents the DiT saw at every step, the block's sink
  distances and its audio features. The next segment replays those forwards (16 at full size, about
  one clip of DiT work) and gets the rings back. The replay is exact when every block since the last
  independent start is in the window (the previous segment was at most one clip long), and otherwise
  misses only what the oldest replayed block itself attended to (earlier blocks that left the ring).
* the **VAE decoder's causal cache** (1.2 GB at 704x384) cannot travel either; it is a function of the
  last `decoder_context` latents the decoder saw (37.5 latents of temporal receptive field for Wan2.1:
  38), so those latents travel and the next segment re-primes a fresh decoder with them, exactly.
* the **kept state**: the worker that made this state keeps the four rings themselves (host memory or
  the device) under `state_id`, a name drawn fresh for every segment. A next segment that runs there
  with this handoff continues from those rings: exactly the video of one long segment. Anywhere else
  (or after the worker went on to other work) the replay above is the fallback.
* counters: the absolute latent frame the next block starts at (RoPE positions, ring slots, and the
  clip index that seeds noise and sink distances).
* the last seconds of audio, as left context for the next segment's wav2vec2 windows.

About 34 MB at 704x384 (latents in float32), validated on load: a state made for another area, step
count or model is refused with a message naming the mismatch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ...errors import InputError

FORMAT = "liveavatar-batch/handoff"
VERSION = 1
Z_DIM = 16  # latent channels of the Wan2.1 VAE


class HandoffError(InputError):
    """The handoff bytes cannot start this segment (corrupt, another format version, another shape)."""

    def __init__(self, problem: str):
        super().__init__("segment handoff", problem)


@dataclass(frozen=True)
class ReplayBlock:
    """One generated block, as needed to write its keys/values into the step rings again.

    inputs: float32 [steps, 1, 16, block_frames, h, w], the noisy latents the DiT saw at each step.
    audio: [1, audio_layers, audio_dim, 4·block_frames] wav2vec2 features of the block's video frames.
    """

    frame_index: int  # absolute latent frame of the block's first frame
    sink_distances: tuple[int, ...]  # one per step
    inputs: torch.Tensor
    audio: torch.Tensor


@dataclass(frozen=True)
class Handoff:
    """Everything the next segment needs to continue; tensors on the CPU."""

    height: int
    width: int
    steps: int
    next_frame: int  # absolute latent frame index of the next block (a multiple of block_frames)
    model: str  # `model_signature` of the DiT that made it
    reference_latent: torch.Tensor  # [1, 16, 1, h, w]: the portrait, sink of the first clip
    sink_latent: torch.Tensor | None  # [1, 16, 1, h, w]: first generated latent (rolling sink)
    motion_latents: torch.Tensor  # [1, 16, motion, h, w]: FramePack's input
    decoder_latents: torch.Tensor  # [1, 16, k, h, w]: the VAE decoder's last k input latents
    replay: tuple[ReplayBlock, ...] = ()
    audio_tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32 samples
    state_id: str = ""  # names the rings the making worker keeps (see the module docstring)

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.reference_latent.shape[-2:])

    def nbytes(self) -> int:
        tensors = _tensors(self)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ----- bytes -----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """safetensors bytes: the tensors, and the scalars as JSON in the header's metadata."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "height": self.height,
            "width": self.width,
            "steps": self.steps,
            "next_frame": self.next_frame,
            "model": self.model,
            "has_sink": self.sink_latent is not None,
            "state_id": self.state_id,
            "replay": [
                {"frame_index": b.frame_index, "sink_distances": list(b.sink_distances)} for b in self.replay
            ],
        }
        return save_tensors(_tensors(self), metadata={"handoff": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Handoff:
        """Parse and check the structure (not yet that it fits a request: see `check_fits`)."""
        meta = _metadata(data)
        try:
            tensors = load_tensors(data)
        except Exception as exc:  # safetensors raises its own error types for corrupt payloads
            raise HandoffError(f"tensors unreadable ({exc})") from exc
        try:
            replay = tuple(
                ReplayBlock(
                    frame_index=int(b["frame_index"]),
                    sink_distances=tuple(int(d) for d in b["sink_distances"]),
                    inputs=tensors[f"replay.{i}.inputs"],
                    audio=tensors[f"replay.{i}.audio"],
                )
                for i, b in enumerate(meta["replay"])
            )
            state = cls(
                height=int(meta["height"]),
                width=int(meta["width"]),
                steps=int(meta["steps"]),
                next_frame=int(meta["next_frame"]),
                model=str(meta["model"]),
                reference_latent=tensors["reference_latent"],
                sink_latent=tensors["sink_latent"] if meta["has_sink"] else None,
                motion_latents=tensors["motion_latents"],
                decoder_latents=tensors["decoder_latents"],
                replay=replay,
                audio_tail=tensors["audio_tail"].numpy(),
                state_id=str(meta.get("state_id", "")),
            )
        except KeyError as exc:
            raise HandoffError(f"field {exc.args[0]!r} is missing") from None
        state.check_structure()
        return state

    # ----- validation ------------------------------------------------------------------------------

    def check_structure(self) -> None:
        """Shapes agree with each other and with the area; raises HandoffError naming the first problem."""
        h, w = self.height // 8, self.width // 8
        latent = (1, Z_DIM)

        def expect(name: str, tensor: torch.Tensor, frames: int | None) -> None:
            shape = tuple(tensor.shape)
            wanted_frames = shape[2] if frames is None and len(shape) == 5 else frames
            if len(shape) != 5 or shape[:2] != latent or shape[3:] != (h, w) or shape[2] != wanted_frames:
                raise HandoffError(
                    f"{name} has shape {list(shape)}, expected [1, {Z_DIM}, {wanted_frames or 't'}, {h}, {w}] "
                    f"for {self.height}x{self.width}"
                )
            if tensor.dtype != torch.float32:
                raise HandoffError(f"{name} is {tensor.dtype}, expected float32")

        expect("reference_latent", self.reference_latent, 1)
        if self.sink_latent is not None:
            expect("sink_latent", self.sink_latent, 1)
        expect("motion_latents", self.motion_latents, None)
        expect("decoder_latents", self.decoder_latents, None)
        if self.steps < 1 or self.next_frame < 0:
            raise HandoffError(f"steps {self.steps} / next_frame {self.next_frame} out of range")
        for i, block in enumerate(self.replay):
            shape = tuple(block.inputs.shape)
            if len(shape) != 6 or shape[0] != self.steps or shape[1:3] != latent or shape[4:] != (h, w):
                raise HandoffError(f"replay block {i} inputs have shape {list(shape)} for {self.steps} steps")
            if len(block.sink_distances) != self.steps:
                raise HandoffError(f"replay block {i} has {len(block.sink_distances)} sink distances")
            if block.audio.ndim != 4 or block.audio.shape[0] != 1:
                raise HandoffError(f"replay block {i} audio has shape {list(block.audio.shape)}")
            if block.frame_index + shape[3] > self.next_frame:
                raise HandoffError(f"replay block {i} at frame {block.frame_index} is after next_frame")
        if self.audio_tail.ndim != 1 or self.audio_tail.dtype != np.float32:
            raise HandoffError(f"audio_tail must be float32 [samples], got {self.audio_tail.dtype}")

    def mismatch(self, height: int, width: int, steps: int, model: str) -> str | None:
        """Why this state cannot continue a segment with these settings (None: it can, fully)."""
        if model != self.model:
            return f"it was made by another model ({self.model}, this engine runs {model})"
        if (height, width) != (self.height, self.width):
            return f"it was made at {self.height}x{self.width}, this segment runs at {height}x{width}"
        if steps != self.steps:
            return f"it was made with {self.steps} steps, this segment runs {steps}"
        return None


def _tensors(state: Handoff) -> dict[str, torch.Tensor]:
    tensors = {
        "reference_latent": state.reference_latent,
        "motion_latents": state.motion_latents,
        "decoder_latents": state.decoder_latents,
        "audio_tail": torch.from_numpy(np.ascontiguousarray(state.audio_tail)),
    }
    if state.sink_latent is not None:
        tensors["sink_latent"] = state.sink_latent
    for i, block in enumerate(state.replay):
        tensors[f"replay.{i}.inputs"] = block.inputs
        tensors[f"replay.{i}.audio"] = block.audio
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _metadata(data: bytes) -> dict:
    """The JSON scalars from a safetensors header, checked for our format and version."""
    if len(data) < 8:
        raise HandoffError(f"{len(data)} bytes is too short to be a handoff state")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise HandoffError("the header is truncated (not a handoff state, or cut short in storage)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["handoff"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HandoffError(f"no handoff metadata in the header ({exc})") from None
    if meta.get("format") != FORMAT:
        raise HandoffError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise HandoffError(
            f"version {meta.get('version')!r}; this engine reads version {VERSION} "
            "(regenerate the previous segment with this engine version)"
        )
    return meta


__all__ = ["FORMAT", "VERSION", "Handoff", "HandoffError", "ReplayBlock"]
