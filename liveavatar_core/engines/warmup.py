"""Warm a freshly loaded engine up before it serves: two short throwaway segments at a lecture's config.

A long-lived GPU worker calls `warm_up` once, after loading the engine and before taking work, so that
its first real segment does not pay for what every engine process pays once per config: compiling
kernels (the LiveAvatar engine's compiled chains), the encoders' first calls and the first allocation
of the caches. The second segment continues from the first one's handoff, so the continuation path is
warmed too. Both go down the degrade ladder, as a real segment does, so the rung a real segment would
take is the one warmed. Frames go nowhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..timebase import SAMPLES_PER_FRAME
from .base import Engine, GenerationConfig, SegmentRequest
from .ladder import generate_with_ladder

WARMUP_PROMPT = "A person speaks to the camera in a bright room."
WARMUP_FRAMES = 25  # per segment: one second of video, more than two LiveAvatar blocks


@dataclass(frozen=True)
class WarmUp:
    seconds: float
    rung: str  # the rung the warm-up segments ran on


class _Discard:
    def write(self, frames: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def warm_up(engine: Engine, config: GenerationConfig, frames: int = WARMUP_FRAMES) -> WarmUp:
    """Run a fresh segment and one continuing from its handoff at `config` (silence, a grey portrait)."""
    start = time.perf_counter()
    portrait = np.full((config.height, config.width, 3), 128, np.uint8)
    silence = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    handoff = None
    for _ in range(2):
        request = SegmentRequest(
            audio=silence,
            num_frames=frames,
            portrait=portrait,
            prompt=WARMUP_PROMPT,
            seed=0,
            config=config,
            handoff=handoff,
        )
        outcome = generate_with_ladder(engine, request, _Discard)
        handoff = outcome.result.handoff
    return WarmUp(seconds=time.perf_counter() - start, rung=outcome.attempts[-1].rung)
