"""The one-pass Triton kernels (`row_kernels.py`) against the eager chains, in Triton's interpreter where
there is no GPU (conftest.py), and the tiny fp8 DiT running them (`chains.row_kernel_chains`)."""

from __future__ import annotations

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
from tests.engine_liveavatar.test_chains import _predict

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, G, S, DIM, FFN = 2, 3, 5, 80, 200  # rows not a power of two wide: the kernels mask the rest


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


def test_gelu_rows_are_the_chains():
    t = _inputs(2)
    _assert_rows_close(row_kernels.gelu_rows(t["hidden"]), EAGER.gelu(t["hidden"], FP8))


def test_row_kernel_chains_leave_everything_but_fp8_rows_to_the_compiled_chains():
    rows, compiled = row_kernel_chains(), compiled_chains()
    assert (
        rows.name == "rows"
        and rows.rms_rope is compiled.rms_rope
        and rows.gated_residual is compiled.gated_residual
    )
    t = _inputs(3)
    got = rows.modulated_norm(t["x"], t["shift"], t["scale"], 1e-6, torch.bfloat16)
    assert torch.equal(got, compiled.modulated_norm(t["x"], t["shift"], t["scale"], 1e-6, torch.bfloat16))


def test_an_fp8_dit_on_row_kernels_predicts_what_the_eager_dit_predicts():
    dit = random_init(DiTConfig.tiny(), DEVICE, torch.bfloat16, seed=0)
    apply_fp8(dit)
    eager = _predict(dit)
    use_chains(dit, row_kernel_chains())
    error = (_predict(dit) - eager).norm() / eager.norm()
    assert error < 0.05, error  # as the compiled chains (0.018 measured in test_chains.py)
