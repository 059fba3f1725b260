"""3-D rotary position embedding with the S2V model's token positions.

Each head of 128 channels is split into three groups (44, 42, 42) rotated by a token's frame, row and
column position. The positions are the unusual part: the reference latent sits at a far-ahead frame,
FramePack's compressed motion buckets sit at negative frames with subsampled rows/columns, and the
subsampling is "linspace, then truncate to int" (so rows 0..23 packed 2:1 become 0,2,4,…,20,23).
We reproduce those positions exactly.

The official model stores its rotation table as complex32, i.e. cos and sin rounded to float16. The
model was trained with that table, so `rope_table` rounds the same way.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from .config import DiTConfig

# Tables a DiT keeps on its device for the forwards that repeat them (`LiveAvatarDiT._rope`); at
# 704x384 one is about 1.5 MB (3,168 block or 2,640 sink tokens x 64 cos and sin in float32).
ROPE_TABLES_KEPT = 16


class RopeTable(NamedTuple):
    """cos and sin of every token's rotation angles: float32 [tokens, head_dim // 2]."""

    cos: torch.Tensor
    sin: torch.Tensor

    def to(self, device: torch.device | str) -> RopeTable:
        return RopeTable(self.cos.to(device), self.sin.to(device))


def axis_positions(start: int, span: int, count: int) -> np.ndarray:
    """Positions of `count` tokens covering `span` grid cells from `start` along one axis.

    Packed tokens (count < span) take evenly spaced positions truncated to int. A negative start
    counts backwards: the official code samples |start| downwards and negates, so the frames of the
    16-frame motion bucket at -19 are -19, -14, -9, -4.
    """
    if start >= 0:
        return np.linspace(start, start + span - 1, count).astype(np.int64)
    return -np.linspace(-start, -start - span + 1, count).astype(np.int64)


def grid_positions(frames: tuple[int, int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """(frame, row, col) of every token of a grid, frame slowest: int64 [F·H·W, 3].

    frames = (start, span, count); rows and cols = (span, count), starting at 0.
    """
    f = axis_positions(*frames)
    h = axis_positions(0, *rows)
    w = axis_positions(0, *cols)
    grid = np.stack(np.meshgrid(f, h, w, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def block_positions(frame_index: int, frames: int, h: int, w: int) -> np.ndarray:
    """Noisy tokens of a block whose first latent frame is `frame_index` (absolute, since job start)."""
    return grid_positions((frame_index, frames, frames), (h, h), (w, w))


def motion_positions(config: DiTConfig, h: int, w: int) -> np.ndarray:
    """FramePack tokens, nearest bucket first. Bucket k packs 2^k:1 in time and space and starts at
    frame -(sum of buckets up to k); the positions never move as generation advances."""
    parts, start = [], 0
    for k, frames in enumerate(config.framepack_buckets):
        factor = 2**k
        start -= frames
        parts.append(grid_positions((start, frames, frames // factor), (h, h // factor), (w, w // factor)))
    return np.concatenate(parts)


def cond_positions(config: DiTConfig, reference_frame: int, h: int, w: int) -> np.ndarray:
    """The cond (sink) tokens: the reference latent at `reference_frame`, then FramePack's tokens."""
    reference = grid_positions((reference_frame, 1, 1), (h, h), (w, w))
    return np.concatenate([reference, motion_positions(config, h, w)])


def reference_frame_for_block(config: DiTConfig, frame_index: int, sink_distance: int) -> int:
    """RoPE frame of the reference latent when the block at `frame_index` attends to the cond cache.

    The reference implementation puts it `sink_distance` frames ahead of the block, but never before
    `ref_frame_position` (30); it draws sink_distance from randint(4, 30) per forward.
    """
    return max(config.ref_frame_position, frame_index + sink_distance)


@lru_cache(maxsize=64)
def _inverse_frequencies(axis_dims: tuple[int, int, int], theta: float) -> tuple[torch.Tensor, ...]:
    return tuple(1.0 / torch.pow(theta, torch.arange(0, m, 2, dtype=torch.float64) / m) for m in axis_dims)


def rope_table(config: DiTConfig, positions: np.ndarray, device: torch.device | str = "cpu") -> RopeTable:
    """Rotation table for int positions [N, 3]; angles in float64, cos/sin rounded to float16."""
    pos = torch.from_numpy(positions).to(torch.float64)
    inv = _inverse_frequencies(config.rope_axis_dims, config.rope_theta)
    angles = torch.cat([pos[:, i : i + 1] * inv[i] for i in range(3)], dim=1)  # [N, head_dim/2]
    cos = torch.cos(angles).to(torch.float16).to(torch.float32)
    sin = torch.sin(angles).to(torch.float16).to(torch.float32)
    if torch.device(device).type == "cuda":  # from pinned memory: the host does not wait for the GPU
        return RopeTable(*(t.pin_memory().to(device, non_blocking=True) for t in (cos, sin)))
    return RopeTable(cos.to(device), sin.to(device))


def apply_rope(x: torch.Tensor, table: RopeTable, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, N, heads, head_dim], computed in float32.

    The result is rounded once to `dtype` as it is stored (float32: not rounded). x is not converted
    first: multiplying a bf16 x by the float32 table promotes it exactly inside the kernel, and the
    two rotated halves are written straight into the output (no float32 copy of x, no stack)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, D/2] views in x's dtype
    cos = table.cos[None, :, None, :]
    sin = table.sin[None, :, None, :]
    if torch.compiler.is_compiling():  # dynamo takes no strided out=; inductor fuses this instead
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(dtype)
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2, 2), dtype=dtype, device=x.device)
    torch.sub(x0 * cos, x1 * sin, out=out[..., 0])
    torch.add(x0 * sin, x1 * cos, out=out[..., 1])
    return out.flatten(-2)
