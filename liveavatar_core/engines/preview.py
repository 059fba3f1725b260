"""The preview engine: a CPU draft renderer, not LiveAvatar.

It animates the cropped portrait so a team can check timing, cuts and outputs in minutes: the jaw
opens with the audio's loudness and the head sways slightly. No weights, no GPU. Motion continues
across segment cuts through a tiny JSON handoff state.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np

from ..timebase import FPS, SAMPLES_PER_FRAME
from .base import Engine, FrameSink, GenerationConfig, Rung, SegmentRequest, SegmentResult

CHUNK_FRAMES = 25  # frames rendered per sink.write: one second, the engine's whole frame buffer
_MAX_SWAY_DEG = 1.2
_MAX_SHIFT_PX = 3.0


VERSION = "1"


def token_counter(checkpoint_dir: str | None) -> None:
    """The preview renderer reads no prompt, so it has no tokenizer."""
    return None


class PreviewEngine(Engine):
    name = "preview"
    version = VERSION

    def default_config(self) -> GenerationConfig:
        return GenerationConfig()

    def estimate_memory(self, config: GenerationConfig, num_frames: int | None = None) -> int:
        """Bytes of the buffers `_generate` holds at its peak (host memory; the preview has no GPU),
        whatever the segment's length."""
        pixels = config.height * config.width
        frame_chunk = CHUNK_FRAMES * pixels * 3  # uint8 [25, H, W, 3] output chunk
        frames = 3 * pixels * 3  # the resized portrait, the jaw-opened frame and its mouth layer, uint8
        # Jaw region (at most 0.9 W x 0.65 H of a face filling the frame): x/y maps, weights and
        # the per-frame y map, float32, plus the remapped uint8 region.
        jaw = int(0.9 * 0.65 * pixels) * (4 * 4 + 3)
        return frame_chunk + frames + jaw

    def ladder(self, config: GenerationConfig) -> list[Rung]:
        """The requested area, then 3/4 and 1/2 of each side (the sink scales back to output size)."""
        rungs = [Rung("requested", config, "nothing")]
        for name, scale in (("area-3/4", 0.75), ("area-1/2", 0.5)):
            smaller = config.replace(
                height=_round16(config.height * scale), width=_round16(config.width * scale)
            )
            rungs.append(Rung(name, smaller, "quality"))
        return rungs

    def _generate(self, request: SegmentRequest, sink: FrameSink) -> SegmentResult:
        cfg = request.config
        state = _State.from_bytes(request.handoff, request.seed)
        portrait, face = _fit_portrait(request.portrait, request.face_box, cfg.height, cfg.width)
        openness = _mouth_openness(request.audio, request.num_frames, state.last_open)
        rig, sway = _JawRig(portrait, face), _Sway(state.motion_seed, face)
        chunk = np.empty((CHUNK_FRAMES, cfg.height, cfg.width, 3), np.uint8)
        for first in range(0, request.num_frames, CHUNK_FRAMES):
            count = min(CHUNK_FRAMES, request.num_frames - first)
            for i in range(count):
                t = (state.frame + first + i) / FPS
                sway.apply(rig.render(openness[first + i]), t, out=chunk[i])
            sink.write(chunk[:count])
        state.frame += request.num_frames
        state.last_open = float(openness[-1]) if len(openness) else state.last_open
        return SegmentResult(
            frames_written=request.num_frames,
            handoff=state.to_bytes(),
            seconds=0.0,
            peak_memory_bytes=self.estimate_memory(cfg),
            details={"mean_mouth_open": round(float(openness.mean()), 4) if len(openness) else 0.0},
        )


class _State:
    """Handoff: where the head sway is in its cycle and how open the mouth was at the cut."""

    def __init__(self, frame: int, last_open: float, motion_seed: int):
        self.frame, self.last_open, self.motion_seed = frame, last_open, motion_seed

    @classmethod
    def from_bytes(cls, data: bytes | None, seed: int) -> _State:
        if not data:
            return cls(0, 0.0, seed)
        d = json.loads(data)
        return cls(int(d["frame"]), float(d["last_open"]), int(d["motion_seed"]))

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"frame": self.frame, "last_open": self.last_open, "motion_seed": self.motion_seed}
        ).encode()


def _round16(x: float) -> int:
    return max(64, int(round(x / 16)) * 16)


def _fit_portrait(portrait: np.ndarray, face_box, height: int, width: int):
    """Portrait resized to the rung's area, and the face box in those pixels (a centred guess if unknown)."""
    h0, w0 = portrait.shape[:2]
    img = (
        portrait
        if (h0, w0) == (height, width)
        else cv2.resize(portrait, (width, height), interpolation=cv2.INTER_AREA)
    )
    if face_box is None:
        face_box = (w0 * 0.3, h0 * 0.2, w0 * 0.4, h0 * 0.3)
    sx, sy = width / w0, height / h0
    x, y, w, h = face_box
    return img, (x * sx, y * sy, w * sx, h * sy)


