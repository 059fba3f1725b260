"""The element-wise chains compiled by torch.compile (inductor, here on CPU) against the eager ones."""

from __future__ import annotations

import pytest
import torch

from liveavatar_core.engines.liveavatar.backends import apply_compile, apply_fp8, remove_compile
from liveavatar_core.engines.liveavatar.chains import EAGER, FP8, Fp8Rows, compiled_chains
from liveavatar_core.engines.liveavatar.checkpoint import random_init
from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.kv_cache import CondKVCache, RingKVCache
from liveavatar_core.engines.liveavatar.rope import RopeTable

BF16 = torch.bfloat16
B, G, S, DIM, HEADS = 1, 3, 8, 64, 4


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    angles = rand(G * S, DIM // HEADS // 2) * 3
    return {
        "x": rand(B, G * S, DIM, dtype=BF16),
        "x32": rand(B, G * S, DIM),
        "y": rand(B, G * S, DIM, dtype=BF16),
        "mod": rand(B, G, 1, DIM) * 0.1,
        "weight": 1 + rand(DIM, dtype=BF16) * 0.1,
        "bias": rand(DIM, dtype=BF16) * 0.1,
        "rope": RopeTable(torch.cos(angles), torch.sin(angles)),
        "heads": rand(B, G * S, HEADS, DIM // HEADS, dtype=BF16),
        "cond": rand(G, DIM, dtype=BF16),
        "outs": [rand(B, HEADS, G * S, DIM // HEADS, dtype=BF16) for _ in range(3)],
        "lses": [rand(B, HEADS, G * S) * 4 for _ in range(3)],
    }


def _calls(chains, t: dict) -> dict[str, object]:
    return {
        "modulated_norm": chains.modulated_norm(t["x"], t["mod"], t["mod"] * 2, 1e-6, BF16),
        "modulated_norm float32 stream": chains.modulated_norm(t["x32"], t["mod"], t["mod"], 1e-6, BF16),
        "gated_residual": chains.gated_residual(t["x32"], t["y"], t["mod"], BF16),
        "residual_then_norm": chains.residual_then_norm(t["x"], t["y"], t["mod"], t["weight"], t["bias"], 1e-6, BF16),
        "add_then_modulated_norm": chains.add_then_modulated_norm(t["x32"], t["y"], t["mod"], t["mod"], 1e-6, BF16),
        "rms_norm": chains.rms_norm(t["x"], t["weight"], 1e-6),
        "rms_rope": chains.rms_rope(t["x"], t["weight"], 1e-6, t["rope"], HEADS),
        "apply_rope": chains.apply_rope(t["heads"], t["rope"], BF16),
        "ada_norm": chains.ada_norm(t["x"].reshape(G, S, DIM), t["cond"], t["cond"], 1e-6, BF16),
        "quantise_rows": chains.quantise_rows(t["x"]),
        "merge_attention": chains.merge_attention(t["outs"], t["lses"], BF16),
        "gelu": chains.gelu(t["y"], BF16),
        # Stored as an fp8 linear takes it: e4m3 rows and their scales.
        "modulated_norm fp8": chains.modulated_norm(t["x"], t["mod"], t["mod"] * 2, 1e-6, FP8),
        "residual_then_norm fp8": chains.residual_then_norm(t["x"], t["y"], t["mod"], t["weight"], t["bias"], 1e-6, FP8),
        "add_then_modulated_norm fp8": chains.add_then_modulated_norm(t["x32"], t["y"], t["mod"], t["mod"], 1e-6, FP8),
        "ada_norm fp8": chains.ada_norm(t["x"].reshape(G, S, DIM), t["cond"], t["cond"], 1e-6, FP8),
        "merge_attention fp8": chains.merge_attention(t["outs"], t["lses"], FP8),
        "gelu fp8": chains.gelu(t["y"], FP8),
    }  # fmt: skip


def _outputs(value) -> list[torch.Tensor | Fp8Rows]:
    if isinstance(value, tuple) and not isinstance(value, Fp8Rows):
        return [t for part in value for t in _outputs(part)]
    return [value]


def test_every_compiled_chain_matches_the_eager_one_within_a_rounding():
    inputs = _inputs()
    eager, compiled = _calls(EAGER, inputs), _calls(compiled_chains(), inputs)
    assert eager.keys() == compiled.keys()
    for name in eager:
        for want, got in zip(_outputs(eager[name]), _outputs(compiled[name]), strict=True):
            if isinstance(want, Fp8Rows):
                assert got.values.dtype == FP8 and got.values.shape == want.values.shape, name
                assert got.scale.shape == want.scale.shape, name
                # The scales may differ by a bf16 rounding of the row's largest value; a value by one
                # e4m3 step (1/8 of it), or near zero by the rounding of an input (1/900 of the row's max).
                torch.testing.assert_close(got.scale, want.scale, rtol=2**-7, atol=0, msg=name)
                got, want = (rows.values.float() * rows.scale for rows in (got, want))
                torch.testing.assert_close(
                    got, want, rtol=0.13, atol=0.5 * float(want.abs().max()) / 448, msg=name
                )
                continue
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if want.dtype == BF16:  # a bf16 intermediate (the norm) may round the other way
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-5, msg=name)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("chains", [EAGER, compiled_chains()], ids=["eager", "compiled"])
def test_a_chain_stores_for_an_fp8_linear_rows_that_dequantise_to_its_result(chains):
    t = _inputs(seed=3)
    t["x"][0, 5] *= 300  # one loud token: a per-tensor scale would flush the others' small values
    cases = {
        "modulated_norm": lambda dtype: chains.modulated_norm(t["x"], t["mod"], t["mod"] * 2, 1e-6, dtype),
        "residual_then_norm": lambda dtype: chains.residual_then_norm(
            t["x"], t["y"], t["mod"], t["weight"], t["bias"], 1e-6, dtype
        )[1],
        "gelu": lambda dtype: chains.gelu(t["x"], dtype),
        "merge_attention": lambda dtype: chains.merge_attention(t["outs"], t["lses"], dtype),
    }
    for name, call in cases.items():
        want, rows = call(torch.float32).flatten(2), call(FP8)
        assert isinstance(rows, Fp8Rows) and rows.values.dtype == FP8, name
        assert rows.values.shape == want.shape and rows.scale.shape == (*want.shape[:-1], 1), name
        torch.testing.assert_close(
            rows.scale, want.abs().amax(-1, keepdim=True) / 448, rtol=0.02, atol=0, msg=name
        )
        got = rows.values.float() * rows.scale
        # e4m3 keeps 3 mantissa bits: within 1/16 of the value, or 2^-9 of the row's scale near zero;
        # bf16 roundings inside the chain add a little.
        bound = want.abs() / 16 + rows.scale * 2**-9 + want.abs() * 2**-7 + 1e-6
        assert ((got - want).abs() <= bound).all(), name


def _predict(dit: torch.nn.Module) -> torch.Tensor:
    """One sink forward and two blocks (the second with the first in its ring), bf16 weights."""
    cfg = dit.config
    g = torch.Generator().manual_seed(1)
    latent, motion = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 19, 8, 8, generator=g)
    text = torch.randn(6, cfg.text_dim, generator=g).to(BF16)
    context = dit.embed_text([text])
    cond = CondKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=BF16)
    ring = RingKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=BF16)
    dit.forward_sink(latent, motion, context, cond)
    outputs = []
    for index in (0, 3):
        noisy = torch.randn(1, 16, 3, 8, 8, generator=g)
        audio = dit.encode_audio(torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12, generator=g))
        outputs.append(
            dit.forward_block(
                noisy,
                857.7,
                frame_index=index,
                sink_distance=5,
                text=context,
                audio=audio,
                cond_cache=cond,
                ring_cache=ring,
            )  # fmt: skip
        )
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_compiled_dit_predicts_what_the_eager_dit_predicts(fp8):
    dit = random_init(DiTConfig.tiny(), "cpu", BF16, seed=0)
    if fp8:
        apply_fp8(dit)
    eager = _predict(dit)
    apply_compile(dit)
    chains = {m.chains for m in dit.modules() if hasattr(type(m), "chains")}
    assert chains == {compiled_chains()}  # blocks, attentions, audio norms and fp8 linears alike
    compiled = _predict(dit)
    remove_compile(dit)
    assert torch.equal(_predict(dit), eager)  # back to eager: the same bits again
    error = (compiled - eager).norm() / eager.norm()
    # An activation that quantises to the neighbouring e4m3 value (1/16 to 1/8 away) moves the
    # prediction more than a bf16 rounding does. Measured here: 0.005 bf16, 0.018 fp8.
    assert error < (0.05 if fp8 else 0.02), error
