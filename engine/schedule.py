"""The DDPM-Würstchen sampler as precomputed per-step coefficients, and the noise it consumes.

Everything a step needs is computed before the loop: the noise level each model evaluation sees, four
fp32 coefficients per step, and the noise itself (drawn from the caller's generator in diffusers'
order). The loop then runs without a host sync, so a whole step can later be captured in a CUDA graph.
The arithmetic reproduces diffusers' `DDPMWuerstchenScheduler.step` operation by operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.config import ScheduleConfig

Generator = torch.Generator | list[torch.Generator] | None


def timestep_grid(num_steps: int, timesteps: Sequence[float] | None = None) -> torch.Tensor:
    """The fp32 grid of noise levels, from 1 down to 0: `num_steps` evaluations need `num_steps + 1` points.

    Custom `timesteps` replace the evenly spaced grid (the model is evaluated at all but the last).
    """
    if timesteps is not None:
        return torch.tensor([float(t) for t in timesteps], dtype=torch.float32)
    return torch.linspace(1.0, 0.0, num_steps + 1)


def alpha_cumprod(t: torch.Tensor, config: ScheduleConfig) -> torch.Tensor:
    """ᾱ(t) of the cosine schedule with offset s, clamped to [1e-4, 0.9999]; fp32 for any dtype of t."""
    s = torch.tensor([config.s])
    initial = (torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2).to(t.device)  # on the CPU, as the reference
    s = s.to(t.device)
    if config.scaler > 1:
        t = 1 - (1 - t) ** config.scaler
    elif config.scaler < 1:
        t = t**config.scaler
    return (torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / initial).clamp(0.0001, 0.9999)


@dataclass(frozen=True)
class DenoisingSchedule:
    """Per-step inputs of the sampler, on the device.

    `ratios[i]` is the noise level the model sees at step i, in the model's dtype (fp16 rounds it, as the
    reference does). `coefficients[i]` holds, in fp32, √(1/α), 1 − α, √(1 − ᾱ(t)) and the noise scale
    √((1 − α)(1 − ᾱ(t_prev))/(1 − ᾱ(t))), the last zeroed when t_prev = 0. Here α = ᾱ(t)/ᾱ(t_prev), with
    ᾱ(t) taken at the rounded noise level and t_prev the exact next grid point.
    """

    ratios: torch.Tensor
    coefficients: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.ratios.shape[0]


def sampler_step(coefficients: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x at the next noise level, from x, the predicted noise eps, the step's noise and a row (4,) of
    `DenoisingSchedule.coefficients` for every row of x, or (B, 4) rows, one per row of x (rows at different
    steps of different schedules); computed in fp32, returned in x's dtype."""
    if coefficients.dim() == 2:  # each coefficient as (B, 1, 1, 1), to broadcast over its row of x
        coefficients = coefficients.T.reshape(4, -1, *[1] * (x.dim() - 1))
    sqrt_recip_alpha, one_minus_alpha, sqrt_one_minus_acp, noise_scale = coefficients
    mean = sqrt_recip_alpha * (x.float() - one_minus_alpha * eps.float() / sqrt_one_minus_acp)
    return (mean + noise_scale * noise.float()).to(x.dtype)


def make_schedule(
    grid: torch.Tensor, config: ScheduleConfig, dtype: torch.dtype, device: torch.device, fp32_ratios: bool = False
) -> DenoisingSchedule:
    """Precompute the sampler for a timestep grid (see `timestep_grid`) and a model dtype.

    The step after grid point i is always grid point i + 1. (diffusers looks it up by the nearest grid
    point to the rounded noise level, which is the same point for any grid coarser than fp16's rounding.)
    The noise levels the model sees are rounded to `dtype` as diffusers rounds them, or with `fp32_ratios`
    kept in fp32 (`Stages.fp32_timesteps`); the sampler's coefficients are diffusers' either way.
    """
    grid = grid.to(device)
    rounded = grid[:-1].to(dtype)
    ratios = grid[:-1].float() if fp32_ratios else rounded
    acp = alpha_cumprod(rounded, config)  # promoted to fp32 by s
    acp_prev = alpha_cumprod(grid[1:], config)
    alpha = acp / acp_prev
    noise_scale = ((1 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt() * (grid[1:] != 0).float()
    coefficients = torch.stack([(1.0 / alpha).sqrt(), 1 - alpha, (1 - acp).sqrt(), noise_scale], dim=1)
    return DenoisingSchedule(ratios=ratios, coefficients=coefficients)


def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One standard normal draw, made as diffusers' `randn_tensor` makes it, so a generator yields the
    same numbers here as there: on the generator's device (a CPU generator draws on the CPU for any
    target device), and one draw per batch element from its own generator when given a list."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        per_image = (1, *shape[1:])
        draws = [torch.randn(per_image, generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def draw_denoising_noise(
    shape: Sequence[int], num_steps: int, generator: Generator, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The initial latents and the noise of every step, drawn in the order the reference draws them.

    Noise is drawn even for the last step, where it is multiplied by zero, to keep the generator in
    step with the reference.
    """
    initial = draw_noise(shape, generator, device, dtype)
    return initial, tuple(draw_noise(shape, generator, device, dtype) for _ in range(num_steps))
