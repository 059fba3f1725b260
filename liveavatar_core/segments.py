"""Segment planning: cut a lecture into GPU work units, in pauses, near a target length.

Rules: segments tile [0, total_samples) exactly (nothing dropped or added); every cut is on a video
frame boundary (640 samples at 16 kHz, 25 fps), so only the last segment may end on a partial frame;
no segment is longer than `max_s`; cuts fall in pauses, as near the middle of the pause as frames
allow, and a cut lands inside speech ("hard") only where speech runs on longer than `max_s` with no
pause to cut in.

The plan is chosen by dynamic programming over candidate cut points (the middle and edges of every
pause, points every half second inside long pauses, and evenly spaced hard cuts only where some
stretch between candidates is longer than allowed). A plan's cost adds, per segment, how far its
length is from the target (relative), a penalty for very short segments, a large penalty per hard
cut, a penalty for cutting near a pause's edge rather than its middle, a penalty for a pause under
0.25 s inside a sentence (a comma, a breath), and subtracts a bonus for longer pauses (up to 1 s). The cheapest plan is exact, not greedy, so an early choice never forces
a needless hard cut later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from .errors import InputError
from .timebase import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME, frames_for_samples

TARGET_FLAG = "--segment-seconds"
MAX_FLAG = "--max-segment-seconds"
MIN_TARGET_S = 1.0

# Plan costs (dimensionless; a segment's deviation from the target costs |length - target| / target).
HARD_CUT_COST = 100.0  # a cut inside speech: only when nothing else fits under max_s
SHORT_COST = 2.0  # a segment under half the target (a quarter for the last one)
OFF_CENTRE_COST = 0.5  # a cut at a pause's very edge; falls to 0 at 0.5 s from speech or mid-pause
PAUSE_BONUS = 0.3  # a cut in a pause of 1 s or more (scaled down for shorter pauses)
PAUSE_BONUS_CAP_S = 1.0
CLEAR_OF_SPEECH_S = 0.5  # past this distance from speech, a cut is as good as mid-pause
LONG_PAUSE_GRID_S = 0.5  # spacing of extra candidates inside long pauses
# A pause shorter than this between two stretches of speech is a comma or a breath inside a sentence:
# cutting there costs more than any length deviation a sentence pause would need, less than a hard cut.
BRIEF_PAUSE_S = 0.25
BRIEF_PAUSE_COST = 3.0

Cut = Literal["pause", "hard", "end"]


class SpeechLike(Protocol):
    """Anything with start_s/end_s in seconds (vad.SpeechSpan, the flow's stored records)."""

    @property
    def start_s(self) -> float: ...

    @property
    def end_s(self) -> float: ...


@dataclass(frozen=True)
class Segment:
    """Samples [start_sample, end_sample) of the lecture. `cut` says how the segment ends."""

    index: int
    start_sample: int
    end_sample: int
    cut: Cut

    @property
    def num_samples(self) -> int:
        return self.end_sample - self.start_sample

    @property
    def start_s(self) -> float:
        return self.start_sample / AUDIO_SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end_sample / AUDIO_SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.num_samples / AUDIO_SAMPLE_RATE

    @property
    def start_frame(self) -> int:
        """Index of this segment's first video frame in the lecture (starts are frame-aligned)."""
        return self.start_sample // SAMPLES_PER_FRAME

    @property
    def num_frames(self) -> int:
        """Video frames covering the segment (a last partial frame counts)."""
        return frames_for_samples(self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    pos: int  # sample position, a multiple of SAMPLES_PER_FRAME
    bonus: float  # subtracted from the plan's cost when the plan cuts here
    kind: Cut


def validate_lengths(target_s: float, max_s: float) -> None:
    """Raise InputError naming the CLI flag when the target or maximum segment length is unusable."""
    if not (isinstance(target_s, int | float) and math.isfinite(target_s)) or target_s < MIN_TARGET_S:
        raise InputError(
            TARGET_FLAG, f"must be a number of seconds of at least {MIN_TARGET_S:g}, not {target_s!r}"
        )
    if not (isinstance(max_s, int | float) and math.isfinite(max_s)):
        raise InputError(MAX_FLAG, f"must be a number of seconds, not {max_s!r}")
    if max_s < target_s:
        raise InputError(
            MAX_FLAG, f"is {max_s:g} s, shorter than {TARGET_FLAG} ({target_s:g} s); it must be at least that"
        )


def plan_segments(
    total_samples: int, speech: Sequence[SpeechLike], *, target_s: float, max_s: float
) -> list[Segment]:
    """Cut [0, total_samples) into segments near `target_s`, none over `max_s`, in pauses of `speech`.

    `speech` holds spans in seconds (any order; overlaps are merged). Segments are returned in
    order with index 0, 1, ...; every segment but the last starts and ends on a frame boundary.
    """
    validate_lengths(target_s, max_s)
    if total_samples <= 0:
        raise ValueError(f"total_samples must be positive, not {total_samples}")
    max_len = math.floor(max_s * FPS) * SAMPLES_PER_FRAME  # longest segment, whole frames
    if total_samples <= max_len:
        return [Segment(0, 0, total_samples, "end")]
    spans = _speech_samples(speech, total_samples)
    candidates = _pause_candidates(spans, total_samples)
    nodes = _with_hard_cuts(candidates, total_samples, max_len)
    path = _cheapest_path(nodes, total_samples, max_len, target_s * AUDIO_SAMPLE_RATE)
    bounds = [0, *(nodes[i].pos for i in path), total_samples]
    kinds = [nodes[i].kind for i in path] + ["end"]
    return [Segment(i, bounds[i], bounds[i + 1], kinds[i]) for i in range(len(kinds))]


def _speech_samples(speech: Sequence[SpeechLike], total: int) -> list[tuple[int, int]]:
    """Spans in samples, clipped to [0, total), sorted, overlapping or touching ones merged."""
    raw = sorted(
        (max(0, round(s.start_s * AUDIO_SAMPLE_RATE)), min(total, round(s.end_s * AUDIO_SAMPLE_RATE)))
        for s in speech
    )
    merged: list[tuple[int, int]] = []
    for a, b in raw:
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _pause_candidates(spans: list[tuple[int, int]], total: int) -> list[_Candidate]:
    """Frame-aligned cut points in every pause (including leading and trailing silence)."""
    frame = SAMPLES_PER_FRAME
    clear = CLEAR_OF_SPEECH_S * AUDIO_SAMPLE_RATE
    best: dict[int, _Candidate] = {}
    edges = [0, *(x for span in spans for x in span), total]
    for i in range(0, len(edges), 2):
        a, b = edges[i], edges[i + 1]  # a pause [a, b); a/b are speech edges unless 0/total
        if b <= a:
            continue
        speech_before, speech_after = i > 0, i + 2 < len(edges)
        length = b - a
        bonus = PAUSE_BONUS * min(length / AUDIO_SAMPLE_RATE, PAUSE_BONUS_CAP_S) / PAUSE_BONUS_CAP_S
        if speech_before and speech_after and length < BRIEF_PAUSE_S * AUDIO_SAMPLE_RATE:
            bonus -= BRIEF_PAUSE_COST
        # how far from speech a cut must be to count as mid-pause: half the pause, at most `clear`
        reach = min(clear, length / 2 if speech_before and speech_after else length)
        positions = {round((a + b) / 2 / frame)}
        lo, hi = -(-a // frame), b // frame
        if lo <= hi:
            step = max(1, round(LONG_PAUSE_GRID_S * FPS))
            positions.update(range(lo, hi + 1, step))
            positions.add(hi)
        for k in positions:
            pos = k * frame
            if not 0 < pos < total:
                continue
            near = min(pos - a if speech_before else math.inf, b - pos if speech_after else math.inf)
            off = 1.0 - min(max(near, 0.0) / reach, 1.0) if reach > 0 else 1.0
            cand = _Candidate(pos, bonus - OFF_CENTRE_COST * off, "pause")
            if pos not in best or cand.bonus > best[pos].bonus:
                best[pos] = cand
    return [best[p] for p in sorted(best)]


def _with_hard_cuts(candidates: list[_Candidate], total: int, max_len: int) -> list[_Candidate]:
    """Add evenly spaced hard cuts wherever consecutive cut points are more than `max_len` apart."""
    frame = SAMPLES_PER_FRAME
    nodes: list[_Candidate] = []
    prev = 0
    for nxt in [*candidates, None]:
        stop = total if nxt is None else nxt.pos
        gap = stop - prev
        if gap > max_len:
            pieces = -(-gap // max_len)
            for j in range(1, pieces):
                # ceil keeps every piece <= max_len: each step is at most ceil(gap / pieces / frame) frames
                pos = prev + frame * math.ceil(j * gap / (pieces * frame))
                nodes.append(_Candidate(pos, -HARD_CUT_COST, "hard"))
        if nxt is not None:
            nodes.append(nxt)
            prev = nxt.pos
    return nodes


def _cheapest_path(nodes: list[_Candidate], total: int, max_len: int, target: float) -> list[int]:
    """Indices of the nodes where the cheapest plan cuts (dynamic programming, O(nodes x window))."""
    n = len(nodes)
    positions = [0, *(c.pos for c in nodes), total]  # 0 and n + 1 are the lecture's ends
    bonus = [0.0, *(c.bonus for c in nodes), 0.0]
    cost = [math.inf] * (n + 2)
    back = [-1] * (n + 2)
    cost[0] = 0.0
    lo = 0
    for i in range(1, n + 2):
        last = i == n + 1
        while positions[i] - positions[lo] > max_len:
            lo += 1
        for j in range(lo, i):
            if cost[j] == math.inf:
                continue
            c = cost[j] + _segment_cost(positions[i] - positions[j], target, last) - bonus[i]
            if c < cost[i]:
                cost[i], back[i] = c, j
    if cost[n + 1] == math.inf:  # cannot happen: hard cuts keep neighbours within max_len
        raise AssertionError("segment planner found no plan")
    path, i = [], back[n + 1]
    while i > 0:
        path.append(i - 1)
        i = back[i]
    return path[::-1]


def _segment_cost(length: int, target: float, last: bool) -> float:
    if last:  # a short tail is natural; only a long one or a crumb costs
        deviation = max(0.0, length - target) / target
        short = length < target / 4
    else:
        deviation = abs(length - target) / target
        short = length < target / 2
    return deviation + (SHORT_COST if short else 0.0)
