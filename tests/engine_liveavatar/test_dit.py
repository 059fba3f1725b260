"""The causal DiT on tiny random weights: shapes, determinism, RoPE positions, audio, ring caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar_core.engines.liveavatar.checkpoint import random_init
from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.dit import SelfContext
from liveavatar_core.engines.liveavatar.kv_cache import CondKVCache, RingKVCache, contiguous_runs
from liveavatar_core.engines.liveavatar.layers import attend, attend_parts
from liveavatar_core.engines.liveavatar.rope import (
    axis_positions,
    cond_positions,
    motion_positions,
    reference_frame_for_block,
    rope_table,
)

H, W = 16, 8  # latent size: 8x4 tokens per frame (fsl 32), sink 2.5·fsl = 80 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_init(DiTConfig.tiny(), "cpu", torch.float32, seed=0)


def _inputs(cfg: DiTConfig, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        text=[torch.randn(6, cfg.text_dim, generator=g) for _ in range(batch)],
        reference=torch.randn(batch, 16, 1, H, W, generator=g),
        motion=torch.randn(batch, 16, 19, H, W, generator=g),
        audio=torch.randn(batch, cfg.audio_layers, cfg.audio_dim, 12 * 6, generator=g),
        noisy=[torch.randn(batch, 16, 3, H, W, generator=g) for _ in range(6)],
    )


def _sink(model, inp, batch: int = 1):
    cfg = model.config
    text = model.embed_text(inp["text"])
    cond = CondKVCache.allocate(cfg, batch, H, W, device="cpu", dtype=torch.float32)
    model.forward_sink(inp["reference"], inp["motion"], text, cond)
    return text, cond


def _ring(cfg, batch: int = 1, frames: int | None = None):
    return RingKVCache.allocate(cfg, batch, H, W, device="cpu", dtype=torch.float32, capacity_frames=frames)


def _block(model, inp, text, cond, ring, blk: int, t: float = 900.0, **kw):
    audio = model.encode_audio(inp["audio"][..., 12 * blk : 12 * blk + 12])
    return model.forward_block(
        inp["noisy"][blk], t, frame_index=3 * blk, sink_distance=7 + blk, text=text, audio=audio,
        cond_cache=cond, ring_cache=ring, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("batch", [1, 2])
def test_sink_and_block_shapes(model, batch):
    cfg = model.config
    inp = _inputs(cfg, seed=1, batch=batch)
    text, cond = _sink(model, inp, batch)
    fsl = cfg.tokens_per_frame(H, W)
    assert text.k.shape == (cfg.num_layers, batch, cfg.text_len, cfg.num_heads, cfg.head_dim)
    assert cond.length == fsl * 5 // 2 == cond.k.shape[2]
    ring = _ring(cfg, batch)
    out = _block(model, inp, text, cond, ring, 0)
    assert out.shape == (batch, cfg.out_dim, 3, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert ring.slot_frames[:4] == [0, 1, 2, -1]


def test_forwards_are_deterministic(model):
    inp = _inputs(model.config, seed=2)
    runs = []
    for _ in range(2):
        text, cond = _sink(model, inp)
        ring = _ring(model.config)
        runs.append(torch.stack([_block(model, inp, text, cond, ring, b) for b in range(2)]))
    assert torch.equal(runs[0], runs[1])


def test_ring_wraps_after_twelve_frames(model):
    cfg = model.config
    inp = _inputs(cfg, seed=3)
    text, cond = _sink(model, inp)
    ring = _ring(cfg)
    fsl = cfg.tokens_per_frame(H, W)
    for blk in range(4):
        _block(model, inp, text, cond, ring, blk)
    assert ring.slot_frames == list(range(12))
    keys_before = ring.k.clone()
    assert ring.context_ranges(12, 3) == ([], [range(3 * fsl, 12 * fsl)])  # frames 3..11; 0..2 evicted
    _block(model, inp, text, cond, ring, 4)
    assert ring.slot_frames == [12, 13, 14] + list(range(3, 12))
    assert torch.equal(ring.k[:, :, 3 * fsl :], keys_before[:, :, 3 * fsl :])  # untouched slots
    assert not torch.equal(ring.k[:, :, : 3 * fsl], keys_before[:, :, : 3 * fsl])
    with pytest.raises(ValueError, match="does not fit"):
        ring.first_slot(10, 3)


def test_block_with_wrapped_cache_equals_explicit_context(model):
    """Block 4 with a 12-frame ring (slots wrapped) == the same layers attending to an explicitly
    concatenated context: frames 3..11's K/V (recorded from an unwrapped 24-frame ring), itself, sink."""
    cfg = model.config
    inp = _inputs(cfg, seed=4)
    text, cond = _sink(model, inp)
    small, big = _ring(cfg), _ring(cfg, frames=24)
    for blk in range(4):
        torch.testing.assert_close(
            _block(model, inp, text, cond, small, blk), _block(model, inp, text, cond, big, blk)
        )
    actual = _block(model, inp, text, cond, small, 4)

    fsl = cfg.tokens_per_frame(H, W)
    audio = model.encode_audio(inp["audio"][..., 48:60])
    prepared = model.prepare_block(inp["noisy"][4], 900.0, frame_index=12, sink_distance=11)
    x = prepared.x
    for i, block in enumerate(model.blocks):
        past_k = big.k[i, :, 3 * fsl : 12 * fsl]  # frames 3..11, one concatenated piece
        past_v = big.v[i, :, 3 * fsl : 12 * fsl]
        context = SelfContext([past_k], [past_v], cond.k[i], cond.v[i], prepared.cond_rope)
        x, _, _ = block(x, prepared.e0, prepared.rope, text.k[i], text.v[i], context, audio)
    torch.testing.assert_close(actual, model.finish_block(x, prepared), rtol=1e-5, atol=1e-5)


