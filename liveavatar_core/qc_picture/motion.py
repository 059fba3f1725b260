"""Motion sanity: frozen picture while someone speaks, and abrupt jumps where segments meet.

Frames are compared as small luma thumbnails (`SMALL_WIDTH` pixels wide, area-averaged), in 8-bit
levels: by the mean absolute difference (how much the picture changed: jumps) and by the largest
(whether anything moved at all: a talking face changes only a few thumbnail pixels, a frozen picture
none; docs/qc.md has the measurements behind `FROZEN_MAX_DIFF`).
"""

from __future__ import annotations

import cv2
import numpy as np

SMALL_WIDTH = 64
FROZEN_MAX_DIFF = 1.5  # levels: frames where no thumbnail pixel moved more are the same picture
FROZEN_MIN_FRAMES = 13  # a run of identical frames this long (0.5 s) during speech is frozen
JUMP_RATIO = 4.0  # a cut whose difference is this many times the segment's median step is a jump
_MIN_STEP = 0.5  # levels: the median step is at least this (a still segment would make any cut a jump)


def small(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape[:2]
    height = max(1, round(h * SMALL_WIDTH / w))
    return cv2.resize(gray, (SMALL_WIDTH, height), interpolation=cv2.INTER_AREA).astype(np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def largest_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def step(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """`difference` and `largest_change` of one frame-to-frame step, from one subtraction."""
    change = np.abs(a - b)
    return float(np.mean(change)), float(np.max(change))


def frozen_runs(steps: list[tuple[int, float]], min_frames: int = FROZEN_MIN_FRAMES) -> list[tuple[int, int]]:
    """(first, last) frame index of every run of at least `min_frames` identical frames.

    `steps` holds (index, largest change from frame index - 1), ascending, for frames whose
    predecessor was decoded too.
    """
    runs: list[tuple[int, int]] = []
    run: list[int] | None = None
    for index, diff in steps:
        if diff <= FROZEN_MAX_DIFF and run is not None and run[1] == index - 1:
            run[1] = index
            continue
        if run is not None and run[1] - run[0] + 1 >= min_frames:
            runs.append((run[0], run[1]))
        run = [index - 1, index] if diff <= FROZEN_MAX_DIFF else None
    if run is not None and run[1] - run[0] + 1 >= min_frames:
        runs.append((run[0], run[1]))
    return runs


def jump_ratio(across: float, steps: list[float]) -> float:
    """The difference across a cut against the median frame-to-frame step before it."""
    step = max(float(np.median(steps)) if steps else 0.0, _MIN_STEP)
    return across / step
