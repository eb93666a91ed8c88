"""diffusers' Würstchen v2 at any preset's shapes, and this engine holding the same weights.

diffusers is the reference that tests and benchmarks measure against; it is never a runtime dependency
of the engine, so everything that imports it lives here, outside `engine/`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from engine import WuerstchenConfig, WuerstchenPipeline
from engine.backends.pytorch import Models, quantize_models, stages
from engine.models import Decoder, Prior, VQGANDecoder
from engine.models.vqgan import ENCODER_PREFIXES
from engine.runtime import Runtime
from engine.text import ClipStates, TextEncoder
from engine.weights import build_with_weights, translate_state_dict

STAGES = ("prior", "decoder", "vqgan", "prior_text", "decoder_text")
_ENGINE_CLASSES = {"prior": Prior, "decoder": Decoder, "vqgan": VQGANDecoder}


def diffusers_module(stage: str, config: WuerstchenConfig) -> nn.Module:
    """diffusers' module of one stage (see `STAGES`) at `config`'s shapes, with diffusers' own init, in
    eval mode, built on the current default device."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel

    if stage == "prior":
        module = WuerstchenPrior(**vars(config.prior))
    elif stage == "decoder":
        lists = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config.decoder).items()}
        module = WuerstchenDiffNeXt(**lists)
    elif stage == "vqgan":
        module = PaellaVQModel(**vars(config.vqgan))
    else:
        module = CLIPTextModel(getattr(config, stage).to_transformers())
    return module.eval()


def diffusers_pipeline(modules: dict[str, nn.Module], tokenizer):
    """diffusers' `WuerstchenCombinedPipeline` around the modules of `diffusers_module`."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline

    pipe = WuerstchenCombinedPipeline(
        tokenizer=tokenizer, text_encoder=modules["decoder_text"], decoder=modules["decoder"],
        scheduler=DDPMWuerstchenScheduler(), vqgan=modules["vqgan"], prior_tokenizer=tokenizer,
        prior_text_encoder=modules["prior_text"], prior_prior=modules["prior"],
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_prior_pipeline(modules: dict[str, nn.Module], tokenizer):
    """diffusers' `WuerstchenPriorPipeline` (text → image embeddings) around the prior's modules."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline

    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=modules["prior_text"], prior=modules["prior"],
                                   scheduler=DDPMWuerstchenScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_decoder_pipeline(modules: dict[str, nn.Module], tokenizer):
    """diffusers' `WuerstchenDecoderPipeline` (image embeddings and text → images) around the decoder's and
    the VQGAN's modules."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline

    pipe = WuerstchenDecoderPipeline(tokenizer=tokenizer, text_encoder=modules["decoder_text"],
                                     decoder=modules["decoder"], scheduler=DDPMWuerstchenScheduler(),
                                     vqgan=modules["vqgan"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine_stage(stage: str, module: nn.Module, config: WuerstchenConfig) -> nn.Module:
    """Our model of `stage` ("prior", "decoder" or "vqgan") sharing `module`'s weights (q, k and v are
    stacked into one copy; the VQGAN's encoder half is left out, as the loader leaves it)."""
    state = {k: v for k, v in module.state_dict().items() if stage != "vqgan" or not k.startswith(ENCODER_PREFIXES)}
    return build_with_weights(_ENGINE_CLASSES[stage], getattr(config, stage), translate_state_dict(stage, state))


def engine_pipeline(modules: dict[str, nn.Module], tokenizer, config: WuerstchenConfig,
                    runtime: Runtime) -> WuerstchenPipeline:
    """Our pipeline on the weights of `diffusers_pipeline(modules, tokenizer)`, on the runtime's PyTorch
    backend (its device and precision must be the modules'), quantized as the runtime says (diffusers' modules
    are left as they are)."""
    device = runtime.device
    models = Models(
        prior_text=TextEncoder(tokenizer, ClipStates(modules["prior_text"]), device),
        prior=engine_stage("prior", modules["prior"], config),
        decoder_text=TextEncoder(tokenizer, ClipStates(modules["decoder_text"]), device),
        decoder=engine_stage("decoder", modules["decoder"], config),
        vqgan=engine_stage("vqgan", modules["vqgan"], config),
    )
    recipe = quantize_models(config, models, runtime.quantization)
    if recipe is not None:
        runtime = replace(runtime, quantization=recipe)
    pipe = WuerstchenPipeline(config, stages(models, runtime.backend, runtime.options, recipe), runtime)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def perturb_(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Add seeded noise to every parameter, N(0, scale²/fan_in) to matrices and N(0, (0.05·scale)²) to the
    rest: the models' init leaves the decoder's head, the FiLM mappers and the GRN at zero, and a parity
    test would then compare x with x."""
    generator = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for p in module.parameters():
        fan_in = p.shape[1:].numel() if p.dim() > 1 else 0
        std = scale * (fan_in**-0.5 if fan_in > 1 else 0.05)
        p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32).to(p.dtype) * std)
    return module.eval()


@torch.no_grad()
def tame_head_(modules: dict[str, nn.Module]) -> None:
    """Shrink the prior's and the decoder's output heads. The prior divides by |1 − b| and the decoder by
    sigmoid(b): a random head brings those near zero somewhere, and a few steps then send the latents to 1e7."""
    for stage, head in (("prior", "out"), ("decoder", "clf")):
        if stage in modules:
            conv = getattr(modules[stage], head)[1]
            conv.weight.mul_(0.1)
            conv.bias.mul_(0.1)


def random_reference(config: WuerstchenConfig, seed: int = 0, device=None, dtype=torch.float32) -> dict:
    """Every stage of diffusers' model at `config`'s shapes, perturbed and tamed: a stand-in for trained
    weights that keeps a whole pipeline run finite and its images unsaturated."""
    modules = {}
    with torch.device(device or "cpu"):
        for offset, stage in enumerate(STAGES):
            modules[stage] = perturb_(diffusers_module(stage, config).to(dtype), seed + offset)
    tame_head_(modules)
    return modules


def load_diffusers(prior: str, decoder: str, device: torch.device, dtype: torch.dtype):
    """diffusers' combined pipeline from the two published folders, as diffusers loads them."""
    from diffusers import WuerstchenCombinedPipeline, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    prior_pipe = WuerstchenPriorPipeline.from_pretrained(prior, torch_dtype=dtype)
    decoder_pipe = WuerstchenDecoderPipeline.from_pretrained(decoder, torch_dtype=dtype)
    pipe = WuerstchenCombinedPipeline(
        tokenizer=decoder_pipe.tokenizer, text_encoder=decoder_pipe.text_encoder, decoder=decoder_pipe.decoder,
        scheduler=decoder_pipe.scheduler, vqgan=decoder_pipe.vqgan, prior_tokenizer=prior_pipe.tokenizer,
        prior_text_encoder=prior_pipe.text_encoder, prior_prior=prior_pipe.prior, prior_scheduler=prior_pipe.scheduler,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
