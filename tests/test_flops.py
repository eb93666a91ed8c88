"""The closed-form FLOP counts of benchmarks/flops.py equal what FlopCounterMode counts on the real modules.

Every module is built on the meta device: it has no weights and no data, so the full-size models cost
milliseconds. Meta tensors also make F.scaled_dot_product_attention fall back to its math form (two
bmm), which FlopCounterMode counts. On CPU tensors the fused CPU kernel would run instead, and
FlopCounterMode has no formula for it, so the attention would go uncounted.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel

from benchmarks.flops import (
    decoder_condition_flops,
    decoder_step_flops,
    prior_condition_flops,
    prior_step_flops,
    request_flops,
    text_encoder_flops,
    vqgan_decode_flops,
)
from engine import DEFAULT_PRIOR_TIMESTEPS, preset
from engine.models import Decoder, Prior, VQGANDecoder
from engine.models.decoder import injected_levels
from engine.shapes import TEXT_TOKENS, image_shapes
from engine.text import ClipStates

SIZES = {"tiny": [(128, 256), (384, 128)], "wuerstchen-v2": [(1024, 1024), (768, 1280)]}
CASES = [(name, height, width) for name, sizes in SIZES.items() for height, width in sizes]
BATCHES = [1, 2]


@functools.cache
def meta_modules(name: str) -> dict[str, torch.nn.Module]:
    """The engine's modules of a preset on the meta device, built once per preset."""
    config = preset(name)
    with torch.device("meta"):
        return {
            "prior": Prior(config.prior),
            "decoder": Decoder(config.decoder),
            "vqgan": VQGANDecoder(config.vqgan),
            "prior_text": ClipStates(CLIPTextModel(config.prior_text.to_transformers())),
            "decoder_text": ClipStates(CLIPTextModel(config.decoder_text.to_transformers())),
        }


def counted(function, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("stage", ["prior_text", "decoder_text"])
@pytest.mark.parametrize("name", list(SIZES))
def test_text_encoder_flops(name, stage, batch):
    config, encoder = getattr(preset(name), stage), meta_modules(name)[stage]  # built outside the fake mode
    # On plain meta tensors transformers fails. Its mask code calls .item() on the attention mask to see
    # whether the causal mask may be skipped. The ids and mask are therefore FakeTensors on meta. transformers
    # treats a FakeTensor as tracing and keeps the mask, and the module itself is the real one, at full size.
    with FakeTensorMode(allow_non_fake_inputs=True):
        input_ids = torch.zeros(batch, TEXT_TOKENS, dtype=torch.int64, device="meta")
        attention_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.int64, device="meta")
        flops = counted(encoder, input_ids, attention_mask)
    assert flops == text_encoder_flops(config, batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(SIZES))
def test_prior_condition_flops(name, batch):
    config = preset(name)
    text = meta(batch, TEXT_TOKENS, config.prior.c_cond)
    assert counted(meta_modules(name)["prior"].condition, text) == prior_condition_flops(config, batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("name", "height", "width"), CASES)
def test_prior_step_flops(name, height, width, batch):
    config = preset(name)
    shapes = image_shapes(config, height, width, batch)
    prior = meta_modules(name)["prior"]
    text_kv = prior.condition(meta(batch, TEXT_TOKENS, config.prior.c_cond))
    flops = counted(prior, meta(*shapes.prior_latent), meta(batch), text_kv)
    assert flops == prior_step_flops(config, shapes)


def decoder_inputs(config, shapes):
    """The decoder's text states and its image-embedding pyramid: one map per injected level."""
    text = meta(shapes.batch, TEXT_TOKENS, config.decoder.clip_embd)
    pyramid = tuple(meta(shapes.batch, config.decoder.effnet_embd, *shapes.decoder_levels[level])
                    for level in injected_levels(config.decoder))
    return pyramid, text


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("name", "height", "width"), CASES)
def test_decoder_condition_flops(name, height, width, batch):
    config = preset(name)
    shapes = image_shapes(config, height, width, batch)
    flops = counted(meta_modules(name)["decoder"].condition, *decoder_inputs(config, shapes))
    assert flops == decoder_condition_flops(config, shapes)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("name", "height", "width"), CASES)
def test_decoder_step_flops(name, height, width, batch):
    config = preset(name)
    shapes = image_shapes(config, height, width, batch)
    decoder = meta_modules(name)["decoder"]
    conditioning = decoder.condition(*decoder_inputs(config, shapes))
    flops = counted(decoder, meta(*shapes.decoder_latent), meta(batch), conditioning)
    assert flops == decoder_step_flops(config, shapes)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("name", "height", "width"), CASES)
def test_vqgan_decode_flops(name, height, width, batch):
    config = preset(name)
    shapes = image_shapes(config, height, width, batch)
    images = meta_modules(name)["vqgan"](meta(*shapes.decoder_latent))
    assert tuple(images.shape) == shapes.image
    flops = counted(meta_modules(name)["vqgan"], meta(*shapes.decoder_latent))
    assert flops == vqgan_decode_flops(config, shapes)


@pytest.mark.parametrize("prior_guidance", [False, True])
@pytest.mark.parametrize("decoder_guidance", [False, True])
@pytest.mark.parametrize(("name", "height", "width"), CASES)
def test_request_flops_adds_up_the_stages(name, height, width, prior_guidance, decoder_guidance):
    config = preset(name)
    shapes = image_shapes(config, height, width, batch=2)
    parts = request_flops(config, shapes, 7, 3, prior_guidance, decoder_guidance)
    assert parts["total"] == sum(flops for key, flops in parts.items() if key != "total")
    prior_batch, decoder_batch = (4 if guided else 2 for guided in (prior_guidance, decoder_guidance))
    assert parts["prior_text"] == (prior_batch // 2) * text_encoder_flops(config.prior_text, 2)
    assert parts["prior_condition"] == prior_condition_flops(config, prior_batch)
    assert parts["prior_steps"] == 7 * prior_step_flops(config, image_shapes(config, height, width, prior_batch))
    assert parts["decoder_text"] == (decoder_batch // 2) * text_encoder_flops(config.decoder_text, 2)
    decoder_shapes = image_shapes(config, height, width, decoder_batch)
    assert parts["decoder_condition"] == decoder_condition_flops(config, decoder_shapes)
    assert parts["decoder_steps"] == 3 * decoder_step_flops(config, decoder_shapes)
    assert parts["vqgan_decode"] == vqgan_decode_flops(config, shapes)


def test_published_recipe_matches_the_reference_estimate():
    """The same count over diffusers' modules, by hand from their configs: ≈ 103.5 TFLOP per 1024² image with 29
    guided prior steps (2.308 TFLOP each) and 12 unguided decoder steps (2.849 TFLOP each), and 2.172 TFLOP for
    the VQGAN decode. The hoisted text k, v make the engine slightly lower."""
    config = preset("wuerstchen-v2")
    shapes = image_shapes(config, 1024, 1024, batch=1)
    parts = request_flops(config, shapes, len(DEFAULT_PRIOR_TIMESTEPS) - 1, 12, prior_guidance=True,
                          decoder_guidance=False)
    assert parts["total"] == pytest.approx(103.5e12, rel=0.10)
    assert parts["total"] < 103.5e12
    assert parts["vqgan_decode"] == pytest.approx(2.172e12, rel=0.01)
