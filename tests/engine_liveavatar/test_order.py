"""The two denoising orders and exact continuation across cuts, on the tiny engine (CPU, float32).

Three clips (144 frames) so the rolling sink rolls: clip 0 runs on the portrait's sink, clips 1 and 2
on clip 0's first latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.handoff import Handoff
from liveavatar_core.engines.liveavatar.order import SweepOrder, sweep_state_bytes
from liveavatar_core.timebase import SAMPLES_PER_FRAME

from .test_engine import SIZE, engine, local_features, request, run, speech  # noqa: F401

CLIP = 48 * SAMPLES_PER_FRAME


@pytest.fixture
def latents(engine, monkeypatch):  # noqa: F811
    """Every latent block the decoder is given, in order (float32 copies)."""
    seen: list[torch.Tensor] = []
    make = engine.parts.vae.decoder_stream

    def decoder_stream():
        stream = make()
        decode = stream.decode_uint8

        def spy(x):
            seen.append(x.detach().float().clone())
            return decode(x)

        stream.decode_uint8 = spy
        return stream

    monkeypatch.setattr(engine.parts.vae, "decoder_stream", decoder_stream)
    return seen


def frame_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b, strict=True))


def latent_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_sweep_groups_split_at_the_rolling_sink_and_at_the_group_size():
    frames = [3 * b for b in range(10)]  # 10 blocks from frame 0; clip 1 starts at latent frame 12
    assert SweepOrder(64).groups(frames, 12) == [[0, 3, 6, 9], [12, 15, 18, 21, 24, 27]]
    assert SweepOrder(4).groups(frames, 12) == [[0, 3, 6, 9], [12, 15, 18, 21], [24, 27]]
    assert SweepOrder(3).groups(frames[5:], 12) == [[15, 18, 21], [24, 27]]  # a continuing segment


def test_a_full_size_sweep_of_64_blocks_holds_about_2_gb_of_hidden_states():
    held = sweep_state_bytes(DiTConfig(), 88, 48, 64, 2)  # 704x384 in bf16
    assert 64 * 3 * 1056 * 5120 * 2 < held < 2.4e9


def test_sweep_order_equals_block_order_over_three_clips(engine, local_features, latents):  # noqa: F811
    audio = speech(144, seed=11)
    by_block, block_result = run(engine, request(audio))
    block_latents = list(latents)
    latents.clear()
    by_sweep, sweep_result = run(engine, request(audio, config=SIZE.replace(order="sweep")))
    assert (block_result.details["order"], sweep_result.details["order"]) == ("block", "sweep")
    assert len(by_sweep) == 144 and len(latents) == len(block_latents) == 12
    assert latent_diff(latents, block_latents) <= 1e-5
    assert frame_diff(by_sweep, by_block) <= 1
    # Rolled: clip 1 attends to clip 0's first latent, not the portrait's (the barrier mattered).
    assert Handoff.from_bytes(sweep_result.handoff).sink_latent is not None


def test_small_sweep_groups_give_the_same_latents(engine, local_features, latents):  # noqa: F811
    audio = speech(144, seed=12)
    run(engine, request(audio))
    block_latents = list(latents)
    latents.clear()
    run(engine, request(audio, config=SIZE.replace(order="sweep", sweep_blocks=5)))
    assert latent_diff(latents, block_latents) <= 1e-5


def test_two_segments_with_kept_state_equal_one_long_segment(engine, local_features, latents):  # noqa: F811
    """A 2-clip segment then a 1-clip one (sweep order) on the engine that keeps the rings: exactly the
    3-clip segment. The replay could not do this: the first segment is longer than the ring."""
    audio = speech(144, seed=13)
    whole, _ = run(engine, request(audio))
    whole_latents = list(latents)
    latents.clear()
    first, one = run(engine, request(audio[: 2 * CLIP]))
    payload = Handoff.from_bytes(one.handoff).to_bytes()  # through bytes, as through the work store
    second, two = run(engine, request(audio[2 * CLIP :], handoff=payload, config=SIZE.replace(order="sweep")))
    assert [one.details["continuation"], two.details["continuation"]] == ["independent", "kept state"]
    assert two.details["replayed_blocks"] == 0 and two.details["timings"]["prepare"] >= 0
    assert latent_diff(latents, whole_latents) <= 1e-5
    assert frame_diff(first + second, whole) <= 1
    # The handoff after a kept-state segment still carries the replay window (the fallback's input).
    assert len(Handoff.from_bytes(two.handoff).replay) == 4


def test_replay_is_the_fallback_when_the_kept_state_is_elsewhere(engine, local_features):  # noqa: F811
    audio = speech(144, seed=14)
    whole, _ = run(engine, request(audio))
    first, one = run(engine, request(audio[: 2 * CLIP]))
    run(engine, request(speech(12, seed=2)))  # the worker went on to another lecture: its state is gone
    second, two = run(engine, request(audio[2 * CLIP :], handoff=one.handoff))
    assert two.details["continuation"] == "replay" and two.details["replayed_blocks"] == 4
    assert len(second) == 48
    # Approximate: the replayed blocks miss what they attended to before the window.
    assert 0 < frame_diff(first + second, whole)
    # The same handoff used twice: the rings it named were consumed by the first use. This time the
    # replay (and the segment) run in sweep order: the same frames as the block-order replay.
    by_sweep, again = run(
        engine, request(audio[2 * CLIP :], handoff=one.handoff, config=SIZE.replace(order="sweep"))
    )
    assert again.details["continuation"] == "replay" and again.details["order"] == "sweep"
    assert frame_diff(by_sweep, second) <= 1
