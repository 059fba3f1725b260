"""Key/value caches of the causal DiT's self-attention.

Two kinds, both preallocated, laid out [layers, B, tokens, heads, head_dim] so that one layer's slice
of a token range is contiguous (a cheap host->device copy when a cache lives on the host):

* `CondKVCache`: keys and values of the sink tokens (reference latent + FramePack motion tokens,
  2.5·fsl tokens), written by `LiveAvatarDiT.forward_sink`. Keys are stored *without* RoPE: the
  reference latent's rotary position moves with every block, so RoPE is applied at attention time.
  One cond cache serves all denoising steps.
* `RingKVCache`: one per denoising step ("timestep forcing"). Step i's cache holds the keys (with
  RoPE, at absolute frame positions) and values of the most recent `ring_frames` latent frames as they
  looked at step i's noise level, written by `forward_block(..., write_cache=True)` at step i. Frame f
  lives in frame slot f % ring_frames. A block attends to every filled slot except its own, plus its
  own fresh keys, plus the sink: with 12 slots and 3-frame blocks that is the 9 latest earlier frames.

A cache may live on another device than the model (the host, for the offload rung): reads copy the
slice a layer needs to the compute device, writes copy back. Caches never guess what is read next:
the denoising order (`order.py`) tells them (`prefetch`, `open_layer`); a device cache ignores the hints.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import DiTConfig
from .framepack import cond_token_count


def _allocate(shape: tuple[int, ...], device, dtype, pin_memory: bool) -> torch.Tensor:
    pin = pin_memory and torch.device(device).type == "cpu" and torch.cuda.is_available()
    return torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin)


def kv_bytes_per_token(config: DiTConfig, dtype: torch.dtype) -> int:
    """Bytes one token takes in a cache across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.dim * itemsize


def contiguous_runs(*ranges: list[range]) -> list[range]:
    """Token ranges joined where one ends at the next's start, in start order (attention is the same
    whatever the order of its keys, so a full window is one run: one view of the ring, no copy)."""
    runs: list[range] = []
    for r in sorted((r for group in ranges for r in group), key=lambda r: r.start):
        if runs and runs[-1].stop == r.start:
            runs[-1] = range(runs[-1].start, r.stop)
        else:
            runs.append(r)
    return runs


