"""One step of each full-size stage (random weights of the `wuerstchen-v2` architecture) against diffusers.

Slow: about 5 minutes and 12 GB on a 2-core CPU. Run with `pytest --runslow tests/test_full_size.py`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference import diffusers_module, engine_stage, perturb_, tame_head_
from engine import preset
from engine.models.decoder import resize_image_embeddings
from engine.shapes import image_shapes

V2 = preset("wuerstchen-v2")
SHAPES = image_shapes(V2, 512, 768, batch=1)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _pair(stage: str, seed: int):
    """diffusers' full-size module of `stage`, perturbed, and ours holding the same weights."""
    reference = perturb_(diffusers_module(stage, V2), seed)
    tame_head_({stage: reference})
    return reference, engine_stage(stage, reference, V2)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_prior_step():
    reference, ours = _pair("prior", seed=1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPES.prior_latent[1:], generator=generator)
    r, text = torch.tensor([0.95, 0.4]), torch.randn(2, 77, 1280, generator=generator)
    expected = reference(x, r=r, c=text)
    actual = ours(x, r, ours.condition(text))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_full_size_decoder_step():
    reference, ours = _pair("decoder", seed=2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES.decoder_latent, generator=generator)
    effnet = torch.randn(SHAPES.prior_latent, generator=generator) * 40
    r, text = torch.tensor([0.6]), torch.randn(1, 77, 1024, generator=generator)
    expected = reference(x, r=r, effnet=effnet, clip=text)
    actual = ours(x, r, ours.condition(resize_image_embeddings(effnet, V2.decoder, SHAPES.decoder_levels), text))
    assert (expected - x).abs().mean() > 0.01
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_full_size_vqgan_decode():
    reference, ours = _pair("vqgan", seed=3)
    latents = torch.randn(SHAPES.decoder_latent, generator=torch.Generator().manual_seed(0)) * 2
    expected = reference.decode(V2.vqgan.scale_factor * latents).sample.clamp(0, 1)
    actual = ours(latents)
    assert actual.shape == SHAPES.image and expected.std() > 0.05
    assert (actual - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_prior_exports_with_external_data(tmp_path):
    """The 994 M-parameter prior step: over protobuf's 2 GB, so its weights go to external data."""
    import time
    from types import SimpleNamespace

    from engine.backends.onnxruntime import OnnxGraph
    from engine.bundle import Bundle
    from engine.models import Prior
    from engine.precision import Precision
    from engine.weights import random_stage
    from export.bundle import OPSETS, export_graph
    from export.graphs import graph_specs

    cpu = torch.device("cpu")
    prior = random_stage(Prior, V2.prior, seed=0, device=cpu, dtype=torch.float32, shrink=("out.1.",))
    pipe = SimpleNamespace(config=V2, dtype=torch.float32, stages=SimpleNamespace(prior=prior))
    spec = graph_specs(pipe, ("prior_step",))["prior_step"]
    start = time.perf_counter()
    files = export_graph(spec, V2, V2.sizes, tmp_path, OPSETS[Precision.FP32], cpu)
    seconds = time.perf_counter() - start
    sizes = {f: (tmp_path / f).stat().st_size for f in files}
    print(f"\nfull-size prior_step export: {seconds:.0f} s, {sizes}")
    # 914 M parameters in fp32: the prior less the text mappers, which run once per request in prior_condition.
    assert files == ["prior_step.onnx", "prior_step.onnx.data"] and sizes["prior_step.onnx.data"] > 3.6e9

    manifest = {"graphs": {"prior_step": {"file": files[0], "inputs": [
        {"name": t.name, "dtype": "float32", "shape": list(t.dims)} for t in spec.inputs], "outputs": [
        {"name": t.name, "dtype": "float32", "shape": list(t.dims)} for t in spec.outputs]}}}
    graph = OnnxGraph(Bundle(tmp_path, manifest), "prior_step", ["CPUExecutionProvider"], cpu)
    feeds = spec.sample(V2, image_shapes(V2, 512, 640, batch=2), torch.Generator().manual_seed(0))
    expected = spec.run(feeds)["eps"]
    assert _relative_error(graph(*feeds.values())[0], expected) < 1e-4
