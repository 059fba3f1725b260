"""The LiveAvatar degrade ladder, quality first: every rung that costs only speed comes before any
rung that costs quality.

Each rung keeps everything the previous rungs changed and changes one more thing:

1. requested
2. encoders off the GPU (text encoder and wav2vec2 come to the GPU only while they run)   -> speed
3. KV rings offloaded to pinned host memory, in sweep order (`order.py`) over groups of  -> speed
   16 blocks: each layer's ring window crosses once per step sweep of a group, not once
   per block forward (16 blocks of hidden state: 0.5 GiB at 704x384)
4. DiT weights offloaded to pinned host memory and streamed in sweep order over groups   -> speed
   of up to 64 blocks: each layer's weights cross once per denoising step, not once per
   block forward; the same pictures as block order, about half the DiT time of
   streaming in block order
5. fp8 linears (per-tensor scales), when the request asked for bf16                      -> quality (slight)
6. 3 denoising steps instead of 4                                                        -> quality
7. 3/4, then 1/2 of the area (sides multiples of 64, aspect kept as closely as possible) -> quality

Rungs the device cannot run (fp8 without an fp8 GPU, offload without CUDA) are left out of the list,
so the ladder never offers what would fail; asking for them directly fails loudly. Given an estimator,
rungs that would not lower the memory estimate are left out too (e.g. 3 steps once the KV rings live
on the host: the step count then changes host memory and time, not device memory).
"""

from __future__ import annotations

from collections.abc import Callable

from ..base import GenerationConfig, Rung

SIDE_MULTIPLE = 64  # FramePack's coarsest bucket packs 8x8 latents: sides are multiples of 64 px
AREA_STEPS = (("area-3/4", 0.75), ("area-1/2", 0.5))
# Rungs that change placement or order only (same pictures, slower), in ladder order: (name, needs
# offload support, config changes).
SPEED_RUNGS: tuple[tuple[str, bool, dict], ...] = (
    ("encoders-off-gpu", False, {"offload_encoders": True}),
    ("kv-cache-offload", True, {"offload_kv_cache": True, "order": "sweep", "sweep_blocks": 16}),
    ("weight-offload", True, {"offload_weights": True, "sweep_blocks": 64}),
)


def fit_area(height: int, width: int, area: float) -> tuple[int, int]:
    """Largest height x width, multiples of 64, with height·width <= area and aspect near height/width."""
    aspect = height / width
    best: tuple[int, int] | None = None
    for h in range(SIDE_MULTIPLE, height + 1, SIDE_MULTIPLE):
        w = max(SIDE_MULTIPLE, round(h / aspect / SIDE_MULTIPLE) * SIDE_MULTIPLE)
        if h * w > area:
            continue
        key = (h * w, -abs(h / w - aspect))
        if best is None or key > (best[0] * best[1], -abs(best[0] / best[1] - aspect)):
            best = (h, w)
    return best or (SIDE_MULTIPLE, SIDE_MULTIPLE)


def degrade_ladder(
    config: GenerationConfig,
    *,
    fp8_available: bool,
    offload_available: bool,
    estimate: Callable[[GenerationConfig], int] | None = None,
) -> list[Rung]:
    """Rungs from `config` down, each cheaper in memory than the one before."""
    rungs = [Rung("requested", config, "nothing")]

    def add(name: str, costs: str, **changes) -> None:
        current = rungs[-1].config
        changed = current.replace(**changes)
        if changed == current:
            return
        if estimate is not None and estimate(changed) >= estimate(current):
            return
        rungs.append(Rung(name, changed, costs))

    for name, needs_offload, changes in SPEED_RUNGS:
        if offload_available or not needs_offload:
            add(name, "speed", **changes)
    if fp8_available:
        add("fp8", "quality", fp8=True)
    if config.steps > 3:
        add("3-steps", "quality", steps=3)
    area = config.height * config.width
    for name, fraction in AREA_STEPS:
        h, w = fit_area(config.height, config.width, area * fraction)
        if h * w < rungs[-1].config.height * rungs[-1].config.width:
            add(name, "quality", height=h, width=w)
    return rungs


def first_fitting(rungs: list[Rung], estimate: Callable[[GenerationConfig], int], budget: int | None) -> Rung:
    """The first rung whose estimate fits `budget` (None: the first), else the last rung: the one a
    segment will run on, so the engine loads its weights placed for it."""
    for rung in rungs:
        if budget is None or estimate(rung.config) <= budget:
            return rung
    return rungs[-1]


__all__ = ["AREA_STEPS", "SIDE_MULTIPLE", "SPEED_RUNGS", "degrade_ladder", "first_fitting", "fit_area"]
