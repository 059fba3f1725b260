"""Picture QC fed from QC's single decode pass: identity, lip-sync proxy and motion, per segment.

What is decoded (cost, docs/qc.md): every keyframe (QC decodes those anyway) and, per segment, the
GOPs that hold its last `LIP_WINDOW_FRAMES` frames at least (the lip-sync window, which also gives
the frame before the next cut). Identity is sampled on every keyframe (one a second in the line's
videos) and on each segment's last frame (where drift has gone furthest). A sample is *measured* (a
descriptor) at the segment's first keyframe, when its upper face changed by over
`identity.CHIP_CHANGE` since the last measured one, and at least every `IDENTITY_EVERY_S`; else it is
*tracked* and takes that measurement's distance. Measurements are at most one per `MEASURE_GAP_S`
(a change inside the gap is measured when the gap ends). Descriptors are computed in one helper
process while decoding goes on here (dlib holds the GIL, so a thread would not overlap). The
landmarks for the mouth every `LANDMARK_EVERY` frames. Everything else works on luma, downscaled.
"""

from __future__ import annotations

import base64
import bisect
import io
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import av
import numpy as np
from PIL import Image

from ..errors import InputError
from ..qc import QCCheck
from ..timebase import FPS
from . import identity, lipsync, motion

LIP_WINDOW_FRAMES = 50  # at least this many frames: from the keyframe at or before end - 50 (2-3 s)
IDENTITY_EVERY_S = 30.0  # a tracked face is measured again after this long (docs/qc.md)
MEASURE_GAP_S = 5.0  # measurements (descriptors, face searches) at most this often per segment
LANDMARK_EVERY = 5  # frames; the mouth patch stays where the last landmarks put it in between
GOP_GUESS = FPS  # frames per GOP assumed when placing the window (the line's segments use 1 s)
THUMB_WIDTH = 96
MAX_CUT_PICTURES = 24  # cuts shown in the report: all up to this many, else the largest jumps
WORST_PICTURES = 6
STRETCH_S = 30.0  # per-stretch summaries of a video whose segments are unknown
_DETECT_EVERY = 5  # frames between face searches while a window has no face yet


def _in_speech(index: int, speech: tuple[list[float], list[float]], fps: int) -> bool:
    starts, ends = speech
    t = (index + 0.5) / fps
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and t < ends[i]


def _jpeg(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumb(frame: av.VideoFrame) -> np.ndarray:
    height = max(2, round(frame.height * THUMB_WIDTH / frame.width / 2) * 2)
    return frame.reformat(width=THUMB_WIDTH, height=height, format="rgb24").to_ndarray()


@dataclass
class _Segment:
    index: int
    start: int
    end: int  # exclusive
    # (index, distance or its Future, measured): tracked samples share their anchor's distance.
    identity: list[tuple[int, Any, bool]] = field(default_factory=list)
    anchor: tuple[int, np.ndarray, Any] | None = None  # the last measured face: index, chip, distance
    measured_at: int | None = None  # index of the last measurement (a face search counts)
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)  # measured samples and cut frames
    lip_start: int | None = None
    mouth: dict[int, float] = field(default_factory=dict)
    face_box: Any = None
    mouth_at: Any = None  # the latest landmarks in the lip window, and their frame index
    searched_at: int = -_DETECT_EVERY
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # index, mean, largest change
    first: np.ndarray | None = None
    last: np.ndarray | None = None

    @property
    def window_from(self) -> int:
        return max(self.start, self.end - LIP_WINDOW_FRAMES - GOP_GUESS + 1)


