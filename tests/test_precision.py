"""fp16 and bf16 on the CPU against fp32: every stage within a bounded relative error, nothing overflows."""

from __future__ import annotations

import pytest
import torch

from engine import WuerstchenPipeline
from engine.models.blocks import GlobalResponseNorm, LayerNorm2d
from engine.models.decoder import resize_image_embeddings
from engine.shapes import image_shapes

# Relative L2 error against fp32 that each stage must stay under.
BOUNDS = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def low_precision(request, tiny_folders):
    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_every_stage_stays_close_to_fp32(low_precision, tiny_pipeline):
    dtype, bound = low_precision.dtype, BOUNDS[low_precision.dtype]
    shapes = image_shapes(tiny_pipeline.config, 256, 384, batch=2)
    generator = torch.Generator().manual_seed(0)
    prompts = ["a watercolour fox", ""]
    errors = {}
    low, reference = low_precision.stages, tiny_pipeline.stages

    errors["prior text"] = _relative_error(low.prior_text(prompts), reference.prior_text(prompts))
    errors["decoder text"] = _relative_error(low.decoder_text(prompts), reference.decoder_text(prompts))

    x = torch.randn(shapes.prior_latent, generator=generator)
    # At r = 0 every dtype holds r·10000 exactly. Elsewhere fp16 and bf16 round the noise level the model
    # sees (bf16 to multiples of 32–64 of r·10000), exactly as the reference does: see test_timestep_embedding.
    r = torch.zeros(2)
    text = reference.prior_text(prompts)
    expected = reference.prior(x, r, reference.prior.condition(text))
    actual = low.prior(x.to(dtype), r.to(dtype), low.prior.condition(text.to(dtype)))
    errors["prior step"] = _relative_error(actual, expected)

    x = torch.randn(shapes.decoder_latent, generator=generator)
    effnet = torch.randn(shapes.prior_latent, generator=generator) * 40  # image embeddings reach ±200
    text = reference.decoder_text(prompts)
    pyramid = resize_image_embeddings(effnet, tiny_pipeline.config.decoder, shapes.decoder_levels)
    expected = reference.decoder(x, r, reference.decoder.condition(pyramid, text))
    pyramid = resize_image_embeddings(effnet.to(dtype), tiny_pipeline.config.decoder, shapes.decoder_levels)
    actual = low.decoder(x.to(dtype), r.to(dtype), low.decoder.condition(pyramid, text.to(dtype)))
    errors["decoder step"] = _relative_error(actual, expected)

    latents = torch.randn(shapes.decoder_latent, generator=generator) * 2
    errors["vqgan decode"] = _relative_error(low.vqgan(latents.to(dtype)), reference.vqgan(latents))

    assert all(error < bound for error in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_timestep_embedding_rounds_the_noise_level_as_diffusers_does(dtype):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    from engine.models.blocks import timestep_embedding

    reference = WuerstchenPrior(c_in=2, c=8, c_cond=4, c_r=64, depth=1, nhead=2)
    r = torch.linspace(0, 1, 57).to(dtype)
    assert torch.equal(timestep_embedding(r, 64), reference.gen_r_embedding(r))


def test_whole_pipeline_gives_finite_images(low_precision):
    images = low_precision("a lighthouse at dusk", negative_prompt="fog", height=128, width=256,
                           prior_num_inference_steps=4, num_inference_steps=3, decoder_guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.dtype == low_precision.dtype and images.shape == (1, 3, 128, 256)
    assert torch.isfinite(images).all() and images.float().std() > 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_accumulate_in_fp32_so_large_activations_do_not_overflow(dtype):
    """A sum of squares over a 128×128 map of values ~300 is ~1.5e9: far past fp16's 65504."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 128, 24, generator=generator) * 300
    grn = GlobalResponseNorm(24)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(1, 1, 1, 24, generator=generator))
        grn.beta.copy_(torch.randn(1, 1, 1, 24, generator=generator))
    expected = grn(x)
    actual = grn.to(dtype)(x.to(dtype))
    assert torch.isfinite(actual).all()
    assert _relative_error(actual, expected) < BOUNDS[dtype]

    x = torch.randn(2, 40, 16, 16, generator=generator) * 3000  # variance ~1e7 per pixel
    expected = LayerNorm2d()(x)
    actual = LayerNorm2d()(x.to(dtype))
    assert torch.isfinite(actual).all() and _relative_error(actual, expected) < BOUNDS[dtype]


def test_bf16_steps_take_the_noise_level_unrounded(tiny_pipeline, low_precision):
    """In bf16 the PyTorch stages take r in fp32 (`Stages.fp32_timesteps`): their step is then closer to the
    fp32 step than with r rounded to bf16 as diffusers rounds it, most of all where r·10000 is large."""
    if low_precision.dtype != torch.bfloat16:
        assert not low_precision.stages.fp32_timesteps
        return
    assert low_precision.stages.fp32_timesteps and not tiny_pipeline.stages.fp32_timesteps
    shapes = image_shapes(tiny_pipeline.config, 256, 256, batch=4)
    x = torch.randn(shapes.prior_latent, generator=torch.Generator().manual_seed(1))
    r = torch.tensor([0.9876, 0.7313, 0.5021, 0.2468])
    reference, low = tiny_pipeline.stages, low_precision.stages
    text = reference.prior_text(["a watercolour fox"] * 4)
    expected = reference.prior(x, r, reference.prior.condition(text))
    conditioning = low.prior.condition(text.bfloat16())
    unrounded = _relative_error(low.prior(x.bfloat16(), r, conditioning), expected)
    rounded = _relative_error(low.prior(x.bfloat16(), r.bfloat16(), conditioning), expected)
    assert unrounded < rounded / 2, (unrounded, rounded)
