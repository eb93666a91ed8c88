"""One stage at a time: `run_prior` against diffusers' `WuerstchenPriorPipeline`, `run_decoder` against its
`WuerstchenDecoderPipeline`, the combined call as the two in sequence, and the command line writing and
reading image embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import save_folders
from PIL import Image

from benchmarks.reference import random_reference
from engine import WuerstchenError, WuerstchenPipeline, preset
from engine.cli import main
from engine.text import byte_level_tokenizer

CASES = {
    "guided, two images per prompt": dict(prompt="a cat", negative_prompt="dog", guidance_scale=4.0,
                                          num_images_per_prompt=2),
    "diffusers' default guidance, two prompts": dict(prompt=["a cat", "a red boat"], num_images_per_prompt=1),
    "unguided, custom timesteps": dict(prompt="a cat", guidance_scale=1.0, timesteps=[1.0, 0.6, 0.2, 0.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_prior_makes_diffusers_prior_embeddings(tiny_pipeline, prior_pipeline, case):
    kwargs = dict(height=256, width=128, num_inference_steps=3, **CASES[case])
    expected = prior_pipeline(**kwargs, generator=torch.Generator().manual_seed(3)).image_embeddings
    actual = tiny_pipeline.run_prior(**kwargs, generator=torch.Generator().manual_seed(3)).image_embeddings
    assert actual.shape == expected.shape and actual.shape[1:] == (16, 6, 3)
    # Guidance 8 magnifies float32 rounding eightfold and the embeddings are latents × 42: relative to their scale.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    as_array = tiny_pipeline.run_prior(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np")
    assert isinstance(as_array.image_embeddings, np.ndarray)
    assert np.array_equal(as_array.image_embeddings, actual.numpy())


@pytest.mark.parametrize("guidance, output_type", [(0.0, "np"), (3.0, "np"), (0.0, "pil")])
def test_run_decoder_makes_diffusers_decoder_images(tiny_pipeline, decoder_pipeline, guidance, output_type):
    embeddings = tiny_pipeline.run_prior("a cat", height=128, width=256, num_inference_steps=2,
                                         num_images_per_prompt=2, generator=torch.Generator().manual_seed(1))
    kwargs = dict(prompt="a cat", negative_prompt="dog" if guidance > 1 else None, num_inference_steps=3,
                  guidance_scale=guidance, output_type=output_type)
    expected = decoder_pipeline(embeddings.image_embeddings, **kwargs,
                                generator=torch.Generator().manual_seed(5)).images
    actual = tiny_pipeline.run_decoder(embeddings.image_embeddings, **kwargs,
                                       generator=torch.Generator().manual_seed(5)).images
    if output_type == "pil":
        assert [image.size for image in actual] == [image.size for image in expected] == [(256, 128)] * 2
        actual, expected = (np.stack([np.asarray(image, dtype=int) for image in images]) for images in (
            actual, expected))
        assert np.abs(actual - expected).max() <= 1
    else:
        assert actual.shape == expected.shape == (2, 128, 256, 3)
        assert np.abs(actual - expected).max() <= 2e-3


def test_the_combined_call_is_the_prior_then_the_decoder(tiny_pipeline):
    kwargs = dict(height=128, width=128, num_images_per_prompt=2)
    combined = tiny_pipeline(["a cat", "a red boat"], "dog", prior_num_inference_steps=3, prior_guidance_scale=4.0,
                             num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(9),
                             **kwargs)
    generator = torch.Generator().manual_seed(9)
    prior = tiny_pipeline.run_prior(["a cat", "a red boat"], num_inference_steps=3, guidance_scale=4.0,
                                    negative_prompt="dog", generator=generator, **kwargs)
    images = tiny_pipeline.run_decoder(prior.image_embeddings, ["a cat", "a cat", "a red boat", "a red boat"],
                                       num_inference_steps=2, generator=generator, output_type="pt").images
    assert torch.equal(images, combined.images)
    assert set(combined.timings) == {"text", "prior", "decoder", "vqgan"}


def test_each_embedding_decodes_into_several_images(tiny_pipeline):
    embeddings = tiny_pipeline.run_prior("a cat", height=128, width=128, num_inference_steps=2,
                                         num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    images = tiny_pipeline.run_decoder(embeddings.image_embeddings, "a cat", num_inference_steps=2,
                                       num_images_per_prompt=3, output_type="np").images
    assert images.shape == (6, 128, 128, 3)


@pytest.mark.parametrize("embeddings, kwargs, message", [
    (torch.zeros(1, 8, 3, 3), {}, r"image_embeddings has shape \(1, 8, 3, 3\): expected \(batch, 16, h, w\)"),
    (torch.zeros(1, 16, 5, 5), {}, r"image_embeddings of size 5×5 make no image on the model's size grid"),
    (torch.zeros(1, 16, 3), {}, r"image_embeddings has shape \(1, 16, 3\)"),
    ("embeddings", {}, r"image_embeddings of type str: expected a float tensor"),
    (torch.zeros(2, 16, 3, 3), dict(prompt=["a", "b", "c"]), r"prompt has 3 entries for 2 image embeddings"),
    (torch.zeros(2, 16, 3, 3), dict(num_images_per_prompt=0), r"num_images_per_prompt=0: expected a positive"),
    (torch.zeros(2, 16, 3, 3), dict(output_type="jpg"), r"output_type='jpg': expected one of pil, np, pt, latent"),
])
def test_bad_decoder_input_is_one_line(tiny_pipeline, embeddings, kwargs, message):
    with pytest.raises(WuerstchenError, match=rf"^{message}"):
        tiny_pipeline.run_decoder(embeddings, **{"prompt": "x", **kwargs})


def test_prior_output_types_are_those_of_diffusers_prior(tiny_pipeline):
    with pytest.raises(WuerstchenError, match=r"^output_type='pil': expected one of pt, np$"):
        tiny_pipeline.run_prior("x", height=128, width=128, num_inference_steps=1, output_type="pil")


def test_a_decoder_that_injects_no_embedding_takes_a_prior_of_another_width(tmp_path):
    """diffusers loads and runs a prior whose c_in differs from the decoder's effnet_embd when the decoder
    injects nothing; so does the engine, and both make the same images."""
    from benchmarks.reference import diffusers_pipeline

    tiny = preset("tiny")
    config = dataclasses.replace(tiny, decoder=dataclasses.replace(
        tiny.decoder, effnet_embd=8, inject_effnet=(False,) * 4))
    modules = random_reference(config, seed=4)
    pipe = WuerstchenPipeline.from_pretrained(*save_folders(modules, tmp_path), device="cpu", dtype=torch.float32)
    assert (pipe.config.prior.c_in, pipe.config.decoder.effnet_embd) == (16, 8)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=128, width=256, prior_num_inference_steps=2, num_inference_steps=2, output_type="np")
    expected = diffusers_pipeline(modules, byte_level_tokenizer())("a cat", **kwargs,
                                                                  generator=torch.Generator().manual_seed(2)).images
    actual = pipe("a cat", **kwargs, generator=torch.Generator().manual_seed(2)).images
    assert np.abs(actual - expected).max() <= 2e-3
    decoded = pipe.run_decoder(torch.zeros(1, 16, 3, 6), "a cat", num_inference_steps=2, output_type="np").images
    assert decoded.shape == (1, 128, 256, 3)


# --- the command line: embeddings written by one run, decoded by another ------------------------------------

FAST = ["--height", "128", "--width", "256", "--prior-steps", "2", "--decoder-steps", "2"]


def test_embeddings_saved_then_decoded_make_the_image_of_one_run(tmp_path, capsys):
    whole, split, saved = tmp_path / "whole.png", tmp_path / "split.png", tmp_path / "cat.safetensors"
    assert main(["generate", "a cat", "--out", str(whole), "--seed", "7", "--num-images", "2", *FAST]) == 0
    assert main(["generate", "a cat", "--save-embeddings", str(saved), "--seed", "7", "--num-images", "2",
                 *FAST]) == 0
    assert f"wrote {saved} (image embeddings (2, 16, 3, 6), seeds from 7)" in capsys.readouterr().out
    assert not list(tmp_path.glob("split*"))  # without --out, the prior alone
    assert main(["generate", "a cat", "--embeddings", str(saved), "--out", str(split), "--decoder-steps", "2"]) == 0
    for index in range(2):
        first, second = (Image.open(tmp_path / f"{name}-{index}.png") for name in ("whole", "split"))
        assert first.tobytes() == second.tobytes()
    assert '"embeddings": "cat.safetensors"' in Image.open(tmp_path / "split-0.png").text["settings"]


@pytest.mark.parametrize("extra, message", [
    (["--height", "256"], "--height does not apply with --embeddings: the prior has already run"),
    (["--prior-steps", "3"], "--prior-steps does not apply with --embeddings"),
])
def test_prior_flags_do_not_apply_to_saved_embeddings(tmp_path, capsys, extra, message):
    saved = tmp_path / "e.safetensors"
    assert main(["generate", "x", "--save-embeddings", str(saved), "--seed", "1", *FAST]) == 0
    capsys.readouterr()
    assert main(["generate", "x", "--embeddings", str(saved), "--out", str(tmp_path / "x.png"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not a safetensors file", "is not a readable safetensors file"),
    (None, "not a file of image embeddings written by `wuerstchen generate --save-embeddings`"),
])
def test_a_file_that_is_not_embeddings_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "e.safetensors"
    if content is None:
        from safetensors.torch import save_file

        save_file({"weights": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    assert main(["generate", "x", "--embeddings", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_without_out_or_embeddings_to_save_there_is_nothing_to_write(tmp_path, capsys):
    assert main(["generate", "x", *FAST]) == 2
    assert "--out is missing: name the PNG to write" in capsys.readouterr().err
