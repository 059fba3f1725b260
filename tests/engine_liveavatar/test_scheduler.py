"""The distilled flow-matching Euler schedule: the reference's timesteps, float32 steps."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from liveavatar_core.engines.liveavatar.scheduler import FlowMatchSchedule


def reference_timesteps(steps: int, shift: float = 3.0) -> np.ndarray:
    """Derived by hand from the reference's setup (float64): shift once for sigma_min, once per step."""
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    sigma_max, sigma_min = shifted(1.0), shifted(1 / 1000)  # __init__: sigmas of t = 1000 .. 1, shifted
    t = np.linspace(sigma_max * 1000, sigma_min * 1000, steps)  # set_timesteps: linspace, shifted again
    return shifted(t / 1000) * 1000


def test_four_steps_are_the_reference_schedule():
    schedule = FlowMatchSchedule.distilled(4)
    expected = reference_timesteps(4)
    assert np.allclose(expected, [1000.0, 857.69, 602.15, 8.93], atol=0.01)
    assert np.allclose(schedule.timesteps.numpy(), expected, rtol=1e-6)
    assert schedule.timesteps.dtype == torch.float32
    assert torch.allclose(schedule.sigmas, torch.cat([schedule.timesteps / 1000, torch.zeros(1)]))


def test_three_steps_are_what_the_reference_runs_with_sample_steps_3():
    schedule = FlowMatchSchedule.distilled(3)
    assert np.allclose(schedule.timesteps.numpy(), reference_timesteps(3), rtol=1e-6)
    assert np.allclose(schedule.timesteps.numpy(), [1000.0, 751.1, 8.93], atol=0.05)


def test_explicit_timesteps_e_g_a_subset_of_the_distilled_ones():
    four = FlowMatchSchedule.distilled(4).timesteps
    subset = FlowMatchSchedule.distilled(3, timesteps=[four[0], four[2], four[3]])
    assert torch.equal(subset.timesteps, four[[0, 2, 3]])
    assert subset.sigmas[-1].item() == 0.0
    with pytest.raises(ValueError, match="descending"):
        FlowMatchSchedule.distilled(2, timesteps=[500.0, 900.0])
    with pytest.raises(ValueError, match="expected 3 values"):
        FlowMatchSchedule.distilled(3, timesteps=[900.0, 500.0])


def test_step_equals_diffusers_euler_step_in_float32():
    schedule = FlowMatchSchedule.distilled(4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 16, 3, 4, 6, generator=g)
    ours = theirs = sample
    for i, t in enumerate(scheduler.timesteps):
        velocity = torch.randn(sample.shape, generator=g)
        theirs = scheduler.step(velocity, t, theirs, return_dict=False)[0]
        ours = schedule.step(i, velocity, ours)
        assert torch.equal(ours, theirs)


def test_step_upcasts_and_reaches_the_clean_sample():
    schedule = FlowMatchSchedule.distilled(4)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    x = noise.to(torch.bfloat16)  # sigma_0 = 1: pure noise
    for i in range(schedule.steps):
        x = schedule.step(i, (noise - x0).to(torch.bfloat16), x)  # an exact velocity predictor
        assert x.dtype == torch.float32
    assert (x - x0).abs().max().item() < 0.02  # bf16 inputs; the update itself ran in float32
    with pytest.raises(IndexError):
        schedule.step(4, x, x)
