"""Closed-form FLOP counts of every stage of this engine, from the configs and shapes alone.

What is counted: FLOPs = 2 × multiply-adds of every matrix product, which is exactly what
`torch.utils.flop_counter.FlopCounterMode` counts (tests/test_flops.py checks each formula against it on
the meta device):
- Linear layers;
- convolutions, depthwise and transposed ones included;
- attention's two products QKᵀ and PV, 4·B·heads·Nq·Nk·head_dim = 4·B·Nq·Nk·C. The text encoders are
  causal, but they still compute the full 77 × 77 product.
Elementwise ops, norms, softmax, activations, resizes, pixel (un)shuffles and embedding lookups are not counted.

Where the work sits follows this engine, not diffusers' modules, which run everything at every step:
- The text tokens' keys and values depend only on the prompt. Each attention block therefore projects them
  (SiLU → kv_mapper → the k, v rows of `qkv`) once per request, in `condition()` (`AttnBlock.text_kv`),
  not at every step. A step pays only for the image tokens: the fused q, k, v Linear, attention over the
  N image + 77 text keys, and the output Linear.
- The decoder's clip_mapper and its effnet mappers (1×1 convs of the image embedding) also run in
  `condition()`.
A step here is therefore a little cheaper than a diffusers step (2.308 TFLOP for the prior's guided step and
2.849 TFLOP for the decoder's at 1024², counted the same way over diffusers' modules), and `request_flops`
counts the hoisted work once per request.

Notation: `positions` is batch × pixels (or × tokens): the rows a Linear or a conv sees across the batch.

    python -m benchmarks.flops --preset wuerstchen-v2 --height 1024 --width 1024
"""

from __future__ import annotations

import argparse
import dataclasses

from engine.config import TextEncoderConfig, WuerstchenConfig, preset
from engine.shapes import TEXT_TOKENS, Shapes, image_shapes

# ---------------------------------------------------------------------------------------------------------
# Primitives: the only three kinds of work that are counted.


def linear(positions: int, c_in: int, c_out: int) -> int:
    """A Linear (or 1×1 conv) from c_in to c_out channels, applied at `positions` rows."""
    return 2 * positions * c_in * c_out


