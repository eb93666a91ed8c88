"""The one place that turns (height, width, batch) into every latent and tensor shape of the pipeline.

The pipeline, the exported graphs' dynamic axes, engine profiles, sample inputs and benchmarks all ask
this module, so a shape is never written twice (NVIDIA's demo uses `h // 42` where diffusers uses
`ceil(h / 42.67)`; the two disagree at most sizes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError

TEXT_TOKENS = 77  # CLIP's context: every prompt is padded or truncated to it


@dataclass(frozen=True)
class Shapes:
    """Shapes of one request of `batch` images of `height` × `width` pixels (NCHW)."""

    batch: int
    height: int
    width: int
    prior_latent: tuple[int, int, int, int]  # (B, 16, ceil(h/42.67), ceil(w/42.67))
    decoder_latent: tuple[int, int, int, int]  # (B, 4, int(h_prior·10.67), int(w_prior·10.67))
    image: tuple[int, int, int, int]  # (B, 3, 4·H_decoder, 4·W_decoder)
    decoder_levels: tuple[tuple[int, int], ...]  # (h, w) of each decoder level, finest first


def check_image_size(config: WuerstchenConfig, height: int, width: int) -> None:
    """Raise a one-line error unless (height, width) lies on the model's size grid."""
    grid = config.sizes
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise WuerstchenError(f"{name}={value!r}: expected an integer, {grid.describe()}")
        if value % grid.step:
            raise WuerstchenError(f"{name}={value} is off the model's size grid: expected {grid.describe()}")
        if not grid.min <= value <= grid.max:
            raise WuerstchenError(f"{name}={value} is outside the sizes served here: expected {grid.describe()}")


def image_shapes(config: WuerstchenConfig, height: int, width: int, batch: int = 1) -> Shapes:
    """Every shape of a request, computed exactly as diffusers' Würstchen pipelines do."""
    check_image_size(config, height, width)
    height, width = int(height), int(width)  # NumPy's integers too
    prior_hw = (math.ceil(height / config.resolution_multiple), math.ceil(width / config.resolution_multiple))
    decoder_hw = _decoder_hw(config, prior_hw)
    decoder = config.decoder
    if decoder_hw[0] % decoder.downscale or decoder_hw[1] % decoder.downscale:
        raise WuerstchenError(
            f"height={height}, width={width}: decoder latent {decoder_hw} is not a multiple of the decoder's "
            f"downscale {decoder.downscale}; expected {config.sizes.describe()}"
        )
    return _shapes(config, prior_hw, decoder_hw, batch, height, width)


def embedding_shapes(config: WuerstchenConfig, prior_hw: tuple[int, int], batch: int = 1) -> Shapes:
    """The shapes of decoding image embeddings of spatial size `prior_hw` into `batch` images: the decoder's
    latent follows from the embeddings (`int(h · 10.67)`), and the image from the latent."""
    decoder_hw = _decoder_hw(config, prior_hw)
    upscale = config.vqgan.upscale
    height, width = decoder_hw[0] * upscale, decoder_hw[1] * upscale
    downscale = config.decoder.downscale
    sizes = config.sizes
    low = math.ceil(sizes.min / config.resolution_multiple)
    high = math.ceil(sizes.max / config.resolution_multiple)
    on_grid = not (decoder_hw[0] % downscale or decoder_hw[1] % downscale) and \
        all(sizes.min <= side <= sizes.max and side % sizes.step == 0 for side in (height, width))
    if not on_grid:
        raise WuerstchenError(
            f"image_embeddings of size {prior_hw[0]}×{prior_hw[1]} make no image on the model's size grid: expected "
            f"the size the prior makes for images of {sizes.describe()} ({low}×{low} to {high}×{high})")
    return _shapes(config, prior_hw, decoder_hw, batch, height, width)


def _decoder_hw(config: WuerstchenConfig, prior_hw: tuple[int, int]) -> tuple[int, int]:
    return tuple(int(side * config.latent_dim_scale) for side in prior_hw)


def _shapes(config: WuerstchenConfig, prior_hw: tuple[int, int], decoder_hw: tuple[int, int], batch: int,
            height: int, width: int) -> Shapes:
    decoder = config.decoder
    levels = tuple(
        (decoder_hw[0] // (decoder.patch_size * 2**i), decoder_hw[1] // (decoder.patch_size * 2**i))
        for i in range(len(decoder.c_hidden))
    )
    upscale = config.vqgan.upscale
    return Shapes(
        batch=batch,
        height=height,
        width=width,
        prior_latent=(batch, config.prior.c_in, *prior_hw),
        decoder_latent=(batch, decoder.c_in, *decoder_hw),
        image=(batch, config.vqgan.out_channels, decoder_hw[0] * upscale, decoder_hw[1] * upscale),
        decoder_levels=levels,
    )


def symbol_values(config: WuerstchenConfig, shapes: Shapes) -> dict[str, int]:
    """Values of the symbolic dimensions that exported graphs use for a request's shapes.

    batch: images in the call (doubled where guidance batches the negative prompts);
    ph, pw: prior latent height and width; dh, dw: decoder latent height and width over the decoder's
    downscale (16 for v2), so that every decoder level, the latent and the image are multiples of them.
    """
    downscale = config.decoder.downscale
    return {
        "batch": shapes.batch,
        "ph": shapes.prior_latent[2],
        "pw": shapes.prior_latent[3],
        "dh": shapes.decoder_latent[2] // downscale,
        "dw": shapes.decoder_latent[3] // downscale,
    }


def resolve_dims(dims: Sequence[int | str], values: dict[str, int]) -> tuple[int, ...]:
    """Concrete sizes of symbolic dims such as ("batch", 4, "16*dh", "16*dw")."""
    sizes = []
    for dim in dims:
        if isinstance(dim, int):
            sizes.append(dim)
        else:
            factor, _, symbol = dim.rpartition("*")
            sizes.append((int(factor) if factor else 1) * values[symbol])
    return tuple(sizes)
