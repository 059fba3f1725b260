"""The one-pass Triton kernels (`row_kernels.py`) against the eager chains, in Triton's interpreter where
there is no GPU (conftest.py), and the tiny DiT running them in bf16 and fp8 (`chains.row_kernel_chains`)."""

from __future__ import annotations

import pytest
import torch

from liveavatar_core.engines.liveavatar import row_kernels
from liveavatar_core.engines.liveavatar.backends import apply_fp8
from liveavatar_core.engines.liveavatar.chains import (
    EAGER,
    FP8,
    FP8_MAX,
    Fp8Rows,
    compiled_chains,
    row_kernel_chains,
    use_chains,
)
from liveavatar_core.engines.liveavatar.checkpoint import random_init
from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.rope import RopeTable
from tests.engine_liveavatar.test_chains import _predict

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, G, S, DIM, FFN = 2, 3, 4, 80, 200  # rows not a power of two wide: the kernels mask the rest
HEADS = 4  # head_dim 20 for RoPE (10 channel pairs a head); 5 heads of 16 for the merge (masked to 8)


def _rand(g, *shape, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=g) * std).to(device=DEVICE, dtype=dtype)


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": _rand(g, B, G * S, DIM, dtype=torch.bfloat16, std=3),
        "x32": _rand(g, B, G * S, DIM, std=3),
        "y": _rand(g, B, G * S, DIM, dtype=torch.bfloat16),
        "shift": _rand(g, B, G, 1, DIM, std=0.3),
        "scale": _rand(g, B, G, 1, DIM, std=0.3),
        "hidden": _rand(g, B, G * S, FFN, dtype=torch.bfloat16, std=2),
    }
    t["x"][1, 4] *= 300  # one loud token: its own scale, the others' small values kept
    t["hidden"][0, 7] *= 300
    return t


def _assert_rows_close(got: Fp8Rows, want: Fp8Rows) -> None:
    """Within one e4m3 step of the eager chain's rows, give or take a bf16 rounding inside the chain (the
    norm, the GELU) that lands the other way: up to 2^-7 of the rounded value, so of the row's scale when
    it is the row's largest, and of the row's largest value where the shift cancels the norm."""
    assert got.values.dtype == FP8 and got.values.shape == want.values.shape
    assert got.scale.shape == want.scale.shape
    torch.testing.assert_close(got.scale, want.scale, rtol=2**-6, atol=0)
    a, b = (rows.values.float() * rows.scale for rows in (got, want))
    assert ((a - b).abs() <= b.abs() / 8 + want.scale * FP8_MAX * 2**-6).all()
    # rows whose scale moved quantise every value afresh: each within a step, on average far less
    assert (a - b).abs().mean() < 0.03 * b.abs().mean()


def test_modulated_norm_rows_are_the_chains():
    t = _inputs(0)
    want = EAGER.modulated_norm(t["x"], t["shift"], t["scale"], 1e-6, FP8)
    _assert_rows_close(row_kernels.modulated_norm_rows(t["x"], t["shift"], t["scale"], 1e-6), want)


def test_add_then_modulated_norm_rows_keep_the_stream_exact():
    t = _inputs(1)
    stream, want = EAGER.add_then_modulated_norm(t["x32"], t["y"], t["shift"], t["scale"], 1e-6, FP8)
    got_stream, got = row_kernels.add_then_modulated_norm_rows(t["x32"], t["y"], t["shift"], t["scale"], 1e-6)
    assert torch.equal(got_stream, stream)
    _assert_rows_close(got, want)


def test_residual_then_norm_rows_are_the_chain():
    t = _inputs(7)
    g = torch.Generator().manual_seed(7)
    weight, bias = (
        _rand(g, DIM, dtype=torch.bfloat16, std=0.3) + 1,
        _rand(g, DIM, dtype=torch.bfloat16, std=0.3),
    )
    args = (t["x"], t["y"], t["scale"], weight, bias, 1e-6)  # the scale as the gate: float32 per group
    stream, want = EAGER.residual_then_norm(*args, FP8)
    got_stream, got = row_kernels.residual_then_norm_rows(*args)
    # On a GPU x + y·gate is one FMA: within a float32 rounding of the product and of the sum.
    product = (t["y"].float().reshape(B, G, S, DIM) * t["scale"]).reshape(stream.shape)
    assert ((got_stream - stream).abs() <= 2**-23 * (product.abs() + stream.abs())).all()
    _assert_rows_close(got, want)