def test_write_cache_false_leaves_the_ring_alone(model):
    cfg = model.config
    inp = _inputs(cfg, seed=5)
    text, cond = _sink(model, inp)
    ring = _ring(cfg)
    _block(model, inp, text, cond, ring, 0)
    k_before, frames_before = ring.k.clone(), list(ring.slot_frames)
    dry = _block(model, inp, text, cond, ring, 1, write_cache=False)
    assert torch.equal(ring.k, k_before) and ring.slot_frames == frames_before
    torch.testing.assert_close(_block(model, inp, text, cond, ring, 1), dry)


def test_step_caches_are_independent(model):
    """Timestep forcing: each step's ring holds K/V computed at that step's timestep."""
    cfg = model.config
    inp = _inputs(cfg, seed=6)
    text, cond = _sink(model, inp)
    rings = [_ring(cfg), _ring(cfg)]
    for i, t in enumerate((1000.0, 500.0)):
        _block(model, inp, text, cond, rings[i], 0, t=t)
    assert not torch.equal(rings[0].k, rings[1].k)
    alone = _ring(cfg)
    _block(model, inp, text, cond, alone, 0, t=500.0)
    assert torch.equal(alone.k, rings[1].k)


def test_sink_distance_moves_only_the_reference(model):
    cfg = model.config
    h, w = H // 2, W // 2
    near = cond_positions(cfg, reference_frame_for_block(cfg, 90, 4), h, w)
    far = cond_positions(cfg, reference_frame_for_block(cfg, 90, 30), h, w)
    fsl = h * w
    assert (near[:fsl, 0] == 94).all() and (far[:fsl, 0] == 120).all()
    assert np.array_equal(near[fsl:], far[fsl:])
    assert reference_frame_for_block(cfg, 0, 4) == 30  # never before frame 30
    out = [
        model.forward_block(**kw)
        for kw in [
            dict(
                noisy=torch.ones(1, 16, 3, H, W),
                timestep=500.0,
                frame_index=90,
                sink_distance=d,
                text=model.embed_text([torch.ones(3, cfg.text_dim)]),
                audio=model.encode_audio(torch.ones(1, cfg.audio_layers, cfg.audio_dim, 12)),
                cond_cache=_sink(model, _inputs(cfg, seed=7))[1],
                ring_cache=_ring(cfg, frames=96),
            )  # fmt: skip
            for d in (4, 30)
        ]
    ]
    assert not torch.allclose(out[0], out[1])


def test_official_rope_positions():
    cfg = DiTConfig()
    assert axis_positions(0, 24, 12).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert axis_positions(-19, 16, 4).tolist() == [-19, -14, -9, -4]
    pos = motion_positions(cfg, 44, 24)  # 704x384: 44x24 tokens per frame
    assert len(pos) == 1056 + 264 + 264
    assert set(pos[:1056, 0]) == {-1} and set(pos[1056:1320, 0]) == {-3}
    assert sorted(set(pos[1320:, 0])) == [-19, -14, -9, -4]
    assert sorted(set(pos[1320:, 1])) == [0, 4, 8, 12, 17, 21, 25, 30, 34, 38, 43]  # 44 rows, 4:1
    table = rope_table(cfg, pos)
    assert table.cos.shape == (1584, 64)
    assert torch.equal(table.cos, table.cos.half().float())  # the official table is float16


def test_audio_encoder_is_causal_and_block_sized(model):
    cfg = model.config
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(1, cfg.audio_layers, cfg.audio_dim, 40, generator=g)
    full = model.audio_encoder(feats)
    assert full.tokens.shape == (1, 10, cfg.num_audio_token + 1, cfg.dim)
    assert full.global_.shape == (1, 10, cfg.dim)
    changed = feats.clone()
    changed[..., 24:] += 1.0  # video frames >= 24 feed latent steps >= 6
    later = model.audio_encoder(changed)
    torch.testing.assert_close(later.tokens[:, :6], full.tokens[:, :6])
    assert not torch.allclose(later.tokens[:, 7:], full.tokens[:, 7:])
    block = model.encode_audio(feats[..., :12])
    assert block.tokens.shape[1] == 3 and torch.equal(block.tokens[:, :, -1], full.tokens[:, :3, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_parts_equals_attention_over_their_concatenation(dtype):
    """Three key sets of different lengths (a ring run, the block's own keys, the sink), attended apart
    and merged by log-sum-exp, against one attention over the concatenated keys; peaked scores."""
    g = torch.Generator().manual_seed(3)

    def rand(n, scale=1.0):
        return (torch.randn(1, n, 4, 16, generator=g) * scale).to(dtype)

    q = rand(24, 3.0)
    parts = [(rand(n, 3.0), rand(n)) for n in (40, 24, 17)]
    merged = attend_parts(q, parts)
    whole = attend(q, torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1))
    assert merged.shape == whole.shape == (1, 24, 4, 16) and merged.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(merged.float(), whole.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(attend_parts(q, parts[:1]), attend(q, *parts[0]))  # one part: one plain call


def test_contiguous_runs_join_a_full_window_into_one_view():
    assert contiguous_runs([range(0, 4)], [range(4, 8), range(12, 16)]) == [range(0, 8), range(12, 16)]
    assert contiguous_runs([], [range(8, 12)], [range(0, 8)]) == [range(0, 12)]
    assert contiguous_runs([], []) == []
