"""The PyTorch backends. `torch` runs the models of `engine.models` eagerly. `torch-fast` runs what
`engine.models.fused.fuse` makes of them (the same weights on this project's Triton kernels, channels-last,
with the glue between blocks fused), every denoising step captured once as a CUDA graph and replayed.
`torch-compile` is `torch-fast` with the fused prior and decoder also under torch.compile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.backends import Backend, BackendOptions, backend_options
from engine.config import WuerstchenConfig, preset
from engine.denoise import StepGraphs
from engine.models import Decoder, Prior, VQGANDecoder
from engine.precision import Quantization
from engine.quantization import QuantRecipe, scan
from engine.runtime import ModelSource, Runtime
from engine.stages import Stages
from engine.text import TextEncoder, load_text_encoder, random_text_encoder
from engine.weights import load_stage, random_stage, read_config


@dataclass(frozen=True)
class Models:
    """The PyTorch modules of one set of weights, plain: what the torch backends run and `export` exports."""

    prior_text: TextEncoder
    prior: Prior
    decoder_text: TextEncoder
    decoder: Decoder
    vqgan: VQGANDecoder


SCAN_SIZE = 256  # the image side a `quantize="fp8"|"int8"` scan measures one step at, on load


def load(runtime: Runtime) -> tuple[WuerstchenConfig, Stages]:
    config, models = load_models(runtime.source, runtime.device, runtime.dtype)
    recipe = quantize_models(config, models, runtime.quantization)
    return config, stages(models, runtime.backend, runtime.options, recipe)


def quantize_models(config: WuerstchenConfig, models: Models, quantization: Quantization | QuantRecipe | None,
                    progress: Callable[[str], None] = lambda _: None) -> QuantRecipe | None:
    """Quantize the prior's and the decoder's Linears in place by a recipe, or by the recipe that a sensitivity
    scan (`engine.quantization.scan`, at `SCAN_SIZE`²) finds for a scheme; return the recipe applied."""
    if quantization is None:
        return None
    recipe = quantization
    if isinstance(quantization, Quantization):
        recipe = scan(config, models.prior_text, models.prior, models.decoder_text, models.decoder, quantization,
                      SCAN_SIZE, progress=progress)
    recipe.apply("prior", models.prior)
    recipe.apply("decoder", models.decoder)
    return recipe


def load_models(source: ModelSource, device: torch.device, dtype: torch.dtype) -> tuple[WuerstchenConfig, Models]:
    """The plain modules of a preset (seeded random weights and a byte-level tokenizer: the images are noise,
    the cost is the real model's) or of the two diffusers folders."""
    if source.kind == "preset":
        config, seed = preset(source.preset), source.seed
        # The noise heads are shrunk: the prior divides by |1 − b| and the decoder by sigmoid(b), and
        # random heads bring those near zero, where the latents blow up within a few steps.
        return config, Models(
            prior_text=random_text_encoder(config.prior_text, seed, device, dtype),
            prior=random_stage(Prior, config.prior, seed + 1, device, dtype, shrink=("out.1.",)),
            decoder_text=random_text_encoder(config.decoder_text, seed + 2, device, dtype),
            decoder=random_stage(Decoder, config.decoder, seed + 3, device, dtype, shrink=("clf.1.",)),
            vqgan=random_stage(VQGANDecoder, config.vqgan, seed + 4, device, dtype),
        )
    config, variant = read_config(source.prior, source.decoder), source.variant
    prior, decoder = source.prior, source.decoder
    return config, Models(
        prior_text=load_text_encoder(prior, device, dtype, variant),
        prior=load_stage("prior", Prior, config.prior, prior / "prior", device, dtype, variant),
        decoder_text=load_text_encoder(decoder, device, dtype, variant),
        decoder=load_stage("decoder", Decoder, config.decoder, decoder / "decoder", device, dtype, variant),
        vqgan=load_stage("vqgan", VQGANDecoder, config.vqgan, decoder / "vqgan", device, dtype, variant),
    )


def stages(models: Models, backend: Backend, options: BackendOptions | None = None,
           quantization: QuantRecipe | None = None) -> Stages:
    """The stages a PyTorch backend runs over `models` (quantized by `quantization`, if given). The fast
    backends take ownership of the models: the fused stages share their weights, converted to channels-last.
    In bf16 or quantized, the denoisers take the noise level in fp32 (`Stages.fp32_timesteps`)."""
    fp32_timesteps = quantization is not None or next(models.prior.parameters()).dtype == torch.bfloat16
    if backend is Backend.TORCH:
        return Stages(models.prior_text, models.prior, models.decoder_text, models.decoder, models.vqgan,
                      fp32_timesteps=fp32_timesteps, quantization=quantization)
    from engine.models.fused import Fusions, fuse  # Triton is needed by the fast backends only

    options = backend_options(backend, options)
    fusions = Fusions(chains=options.chains, gemm_gelu=options.gemm_gelu)
    prior, decoder, vqgan = (fuse(model, fusions) for model in (models.prior, models.decoder, models.vqgan))
    if backend is Backend.TORCH_COMPILE:
        prior = torch.compile(prior, fullgraph=True, dynamic=False)
        decoder = torch.compile(decoder, fullgraph=True, dynamic=False)
    graphs = StepGraphs(options.graph_cache_size) if options.cuda_graphs else None
    return Stages(models.prior_text, prior, models.decoder_text, decoder, vqgan, graphs, fp32_timesteps, quantization)
