"""The Engine contract, the degrade ladder and the preview engine, on real arrays."""

import tracemalloc

import numpy as np
import pytest

from liveavatar_core.engines import (
    GenerationConfig,
    LadderExhausted,
    SegmentRequest,
    generate_with_ladder,
    registry,
)
from liveavatar_core.engines.preview import PreviewEngine
from liveavatar_core.errors import InputError, OutOfMemory
from liveavatar_core.timebase import SAMPLES_PER_FRAME

SMALL = GenerationConfig(height=256, width=160)


class ListSink:
    """Keeps copies of every frame; records whether the attempt was closed or aborted."""

    def __init__(self):
        self.frames: list[np.ndarray] = []
        self.state = "open"

    def write(self, frames):
        self.frames.extend(f.copy() for f in frames)

    def close(self):
        self.state = "closed"

    def abort(self):
        self.state = "aborted"
        self.frames.clear()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise bursts (syllables) with gaps: loud and quiet frames both occur."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    envelope = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 3) > 0).astype(np.float32)
    return (rng.standard_normal(n).astype(np.float32) * 0.2 * envelope).astype(np.float32)


def portrait() -> np.ndarray:
    img = np.zeros((256, 160, 3), np.uint8)
    img[:] = (90, 120, 160)
    img[60:200, 40:120] = (220, 180, 150)  # a face-coloured block where the face box says
    return img


def request(audio, handoff=None, config=SMALL, budget=None, seed=3):
    return SegmentRequest(
        audio=audio,
        num_frames=-(-len(audio) // SAMPLES_PER_FRAME),
        portrait=portrait(),
        prompt="a person speaking",
        seed=seed,
        config=config,
        face_box=(40, 60, 80, 140),
        handoff=handoff,
        memory_budget_bytes=budget,
    )


def test_preview_writes_every_frame_at_the_config_size():
    audio = speech_like(2.03)  # not a whole number of frames: the last partial frame counts
    sink = ListSink()
    result = PreviewEngine().generate(request(audio), sink)
    assert result.frames_written == len(sink.frames) == 51
    assert sink.frames[0].shape == (256, 160, 3) and sink.frames[0].dtype == np.uint8


def test_preview_is_deterministic_and_seeded():
    audio = speech_like(1.0)
    a, b, c = ListSink(), ListSink(), ListSink()
    PreviewEngine().generate(request(audio, seed=3), a)
    PreviewEngine().generate(request(audio, seed=3), b)
    PreviewEngine().generate(request(audio, seed=4), c)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a.frames, c.frames, strict=True))


def test_preview_handoff_makes_two_segments_equal_one():
    audio = speech_like(3.0)
    cut = 40 * SAMPLES_PER_FRAME
    whole = ListSink()
    PreviewEngine().generate(request(audio), whole)
    first, second = ListSink(), ListSink()
    state = PreviewEngine().generate(request(audio[:cut]), first).handoff
    PreviewEngine().generate(request(audio[cut:], handoff=state), second)
    joined = first.frames + second.frames
    assert len(joined) == len(whole.frames)
    assert all(np.array_equal(x, y) for x, y in zip(joined, whole.frames, strict=True))


def test_preview_mouth_follows_the_audio():
    engine = PreviewEngine()
    loud, quiet = ListSink(), ListSink()
    engine.generate(request(np.full(16000, 0.3, np.float32) * np.sign(speech_like(1.0) + 1e-9)), loud)
    engine.generate(request(np.zeros(16000, np.float32)), quiet)
    mouth = (slice(165, 200), slice(55, 105))  # below the mouth line of face box (40, 60, 80, 140)
    still = portrait()[mouth].astype(float)
    assert (
        np.abs(loud.frames[-1][mouth] - still).mean() > 4 * np.abs(quiet.frames[-1][mouth] - still).mean() + 1
    )


class CountingSink(ListSink):
    def write(self, frames):  # keeps nothing, so the engine's own buffers are what is measured
        pass


def test_preview_memory_estimate_is_honest():
    engine = PreviewEngine()
    config = GenerationConfig(height=704, width=384)
    big_face = SegmentRequest(
        audio=speech_like(2.0),
        num_frames=50,
        portrait=np.full((704, 384, 3), 128, np.uint8),
        prompt="p",
        seed=0,
        config=config,
        face_box=(20, 20, 344, 600),  # a face filling the frame: the estimate's worst case
    )
    tracemalloc.start()
    try:
        engine.generate(big_face, CountingSink())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = engine.estimate_memory(config)
    assert 0.8 * estimate <= peak <= 1.05 * estimate, (peak, estimate)