def conv(positions: int, c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> int:
    """A k×k conv. `positions` are the output pixels of a conv and the input pixels of a transposed conv."""
    return 2 * positions * (c_in // groups) * c_out * kernel**2


def attention_core(batch: int, queries: int, keys: int, width: int) -> int:
    """QKᵀ and PV, summed over all heads: heads × head_dim = width."""
    return 4 * batch * queries * keys * width


# ---------------------------------------------------------------------------------------------------------
# The blocks of engine/models/blocks.py and vqgan.py.


def _res_block(positions: int, channels: int, c_skip: int = 0, kernel: int = 3) -> int:
    """`ResBlock`: the depthwise conv, then a channel MLP of ×4 width whose input also carries the skip."""
    return (
        conv(positions, channels, channels, kernel, groups=channels)  # depthwise k×k
        + linear(positions, channels + c_skip, 4 * channels)  # fc1 on [h, skip]
        + linear(positions, 4 * channels, channels)  # fc2
    )


def _timestep_block(batch: int, channels: int, c_r: int) -> int:
    """`TimestepBlock`: one Linear per sample maps the timestep embedding to the FiLM's (a, b)."""
    return linear(batch, c_r, 2 * channels)


def _attention_step(batch: int, tokens: int, channels: int) -> int:
    """`AttnBlock.forward`: the part of an attention block that runs at every step."""
    positions = batch * tokens
    return (
        linear(positions, channels, 3 * channels)  # fused q, k, v of the image tokens
        + attention_core(batch, tokens, tokens + TEXT_TOKENS, channels)  # image queries over image + text keys
        + linear(positions, channels, channels)  # out
    )


def _attention_text_kv(batch: int, c_cond: int, channels: int) -> int:
    """`AttnBlock.text_kv`: the text tokens' keys and values, once per request."""
    positions = batch * TEXT_TOKENS
    return (
        linear(positions, c_cond, channels)  # kv_mapper
        + linear(positions, channels, 2 * channels)  # the k and v rows of qkv
    )


def _mixing_block(positions: int, channels: int) -> int:
    """The VQGAN's `MixingResidualBlock`: a depthwise 3×3 conv and a channel MLP of ×4 width."""
    return (
        conv(positions, channels, channels, kernel=3, groups=channels)  # depthwise 3×3
        + linear(positions, channels, 4 * channels)  # fc1
        + linear(positions, 4 * channels, channels)  # fc2
    )


# ---------------------------------------------------------------------------------------------------------
# The stages.


def text_encoder_flops(config: TextEncoderConfig, batch: int) -> int:
    """One call of the CLIP text transformer on `batch` prompts of 77 tokens."""
    positions = batch * TEXT_TOKENS
    width, hidden = config.hidden_size, config.intermediate_size
    layer = (
        4 * linear(positions, width, width)  # q, k, v and out projections
        + attention_core(batch, TEXT_TOKENS, TEXT_TOKENS, width)  # the causal mask does not skip any work
        + linear(positions, width, hidden)  # fc1
        + linear(positions, hidden, width)  # fc2
    )
    return config.num_hidden_layers * layer


def prior_condition_flops(config: WuerstchenConfig, batch: int) -> int:
    """`Prior.condition(text)` at `batch` rows of text states: the cond_mapper and every layer's text k, v."""
    prior = config.prior
    positions = batch * TEXT_TOKENS
    return (
        linear(positions, prior.c_cond, prior.c)  # cond_mapper's first Linear
        + linear(positions, prior.c, prior.c)  # cond_mapper's second Linear
        + prior.depth * _attention_text_kv(batch, prior.c, prior.c)
    )


def prior_step_flops(config: WuerstchenConfig, shapes: Shapes) -> int:
    """One `Prior.forward` at `shapes.batch` (the batch the model sees; guidance doubles it)."""
    prior = config.prior
    batch = shapes.batch
    tokens = shapes.prior_latent[2] * shapes.prior_latent[3]
    positions = batch * tokens
    layer = (
        _res_block(positions, prior.c)
        + _timestep_block(batch, prior.c, prior.c_r)
        + _attention_step(batch, tokens, prior.c)
    )
    return (
        conv(positions, prior.c_in, prior.c)  # 1×1 projection
        + prior.depth * layer
        + conv(positions, prior.c, 2 * prior.c_in)  # 1×1 head to the noise parameters (a, b)
    )


def decoder_condition_flops(config: WuerstchenConfig, shapes: Shapes) -> int:
    """`Decoder.condition(pyramid, text)` at `shapes.batch`: the clip_mapper, every attention block's text
    k, v and the effnet mappers. Each injected level has one mapper on the way down and one on the way up."""
    decoder = config.decoder
    batch = shapes.batch
    flops = linear(batch * TEXT_TOKENS, decoder.clip_embd, decoder.c_cond)  # clip_mapper
    for i, (channels, kinds, repeats) in enumerate(zip(decoder.c_hidden, decoder.level_config, decoder.blocks,
                                                       strict=True)):
        attention_blocks = 2 * repeats * kinds.count("A")  # down and up path
        flops += attention_blocks * _attention_text_kv(batch, decoder.c_cond, channels)
        if decoder.inject_effnet[i]:
            height, width = shapes.decoder_levels[i]
            flops += 2 * conv(batch * height * width, decoder.effnet_embd, decoder.c_cond)  # down and up mapper
    return flops


def decoder_step_flops(config: WuerstchenConfig, shapes: Shapes) -> int:
    """One `Decoder.forward` at `shapes.batch`: a U-Net whose down and up path run the same blocks per level."""
    decoder = config.decoder
    batch = shapes.batch
    levels = len(decoder.c_hidden)
    finest = batch * shapes.decoder_levels[0][0] * shapes.decoder_levels[0][1]
    flops = conv(finest, decoder.c_in * decoder.patch_size**2, decoder.c_hidden[0])  # 1×1 embedding after unshuffle
    for i, (channels, kinds, repeats) in enumerate(zip(decoder.c_hidden, decoder.level_config, decoder.blocks,
                                                       strict=True)):
        tokens = shapes.decoder_levels[i][0] * shapes.decoder_levels[i][1]
        positions = batch * tokens
        effnet_skip = decoder.c_cond if decoder.inject_effnet[i] else 0
        block = {
            "C": _res_block(positions, channels, effnet_skip, decoder.kernel_size),
            "T": _timestep_block(batch, channels, decoder.c_r),
            "A": _attention_step(batch, tokens, channels),
        }
        flops += 2 * repeats * sum(block[kind] for kind in kinds)  # the down and the up path
        if i < levels - 1:
            flops += linear(positions, channels, 4 * channels)  # the up path's first fc1 also reads the down output
        if i > 0:
            # A 2×2 stride-2 conv into this level on the way down and its transpose out of it on the way up:
            # both are counted at this level's pixels.
            flops += 2 * conv(positions, decoder.c_hidden[i - 1], channels, kernel=2)
    return flops + conv(finest, decoder.c_hidden[0], 2 * decoder.c_out * decoder.patch_size**2)  # 1×1 clf head


def vqgan_decode_flops(config: WuerstchenConfig, shapes: Shapes) -> int:
    """One `VQGANDecoder.forward` on the decoder latent at `shapes.batch`."""
    vqgan = config.vqgan
    widths = [vqgan.embed_dim // 2**i for i in range(vqgan.levels)]  # the latent's (coarsest) level first
    positions = shapes.batch * shapes.decoder_latent[2] * shapes.decoder_latent[3]
    flops = conv(positions, vqgan.latent_channels, widths[0])  # 1×1 input conv
    for i, channels in enumerate(widths):
        flops += (vqgan.bottleneck_blocks if i == 0 else 1) * _mixing_block(positions, channels)
        if i < vqgan.levels - 1:
            flops += conv(positions, channels, widths[i + 1], kernel=4)  # 4×4 stride-2 transposed conv, ×2 up
            positions *= 4
    return flops + conv(positions, widths[-1], vqgan.out_channels * vqgan.up_down_scale_factor**2)  # 1×1 out conv


# ---------------------------------------------------------------------------------------------------------
# A whole request.


def model_shapes(shapes: Shapes, guided: bool) -> Shapes:
    """The shapes a stage's model sees. With guidance it also runs the negative prompts' rows, so the batch doubles."""
    if not guided:
        return shapes
    batch = 2 * shapes.batch
    return dataclasses.replace(
        shapes,
        batch=batch,
        prior_latent=(batch, *shapes.prior_latent[1:]),
        decoder_latent=(batch, *shapes.decoder_latent[1:]),
        image=(batch, *shapes.image[1:]),
    )


def request_flops(
    config: WuerstchenConfig,
    shapes: Shapes,
    prior_steps: int,
    decoder_steps: int,
    prior_guidance: bool,
    decoder_guidance: bool,
    prompts: int | None = None,
) -> dict[str, int]:
    """The FLOPs of one pipeline call for `shapes.batch` images, stage by stage, as engine/pipeline.py runs it.

    A guided stage encodes the prompts and then the negative prompts (two text calls) and runs its condition
    and every step at twice the batch. The text encoders see `prompts` prompts per call: one per image
    unless given (with `num_images_per_prompt` > 1 the pipeline encodes each prompt once and repeats it).
    """
    prompts = shapes.batch if prompts is None else prompts
    prior, decoder = model_shapes(shapes, prior_guidance), model_shapes(shapes, decoder_guidance)
    parts = {
        "prior_text": (2 if prior_guidance else 1) * text_encoder_flops(config.prior_text, prompts),
        "prior_condition": prior_condition_flops(config, prior.batch),
        "prior_steps": prior_steps * prior_step_flops(config, prior),
        "decoder_text": (2 if decoder_guidance else 1) * text_encoder_flops(config.decoder_text, prompts),
        "decoder_condition": decoder_condition_flops(config, decoder),
        "decoder_steps": decoder_steps * decoder_step_flops(config, decoder),
        "vqgan_decode": vqgan_decode_flops(config, shapes),
    }
    parts["total"] = sum(parts.values())
    return parts


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Print a request's FLOPs per stage in TFLOP. The default is the published recipe: 29 guided prior
    steps, then 12 decoder steps without guidance."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wuerstchen-v2")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prior-steps", type=int, default=29)
    parser.add_argument("--decoder-steps", type=int, default=12)
    parser.add_argument("--no-prior-guidance", dest="prior_guidance", action="store_false")
    parser.add_argument("--decoder-guidance", action="store_true")
    args = parser.parse_args(argv)
    config = preset(args.preset)
    shapes = image_shapes(config, args.height, args.width, args.batch)
    parts = request_flops(config, shapes, args.prior_steps, args.decoder_steps, args.prior_guidance,
                          args.decoder_guidance)
    for name, flops in parts.items():
        print(f"{name:>18}  {flops / 1e12:10.4f} TFLOP")
    return parts


if __name__ == "__main__":
    main()
