"""A lip-sync proxy: how well the mouth's opening follows the loudness of the voice, and at what lag.

No lip-sync model ships with weights in a package, so this is a proxy, not SyncNet: per video frame,
the mouth's opening (dark pixels between the lips, in a patch placed from the 5 landmarks) against the
speech envelope (RMS level in dB of the frame's 40 ms of audio); the lag within ±`MAX_LAG` frames with
the best Pearson correlation, and that correlation.
"""

from __future__ import annotations

import av
import dlib
import numpy as np

from ..timebase import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME
from . import identity

MAX_LAG = 10  # frames searched either way
MAX_ABS_LAG = 1  # gate: the best lag must be within this many frames of 0
MIN_CORRELATION = 0.4  # gate: the best correlation must reach this (calibration: docs/qc.md)
MIN_SPEECH_FRAMES = 25  # a window with less speech than this is not judged
# A segment's window is 2-3 s: speech's own rhythm can give a far lag nearly the same correlation as the
# true one. Such a window fails only when a lag outside ±MAX_ABS_LAG beats the best within it by this.
SEGMENT_LAG_MARGIN = 0.1
_PATCH = 32  # the mouth patch is _PATCH x _PATCH pixels
_FLOOR_DB = 40.0  # the envelope is floored this far under the window's loudest frame


def mouth_patch(gray: np.ndarray, shape: dlib.full_object_detection) -> np.ndarray:
    """The mouth region as a square patch: aligned with the eye line, from the nose base down to the
    chin, 0.9 eye distances wide."""
    p, x, y, eyes = identity.eye_frame(shape)
    origin = p[4] + y * (0.1 * eyes) - x * (0.45 * eyes)
    return identity.patch(gray, origin, x, y, 0.9 * eyes / _PATCH, (_PATCH, _PATCH))


def mouth_opening(patch: np.ndarray) -> float:
    """How much of the patch is much darker than the face around it: the open mouth's interior."""
    values = patch.astype(np.float32)
    skin = float(np.percentile(values, 75)) or 1.0
    return float(np.mean(np.clip(0.7 * skin - values, 0, None)) / skin)


def envelope_db(samples: np.ndarray, frames: int) -> np.ndarray:
    """Per-video-frame level in dB of 16 kHz mono samples (frame i: samples [640 i, 640 (i + 1)))."""
    padded = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    n = min(len(samples), len(padded))
    padded[:n] = samples[:n]
    rms = np.sqrt(np.mean(padded.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms)
    return np.maximum(db, db.max() - _FLOOR_DB)


def audio_track(path: str, start_frame: int, frames: int) -> np.ndarray:
    """The video file's own first audio track from frame `start_frame` on, as 16 kHz mono float32.

    The muxed track is what viewers hear, so an offset introduced when muxing is measured too.
    """
    t0 = start_frame / FPS
    t1 = t0 + frames / FPS
    out: list[np.ndarray] = []
    first = None
    with av.open(path) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
        container.seek(max(0, int((t0 - 0.5) / stream.time_base)), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            start = float(frame.pts * stream.time_base)
            if start > t1:
                break
            for chunk in resampler.resample(frame):
                if first is None:
                    first = float(chunk.pts * chunk.time_base) if chunk.pts is not None else start
                out.append(chunk.to_ndarray()[0])
    if first is None:
        return np.zeros(0, np.float32)
    samples = np.concatenate(out)
    skip = round((t0 - first) * AUDIO_SAMPLE_RATE)
    if skip < 0:
        samples = np.concatenate([np.zeros(-skip, np.float32), samples])
        skip = 0
    return samples[skip : skip + frames * SAMPLES_PER_FRAME]


def correlations(mouth: np.ndarray, envelope: np.ndarray, max_lag: int = MAX_LAG) -> dict[int, float]:
    """Pearson correlation of mouth[t] with envelope[t + lag] for every lag in ±max_lag.

    A positive lag means the sound comes `lag` frames after the mouth moves. Frames where the mouth
    was not measured (NaN) are left out.
    """
    out = {}
    for lag in range(-max_lag, max_lag + 1):
        m = mouth[max(0, -lag) : len(mouth) - max(0, lag)]
        e = envelope[max(0, lag) : len(envelope) - max(0, -lag)]
        ok = np.isfinite(m) & np.isfinite(e)
        if ok.sum() < 10 or np.ptp(m[ok]) < 1e-6 or np.ptp(e[ok]) < 1e-6:  # a flat series: no correlation
            continue
        out[lag] = float(np.corrcoef(m[ok], e[ok])[0, 1])
    return out


def segment_passed(corrs: dict[int, float]) -> bool:
    """A short window's verdict: the best correlation within ±MAX_ABS_LAG reaches the floor, and no lag
    outside it is better by more than SEGMENT_LAG_MARGIN."""
    near = [c for lag, c in corrs.items() if abs(lag) <= MAX_ABS_LAG]
    if not near:
        return False
    return max(near) >= MIN_CORRELATION and max(corrs.values()) - max(near) <= SEGMENT_LAG_MARGIN


def best(corrs: dict[int, float]) -> tuple[int | None, float | None]:
    """The lag with the highest correlation (the smaller |lag| on a tie) and that correlation."""
    if not corrs:
        return None, None
    lag = max(corrs, key=lambda k: (corrs[k], -abs(k)))
    return lag, corrs[lag]
