"""Segment planning: exact tiling, frame-aligned cuts in pauses, nothing over the maximum."""

from __future__ import annotations

import random
import time
from collections import namedtuple
from pathlib import Path

import pytest

from liveavatar_core import vad
from liveavatar_core.errors import InputError
from liveavatar_core.segments import Segment, plan_segments
from liveavatar_core.timebase import SAMPLES_PER_FRAME, frames_for_samples
from tests.fixtures.speech import JOIN_GAPS_S

SR = 16000
Span = namedtuple("Span", "start_s end_s")  # any object with start_s/end_s will do


def random_speech(rng: random.Random, seconds: float, phrase=(0.5, 7.0), pause=(0.1, 1.5)) -> list[Span]:
    spans, t = [], rng.uniform(0.0, 1.0)
    while t < seconds:
        end = min(seconds, t + rng.uniform(*phrase))
        spans.append(Span(round(t * SR) / SR, round(end * SR) / SR))
        t = end + rng.uniform(*pause)
    return spans


def check_plan(plan: list[Segment], total: int, spans: list[Span], max_s: float) -> None:
    """The promises every plan keeps."""
    assert [s.index for s in plan] == list(range(len(plan)))
    assert plan[0].start_sample == 0 and plan[-1].end_sample == total
    for a, b in zip(plan, plan[1:], strict=False):
        assert a.end_sample == b.start_sample  # tiles: nothing dropped, nothing doubled
    for seg in plan:
        assert 0 < seg.num_samples <= max_s * SR
        assert seg.start_sample % SAMPLES_PER_FRAME == 0  # every cut on a frame boundary
        assert seg.start_frame * SAMPLES_PER_FRAME == seg.start_sample
    assert [s.cut for s in plan[:-1]] == [s.cut for s in plan[:-1] if s.cut in ("pause", "hard")]
    assert plan[-1].cut == "end"
    assert sum(s.num_frames for s in plan) == frames_for_samples(total)
    for seg in plan[:-1]:
        cut = seg.end_sample
        in_speech = [
            s
            for s in spans
            if s.start_s * SR + SAMPLES_PER_FRAME / 2 < cut < s.end_s * SR - SAMPLES_PER_FRAME / 2
        ]
        if seg.cut == "pause":  # in a pause, or at most half a frame into a span's padding
            assert not in_speech, (seg, in_speech)
        else:
            assert in_speech, seg  # a hard cut is only ever needed inside speech


def test_short_lecture_is_one_segment():
    assert plan_segments(5 * SR + 7, [Span(0.2, 4.9)], target_s=8, max_s=12) == [
        Segment(0, 0, 5 * SR + 7, "end")
    ]


def test_segment_properties():
    seg = Segment(3, 6400, 6400 + 16000 + 1, "pause")
    assert (seg.start_s, seg.duration_s, seg.start_frame, seg.num_frames) == (0.4, 1.0000625, 10, 26)
    assert seg.to_dict() == {"index": 3, "start_sample": 6400, "end_sample": 22401, "cut": "pause"}


@pytest.mark.parametrize("seed", range(40))
def test_random_lectures_keep_every_promise(seed: int):
    rng = random.Random(seed)
    seconds = rng.uniform(20, 400)
    total = round(seconds * SR) + rng.randrange(SAMPLES_PER_FRAME)  # usually not a whole frame
    spans = random_speech(rng, seconds, phrase=(0.3, rng.choice([4.0, 9.0, 30.0])))
    target = rng.choice([4.0, 8.0, 12.0])
    max_s = target * rng.choice([1.0, 1.25, 1.5, 2.0])
    check_plan(plan_segments(total, spans, target_s=target, max_s=max_s), total, spans, max_s)


def test_no_hard_cut_while_pauses_allow():
    # Every phrase plus the pause after it fits under max_s, so no cut need land in speech.
    for seed in range(20):
        rng = random.Random(seed)
        spans = random_speech(rng, 300, phrase=(0.5, 6.0), pause=(0.15, 1.5))
        plan = plan_segments(300 * SR, spans, target_s=6, max_s=8)
        check_plan(plan, 300 * SR, spans, 8)
        assert all(s.cut != "hard" for s in plan), seed


def test_hard_cuts_only_in_unbroken_speech():
    # 5 s of pauses, 30 s of speech without a pause, then a pause and more speech.
    spans = [Span(1.0, 4.0), Span(5.0, 35.0), Span(36.0, 40.0)]
    plan = plan_segments(41 * SR, spans, target_s=8, max_s=12)
    check_plan(plan, 41 * SR, spans, 12)
    hard = [s.end_s for s in plan if s.cut == "hard"]
    assert len(hard) == 2  # 30 s of speech needs ceil(30 / 12) - 1 cuts inside it; no more
    assert all(5.0 < t < 35.0 for t in hard)


