"""The denoising order: the one place that decides in which order a segment's blocks, steps and layers
run. Two implementations of one interface; both give the same latents (the same operations on the same
inputs, in another order).

* `BlockOrder` (the reference order): block after block, each through its `steps` DiT forwards.
* `SweepOrder`: step-major, layer-major. LiveAvatar's timestep forcing makes step i of block b need
  only block b's own step i-1 output and what blocks b-3..b-1 wrote into step i's ring *at step i*. So
  step 1 can run over every block of a group, then step 2, ...; and each such sweep runs layer by
  layer over all the group's blocks (`LiveAvatarDiT.forward_sweep`), so a streamed layer's weights
  cross to the device once per sweep instead of once per block forward. Only one step's ring is in use
  at a time. The rolling sink is the one barrier: clip 0 finishes before clip 1 starts (clip 0's first
  latent becomes the sink of every later clip). Groups are also capped at `group_blocks` blocks, which
  bounds the sweep's hidden states (one block's tokens per block of the group).

Both also replay a handoff's last blocks into the step rings (the fallback continuation), each in its
own order.

Randomness stays a function of (seed, clip, block, step): noise and sink distances are drawn by the
segment (`SegmentRun.begin_block`) per block, whatever the order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from .config import DiTConfig
from .dit_audio import AudioTokens
from .framepack import cond_token_count
from .handoff import ReplayBlock

if TYPE_CHECKING:
    from .pipeline import SegmentRun

ORDERS = ("block", "sweep")


@dataclass
class BlockWork:
    """One block on its way through the steps."""

    frame_index: int
    x: torch.Tensor  # the latents after the steps done so far, float32 [1, 16, F, h, w]
    audio: AudioTokens
    audio_input: torch.Tensor  # the wav2vec2 features it was encoded from (for the replay window)
    distances: tuple[int, ...]  # sink distance per step
    inputs: list[torch.Tensor] = field(default_factory=list)  # what the DiT saw at each step


class DenoisingOrder(Protocol):
    name: str

    def denoise(self, run: SegmentRun, frame_indices: list[int]) -> Iterator[torch.Tensor]:
        """Denoise the blocks starting at `frame_indices` (consecutive); yield their clean latents in
        block order, each as soon as the order has finished it."""
        ...

    def replay(self, run: SegmentRun, blocks: list[ReplayBlock]) -> None:
        """Rewrite the step rings as the previous segment wrote them (the fallback continuation): every
        block's forwards at every step again, from the inputs it saw then; the predictions are unused."""
        ...


class BlockOrder:
    """Block-major: every step of block b before block b+1 (the reference order)."""

    name = "block"

    def denoise(self, run: SegmentRun, frame_indices: list[int]) -> Iterator[torch.Tensor]:
        for frame_index in frame_indices:
            work = run.begin_block(frame_index)
            with run.timed_dit():
                run.ensure_cond(frame_index)
                for i in range(run.schedule.steps):
                    work.inputs.append(work.x)
                    velocity = run.dit.forward_block(
                        work.x,
                        run.schedule.timesteps[i],
                        frame_index=frame_index,
                        sink_distance=work.distances[i],
                        text=run.text,
                        audio=work.audio,
                        cond_cache=run.caches.cond,
                        ring_cache=run.caches.rings[i],
                    )
                    work.x = run.schedule.step(i, velocity, work.x)
            run.end_block(work)
            yield work.x

    def replay(self, run: SegmentRun, blocks: list[ReplayBlock]) -> None:
        device = run.dit.device
        for block in blocks:
            run.ensure_cond(block.frame_index)
            audio = run.dit.encode_audio(block.audio.to(device))
            for i in range(run.schedule.steps):
                run.dit.forward_block(
                    block.inputs[i].to(device),
                    run.schedule.timesteps[i],
                    frame_index=block.frame_index,
                    sink_distance=block.sink_distances[i],
                    text=run.text,
                    audio=audio,
                    cond_cache=run.caches.cond,
                    ring_cache=run.caches.rings[i],
                )


class SweepOrder:
    """Step-major over groups of blocks, each step one layer-major sweep (see the module docstring)."""

    name = "sweep"

    def __init__(self, group_blocks: int):
        if group_blocks < 1:
            raise ValueError(f"a sweep needs at least one block per group, got {group_blocks}")
        self.group_blocks = group_blocks

    def groups(self, frame_indices: list[int], clip_latents: int) -> list[list[int]]:
        """Consecutive runs of blocks: split where clip 1 starts (the rolling-sink barrier) and every
        `group_blocks` blocks."""
        groups: list[list[int]] = []
        for frame_index in frame_indices:
            barrier = frame_index == clip_latents
            if not groups or barrier or len(groups[-1]) == self.group_blocks:
                groups.append([])
            groups[-1].append(frame_index)
        return groups

    def denoise(self, run: SegmentRun, frame_indices: list[int]) -> Iterator[torch.Tensor]:
        for group in self.groups(frame_indices, run.clip_latents):
            works = [run.begin_block(frame_index) for frame_index in group]
            with run.timed_dit():
                run.ensure_cond(group[0])
                for i in range(run.schedule.steps):
                    for work in works:
                        work.inputs.append(work.x)
                    velocities = run.dit.forward_sweep(
                        [work.x for work in works],
                        run.schedule.timesteps[i],
                        frame_indices=group,
                        sink_distances=[work.distances[i] for work in works],
                        text=run.text,
                        audio=[work.audio for work in works],
                        cond_cache=run.caches.cond,
                        ring_cache=run.caches.rings[i],
                    )
                    for work, velocity in zip(works, velocities, strict=True):
                        work.x = run.schedule.step(i, velocity, work.x)
            for work in works:
                run.end_block(work)
                yield work.x

    def replay(self, run: SegmentRun, blocks: list[ReplayBlock]) -> None:
        device = run.dit.device
        by_frame = {block.frame_index: block for block in blocks}
        for group in self.groups(list(by_frame), run.clip_latents):
            run.ensure_cond(group[0])
            audio = [run.dit.encode_audio(by_frame[f].audio.to(device)) for f in group]
            for i in range(run.schedule.steps):
                run.dit.forward_sweep(
                    [by_frame[f].inputs[i].to(device) for f in group],
                    run.schedule.timesteps[i],
                    frame_indices=group,
                    sink_distances=[by_frame[f].sink_distances[i] for f in group],
                    text=run.text,
                    audio=audio,
                    cond_cache=run.caches.cond,
                    ring_cache=run.caches.rings[i],
                )


def sweep_state_bytes(
    config: DiTConfig, latent_height: int, latent_width: int, blocks: int, itemsize: int
) -> int:
    """Device bytes a sweep holds beyond block order: every block's hidden state between layers (its
    tokens x dim in the compute dtype) and its RoPE tables (own and sink tokens, float32 cos and sin)."""
    fsl = config.tokens_per_frame(latent_height, latent_width)
    tokens = config.block_frames * fsl
    rope = (tokens + cond_token_count(config, latent_height, latent_width)) * config.head_dim * 4
    return blocks * (tokens * config.dim * itemsize + rope)


def make_order(name: str, group_blocks: int) -> DenoisingOrder:
    if name == "block":
        return BlockOrder()
    if name == "sweep":
        return SweepOrder(group_blocks)
    raise ValueError(f"denoising order {name!r}: expected one of {', '.join(ORDERS)}")


__all__ = [
    "ORDERS",
    "BlockOrder",
    "BlockWork",
    "DenoisingOrder",
    "SweepOrder",
    "make_order",
    "sweep_state_bytes",
]
