"""The precomputed sampler against diffusers' DDPMWuerstchenScheduler, step by step, bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from engine import DEFAULT_PRIOR_TIMESTEPS
from engine.config import ScheduleConfig
from engine.schedule import draw_denoising_noise, draw_noise, make_schedule, sampler_step, timestep_grid

CPU = torch.device("cpu")


def test_default_prior_timesteps_are_the_published_29_step_schedule():
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

    assert DEFAULT_PRIOR_TIMESTEPS == tuple(float(t) for t in DEFAULT_STAGE_C_TIMESTEPS)
    assert len(DEFAULT_PRIOR_TIMESTEPS) == 30
    assert DEFAULT_PRIOR_TIMESTEPS[0] == 1.0 and DEFAULT_PRIOR_TIMESTEPS[-1] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "timesteps, config",
    [
        (None, ScheduleConfig()),
        (DEFAULT_PRIOR_TIMESTEPS, ScheduleConfig()),
        ([1.0, 0.6, 0.1], ScheduleConfig()),  # does not end at 0: the last step adds noise too
        (None, ScheduleConfig(scaler=2.0, s=0.01)),
        (None, ScheduleConfig(scaler=0.5)),
    ],
)
def test_schedule_matches_diffusers_step_by_step(dtype, timesteps, config):
    reference = DDPMWuerstchenScheduler(scaler=config.scaler, s=config.s)
    if timesteps is None:
        reference.set_timesteps(9)
        grid = timestep_grid(9)
    else:
        reference.set_timesteps(timesteps=list(timesteps))
        grid = timestep_grid(len(timesteps) - 1, timesteps)
    schedule = make_schedule(grid, config, dtype, CPU)
    assert schedule.num_steps == len(reference.timesteps) - 1

    inputs = torch.Generator().manual_seed(0)
    reference_noise, our_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 7, generator=inputs).to(dtype)
    for i, t in enumerate(reference.timesteps[:-1]):
        ratio = t.expand(2).to(dtype)
        assert torch.equal(schedule.ratios[i].expand(2), ratio)
        eps = torch.randn(x.shape, generator=inputs).to(dtype)
        expected = reference.step(eps, ratio, x, generator=reference_noise).prev_sample
        actual = sampler_step(schedule.coefficients[i], x, eps, draw_noise(x.shape, our_noise, CPU, dtype))
        assert actual.dtype == dtype
        assert torch.equal(actual, expected), f"step {i}: max diff {(actual - expected).abs().max()}"
        x = expected


def test_noise_on_the_last_step_is_drawn_but_not_added():
    schedule = make_schedule(timestep_grid(3), ScheduleConfig(), torch.float32, CPU)
    assert schedule.coefficients[-1, 3] == 0 and (schedule.coefficients[:-1, 3] > 0).all()
    initial, noise = draw_denoising_noise((1, 4, 2, 2), 3, torch.Generator().manual_seed(0), CPU, torch.float32)
    assert len(noise) == 3  # the generator advances as far as the reference's does


def test_draw_noise_follows_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    for generator_seeds in ([4], [4, 5, 6]):
        reference = randn_tensor((len(generator_seeds) if len(generator_seeds) > 1 else 3, 4, 3, 5),
                                 generator=[torch.Generator().manual_seed(s) for s in generator_seeds],
                                 device=CPU, dtype=torch.float16)
        ours = draw_noise(reference.shape, [torch.Generator().manual_seed(s) for s in generator_seeds],
                          CPU, torch.float16)
        assert torch.equal(ours, reference)