@dataclass
class CondKVCache:
    """Sink keys (no RoPE) and values per layer: k, v [layers, B, tokens, heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # tokens written by the last sink forward

    @classmethod
    def allocate(
        cls,
        config: DiTConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        pin_memory: bool = False,
    ) -> CondKVCache:
        tokens = cond_token_count(config, latent_height, latent_width)
        shape = (config.num_layers, batch, tokens, config.num_heads, config.head_dim)
        return cls(_allocate(shape, device, dtype, pin_memory), _allocate(shape, device, dtype, pin_memory))

    @staticmethod
    def nbytes_for(config: DiTConfig, latent_height: int, latent_width: int, batch: int, dtype) -> int:
        return (
            batch * cond_token_count(config, latent_height, latent_width) * kv_bytes_per_token(config, dtype)
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer's sink keys/values [B, tokens, heads, head_dim]."""
        n = k.shape[1]
        if n > self.k.shape[2]:
            raise ValueError(f"cond cache holds {self.k.shape[2]} tokens, the sink has {n}")
        self.k[layer, :, :n].copy_(k, non_blocking=True)
        self.v[layer, :, :n].copy_(v, non_blocking=True)

    def read(self, layer: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length == 0:
            raise RuntimeError("the cond cache is empty: run forward_sink before forward_block")
        k = self.k[layer, :, : self.length].to(device, non_blocking=True)
        v = self.v[layer, :, : self.length].to(device, non_blocking=True)
        return k, v


@dataclass
class RingKVCache:
    """One denoising step's keys (with RoPE) and values of the latest `capacity_frames` latent frames.

    k, v [layers, B, capacity_frames · tokens_per_frame, heads, head_dim]; `slot_frames[s]` is the
    absolute latent frame held by frame slot s (-1: empty).
    """

    k: torch.Tensor
    v: torch.Tensor
    tokens_per_frame: int
    slot_frames: list[int] = field(default_factory=list)

    @classmethod
    def allocate(
        cls,
        config: DiTConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        capacity_frames: int | None = None,
        pin_memory: bool = False,
    ) -> RingKVCache:
        frames = capacity_frames or config.ring_frames
        fsl = config.tokens_per_frame(latent_height, latent_width)
        shape = (config.num_layers, batch, frames * fsl, config.num_heads, config.head_dim)
        return cls(
            _allocate(shape, device, dtype, pin_memory),
            _allocate(shape, device, dtype, pin_memory),
            tokens_per_frame=fsl,
            slot_frames=[-1] * frames,
        )

    @staticmethod
    def nbytes_for(config: DiTConfig, latent_height: int, latent_width: int, batch: int, dtype) -> int:
        fsl = config.tokens_per_frame(latent_height, latent_width)
        return batch * config.ring_frames * fsl * kv_bytes_per_token(config, dtype)

    @property
    def capacity_frames(self) -> int:
        return len(self.slot_frames)

    def reset(self) -> None:
        """Forget every frame (the tensors keep their memory; stale values are never read)."""
        self.slot_frames = [-1] * self.capacity_frames

    def first_slot(self, frame_index: int, frames: int) -> int:
        """Frame slot where a block starting at `frame_index` goes; a block never straddles the end."""
        slot = frame_index % self.capacity_frames
        if frames > self.capacity_frames or slot + frames > self.capacity_frames:
            raise ValueError(
                f"a {frames}-frame block at frame {frame_index} does not fit slots "
                f"{slot}..{slot + frames - 1} of a {self.capacity_frames}-frame ring"
            )
        return slot

    def context_ranges(self, frame_index: int, frames: int) -> tuple[list[range], list[range]]:
        """Token ranges of the filled slots before and after the block's own slots, in slot order."""
        first = self.first_slot(frame_index, frames)
        fsl = self.tokens_per_frame
        before, after = [], []
        for slot, held in enumerate(self.slot_frames):
            if held < 0 or first <= slot < first + frames:
                continue
            runs = before if slot < first else after
            if runs and runs[-1].stop == slot * fsl:
                runs[-1] = range(runs[-1].start, (slot + 1) * fsl)  # extend a contiguous run
            else:
                runs.append(range(slot * fsl, (slot + 1) * fsl))
        return before, after

    def read(
        self, layer: int, ranges: list[range], device: torch.device | str
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of `ranges` of one layer, on `device`: lists of [B, n, heads, head_dim]."""
        ks = [self.k[layer, :, r.start : r.stop].to(device, non_blocking=True) for r in ranges]
        vs = [self.v[layer, :, r.start : r.stop].to(device, non_blocking=True) for r in ranges]
        return ks, vs

    def write(self, layer: int, frame_index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's keys/values [B, frames·fsl, heads, head_dim] of the block at frame_index."""
        frames = k.shape[1] // self.tokens_per_frame
        start = self.first_slot(frame_index, frames) * self.tokens_per_frame
        self.k[layer, :, start : start + k.shape[1]].copy_(k, non_blocking=True)
        self.v[layer, :, start : start + v.shape[1]].copy_(v, non_blocking=True)

    def commit(self, frame_index: int, frames: int) -> None:
        """Mark the block's slots as holding its frames (after all layers were written)."""
        first = self.first_slot(frame_index, frames)
        for i in range(frames):
            self.slot_frames[first + i] = frame_index + i

    def context_plan(self, frame_indices: list[int], frames: int) -> list[tuple[list[range], list[range]]]:
        """`context_ranges` of each block in turn, as if each earlier one had been committed (a sweep
        runs every block at one layer before the next layer, so no block is committed until the end)."""
        saved = list(self.slot_frames)
        try:
            plan = []
            for frame_index in frame_indices:
                plan.append(self.context_ranges(frame_index, frames))
                self.commit(frame_index, frames)
            return plan
        finally:
            self.slot_frames[:] = saved

    # ----- hints from the denoising order (a device cache needs none) ---------------------------------

    def prefetch(self, layer: int, ranges: list[list[range]]) -> None:
        """The next `read`s will be of `layer`, these ranges (block order)."""

    def open_layer(self, layer: int, following: int | None) -> RingKVCache:
        """One layer as a one-layer cache on the compute device, sharing the slot bookkeeping (sweep
        order: every block of the sweep reads and writes it before the next layer); `following` is the
        layer opened next. Close it with `close_layer`."""
        return replace(self, k=self.k[layer : layer + 1], v=self.v[layer : layer + 1])

    def close_layer(self, layer: int, view: RingKVCache) -> None:
        """The sweep is done with `layer` (a view of this cache's own memory: nothing to copy back)."""