def test_gelu_rows_are_the_chains():
    t = _inputs(2)
    _assert_rows_close(row_kernels.gelu_rows(t["hidden"]), EAGER.gelu(t["hidden"], FP8))


def test_rms_rope_is_the_chain_within_a_bf16_rounding():
    g = torch.Generator().manual_seed(4)
    x = _rand(g, B, G * S, DIM, dtype=torch.bfloat16, std=3)
    x[0, 2] *= 300
    weight = _rand(g, DIM, dtype=torch.bfloat16)
    angles = torch.rand(G * S, DIM // HEADS // 2, generator=g) * 6.3  # every token, every pair its own
    table = RopeTable(angles.cos().to(DEVICE), angles.sin().to(DEVICE))
    want = EAGER.rms_rope(x, weight, 1e-6, table, HEADS)
    got = row_kernels.rms_rope(x, weight, 1e-6, table, HEADS)
    assert got.shape == want.shape == (B, G * S, HEADS, DIM // HEADS) and got.dtype == want.dtype
    # the norm's sum in another order can round a normalised value the other way: one bf16 step of it
    scale = want.float().abs().amax(dim=(-2, -1), keepdim=True)
    assert ((got.float() - want.float()).abs() <= 2**-7 * scale).all()
    assert (got == want).float().mean() > 0.9


def _attention_parts(seed: int, parts: int, heads: int = 5, head_dim: int = 16):
    """Outputs [B, H, N, D] of `parts` attention calls in cuDNN's layout ([B, N, H, D] in memory) and
    their log-sum-exps [B, H, N], some parts dominant and some negligible per query."""
    g = torch.Generator().manual_seed(seed)
    n = G * S
    outs = [_rand(g, B, n, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2) for _ in range(parts)]
    lses = [_rand(g, B, heads, n, std=4) for _ in range(parts)]
    outs[0][1, 2, 3] *= 300  # one loud query-head
    return outs, lses


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_attention_rows_are_the_chain(parts):
    outs, lses = _attention_parts(5, parts)
    want = EAGER.merge_attention(outs, lses, FP8)
    _assert_rows_close(row_kernels.merge_attention_rows(outs, lses), want)
    contiguous = [o.contiguous() for o in outs]  # another layout, the same rows
    _assert_rows_close(row_kernels.merge_attention_rows(contiguous, lses), want)


def test_row_kernel_chains_send_what_no_kernel_answers_to_the_compiled_chains():
    rows, compiled = row_kernel_chains(), compiled_chains()
    assert rows.name == "rows" and rows.gated_residual is compiled.gated_residual
    t = _inputs(3)
    got = rows.modulated_norm(t["x"], t["shift"], t["scale"], 1e-6, torch.bfloat16)
    assert torch.equal(got, compiled.modulated_norm(t["x"], t["shift"], t["scale"], 1e-6, torch.bfloat16))
    outs, lses = _attention_parts(6, 4)  # four parts: no kernel for those
    assert torch.equal(
        rows.merge_attention(outs, lses, FP8).values, compiled.merge_attention(outs, lses, FP8).values
    )
    float_q, bf16_weight = t["x"].float(), t["x"][0, 0]
    assert not row_kernels.KERNELS["rms_rope"][1](
        float_q, bf16_weight, 1e-6, None, 4
    )  # a float32 q: compiled


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_dit_on_row_kernels_predicts_what_the_eager_dit_predicts(fp8):
    dit = random_init(DiTConfig.tiny(), DEVICE, torch.bfloat16, seed=0)
    if fp8:
        apply_fp8(dit)
    eager = _predict(dit)
    use_chains(dit, row_kernel_chains())
    error = (_predict(dit) - eager).norm() / eager.norm()
    assert error < (0.05 if fp8 else 0.02), error  # as the compiled chains (test_chains.py)
