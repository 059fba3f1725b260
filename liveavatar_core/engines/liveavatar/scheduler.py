"""Flow-matching Euler schedule of the distilled LiveAvatar generator (4 steps, or 3 on the ladder).

The reference builds diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)` and
calls `set_timesteps(steps)`. That class shifts its sigmas once in `__init__` (so its sigma_min is the
already shifted 0.003/1.002) and once more in `set_timesteps`, which is why the 4-step timesteps are
[1000, 857.7, 602.2, 8.9] rather than a plain shifted linspace ending near 1. We take the timesteps and
sigmas from that very class, so the numbers are the reference's by construction, and do the Euler update
ourselves: stateless (the step index is an argument, not hidden scheduler state) and in float32.

`steps=3` (the ladder's quality rung) is what the reference would run with `--sample_steps 3`: the same
two-fold shift over a 3-point linspace, timesteps [1000, 751.1, 8.9]. A caller that prefers a subset of
the 4 distilled timesteps (the noise levels the generator was trained on) passes `timesteps=` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Timesteps for the DiT and the sigmas of the Euler updates between them.

    timesteps: float32 [steps], what the DiT's time embedding receives (sigma * 1000).
    sigmas:    float32 [steps + 1], the noise level before each step; the last is 0 (clean).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    @classmethod
    def distilled(
        cls,
        steps: int = 4,
        *,
        shift: float = SHIFT,
        timesteps: Sequence[float] | None = None,
    ) -> FlowMatchSchedule:
        """The reference's schedule for `steps` steps, or the given `timesteps` (descending, in (0, 1000])."""
        if timesteps is not None:
            values = [float(t) for t in timesteps]
            if len(values) != steps:
                raise ValueError(f"timesteps: expected {steps} values for {steps} steps, got {len(values)}")
            if (
                any(b >= a for a, b in zip(values, values[1:], strict=False))
                or not 0 < values[-1] <= values[0] <= 1000
            ):
                raise ValueError(f"timesteps: expected strictly descending values in (0, 1000], got {values}")
            t = torch.tensor(values, dtype=torch.float32)
            sigmas = torch.cat([t / NUM_TRAIN_TIMESTEPS, torch.zeros(1)])
            return cls(timesteps=t, sigmas=sigmas)
        if steps < 1:
            raise ValueError(f"steps: expected at least 1, got {steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        scheduler.set_timesteps(steps)
        return cls(
            timesteps=scheduler.timesteps.to(torch.float32).clone(),
            sigmas=scheduler.sigmas.to(torch.float32).clone(),
        )

    def step(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from sigma[index] to sigma[index + 1], in float32.

        velocity: the DiT's prediction (noise - x0) for `sample`, any float dtype, same shape.
        Returns the float32 sample at the next noise level (x0 after the last step).
        """
        if not 0 <= index < self.steps:
            raise IndexError(f"step index {index} outside 0..{self.steps - 1}")
        dt = float(self.sigmas[index + 1] - self.sigmas[index])
        return sample.to(torch.float32) + dt * velocity.to(torch.float32)


__all__ = ["FlowMatchSchedule", "NUM_TRAIN_TIMESTEPS", "SHIFT"]