def test_cuts_in_the_middle_of_pauses():
    rng = random.Random(7)
    spans = random_speech(rng, 600, phrase=(1.0, 8.0), pause=(0.2, 1.0))
    plan = plan_segments(600 * SR, spans, target_s=10, max_s=20)
    gaps = [(a.end_s, b.start_s) for a, b in zip(spans, spans[1:], strict=False)]
    for seg in plan[:-1]:
        t = seg.end_s
        gap = next(g for g in gaps if g[0] <= t <= g[1])
        assert abs(t - (gap[0] + gap[1]) / 2) <= 0.5 / 25 + 1e-9, (t, gap)  # nearest frame to the middle


def test_prefers_a_long_pause_near_the_target_to_a_blip_on_it():
    # At 10 s a 0.15 s breath; at 11 s a 1.2 s pause. Target 10 s, max 15 s.
    spans = [Span(0.0, 9.925), Span(10.075, 11.0), Span(12.2, 19.5)]
    plan = plan_segments(20 * SR, spans, target_s=10, max_s=15)
    assert plan[0].end_s == pytest.approx(11.6, abs=0.02) and plan[0].cut == "pause"


def test_a_comma_inside_a_sentence_loses_to_a_sentence_pause_a_third_of_the_target_away():
    # What an 8 kHz telephone lecture gave (tests/test_inputs_produce.py): the voice detector hears a
    # 0.13 s gap at a comma right on the target, and sentence pauses 2.2 and 3.4 s off it.
    spans = [Span(0.55, 8.22), Span(9.6, 14.4), Span(15.17, 16.93), Span(17.06, 19.36), Span(20.99, 31.0)]
    plan = plan_segments(31 * SR, spans, target_s=8, max_s=12)
    check_plan(plan, 31 * SR, spans, 12)
    assert all(abs(seg.end_s - 17.0) > 0.2 for seg in plan[:-1]), plan


def test_a_comma_is_still_cut_rather_than_speech():
    spans = [Span(0.0, 9.9), Span(10.05, 25.0)]  # only a 0.15 s gap within 15 s of the start
    plan = plan_segments(25 * SR, spans, target_s=10, max_s=15)
    assert plan[0].cut == "pause" and 9.9 <= plan[0].end_s <= 10.05


def test_prefers_a_pause_on_the_target_to_a_long_one_far_away():
    spans = [Span(0.0, 5.0), Span(6.2, 9.8), Span(10.2, 19.5)]
    plan = plan_segments(20 * SR, spans, target_s=10, max_s=15)
    assert plan[0].end_s == pytest.approx(10.0, abs=0.02)


def test_the_whole_plan_is_chosen_not_greedily():
    # A greedy planner cuts at 8 s (on target), then 13 s of speech to the next pause (max 12) forces
    # a hard cut. Cutting at 11 s instead reaches the pause at 21 s: no hard cut at all.
    spans = [Span(0.0, 7.8), Span(8.2, 10.8), Span(11.2, 20.8), Span(21.2, 25.0)]
    plan = plan_segments(25 * SR, spans, target_s=8, max_s=12)
    check_plan(plan, 25 * SR, spans, 12)
    assert [(s.end_s, s.cut) for s in plan] == [(11.0, "pause"), (21.0, "pause"), (25.0, "end")]


def test_plan_is_exact_in_the_sample_lectures_pauses(lecture_wav: Path):
    spans = vad.detect_speech(lecture_wav)
    import soundfile as sf

    total = sf.info(str(lecture_wav)).frames
    plan = plan_segments(total, spans, target_s=8, max_s=12)
    check_plan(plan, total, spans, 12)
    for seg in plan[:-1]:  # every cut falls in one of the pauses between the read sentences
        assert any(a - 0.3 <= seg.end_s <= b + 0.3 for a, b in JOIN_GAPS_S), seg


def test_an_hour_plans_in_well_under_a_second():
    spans = random_speech(random.Random(3), 3600)
    start = time.perf_counter()
    plan = plan_segments(3600 * SR, spans, target_s=10, max_s=15)
    assert time.perf_counter() - start < 1.0
    check_plan(plan, 3600 * SR, spans, 15)
    lengths = [s.duration_s for s in plan[:-1]]
    assert 8.5 < sum(lengths) / len(lengths) < 11.5  # near the target on average


def test_no_speech_at_all_still_tiles():
    plan = plan_segments(60 * SR + 5, [], target_s=10, max_s=12)
    check_plan(plan, 60 * SR + 5, [], 12)


@pytest.mark.parametrize(
    "target, max_s, flag",
    [(0.5, 10, "--segment-seconds"), (float("nan"), 10, "--segment-seconds"), ("8", 10, "--segment-seconds"),
     (10, 8, "--max-segment-seconds"), (10, float("inf"), "--max-segment-seconds")],
)  # fmt: skip
def test_bad_lengths_name_the_flag(target, max_s, flag):
    with pytest.raises(InputError) as err:
        plan_segments(100 * SR, [], target_s=target, max_s=max_s)
    assert err.value.subject == flag
