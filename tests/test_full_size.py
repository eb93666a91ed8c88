"""One step of each full-size stage (random weights of the `wuerstchen-v2` architecture) against diffusers.

Slow: about 3 minutes and 12 GB on a 2-core CPU. Run with `pytest --runslow tests/test_full_size.py`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference import diffusers_module, engine_stage, perturb_, tame_head_
from engine import preset
from engine.models.decoder import resize_image_embeddings
from engine.shapes import image_shapes

V2 = preset("wuerstchen-v2")
SHAPES = image_shapes(V2, 512, 768, batch=1)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _pair(stage: str, seed: int):
    """diffusers' full-size module of `stage`, perturbed, and ours holding the same weights."""
    reference = perturb_(diffusers_module(stage, V2), seed)
    tame_head_({stage: reference})
    return reference, engine_stage(stage, reference, V2)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_prior_step():
    reference, ours = _pair("prior", seed=1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPES.prior_latent[1:], generator=generator)
    r, text = torch.tensor([0.95, 0.4]), torch.randn(2, 77, 1280, generator=generator)
    expected = reference(x, r=r, c=text)
    actual = ours(x, r, ours.condition(text))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_full_size_decoder_step():
    reference, ours = _pair("decoder", seed=2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES.decoder_latent, generator=generator)
    effnet = torch.randn(SHAPES.prior_latent, generator=generator) * 40
    r, text = torch.tensor([0.6]), torch.randn(1, 77, 1024, generator=generator)
    expected = reference(x, r=r, effnet=effnet, clip=text)
    actual = ours(x, r, *ours.condition(resize_image_embeddings(effnet, V2.decoder, SHAPES.decoder_levels), text))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_full_size_vqgan_decode():
    reference, ours = _pair("vqgan", seed=3)
    latents = torch.randn(SHAPES.decoder_latent, generator=torch.Generator().manual_seed(0)) * 2
    expected = reference.decode(V2.vqgan.scale_factor * latents).sample.clamp(0, 1)
    actual = ours(latents)
    assert actual.shape == SHAPES.image and expected.std() > 0.05
    assert (actual - expected).abs().max() < 1e-4
