"""Every stage and the whole pipeline against diffusers, fp32 on the CPU, with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import DEFAULT_PRIOR_TIMESTEPS
from engine.models.decoder import resize_image_embeddings
from engine.shapes import image_shapes

ATOL = 2e-3  # on [0, 1] images: the project's bar for "the same image"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _outputs_and_heads(reference, ours, head: str, run_reference, run_ours):
    """Both models' outputs and the outputs of their `head` module (the last layer before the noise
    parametrisation), captured with forward hooks."""
    heads = {}
    hooks = [getattr(model, head).register_forward_hook(lambda m, i, o, k=key: heads.__setitem__(k, o))
             for key, model in (("reference", reference), ("ours", ours))]
    expected, actual = run_reference(), run_ours()
    for hook in hooks:
        hook.remove()
    return expected, actual, heads["reference"], heads["ours"]


def _assert_matches(expected, actual, expected_head, actual_head, denominator):
    """Heads equal to fp32 rounding; outputs equal where the parametrisation's denominator, which a random
    model can bring near zero, does not amplify that rounding by more than 100×."""
    assert expected_head.abs().mean() > 0.01  # the head is not at its zero init
    assert _max_diff(actual_head, expected_head) < 1e-5 * expected_head.abs().max().item()
    keep = denominator > 0.01
    assert keep.float().mean() > 0.9
    assert _max_diff(actual[keep], expected[keep]) < 1e-4 * expected[keep].abs().max().item()


@torch.no_grad()
def test_prior_step_matches_diffusers(tiny_pipeline, reference_modules):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 9, generator=generator)
    r = torch.tensor([0.9, 0.31])
    text = torch.randn(2, 77, 32, generator=generator)
    reference, ours = reference_modules["prior"], tiny_pipeline.stages.prior
    expected, actual, expected_head, actual_head = _outputs_and_heads(
        reference, ours, "out", lambda: reference(x, r=r, c=text), lambda: ours(x, r, ours.condition(text)))
    b = expected_head.chunk(2, dim=1)[1]
    _assert_matches(expected, actual, expected_head, actual_head, (1 - b).abs())


@torch.no_grad()
@pytest.mark.parametrize("height, width", [(128, 128), (256, 384)])
def test_decoder_step_matches_diffusers(tiny_pipeline, reference_modules, height, width):
    shapes = image_shapes(tiny_pipeline.config, height, width, batch=2)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shapes.decoder_latent, generator=generator)
    effnet = torch.randn(shapes.prior_latent, generator=generator) * 20
    text = torch.randn(2, 77, 24, generator=generator)
    r = torch.tensor([0.75, 0.2])
    reference, ours = reference_modules["decoder"], tiny_pipeline.stages.decoder
    expected, actual, expected_head, actual_head = _outputs_and_heads(
        reference, ours, "clf", lambda: reference(x, r=r, effnet=effnet, clip=text),
        lambda: ours(x, r, ours.condition(resize_image_embeddings(effnet, ours.config, shapes.decoder_levels), text)))
    b = expected_head.chunk(2, dim=1)[1].sigmoid() * (1 - 2e-3) + 1e-3
    _assert_matches(expected, actual, expected_head, actual_head, b)


@torch.no_grad()
def test_vqgan_decode_matches_diffusers(tiny_pipeline, reference_modules):
    latents = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(3)) * 2
    vqgan = reference_modules["vqgan"]
    expected = vqgan.decode(vqgan.config.scale_factor * latents).sample.clamp(0, 1)
    actual = tiny_pipeline.stages.vqgan(latents)
    assert actual.shape == (2, 3, 96, 160)
    assert 0.05 < expected.std() and _max_diff(actual, expected) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_text_encoders_match_diffusers(tiny_pipeline, reference_pipeline, stage):
    prompts = ["a photo of a cat", "", "Ünïcode, punctuation; and   spaces!"]
    if stage == "prior":
        expected, _ = reference_pipeline.prior_pipe.encode_prompt("cpu", 1, False, prompt=prompts)
        actual = tiny_pipeline.stages.prior_text(prompts)
    else:
        expected, _ = reference_pipeline.decoder_pipe.encode_prompt(prompts, "cpu", 1, False)
        actual = tiny_pipeline.stages.decoder_text(prompts)
    width = getattr(tiny_pipeline.config, f"{stage}_text").hidden_size
    assert actual.shape == expected.shape == (3, 77, width)
    assert _max_diff(actual, expected) < 1e-5


PIPELINE_CASES = {
    "non-square, negative prompt, 2 per prompt, custom prior timesteps, decoder guidance": dict(
        prompt="a photo of a cat", negative_prompt="blurry", height=256, width=384, num_images_per_prompt=2,
        prior_timesteps=[1.0, 0.8, 0.45, 0.2, 0.0], prior_guidance_scale=4.0,
        num_inference_steps=3, decoder_guidance_scale=2.5,
    ),
    "square, published prior timesteps": dict(
        prompt="an oil painting of a harbour", height=128, width=128,
        prior_timesteps=DEFAULT_PRIOR_TIMESTEPS, prior_guidance_scale=4.0, num_inference_steps=4,
    ),
    "no guidance at all, evenly spaced steps": dict(
        prompt="", height=384, width=128, prior_num_inference_steps=3, prior_guidance_scale=1.0,
        num_inference_steps=2,
    ),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_matches_diffusers(tiny_pipeline, reference_pipeline, case):
    kwargs = PIPELINE_CASES[case]
    expected = reference_pipeline(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    actual = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert actual.shape == expected.shape
    assert expected.std() > 0.02  # an image, not a constant
    assert np.abs(actual - expected).max() <= ATOL


def test_pil_output_matches_diffusers(tiny_pipeline, reference_pipeline):
    kwargs = dict(prompt="a red bicycle", height=128, width=256, prior_num_inference_steps=2, num_inference_steps=2)
    expected = reference_pipeline(**kwargs, generator=torch.Generator().manual_seed(3)).images
    actual = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert [im.size for im in actual] == [im.size for im in expected] == [(256, 128)]
    diff = np.abs(np.asarray(actual[0], dtype=int) - np.asarray(expected[0], dtype=int))
    assert diff.max() <= 1  # rounding to uint8 may flip a level where the float images differ by ~1e-6


def test_prompt_list_works_and_each_image_follows_its_own_prompt(tiny_pipeline, reference_pipeline):
    """diffusers' combined pipeline crashes on a list of prompts (its decoder repeats the text states once
    per image per prompt); here every image sees its own prompt and equals the single-prompt result."""
    kwargs = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, output_type="np")
    with pytest.raises(RuntimeError):
        reference_pipeline(prompt=["a cat", "a dog"], generator=torch.Generator().manual_seed(5), **kwargs)

    both = tiny_pipeline(prompt=["a cat", "a dog"], negative_prompt=["ugly", "blurry"],
                         generator=[torch.Generator().manual_seed(s) for s in (11, 12)], **kwargs).images
    for i, (prompt, negative, seed) in enumerate([("a cat", "ugly", 11), ("a dog", "blurry", 12)]):
        alone = tiny_pipeline(prompt=prompt, negative_prompt=negative,
                              generator=[torch.Generator().manual_seed(seed)], **kwargs).images
        assert np.abs(both[i] - alone[0]).max() < 1e-4
    assert np.abs(both[0] - both[1]).max() > 0.01
