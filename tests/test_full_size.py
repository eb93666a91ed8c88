"""One step of each full-size stage (random weights of the `wuerstchen-v2` architecture) against diffusers.

Slow: about 3 minutes and 12 GB on a 2-core CPU. Run with `pytest --runslow tests/test_full_size.py`.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import perturb_, tame_head_

from engine import preset
from engine.models import Decoder, Prior, VQGANDecoder
from engine.models.vqgan import ENCODER_PREFIXES
from engine.shapes import image_shapes
from engine.weights import build_with_weights, translate_state_dict

V2 = preset("wuerstchen-v2")
SHAPES = image_shapes(V2, 512, 768, batch=1)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _ours(stage: str, model_class, config, reference: torch.nn.Module) -> torch.nn.Module:
    """Our model holding the reference's weights (the VQGAN's encoder half left out, as the loader does)."""
    state = {k: v for k, v in reference.state_dict().items()
             if stage != "vqgan" or not k.startswith(ENCODER_PREFIXES)}
    return build_with_weights(model_class, config, translate_state_dict(stage, state))


@pytest.mark.slow
@torch.no_grad()
def test_full_size_prior_step():
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    reference = perturb_(WuerstchenPrior(**vars(V2.prior)), seed=1, scale=0.3)
    tame_head_(reference.out[1])
    ours = _ours("prior", Prior, V2.prior, reference)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPES.prior_latent[1:], generator=generator)
    r, text = torch.tensor([0.95, 0.4]), torch.randn(2, 77, 1280, generator=generator)
    expected = reference(x, r=r, c=text)
    actual = ours(x, r, ours.condition(text))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4
    del reference, ours
    gc.collect()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_decoder_step():
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    reference = perturb_(WuerstchenDiffNeXt(), seed=2, scale=0.3)
    tame_head_(reference.clf[1])
    ours = _ours("decoder", Decoder, V2.decoder, reference)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES.decoder_latent, generator=generator)
    effnet = torch.randn(SHAPES.prior_latent, generator=generator) * 40
    r, text = torch.tensor([0.6]), torch.randn(1, 77, 1024, generator=generator)
    expected = reference(x, r=r, effnet=effnet, clip=text)
    actual = ours(x, r, *ours.condition(effnet, text, SHAPES.decoder_levels))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4
    del reference, ours
    gc.collect()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_vqgan_decode():
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    reference = perturb_(PaellaVQModel(**vars(V2.vqgan)), seed=3, scale=0.3)
    ours = _ours("vqgan", VQGANDecoder, V2.vqgan, reference)
    latents = torch.randn(SHAPES.decoder_latent, generator=torch.Generator().manual_seed(0)) * 2
    expected = reference.decode(V2.vqgan.scale_factor * latents).sample.clamp(0, 1)
    actual = ours(latents)
    assert actual.shape == SHAPES.image and expected.std() > 0.05
    assert (actual - expected).abs().max() < 1e-4
