"""Shared fixtures: diffusers' tiny Würstchen modules with every parameter perturbed (see
`benchmarks.reference.random_reference`), and the same weights written by diffusers' own `save_pretrained`."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter; set before importing it

from benchmarks.reference import (  # noqa: E402
    diffusers_decoder_pipeline,
    diffusers_pipeline,
    diffusers_prior_pipeline,
    random_reference,
)
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


def save_folders(modules: dict, root) -> tuple:
    """Write the modules as the two published folders (warp-ai/wuerstchen-prior, warp-ai/wuerstchen)."""
    prior_dir, decoder_dir = root / "wuerstchen-prior", root / "wuerstchen"
    diffusers_prior_pipeline(modules, byte_level_tokenizer()).save_pretrained(prior_dir)
    diffusers_decoder_pipeline(modules, byte_level_tokenizer()).save_pretrained(decoder_dir)
    return prior_dir, decoder_dir


@pytest.fixture(scope="session")
def reference_modules() -> dict:
    """diffusers' tiny modules, perturbed, keyed by `benchmarks.reference.STAGES`."""
    return random_reference(TINY)


@pytest.fixture(scope="session")
def tiny_folders(reference_modules, tmp_path_factory) -> tuple:
    """(prior folder, decoder folder) of the perturbed tiny model, written by diffusers."""
    return save_folders(reference_modules, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def reference_pipeline(reference_modules):
    return diffusers_pipeline(reference_modules, byte_level_tokenizer())


@pytest.fixture(scope="session")
def prior_pipeline(reference_modules):
    """diffusers' prior-only pipeline over the reference modules."""
    return diffusers_prior_pipeline(reference_modules, byte_level_tokenizer())


@pytest.fixture(scope="session")
def decoder_pipeline(reference_modules):
    """diffusers' decoder-only pipeline over the reference modules."""
    return diffusers_decoder_pipeline(reference_modules, byte_level_tokenizer())


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_folders):
    from engine import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_bundle(tiny_pipeline, tmp_path_factory):
    """The perturbed tiny model exported in fp32 for sizes 128 to 512."""
    from export.bundle import export_bundle

    folder = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle(tiny_pipeline, folder, {"preset": "test"}, min_size=128, max_size=512, progress=lambda _: None)
    return folder
