"""Shared fixtures: tiny Würstchen models written by diffusers' own `save_pretrained`, with every parameter
perturbed (random init leaves the decoder's head, the FiLM mappers and the GRN at zero, and a parity test
would then compare x with x), and scaled so that a whole pipeline run stays finite and unsaturated."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import preset  # noqa: E402
from engine.text import byte_level_tokenizer  # noqa: E402

TINY = preset("tiny")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (full-size models on CPU)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size models; minutes and ~20 GB of memory on a CPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Add seeded noise to every parameter: N(0, scale²/fan_in) to matrices, N(0, (0.05·scale)²) to the rest."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        fan_in = p.shape[1:].numel() if p.dim() > 1 else 0
        std = fan_in**-0.5 if fan_in > 1 else 0.05
        p.add_(torch.randn(p.shape, generator=generator) * std * scale)
    return module.eval()


@torch.no_grad()
def tame_head_(head: torch.nn.Module) -> None:
    """Shrink an output head. The prior divides by |1 − b| and the decoder by sigmoid(b): a random head
    brings those near zero somewhere, and a few denoising steps then blow the latents up to 1e7."""
    head.weight.mul_(0.1)
    head.bias.mul_(0.1)


def diffusers_components(config=TINY, seed: int = 0) -> dict:
    """diffusers' Würstchen modules at `config`'s shapes, perturbed, keyed as the combined pipeline names them."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    d = config.decoder
    components = dict(
        prior_prior=perturb_(WuerstchenPrior(**vars(config.prior)), seed + 1),
        prior_text_encoder=perturb_(CLIPTextModel(config.prior_text.to_transformers()), seed + 2),
        prior_tokenizer=byte_level_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
        decoder=perturb_(WuerstchenDiffNeXt(
            c_in=d.c_in, c_out=d.c_out, c_r=d.c_r, patch_size=d.patch_size, c_cond=d.c_cond,
            c_hidden=list(d.c_hidden), nhead=list(d.nhead), blocks=list(d.blocks), level_config=list(d.level_config),
            inject_effnet=list(d.inject_effnet), effnet_embd=d.effnet_embd, clip_embd=d.clip_embd,
            kernel_size=d.kernel_size,
        ), seed + 3),
        text_encoder=perturb_(CLIPTextModel(config.decoder_text.to_transformers()), seed + 4),
        tokenizer=byte_level_tokenizer(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=perturb_(PaellaVQModel(**vars(config.vqgan)), seed + 5),
    )
    tame_head_(components["prior_prior"].out[1])
    tame_head_(components["decoder"].clf[1])
    return components


def save_folders(components: dict, root) -> tuple:
    """Write the components as the two published folders (warp-ai/wuerstchen-prior, warp-ai/wuerstchen)."""
    from diffusers import WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    prior_dir, decoder_dir = root / "wuerstchen-prior", root / "wuerstchen"
    WuerstchenPriorPipeline(
        tokenizer=components["prior_tokenizer"], text_encoder=components["prior_text_encoder"],
        prior=components["prior_prior"], scheduler=components["prior_scheduler"],
    ).save_pretrained(prior_dir)
    WuerstchenDecoderPipeline(
        tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], decoder=components["decoder"],
        scheduler=components["scheduler"], vqgan=components["vqgan"],
    ).save_pretrained(decoder_dir)
    return prior_dir, decoder_dir


@pytest.fixture(scope="session")
def reference_components() -> dict:
    return diffusers_components()


@pytest.fixture(scope="session")
def tiny_folders(reference_components, tmp_path_factory) -> tuple:
    """(prior folder, decoder folder) of the perturbed tiny model, written by diffusers."""
    return save_folders(reference_components, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def reference_pipeline(reference_components):
    from diffusers import WuerstchenCombinedPipeline

    pipe = WuerstchenCombinedPipeline(**reference_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_folders):
    from engine import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
