"""Warm a freshly loaded engine up before it serves: two short throwaway segments at a lecture's config.

Most of a cold warm-up is torch.compile building kernels. `use_compile_cache` keeps Inductor's caches
(FX graphs, autotuning results, Triton kernels) in a directory that outlives the process
($LIVEAVATAR_COMPILE_CACHE, a volume in infra/docker-compose.yml), so a restarted worker loads them
instead of compiling again. The worker calls it before anything compiles.

A long-lived GPU worker calls `warm_up` once, after loading the engine and before taking work, so that
its first real segment does not pay for what every engine process pays once per config: compiling
kernels (the LiveAvatar engine's compiled chains), the encoders' first calls and the first allocation
of the caches. The second segment continues from the first one's handoff, so the continuation path is
warmed too. Both go down the degrade ladder, as a real segment does, so the rung a real segment would
take is the one warmed. Frames go nowhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..timebase import SAMPLES_PER_FRAME
from .base import Engine, GenerationConfig, SegmentRequest
from .ladder import generate_with_ladder

WARMUP_PROMPT = "A person speaks to the camera in a bright room."
WARMUP_FRAMES = 25  # per segment: one second of video, more than two LiveAvatar blocks
COMPILE_CACHE_ENV = "LIVEAVATAR_COMPILE_CACHE"


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


def use_compile_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep torch.compile's caches in `directory` (else $LIVEAVATAR_COMPILE_CACHE); call before compiling.

    Sets Inductor's environment (TORCHINDUCTOR_CACHE_DIR, and its FX graph and AOT autograd caches on),
    which torch reads when it compiles; Triton's kernels go under the same directory. Returns the
    directory, or None when neither names one (torch's default under the temp dir, lost on restart).
    Raises InputError when the directory cannot be created or written.
    """
    directory = directory or os.environ.get(COMPILE_CACHE_ENV)
    if not directory:
        return None
    path = Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(
            COMPILE_CACHE_ENV, f"{path}: compile cache not writable ({exc.strerror or exc})"
        ) from exc
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    return path
