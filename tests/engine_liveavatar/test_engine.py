"""The LiveAvatar engine end to end at tiny size, on CPU: a tiny checkpoint in the official layout,
loaded through the real loaders, generating segments block by block."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch

from liveavatar_core.engines import registry
from liveavatar_core.engines.base import GenerationConfig, SegmentRequest
from liveavatar_core.engines.ladder import generate_with_ladder
from liveavatar_core.engines.liveavatar import LiveAvatarEngine
from liveavatar_core.engines.liveavatar.backends import BackendUnavailable, Fp8Linear, apply_fp8
from liveavatar_core.engines.liveavatar.chains import quantise_rows
from liveavatar_core.engines.liveavatar.checkpoint import random_init
from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.handoff import Handoff, HandoffError, ReplayBlock
from liveavatar_core.engines.liveavatar.kv_cache import CondKVCache, RingKVCache
from liveavatar_core.engines.liveavatar.memory import ModelSizes, estimate_memory
from liveavatar_core.engines.liveavatar.ring import WindowRing, ring_capacity_frames
from liveavatar_core.engines.liveavatar.rungs import degrade_ladder, fit_area
from liveavatar_core.engines.liveavatar.vae import StreamingDecoder
from liveavatar_core.engines.warmup import warm_up
from liveavatar_core.errors import InputError, OutOfMemory
from liveavatar_core.timebase import SAMPLES_PER_FRAME

SIZE = GenerationConfig(height=64, width=64)
PORTRAIT = (np.random.default_rng(7).random((80, 64, 3)) * 255).astype(np.uint8)


class ListSink:
    def __init__(self):
        self.frames: list[np.ndarray] = []

    def write(self, frames):
        self.frames.extend(f.copy() for f in frames)

    def close(self):
        pass

    def abort(self):
        self.frames.clear()


def speech(frames: int, seed: int = 0, short_by: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = frames * SAMPLES_PER_FRAME - short_by
    envelope = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 3) > 0).astype(np.float32)
    return (rng.standard_normal(n) * 0.2 * envelope).astype(np.float32)


def request(audio, *, seed=1, handoff=None, config=SIZE, prompt="a person speaking in a bright room"):
    return SegmentRequest(
        audio=audio,
        num_frames=-(-len(audio) // SAMPLES_PER_FRAME),
        portrait=PORTRAIT,
        prompt=prompt,
        seed=seed,
        config=config,
        handoff=handoff,
    )


def run(engine, req) -> tuple[list[np.ndarray], object]:
    sink = ListSink()
    result = engine.generate(req, sink)
    return sink.frames, result


@pytest.fixture(scope="module")
def engine(liveavatar_checkpoint):  # noqa: F811
    return LiveAvatarEngine(checkpoint_dir=str(liveavatar_checkpoint), device="cpu")


class LocalFeatures:
    """Audio features of a frame from that frame's samples only: independent of where a lecture is cut,
    so two segments can be compared with one (wav2vec2 attends across seconds of audio)."""

    def __init__(self, layers: int, hidden: int):
        self.proj = (
            torch.randn(SAMPLES_PER_FRAME, layers * hidden, generator=torch.Generator().manual_seed(0)) / 25
        )
        self.layers, self.hidden = layers, hidden
        self.model = torch.nn.Module()  # what the engine places on the device: no weights here

    def to(self, *args, **kwargs):
        return self

    def iter_features(self, audio, num_frames):
        x = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float32)
        x[: min(len(audio), len(x))] = audio[: len(x)]
        yield (torch.from_numpy(x).view(num_frames, -1) @ self.proj).view(
            num_frames, self.layers, self.hidden
        )


@pytest.fixture
def local_features(engine, monkeypatch):
    cfg = engine.parts.dit.config
    monkeypatch.setattr(engine.parts, "audio", LocalFeatures(cfg.audio_layers, cfg.audio_dim))


# ----- generation ------------------------------------------------------------------------------------


def test_segment_writes_every_frame_and_is_deterministic_for_a_seed(engine):
    audio = speech(30, short_by=100)  # the last frame is partial: it still counts
    frames, result = run(engine, request(audio))
    again, _ = run(engine, request(audio))
    other, _ = run(engine, request(audio, seed=2))
    assert result.frames_written == len(frames) == 30  # 3 blocks of 12, the last one trimmed
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(frames, other, strict=True))
    assert result.details["handoff_in"] == "none" and result.details["blocks"] == 3
    assert Handoff.from_bytes(result.handoff).next_frame == 9  # latent frames generated


def test_compiled_chains_are_the_engines_choice_unless_the_config_says(engine):
    """compile=None: eager on a CPU (compiled on CUDA); compile=True compiles, and back is exact."""
    audio = speech(12)
    eager, result = run(engine, request(audio))
    compiled, with_compile = run(engine, request(audio, config=SIZE.replace(compile=True)))
    again, back = run(engine, request(audio))
    assert (result.details["chains"], with_compile.details["chains"], back.details["chains"]) == (
        "eager", "compiled", "eager",
    )  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(eager, again, strict=True))
    diff = max(np.abs(a.astype(int) - b).max() for a, b in zip(eager, compiled, strict=True))
    assert diff <= 8, diff  # rounding-level differences only (float32 model: usually none)


def test_row_kernels_are_refused_by_name_without_a_gpu(engine):
    with pytest.raises(BackendUnavailable, match="row_kernels: needs a CUDA device, not cpu"):
        run(engine, request(speech(12), config=SIZE.replace(row_kernels=True)))
    frames, result = run(engine, request(speech(12)))  # the engine goes on as before
    assert result.details["chains"] == "eager" and len(frames) == 12


@pytest.mark.parametrize("knob", ["cuda_graphs", "overlap_decode"])
def test_graphs_and_decode_overlap_only_on_cuda_with_weights_and_rings_there(engine, knob):
    """Off unless asked, never with streamed weights or rings; asked for on a CPU: refused, named."""
    assert engine._graphs(SIZE) is False and engine._overlaps(SIZE) is False
    assert engine.parts.dit.graphs is None
    with pytest.raises(BackendUnavailable, match=f"{knob}: needs a CUDA device, not cpu"):
        run(engine, request(speech(12), config=SIZE.replace(**{knob: True})))
    sizes, full = ModelSizes.from_shapes(DiTConfig()), GenerationConfig(height=704, width=384)
    plain = estimate_memory(full, DiTConfig(), sizes).parts
    more = estimate_memory(full.replace(**{knob: True}), DiTConfig(), sizes).parts
    if knob == "cuda_graphs":  # the graphs' pool keeps one block forward's working memory
        assert more.keys() - plain.keys() == {"graph_pool"} and 0.5e9 < more["graph_pool"] < 2e9
    else:  # the decode's working memory on top of the DiT's
        assert more["transient"] > plain["transient"] and more.keys() == plain.keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphs_and_overlapped_decode_give_the_same_frames(liveavatar_checkpoint):  # noqa: F811
    """Same kernels replayed, the decode on a second stream: bit-identical frames over a segment and its
    continuation, and graphs were captured and replayed (every key after the first forward of its
    structure)."""
    engine = LiveAvatarEngine(checkpoint_dir=str(liveavatar_checkpoint), device="cuda")
    outputs = {}
    for graphs in (False, True):
        config = SIZE.replace(cuda_graphs=graphs, overlap_decode=graphs)
        first, result = run(engine, request(speech(60), config=config))
        second, _ = run(engine, request(speech(60), config=config, handoff=result.handoff))
        outputs[graphs] = first + second
    assert all(np.array_equal(a, b) for a, b in zip(outputs[False], outputs[True], strict=True))
    assert engine.parts.dit.graphs.captures > 0 and engine.parts.dit.graphs.replays > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA GPU")
def test_the_portraits_decoder_state_waits_in_pinned_memory(liveavatar_checkpoint):  # noqa: F811
    """Kept pinned between segments and copied up without blocking: the same frames from the kept
    state as from the state just prepared."""
    engine = LiveAvatarEngine(checkpoint_dir=str(liveavatar_checkpoint), device="cuda")
    audio = speech(24)
    first, _ = run(engine, request(audio))  # prepares the portrait
    second, _ = run(engine, request(audio))  # starts from the kept state
    (state,) = engine._portraits.values()
    kept = [t for t in state.decoder_cache if isinstance(t, torch.Tensor)]
    assert kept and all(t.device.type == "cpu" and t.is_pinned() for t in kept)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_warm_up_runs_a_fresh_and_a_continued_segment_and_changes_no_later_output(engine, monkeypatch):
    audio = speech(24, seed=5)
    before, _ = run(engine, request(audio))
    seen = []
    generate = engine.generate

    def spy(req, sink):
        result = generate(req, sink)
        seen.append((req.config, req.num_frames, result.details["handoff_in"]))
        return result

    monkeypatch.setattr(engine, "generate", spy)
    done = warm_up(engine, SIZE, frames=13)
    monkeypatch.undo()
    after, _ = run(engine, request(audio))
    assert [(c.size, n, h) for c, n, h in seen] == [("64x64", 13, "none"), ("64x64", 13, "continued")]
    assert done.rung == engine.ladder(SIZE)[0].name and done.seconds > 0
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_two_segments_with_the_handoff_equal_one_segment(engine, local_features, monkeypatch):
    """The kept state continues without re-priming the decoder; the replay primes a fresh one."""
    primes = []
    prime = StreamingDecoder.prime
    monkeypatch.setattr(
        StreamingDecoder, "prime", lambda self, z: (primes.append(z.shape[2]), prime(self, z))
    )
    audio = speech(96, seed=3)
    whole, _ = run(engine, request(audio))
    cut = 48 * SAMPLES_PER_FRAME
    first, state = run(engine, request(audio[:cut]))
    payload = Handoff.from_bytes(state.handoff).to_bytes()  # through bytes, as between workers
    primes.clear()
    second, result = run(engine, request(audio[cut:], handoff=payload))
    assert result.details["handoff_in"] == "continued" and result.details["continuation"] == "kept state"
    assert primes == []
    joined = first + second
    assert len(joined) == len(whole) == 96
    assert all(np.array_equal(a, b) for a, b in zip(joined, whole, strict=True))
    # On another worker (here: after another lecture's segment) the rings are replayed; exact too,
    # since the first segment was no longer than one clip.
    run(engine, request(speech(12, seed=4)))
    second, result = run(engine, request(audio[cut:], handoff=payload))
    assert result.details["continuation"] == "replay" and result.details["replayed_blocks"] == 4
    assert len(primes) == 1  # the replay's fresh decoder, primed with the handoff's latents
    assert all(np.array_equal(a, b) for a, b in zip(first + second, whole, strict=True))


def test_block_b_hears_audio_frames_12b_to_12b_plus_11(engine, monkeypatch):
    """Video frame k is made with audio frame k: no frames dropped, no offset."""
    cfg = engine.parts.dit.config

    class FrameIndexFeatures(LocalFeatures):
        def iter_features(self, audio, num_frames):
            index = torch.arange(num_frames, dtype=torch.float32)[:, None, None]
            yield index.expand(num_frames, self.layers, self.hidden).clone()

    monkeypatch.setattr(engine.parts, "audio", FrameIndexFeatures(cfg.audio_layers, cfg.audio_dim))
    heard = []
    encode = engine.parts.dit.encode_audio
    monkeypatch.setattr(
        engine.parts.dit, "encode_audio", lambda f: heard.append(f[0, 0, 0].tolist()) or encode(f)
    )
    frames, _ = run(engine, request(speech(24)))
    assert len(frames) == 24
    assert heard == [list(range(0, 12)), list(range(12, 24))]


def test_the_9_frame_ring_attends_like_the_reference_12_frame_ring():
    """Blocks keep attending to the 9 frames before them and themselves, with a quarter less cache."""
    cfg = DiTConfig.tiny()
    dit = random_init(cfg, "cpu", torch.float32, seed=0)
    torch.manual_seed(0)
    context = dit.embed_text([torch.randn(6, cfg.text_dim)])
    cond = CondKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)
    dit.forward_sink(torch.randn(1, 16, 1, 8, 8), torch.randn(1, 16, 19, 8, 8), context, cond)
    audio = dit.encode_audio(torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12))
    blocks = [torch.randn(1, 16, 3, 8, 8) for _ in range(7)]  # past one wrap of either ring
    wide = RingKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)  # 12 frames
    narrow = WindowRing.allocate(
        cfg, 1, 8, 8, device="cpu", dtype=torch.float32, capacity_frames=ring_capacity_frames(cfg)
    )
    assert narrow.capacity_frames == 9
    for i, x in enumerate(blocks):
        kwargs = dict(frame_index=3 * i, sink_distance=7, text=context, audio=audio, cond_cache=cond)
        a = dit.forward_block(x, 602.2, ring_cache=wide, **kwargs)
        b = dit.forward_block(x, 602.2, ring_cache=narrow, **kwargs)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ----- handoff ----------------------------------------------------------------------------------------


def small_handoff(**changes) -> Handoff:
    latent = torch.zeros(1, 16, 1, 8, 8)
    block = ReplayBlock(6, (4, 9, 30, 12), torch.randn(4, 1, 16, 3, 8, 8), torch.randn(1, 3, 32, 12))
    fields = dict(
        height=64,
        width=64,
        steps=4,
        next_frame=9,
        model="checkpoint-abc",
        reference_latent=latent,
        sink_latent=latent + 1,
        motion_latents=torch.randn(1, 16, 19, 8, 8),
        decoder_latents=torch.randn(1, 16, 38, 8, 8),
        replay=(block,),
        audio_tail=np.arange(1280, dtype=np.float32),
    )
    fields.update(changes)
    return Handoff(**fields)


def test_handoff_round_trips_through_bytes():
    state = small_handoff()
    back = Handoff.from_bytes(state.to_bytes())
    assert (back.height, back.width, back.steps, back.next_frame, back.model) == (
        64,
        64,
        4,
        9,
        "checkpoint-abc",
    )
    for name in ("reference_latent", "sink_latent", "motion_latents", "decoder_latents"):
        assert torch.equal(getattr(back, name), getattr(state, name))
    assert back.replay[0].sink_distances == (4, 9, 30, 12) and back.replay[0].frame_index == 6
    assert torch.equal(back.replay[0].inputs, state.replay[0].inputs)
    assert np.array_equal(back.audio_tail, state.audio_tail)
    assert Handoff.from_bytes(small_handoff(sink_latent=None, replay=()).to_bytes()).sink_latent is None


def test_handoff_rejects_corrupt_foreign_and_misshapen_states():
    data = small_handoff().to_bytes()
    with pytest.raises(HandoffError, match="truncated"):
        Handoff.from_bytes(data[:100])
    with pytest.raises(HandoffError, match="too short"):
        Handoff.from_bytes(b"abc")
    with pytest.raises(HandoffError, match="version"):
        Handoff.from_bytes(data.replace(b'\\"version\\": 1', b'\\"version\\": 9'))
    with pytest.raises(HandoffError, match=r"motion_latents has shape \[1, 16, 19, 4, 8\]"):
        small_handoff(motion_latents=torch.zeros(1, 16, 19, 4, 8)).check_structure()
    assert "704x384" in small_handoff().mismatch(704, 384, 4, "checkpoint-abc")
    assert "3" in small_handoff().mismatch(64, 64, 3, "checkpoint-abc")
    assert small_handoff().mismatch(64, 64, 4, "checkpoint-abc") is None


def test_a_handoff_that_does_not_fit_is_used_as_far_as_it_fits(engine):
    _, first = run(engine, request(speech(12)))
    state = Handoff.from_bytes(first.handoff)
    foreign = dataclasses.replace(state, model="checkpoint-0000").to_bytes()
    frames, result = run(engine, request(speech(12), handoff=foreign))
    assert result.details["handoff_in"] == (
        f"ignored (independent start): it was made by another model (checkpoint-0000, this engine runs {engine.signature})"
    )
    assert len(frames) == 12
    frames, result = run(engine, request(speech(12), handoff=first.handoff, config=SIZE.replace(steps=3)))
    assert (
        result.details["handoff_in"]
        == "continued without KV replay: it was made with 4 steps, this segment runs 3"
    )
    assert result.details["replayed_blocks"] == 0 and Handoff.from_bytes(result.handoff).next_frame == 6


# ----- out of memory ------------------------------------------------------------------------------------


def test_oom_frees_the_attempt_and_the_engine_stays_usable(engine, monkeypatch):
    allocated: list[weakref.ref] = []
    for cls in (RingKVCache, CondKVCache):
        original = cls.allocate.__func__

        def allocate(cls_, *args, _original=original, **kwargs):
            cache = _original(cls_, *args, **kwargs)
            allocated.extend([weakref.ref(cache.k), weakref.ref(cache.v)])
            return cache

        monkeypatch.setattr(cls, "allocate", classmethod(allocate))
    attention = torch.nn.functional.scaled_dot_product_attention
    calls = {"n": 0}

    def failing_attention(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:  # mid-segment, after the caches exist and blocks were written
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", failing_attention)
    sink = ListSink()
    with pytest.raises(OutOfMemory, match="ran out of device memory at 64x64, 4 steps.*Tried to allocate"):
        engine.generate(request(speech(24)), sink)
    gc.collect()
    assert allocated and all(ref() is None for ref in allocated)  # nothing of the attempt survives

    frames, result = run(engine, request(speech(24)))
    assert result.frames_written == len(frames) == 24

    calls["n"] = 0
    sinks: list[ListSink] = []
    outcome = generate_with_ladder(engine, request(speech(12)), lambda: sinks.append(ListSink()) or sinks[-1])
    assert [a.rung for a in outcome.attempts] == ["requested", "encoders-off-gpu"]
    assert outcome.attempts[0].error.startswith("liveavatar ran out of device memory")
    assert len(sinks[-1].frames) == 12


# ----- contract: ladder, memory, tokens, config ----------------------------------------------------------------


def test_ladder_goes_quality_first():
    config = GenerationConfig(height=704, width=384)
    rungs = degrade_ladder(config, fp8_available=True, offload_available=True)
    assert [r.name for r in rungs] == [
        "requested",
        "encoders-off-gpu",
        "kv-cache-offload",
        "weight-offload",
        "fp8",
        "3-steps",
        "area-3/4",
        "area-1/2",
    ]
    assert [r.costs for r in rungs] == [
        "nothing",
        "speed",
        "speed",
        "speed",
        "quality",
        "quality",
        "quality",
        "quality",
    ]
    last = rungs[-1].config
    assert (last.offload_encoders, last.offload_kv_cache, last.offload_weights, last.fp8, last.steps) == (
        True,
        True,
        True,
        True,
        3,
    )
    assert (rungs[-2].config.height, rungs[-2].config.width) == (576, 320)
    assert (last.height, last.width) == (512, 256)
    cpu_only = degrade_ladder(config, fp8_available=False, offload_available=False)
    assert [r.name for r in cpu_only] == ["requested", "encoders-off-gpu", "3-steps", "area-3/4", "area-1/2"]


def test_fit_area_keeps_multiples_of_64_and_the_aspect():
    for (h, w), fraction in [((704, 384), 0.75), ((704, 384), 0.5), ((384, 256), 0.5), ((1280, 720), 0.3)]:
        fh, fw = fit_area(h, w, h * w * fraction)
        assert fh % 64 == 0 and fw % 64 == 0 and fh * fw <= h * w * fraction
        assert abs(fh / fw - h / w) / (h / w) < 0.25


def test_memory_estimate_at_full_size_shrinks_down_the_ladder():
    sizes = ModelSizes.from_shapes(DiTConfig())
    config = GenerationConfig(height=704, width=384)

    def estimate(c):
        return estimate_memory(c, DiTConfig(), sizes).total

    every = degrade_ladder(config, fp8_available=True, offload_available=True)
    totals = [estimate(r.config) for r in every]
    assert totals == sorted(totals, reverse=True)  # never more memory further down
    useful = degrade_ladder(config, fp8_available=True, offload_available=True, estimate=estimate)
    totals = [estimate(r.config) for r in useful]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False))  # every kept rung saves memory
    assert "3-steps" not in [r.name for r in useful]  # with the rings on the host, steps cost no GPU memory
    assert [r.name for r in useful if r.name.startswith("area")] == ["area-3/4", "area-1/2"]
    parts = estimate_memory(config, DiTConfig(), sizes).parts
    assert parts["kv_rings"] == 4 * 9 * 1056 * 40 * 2 * 5120 * 2  # 31.1 GB: four rings of 9 frames
    assert parts["cond_cache"] == (1056 + 1056 + 264 + 264) * 40 * 2 * 5120 * 2  # reference + FramePack
    assert 30e9 < parts["dit_weights"] < 36e9  # ~16.3 B parameters in bf16 (+ float32 modules)
    fp8 = estimate_memory(config.replace(fp8=True), DiTConfig(), sizes).parts
    assert 15e9 < fp8["dit_weights"] < 20e9
    # The rings' rung sweeps groups of 16 blocks; the weights' rung groups of 64, whose state a short
    # segment never holds: given the segment's blocks, the estimate counts only those.
    rings, weights = (
        next(r.config for r in useful if r.name == n) for n in ("kv-cache-offload", "weight-offload")
    )
    assert (rings.order, rings.sweep_blocks, weights.order, weights.sweep_blocks) == (
        "sweep",
        16,
        "sweep",
        64,
    )
    state = estimate_memory(weights, DiTConfig(), sizes).parts["sweep_state"]
    assert estimate_memory(weights, DiTConfig(), sizes, blocks=8).parts["sweep_state"] == state // 8
    assert estimate_memory(weights, DiTConfig(), sizes, blocks=200).parts["sweep_state"] == state


def test_compiled_decode_is_counted_and_lean_on_the_rungs_that_save_memory():
    """The compiled fast decode takes 4 latents a call (4.6 GiB at 704x384 in bf16), one on the offload
    rungs; the diffusers loop (eager) one."""
    sizes, full = ModelSizes.from_shapes(DiTConfig()), GenerationConfig(height=704, width=384)

    def transient(config):
        return estimate_memory(config, DiTConfig(), sizes).parts["transient"]

    eager, fast = transient(full.replace(compile=False)), transient(full.replace(compile=True))
    lean = transient(full.replace(compile=True, offload_kv_cache=True))
    assert 4.4 * 2**30 < fast < 4.9 * 2**30 and eager < lean < fast / 3


def test_engine_estimate_matches_its_loaded_models(engine):
    parts = engine.memory_parts(SIZE)
    assert parts["dit_weights"] == sum(p.numel() * p.element_size() for p in engine.parts.dit.parameters())
    assert engine.estimate_memory(SIZE) == sum(parts.values())
    sweep = SIZE.replace(order="sweep", sweep_blocks=8)
    # 13 frames are 2 blocks of 12 frames: a quarter of the 8-block group's hidden state.
    assert engine.memory_parts(sweep, 13)["sweep_state"] * 4 == engine.memory_parts(sweep)["sweep_state"]


def test_token_counter_reads_the_checkpoint_tokenizer(liveavatar_checkpoint):  # noqa: F811
    count = registry.token_counter("liveavatar", str(liveavatar_checkpoint))
    assert count("a person speaking") == 4  # three words of the tiny vocabulary, then </s>
    assert count("a person speaking and smiles") > count("a person speaking")
    assert registry.token_counter("liveavatar", None) is None
    assert registry.token_counter("liveavatar", str(liveavatar_checkpoint / "nowhere")) is None


def test_bad_sizes_and_missing_checkpoints_are_named(engine, tmp_path):
    with pytest.raises(InputError, match="liveavatar height: 100 px: must be a positive multiple of 64"):
        run(engine, request(speech(12), config=GenerationConfig(height=100, width=64)))
    with pytest.raises(Exception, match=r"Wan2.2-S2V-14B/config.json.*not found"):
        LiveAvatarEngine(checkpoint_dir=str(tmp_path), device="cpu")
    with pytest.raises(InputError, match="--random-weights"):
        LiveAvatarEngine(device="cpu")


def test_registry_builds_the_engine(liveavatar_checkpoint):  # noqa: F811
    spec = registry.EngineSpec("liveavatar", checkpoint_dir=str(liveavatar_checkpoint), device="cpu")
    engine = registry.load(spec)
    try:
        assert isinstance(engine, LiveAvatarEngine) and engine.parts.weights == "checkpoint"
    finally:
        registry.unload_all()


# ----- fp8 -------------------------------------------------------------------------------------------------------


def test_fp8_linear_is_close_to_the_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (32, 64)
    error = (fp8(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.06
    assert torch.equal(fp8(quantise_rows(x)), fp8(x))  # rows a chain stored are what it would quantise


def test_fp8_scales_each_token_and_each_output_channel_on_its_own():
    """A loud token or a large weight row must not flush the quiet ones to zero, as one scale per
    tensor would (1e-6 of the largest value is below e4m3's smallest step: error 0.35 here)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3] *= 1e6
    x = torch.randn(6, 64)
    x[2] *= 1e6
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight_scale.shape == (1, 32)
    error = (fp8(x) - linear(x)).abs()
    # Each output's error against the size its token and weight row allow (|x_t|·|w_c|): 0.011 here.
    size = x.norm(dim=1, keepdim=True) * linear.weight.norm(dim=1)
    assert (error / size).max() < 0.03


def test_fp8_converts_the_block_linears_only_and_the_dit_still_predicts():
    dit = random_init(DiTConfig.tiny(), "cpu", torch.float32, seed=0)
    names = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_fp8(dit)
    converted = {n for n, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    assert converted and converted <= names
    assert all(n.startswith("blocks.") for n in converted)
    assert not any(n.startswith(("text_embedding", "time_", "head", "audio_encoder")) for n in converted)
    assert {
        "blocks.0.self_attn.q",
        "blocks.0.ffn.2",
        "blocks.0.audio.attn.o",
        "blocks.0.audio.norm.linear",
    } <= converted


def test_fp8_dit_predicts_close_to_the_float_dit():
    cfg = DiTConfig.tiny()
    torch.manual_seed(0)
    latent, motion = torch.randn(1, 16, 1, 8, 8), torch.randn(1, 16, 19, 8, 8)
    noisy, audio = torch.randn(1, 16, 3, 8, 8), torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12)
    text = torch.randn(6, cfg.text_dim)

    def predict(dit):
        context = dit.embed_text([text])
        cond = CondKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)
        ring = RingKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)
        dit.forward_sink(latent, motion, context, cond)
        return dit.forward_block(
            noisy, 857.7, frame_index=0, sink_distance=5, text=context, audio=dit.encode_audio(audio),
            cond_cache=cond, ring_cache=ring,
        )  # fmt: skip

    reference = predict(random_init(cfg, "cpu", torch.float32, seed=0))
    dit = random_init(cfg, "cpu", torch.float32, seed=0)
    apply_fp8(dit)
    error = (predict(dit) - reference).norm() / reference.norm()
    assert 0 < error < 0.1


def test_random_draws_are_keyed_by_seed_and_clip(engine):
    """Noise and sink distances are keyed by (seed, clip): segment boundaries do not shift them."""
    from liveavatar_core.engines.liveavatar.pipeline import draw_seed

    assert draw_seed(1, 0, 0) == draw_seed(1, 0, 0)
    assert len({draw_seed(1, c, s) for c in range(4) for s in range(2)}) == 8
    assert dataclasses.is_dataclass(engine.settings) and engine.settings.sink_distance == (4, 30)


def test_random_weights_engine_builds_without_a_checkpoint():
    engine = LiveAvatarEngine(random_weights=True, device="cpu", tiny=True)
    assert engine.parts.weights == "random" and engine.signature.startswith("random-")
    assert engine.parts.text.count_tokens("a person speaking") == 4  # hashed words, then </s>
    assert engine.estimate_memory(SIZE) == sum(engine.memory_parts(SIZE).values()) > 0
    assert [r.name for r in engine.ladder(SIZE)][:2] == ["requested", "encoders-off-gpu"]