class PictureQC:
    """Collects what the decode pass shows (`wants_gop`, `feed`), then judges it (`finish`)."""

    def __init__(
        self,
        portrait: np.ndarray | None,
        segments: Sequence[tuple[int, int]] | int,
        speech: tuple[list[float], list[float]],
        *,
        fps: int = FPS,
        skip_reason: str | None = None,
        portrait_name: str = "the portrait",
    ):
        self.fps = fps
        self.speech = speech
        self.skip_reason = skip_reason
        self.reference = None
        if skip_reason is None:
            self.reference = identity.descriptor(portrait) if portrait is not None else None
            if self.reference is None:
                raise InputError(
                    portrait_name, "no face found by dlib's detector; QC compares the video with it"
                )
        # Without the lecture's segments (a video made elsewhere): stretches of STRETCH_S, no cuts.
        self.real_cuts = not isinstance(segments, int)
        if isinstance(segments, int):
            step = round(STRETCH_S * fps)
            segments = [(a, min(a + step, segments)) for a in range(0, segments, step)]
        self.segments = [_Segment(i, a, b) for i, (a, b) in enumerate(segments)]
        self._starts = [s.start for s in self.segments]
        self._prev: tuple[int, np.ndarray] | None = None
        self._prev_key: tuple[int, np.ndarray] | None = None
        self._key_freezes: list[tuple[int, int]] = []
        self._pool: ProcessPoolExecutor | None = None

    def _distance(self, rgb: np.ndarray, box: Any) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        where = None if box is None else (box.left(), box.top(), box.right(), box.bottom())
        return self._pool.submit(identity.distance_to, self.reference, rgb, where)

    def close(self) -> None:
        """Stop the helper process (finish does; call it when the decode pass fails)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _segment(self, index: int) -> _Segment | None:
        i = bisect.bisect_right(self._starts, index) - 1
        return self.segments[i] if i >= 0 and index < self.segments[i].end else None

    def wants_gop(self, key_index: int) -> bool:
        """Whether to decode every frame of the GOP starting at this keyframe."""
        seg = self._segment(key_index)
        return seg is not None and seg.window_from <= key_index

    def feed(self, index: int, frame: av.VideoFrame, gray: np.ndarray, key: bool) -> None:
        """One decoded frame, in presentation order; `gray` is its luma plane."""
        seg = self._segment(index)
        if seg is None:
            return
        thumb = motion.small(gray)
        if self._prev is not None and self._prev[0] == index - 1:
            seg.steps.append((index, *motion.step(self._prev[1], thumb)))
        self._prev = (index, thumb)
        if key:
            if self._prev_key is not None and index - self._prev_key[0] <= 2 * self.fps:
                if motion.largest_change(self._prev_key[1], thumb) <= motion.FROZEN_MAX_DIFF:
                    self._key_freezes.append((self._prev_key[0], index))
            self._prev_key = (index, thumb)
        if index == seg.start:
            seg.first = thumb
            seg.thumbs[index] = _thumb(frame)
        last = index == seg.end - 1
        if last:
            seg.last = thumb
            seg.thumbs[index] = _thumb(frame)
        if self.reference is None:
            return
        gray = np.ascontiguousarray(gray)
        if key or last:
            self._identity(seg, index, frame, gray)
        if index >= seg.window_from and (seg.lip_start is not None or key):
            self._mouth(seg, index, gray)

    def _identity(self, seg: _Segment, index: int, frame: av.VideoFrame, gray: np.ndarray) -> None:
        """One identity sample: tracked from the last measured face, or measured (see the module doc)."""
        chip = None
        if seg.face_box is not None:
            chip = identity.face_chip(gray, identity.landmarks(gray, seg.face_box))
        anchor = seg.anchor
        if (
            anchor is not None
            and chip is not None
            and index - anchor[0] < IDENTITY_EVERY_S * self.fps
            and identity.chip_change(chip, anchor[1]) <= identity.CHIP_CHANGE
        ):
            seg.identity.append((index, anchor[2], False))
            return
        if seg.measured_at is not None and index - seg.measured_at < MEASURE_GAP_S * self.fps:
            return  # changed too soon after the last measurement: measured when the gap ends
        seg.measured_at = index
        seg.thumbs.setdefault(index, _thumb(frame))
        seg.face_box = identity.find_face(gray)
        if seg.face_box is None:
            seg.anchor = None
            seg.identity.append((index, None, True))
            return
        distance = self._distance(frame.to_ndarray(format="rgb24"), seg.face_box)
        seg.anchor = (index, identity.face_chip(gray, identity.landmarks(gray, seg.face_box)), distance)
        seg.identity.append((index, distance, True))

    def _mouth(self, seg: _Segment, index: int, gray: np.ndarray) -> None:
        if seg.lip_start is None:
            seg.lip_start = index
        if seg.face_box is None and index - seg.searched_at >= _DETECT_EVERY:
            seg.searched_at = index
            seg.face_box = identity.find_face(gray)
        if seg.face_box is None:
            return
        if seg.mouth_at is None or index - seg.mouth_at[1] >= LANDMARK_EVERY:
            seg.mouth_at = (identity.landmarks(gray, seg.face_box), index)
        seg.mouth[index] = lipsync.mouth_opening(lipsync.mouth_patch(gray, seg.mouth_at[0]))

    def finish(self, video_path: str) -> tuple[list[QCCheck], dict[str, Any]]:
        """The four picture gates and the qc.json `picture` section (with report images)."""
        try:
            for seg in self.segments:
                seg.identity = [
                    (i, d.result() if isinstance(d, Future) else d, measured)
                    for i, d, measured in seg.identity
                ]
        finally:
            self.close()
        seg_data = [self._segment_data(seg) for seg in self.segments]
        lecture_lip = self._lip_lecture(video_path, seg_data) if self.reference is not None else None
        frozen = self._frozen()
        cuts = self._cuts()
        data: dict[str, Any] = {
            "face_expected": self.skip_reason is None,
            "skipped": self.skip_reason,
            "thresholds": {
                "identity_distance": identity.THRESHOLD,
                "lip_sync_max_abs_lag": lipsync.MAX_ABS_LAG,
                "lip_sync_min_correlation": lipsync.MIN_CORRELATION,
                "frozen_max_diff": motion.FROZEN_MAX_DIFF,
                "frozen_min_frames": motion.FROZEN_MIN_FRAMES,
                "jump_ratio": motion.JUMP_RATIO,
            },
            "lip_sync": lecture_lip,
            "segments": seg_data,
            "frozen": frozen,
            "cuts": cuts,
        }
        data["images"] = self._images(seg_data, cuts)
        return self._checks(data), data

    def _segment_data(self, seg: _Segment) -> dict[str, Any]:
        fps = self.fps
        found = [(i, d) for i, d, _ in seg.identity if d is not None]
        ident: dict[str, Any] = {
            "samples": [  # [time s, distance (None: no face), measured (else tracked)]
                [round(i / fps, 2), None if d is None else round(d, 3), measured]
                for i, d, measured in seg.identity
            ],
            "measured": sum(measured for _, _, measured in seg.identity),
            "faces_missing": len(seg.identity) - len(found),
        }
        if found:
            worst = max(found, key=lambda s: s[1])
            ident |= {
                "median": round(float(np.median([d for _, d in found])), 3),
                "worst": round(worst[1], 3),
                "worst_at_s": round(worst[0] / fps, 2),
            }
        ident["passed"] = self._identity_passed(ident) if self.reference is not None else None
        return {
            "index": seg.index,
            "start_s": round(seg.start / fps, 3),
            "end_s": round(seg.end / fps, 3),
            "identity": ident,
            "lip_sync": None,
        }

    @staticmethod
    def _identity_passed(ident: dict[str, Any]) -> bool:
        samples = len(ident["samples"])
        if not samples or ident["faces_missing"] * 2 > samples:
            return False
        return ident.get("worst", 0.0) <= identity.THRESHOLD

    def _lip_lecture(self, video_path: str, seg_data: list[dict[str, Any]]) -> dict[str, Any] | None:
        pooled_mouth: list[np.ndarray] = []
        pooled_env: list[np.ndarray] = []
        gap = np.full(lipsync.MAX_LAG, np.nan, np.float32)
        for seg, out in zip(self.segments, seg_data, strict=True):
            if seg.lip_start is None:
                continue
            n = seg.end - seg.lip_start
            mouth = np.array([seg.mouth.get(seg.lip_start + k, np.nan) for k in range(n)], np.float32)
            env = lipsync.envelope_db(lipsync.audio_track(video_path, seg.lip_start, n), n)
            speech = sum(_in_speech(seg.lip_start + k, self.speech, self.fps) for k in range(n))
            corrs = lipsync.correlations(mouth, env)
            lag, corr = lipsync.best(corrs)
            judged = speech >= lipsync.MIN_SPEECH_FRAMES and np.isfinite(mouth).sum() * 2 > n
            out["lip_sync"] = {
                "window_s": [round(seg.lip_start / self.fps, 2), round(seg.end / self.fps, 2)],
                "speech_frames": speech,
                "mouth_frames": int(np.isfinite(mouth).sum()),
                "lag_frames": lag,
                "correlation": None if corr is None else round(corr, 3),
                "passed": lipsync.segment_passed(corrs) if judged else None,
            }
            if judged:
                pooled_mouth += [_z(mouth), gap]
                pooled_env += [_z(env), gap]
        if not pooled_mouth:
            return None
        lag, corr = lipsync.best(
            lipsync.correlations(np.concatenate(pooled_mouth), np.concatenate(pooled_env))
        )
        return {
            "lag_frames": lag,
            "correlation": None if corr is None else round(corr, 3),
            "passed": _lip_passed(lag, corr),
        }

    def _frozen(self) -> list[dict[str, Any]]:
        runs = [r for seg in self.segments for r in motion.frozen_runs([(i, m) for i, _, m in seg.steps])]
        runs = [
            r
            for r in runs
            if sum(_in_speech(i, self.speech, self.fps) for i in range(r[0], r[1] + 1))
            >= motion.FROZEN_MIN_FRAMES
        ]
        runs += [
            r
            for r in self._key_freezes
            if all(_in_speech(i, self.speech, self.fps) for i in range(r[0], r[1] + 1))
        ]
        merged: list[list[int]] = []
        for a, b in sorted(runs):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out = []
        for a, b in merged:
            seg = self._segment(a)
            out.append({"start_s": round(a / self.fps, 2), "end_s": round((b + 1) / self.fps, 2),
                        "segment": None if seg is None else seg.index})  # fmt: skip
        return out

    def _cuts(self) -> list[dict[str, Any]]:
        cuts = []
        for before, after in pairwise(self.segments) if self.real_cuts else ():
            cut: dict[str, Any] = {"after_segment": before.index, "at_s": round(after.start / self.fps, 3)}
            if before.last is not None and after.first is not None:
                across = motion.difference(before.last, after.first)
                steps = [d for _, d, _ in before.steps]
                cut |= {
                    "difference": round(across, 2),
                    "median_step": round(float(np.median(steps)), 2) if steps else None,
                    "ratio": round(motion.jump_ratio(across, steps), 2),
                }
            cuts.append(cut)
        return cuts

    def _images(self, seg_data: list[dict[str, Any]], cuts: list[dict[str, Any]]) -> dict[str, Any]:
        """Small JPEGs for the report: both sides of the cuts shown, and the worst identity samples."""
        by_index = {i: img for seg in self.segments for i, img in seg.thumbs.items()}
        shown = sorted(cuts, key=lambda c: -(c.get("ratio") or 0))[:MAX_CUT_PICTURES]
        cut_images = []
        for cut in sorted(shown, key=lambda c: c["at_s"]):
            seg_after = self.segments[cut["after_segment"] + 1]
            before, after = by_index.get(seg_after.start - 1), by_index.get(seg_after.start)
            if before is not None and after is not None:
                cut_images.append({"at_s": cut["at_s"], "before": _jpeg(before), "after": _jpeg(after)})
        samples = [(d, i, seg.index) for seg in self.segments for i, d, measured in seg.identity if measured]
        worst = sorted(samples, key=lambda s: -(s[0] if s[0] is not None else np.inf))[:WORST_PICTURES]
        worst_images = [
            {"at_s": round(i / self.fps, 2), "segment": k, "distance": None if d is None else round(d, 3),
             "image": _jpeg(by_index[i])}
            for d, i, k in worst
        ]  # fmt: skip
        return {"cuts": cut_images, "worst": worst_images}

    def _checks(self, data: dict[str, Any]) -> list[QCCheck]:
        segs = data["segments"]
        if self.reference is None:
            skipped = f"skipped: {self.skip_reason}"
            checks = [
                QCCheck("identity", True, None, identity.THRESHOLD, skipped),
                QCCheck("lip_sync", True, None, lipsync.MAX_ABS_LAG, skipped),
            ]
        else:
            checks = [_identity_check(segs), _lip_check(data["lip_sync"], segs)]
        frozen, cuts = data["frozen"], data["cuts"]
        jumps = [c for c in cuts if c.get("ratio", 0) > motion.JUMP_RATIO]
        frozen_detail = f"{len(frozen)} frozen stretches during speech" + (
            " (" + ", ".join(f"{f['start_s']:.2f}-{f['end_s']:.2f} s in segment {f['segment']}" for f in frozen[:5]) + ")"
            if frozen else ""
        )  # fmt: skip
        jump_detail = f"{len(jumps)} of {len(cuts)} cuts jump (difference over {motion.JUMP_RATIO:g}x the median step)" + (
            " (" + ", ".join(f"{c['at_s']:.2f} s: {c['ratio']:.1f}x" for c in jumps[:5]) + ")" if jumps else ""
        )  # fmt: skip
        skip = self.skip_reason
        checks += [
            QCCheck("no_frozen_speech", skip is not None or not frozen, len(frozen), 0,
                    f"skipped: {skip}; measured {frozen_detail}" if skip else frozen_detail),
            QCCheck("no_jump_at_cuts", skip is not None or not jumps, len(jumps), 0,
                    f"skipped: {skip}; measured {jump_detail}" if skip else jump_detail),
        ]  # fmt: skip
        return checks


def _z(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    if ok.sum() < 2 or np.std(x[ok]) == 0:
        return np.full_like(x, np.nan)
    return (x - np.mean(x[ok])) / np.std(x[ok])


def _lip_passed(lag: int | None, corr: float | None) -> bool:
    return lag is not None and abs(lag) <= lipsync.MAX_ABS_LAG and corr >= lipsync.MIN_CORRELATION


def _identity_check(segs: list[dict[str, Any]]) -> QCCheck:
    failed = [s for s in segs if not s["identity"]["passed"]]
    worst = max((s["identity"]["worst"] for s in segs if "worst" in s["identity"]), default=None)
    parts = []
    for s in failed[:5]:
        ident = s["identity"]
        if "worst" in ident and ident["worst"] > identity.THRESHOLD:
            parts.append(
                f"segment {s['index']}: distance {ident['worst']:.2f} at {ident['worst_at_s']:.1f} s"
            )
        else:
            parts.append(
                f"segment {s['index']}: no face in {ident['faces_missing']} of {len(ident['samples'])} samples"
            )
    samples = sum(len(s["identity"]["samples"]) for s in segs)
    worst_text = "no face found" if worst is None else f"worst distance {worst}"
    detail = f"{len(failed)} of {len(segs)} segments are not the portrait's person ({samples} samples, {worst_text})"
    if parts:
        detail += ": " + "; ".join(parts)
    return QCCheck("identity", not failed and bool(segs), worst, identity.THRESHOLD, detail)


def _lip_check(lecture: dict[str, Any] | None, segs: list[dict[str, Any]]) -> QCCheck:
    limit = lipsync.MAX_ABS_LAG  # frames; the correlation floor is in the detail and in picture.thresholds
    if lecture is None:
        return QCCheck(
            "lip_sync", False, None, limit, "no segment had enough speech and a face to measure (proxy)"
        )
    judged = [s for s in segs if s["lip_sync"] and s["lip_sync"]["passed"] is not None]
    failed = [s for s in judged if not s["lip_sync"]["passed"]]
    detail = (
        f"proxy: lecture lag {lecture['lag_frames']} frames, correlation {lecture['correlation']} "
        f"(floor {lipsync.MIN_CORRELATION}); "
        f"{len(failed)} of {len(judged)} measured segments out of sync"
    )
    if failed:
        detail += ": " + "; ".join(
            f"segment {s['index']}: lag {s['lip_sync']['lag_frames']}, correlation {s['lip_sync']['correlation']}"
            for s in failed[:5]
        )
    # Both gate: the lecture's pooled proxy, and every judged segment (a mouth that stops following the
    # voice in one segment of an hour must not pass on the other segments' strength).
    return QCCheck("lip_sync", lecture["passed"] and not failed, lecture["lag_frames"], limit, detail)
