"""The Python API's contract beyond parity: shapes, bad input, prompts, output types, per-image work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine import WuerstchenError, preset
from engine.device import resolve_device
from engine.runtime import ModelSource, resolve
from engine.shapes import image_shapes
from engine.text import PromptTruncatedWarning

FAST = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2)


@pytest.mark.parametrize("size, prior, decoder", [(128, 3, 32), (512, 12, 128), (1024, 24, 256), (1152, 27, 288),
                                                  (1536, 36, 384), (2048, 48, 512)])
def test_shapes_follow_diffusers_formulas(size, prior, decoder):
    shapes = image_shapes(preset("wuerstchen-v2"), size, 1024, batch=3)
    assert shapes.prior_latent == (3, 16, prior, 24)
    assert shapes.decoder_latent == (3, 4, decoder, 256)
    assert shapes.image == (3, 3, size, 1024)
    assert shapes.decoder_levels[0] == (decoder // 2, 128) and shapes.decoder_levels[3] == (decoder // 16, 16)


def test_every_size_on_the_grid_comes_out_at_that_size():
    config = preset("wuerstchen-v2")
    for size in range(config.sizes.min, config.sizes.max + 1, config.sizes.step):
        shapes = image_shapes(config, size, size)
        assert shapes.image[2] == size and shapes.prior_latent[2] == math.ceil(size / 42.67)


@pytest.mark.parametrize("field, value, message", [
    ("height", 1000, "height=1000 is off the model's size grid: expected a multiple of 128 from 128 to 4096"),
    ("width", 8192, "width=8192 is outside the sizes served here: expected a multiple of 128 from 128 to 4096"),
    ("height", 512.0, "height=512.0: expected an integer, a multiple of 128 from 128 to 4096"),
    ("prior_num_inference_steps", 0, "prior_num_inference_steps=0: expected a positive integer"),
    ("num_inference_steps", -3, "num_inference_steps=-3: expected a positive integer"),
    ("num_images_per_prompt", 0, "num_images_per_prompt=0: expected a positive integer"),
    ("prior_timesteps", [1.0, 0.0, 0.5],
     "prior_timesteps=[1.0, 0.0, 0.5]: expected a decreasing list of two or more noise levels in [0, 1]"),
    ("decoder_timesteps", [2.0, 0.0], "decoder_timesteps=[2.0, 0.0]: expected a decreasing list"),
    ("prior_guidance_scale", float("nan"), "prior_guidance_scale=nan: expected a finite number"),
    ("output_type", "jpg", "output_type='jpg': expected one of pil, np, pt, latent"),
    ("prompt", 3, "prompt=3: expected a string or a non-empty list of strings"),
    ("prompt", [], "prompt=[]: expected a string or a non-empty list of strings"),
    ("negative_prompt", ["a", "b"], "negative_prompt has 2 entries for 1 prompts: expected one per prompt"),
    ("generator", [torch.Generator()] * 3, "generator is a list of 3: expected one per image, 1"),
    ("generator", 42, "generator=42: expected a torch.Generator or a list of them"),
])
def test_bad_input_is_one_line_naming_the_field(tiny_pipeline, field, value, message):
    kwargs = dict(prompt="a cat", **FAST, generator=torch.Generator().manual_seed(0))
    kwargs[field] = value
    with pytest.raises(WuerstchenError) as excinfo:
        tiny_pipeline(**kwargs)
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


def test_a_bad_request_does_not_break_the_next_good_one(tiny_pipeline):
    first = tiny_pipeline("a cat", **FAST, generator=torch.Generator().manual_seed(0), output_type="np").images
    for bad in (dict(height=100), dict(num_images_per_prompt=0), dict(prior_timesteps=[0.0, 1.0])):
        with pytest.raises(WuerstchenError):
            tiny_pipeline("a cat", **{**FAST, **bad}, generator=torch.Generator().manual_seed(0))
    again = tiny_pipeline("a cat", **FAST, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.array_equal(first, again)


def test_device_and_dtype_choices():
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    tiny = ModelSource.from_preset("tiny")
    assert resolve(tiny, device="cpu").dtype == torch.float32
    assert resolve(tiny, device="cpu", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(WuerstchenError, match=r"^dtype='int8' is not supported: expected auto, fp32, fp16 or bf16"):
        resolve(tiny, device="cpu", dtype="int8")
    with pytest.raises(WuerstchenError, match=r"^device='gpu' is not a device: expected auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(WuerstchenError, match=r"^device='cuda:1': no CUDA GPU is available on this machine"):
            resolve_device("cuda:1")


def test_long_prompt_is_truncated_with_a_warning_and_empty_prompt_is_valid(tiny_pipeline):
    long_prompt = "a very long prompt about many things " * 5
    with pytest.warns(PromptTruncatedWarning, match="longer than CLIP's 77 tokens"):
        states = tiny_pipeline.stages.prior_text([long_prompt])
    assert states.shape == (1, 77, 32)
    with pytest.warns(PromptTruncatedWarning):
        assert torch.equal(states, tiny_pipeline.stages.prior_text([long_prompt + " and more words at the end"]))
    images = tiny_pipeline("", **FAST, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and isinstance(images[0], Image.Image)


def test_output_types(tiny_pipeline):
    def run(output_type):
        return tiny_pipeline("a cat", **FAST, num_images_per_prompt=2, generator=torch.Generator().manual_seed(1),
                             output_type=output_type).images

    pt, array, pil, latent = run("pt"), run("np"), run("pil"), run("latent")
    assert pt.shape == (2, 3, 128, 128) and 0 <= pt.min() and pt.max() <= 1
    assert array.shape == (2, 128, 128, 3) and array.dtype == np.float32
    assert np.array_equal(array, pt.permute(0, 2, 3, 1).numpy())
    assert [im.size for im in pil] == [(128, 128)] * 2
    assert np.array_equal(np.asarray(pil[1]), (array[1] * 255).round().astype(np.uint8))
    assert latent.shape == (2, 4, 32, 32)


def test_step_invariant_work_runs_once_per_request(tiny_pipeline, monkeypatch):
    """The decoder's antialiased resize of the image embedding (one per injected level) and the text
    projections happen once per call, however many steps run."""
    calls = {"interpolate": 0, "prior.condition": 0, "decoder.condition": 0}
    interpolate = torch.nn.functional.interpolate

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.nn.functional, "interpolate", counting("interpolate", interpolate))
    stages = tiny_pipeline.stages
    monkeypatch.setattr(stages.prior, "condition", counting("prior.condition", stages.prior.condition))
    monkeypatch.setattr(stages.decoder, "condition", counting("decoder.condition", stages.decoder.condition))
    tiny_pipeline("a cat", height=128, width=128, prior_num_inference_steps=5, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0))
    injected_levels = sum(preset("tiny").decoder.inject_effnet)
    assert calls == {"interpolate": injected_levels, "prior.condition": 1, "decoder.condition": 1}
