"""Motion sanity: frozen picture while someone speaks, and abrupt jumps where segments meet.

Frames are compared as small luma thumbnails (`SMALL_WIDTH` pixels wide, area-averaged), by the mean
absolute difference in 8-bit levels.
"""

from __future__ import annotations

import cv2
import numpy as np

SMALL_WIDTH = 64
FROZEN_DIFF = 0.2  # levels: frames closer than this are the same picture (docs/qc.md)
FROZEN_MIN_FRAMES = 13  # a run of identical frames this long (0.5 s) during speech is frozen
JUMP_RATIO = 4.0  # a cut whose difference is this many times the segment's median step is a jump
_MIN_STEP = 0.5  # levels: the median step is at least this (a still segment would make any cut a jump)


def small(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape[:2]
    height = max(1, round(h * SMALL_WIDTH / w))
    return cv2.resize(gray, (SMALL_WIDTH, height), interpolation=cv2.INTER_AREA).astype(np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def frozen_runs(steps: list[tuple[int, float]], min_frames: int = FROZEN_MIN_FRAMES) -> list[tuple[int, int]]:
    """(first, last) frame index of every run of at least `min_frames` identical frames.

    `steps` holds (index, difference from frame index - 1), ascending, for frames whose predecessor
    was decoded too.
    """
    runs: list[tuple[int, int]] = []
    run: list[int] | None = None
    for index, diff in steps:
        if diff < FROZEN_DIFF and run is not None and run[1] == index - 1:
            run[1] = index
            continue
        if run is not None and run[1] - run[0] + 1 >= min_frames:
            runs.append((run[0], run[1]))
        run = [index - 1, index] if diff < FROZEN_DIFF else None
    if run is not None and run[1] - run[0] + 1 >= min_frames:
        runs.append((run[0], run[1]))
    return runs


def jump_ratio(across: float, steps: list[float]) -> float:
    """The difference across a cut against the median frame-to-frame step before it."""
    step = max(float(np.median(steps)) if steps else 0.0, _MIN_STEP)
    return across / step