def test_estimate_over_budget_raises_out_of_memory_before_work():
    engine = PreviewEngine()
    sink = ListSink()
    with pytest.raises(OutOfMemory, match="over the budget"):
        engine.generate(request(speech_like(1.0), budget=1000), sink)
    assert sink.frames == []


def test_ladder_takes_the_first_rung_that_fits_and_records_every_attempt():
    engine = PreviewEngine()
    rungs = engine.ladder(SMALL)
    estimates = [engine.estimate_memory(r.config) for r in rungs]
    assert estimates == sorted(estimates, reverse=True)
    budget = (estimates[1] + estimates[2]) // 2  # only the last rung fits
    sinks = []
    outcome = generate_with_ladder(
        engine, request(speech_like(1.0), budget=budget), lambda: sinks.append(ListSink()) or sinks[-1]
    )
    assert [a.rung for a in outcome.attempts] == [r.name for r in rungs]
    assert [a.error is None for a in outcome.attempts] == [False, False, True]
    assert [s.state for s in sinks] == ["aborted", "aborted", "closed"]
    assert sinks[-1].frames[0].shape == (rungs[2].config.height, rungs[2].config.width, 3)


def test_ladder_exhausted_names_budget_and_smallest_estimate():
    engine = PreviewEngine()
    with pytest.raises(
        LadderExhausted, match=r"budget of 10 B; the smallest estimate is \d+\.\d\d [KM]iB"
    ) as info:
        generate_with_ladder(engine, request(speech_like(1.0), budget=10), ListSink)
    assert len(info.value.attempts) == len(engine.ladder(SMALL))


class OomOnceEngine(PreviewEngine):
    """Raises a real-OOM-like OutOfMemory halfway through the first attempt."""

    calls = 0

    def _generate(self, req, sink):
        type(self).calls += 1
        if type(self).calls == 1:
            sink.write(np.zeros((3, req.config.height, req.config.width, 3), np.uint8))
            raise OutOfMemory("CUDA out of memory (injected)")
        return super()._generate(req, sink)


def test_oom_mid_segment_discards_partial_output_and_degrades():
    sinks = []
    outcome = generate_with_ladder(
        OomOnceEngine(), request(speech_like(1.0)), lambda: sinks.append(ListSink()) or sinks[-1]
    )
    assert sinks[0].state == "aborted" and sinks[0].frames == []
    assert outcome.attempts[0].error == "CUDA out of memory (injected)"
    assert outcome.attempts[1].error is None and len(sinks[1].frames) == 25


def test_request_check_rejects_wrong_frame_count():
    bad = request(speech_like(1.0))
    object.__setattr__(bad, "num_frames", 7)
    with pytest.raises(InputError, match="16000 samples need 25 frames"):
        PreviewEngine().generate(bad, ListSink())


def test_registry_rejects_unknown_engine_and_explains_auto():
    with pytest.raises(InputError, match="unknown engine 'nope'"):
        registry.resolve("nope", None, False)
    name, reason = registry.resolve("auto", None, False)
    assert name == "preview" and "no CUDA GPU" in reason  # CI machines have no GPU
    assert registry.load(registry.EngineSpec("preview")) is registry.load(registry.EngineSpec("preview"))


# Chooses LiveAvatar as a lecture flow does (name, version, prompt tokens), then lists the heavy
# modules that got imported.
CHOOSE_ONLY = """
import sys
from flows.lecture import LectureParams, choose_engine
from liveavatar_core.engines import registry
params = LectureParams(audio="a.wav", image="p.jpg", prompt="p", out="o", engine="liveavatar", random_weights=True)
choice = choose_engine(params)
assert registry.token_counter(choice.name, choice.checkpoint_dir) is None  # no tokenizer: random weights
heavy = ("torch", "diffusers", "transformers", "liveavatar_core.engines.liveavatar.engine")
print(choice.name, choice.version, [m for m in heavy if m in sys.modules])
"""


def test_a_flow_chooses_the_liveavatar_engine_without_importing_model_code():
    """The lecture flow runs on CPU hosts; importing the model code there cost 14 s per course."""
    import subprocess
    import sys

    from liveavatar_core.engines.liveavatar import LiveAvatarEngine

    result = subprocess.run([sys.executable, "-c", CHOOSE_ONLY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["liveavatar", LiveAvatarEngine.version, "[]"]