def _mouth_openness(audio: np.ndarray, num_frames: int, start_open: float) -> np.ndarray:
    """Per-frame mouth opening in [0, 1] from the RMS level of each 40 ms frame, lightly smoothed."""
    padded = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float32)
    padded[: len(audio)] = audio
    rms = np.sqrt(np.mean(padded.reshape(num_frames, SAMPLES_PER_FRAME) ** 2, axis=1) + 1e-12)
    level_db = 20 * np.log10(rms)
    # Speech normalised to -16 LUFS has frame levels of about -35 to -12 dBFS.
    target = np.clip((level_db + 38.0) / 26.0, 0.0, 1.0)  # -38 dBFS closed, -12 dBFS fully open
    out = np.empty(num_frames, np.float32)
    prev = start_open
    for i, v in enumerate(target):  # fast attack, slower release: looks like speech, not flicker
        prev = prev + (0.7 if v > prev else 0.35) * (v - prev)
        out[i] = prev
    return out


class _JawRig:
    """Opens the jaw by pulling the pixels below the mouth line down, with a dark mouth interior.

    Only a region around the mouth and chin is remapped, so per-frame cost and memory stay small.
    """

    def __init__(self, portrait: np.ndarray, face: tuple[float, float, float, float]):
        self.image = portrait
        h, w = portrait.shape[:2]
        fx, fy, fw, fh = face
        self.mouth_x, self.mouth_y = fx + fw / 2, fy + fh * 0.80
        self.half_w = fw * 0.16
        self.max_drop = max(2.0, fh * 0.10)
        # Region of interest: mouth line to below the chin, the face's middle 90% in width.
        self.x0, self.x1 = _clamp(self.mouth_x - fw * 0.45, w), _clamp(self.mouth_x + fw * 0.45, w)
        self.y0, self.y1 = _clamp(self.mouth_y - 2, h), _clamp(self.mouth_y + fh * 0.55 + self.max_drop, h)
        xs = np.arange(self.x0, self.x1, dtype=np.float32)[None, :]  # [1, rw]
        ys = np.arange(self.y0, self.y1, dtype=np.float32)[:, None]  # [rh, 1]
        across = np.clip(1 - ((xs - self.mouth_x) / (fw * 0.45)) ** 2, 0, 1)
        below = ys - self.mouth_y
        down = np.where(below > 0, np.clip(1 - below / (fh * 0.55), 0, 1), 0)
        # Pixel maps relative to the ROI: x is fixed, y is pulled up by drop * weight.
        self.map_x = np.broadcast_to(xs - self.x0, (len(ys), xs.shape[1])).astype(np.float32)
        self.map_y = np.broadcast_to(ys - self.y0, self.map_x.shape).astype(np.float32)
        self.weight = (across * np.clip(below / 3.0, 0, 1) * down).astype(np.float32)  # [rh, rw]

    def render(self, openness: float) -> np.ndarray:
        """The portrait with the jaw opened by `openness` (a new array; the portrait is untouched)."""
        frame = self.image.copy()
        drop = openness * self.max_drop
        if drop < 0.5 or self.x1 <= self.x0 or self.y1 <= self.y0:
            return frame
        roi = self.image[self.y0 : self.y1, self.x0 : self.x1]
        frame[self.y0 : self.y1, self.x0 : self.x1] = cv2.remap(
            roi,
            self.map_x,
            self.map_y - drop * self.weight,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        axes = (max(1, int(self.half_w * (0.8 + 0.2 * openness))), max(1, int(drop * 0.6)))
        centre = (int(self.mouth_x), int(self.mouth_y + drop * 0.5))
        interior = frame.copy()
        cv2.ellipse(interior, centre, axes, 0, 0, 360, (70, 25, 30), -1, cv2.LINE_AA)
        return cv2.addWeighted(interior, 0.8, frame, 0.2, 0, dst=frame)


def _clamp(v: float, limit: int) -> int:
    return int(min(max(v, 0), limit))


class _Sway:
    """A slow, seeded head sway (rotation about the chin plus a small drift), continuous in time."""

    def __init__(self, motion_seed: int, face: tuple[float, float, float, float]):
        rng = np.random.default_rng(motion_seed)
        self.freqs = rng.uniform((0.08, 0.11, 0.05), (0.16, 0.23, 0.12))
        self.phases = rng.uniform(0, 2 * math.pi, 3)
        fx, fy, fw, fh = face
        self.pivot = (fx + fw / 2, fy + fh * 1.1)

    def apply(self, frame: np.ndarray, t: float, out: np.ndarray) -> None:
        s = np.sin(2 * math.pi * self.freqs * t + self.phases)
        m = cv2.getRotationMatrix2D(self.pivot, _MAX_SWAY_DEG * s[0], 1.0)
        m[:, 2] += (_MAX_SHIFT_PX * s[1], 0.6 * _MAX_SHIFT_PX * s[2])
        h, w = frame.shape[:2]
        cv2.warpAffine(frame, m, (w, h), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
