"""The first fast path: the Triton attention kernel (in Triton's interpreter on a CPU), the CUDA-graph step
cache, and the torch-fast backend's images against the reference path."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import save_folders
from PIL import Image

from benchmarks.reference import random_reference
from engine import WuerstchenError, WuerstchenPipeline, preset
from engine.backends import Backend
from engine.cli import main
from engine.denoise import StepGraphs
from kernels.attention import attention, attention_ref

# On a GPU everything runs there (CUDA graphs, compiled kernels); on a CPU, in Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Würstchen's attention at a 23×31 latent: 713 image queries, 713 + 77 keys.
SHAPES = [(1, 2, 713, 790, 64), (2, 3, 713, 790, 64), (2, 2, 5, 82, 16), (1, 1, 64, 141, 32)]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _inputs(batch, heads, queries, keys, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=generator).to(DEVICE) for n in (queries, keys, keys)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_the_fp64_reference(shape, dtype):
    """flash-attention's rule: the kernel's error against fp64 is at most twice PyTorch's own error in the
    same dtype, plus a small atol."""
    q, k, v = _inputs(*shape)
    exact = attention_ref(q.double(), k.double(), v.double())
    low = [t.to(dtype) for t in (q, k, v)]
    out = attention(*low)
    assert out.shape == q.shape and out.dtype == dtype
    kernel_error = (out.double() - exact).abs().max().item()
    torch_error = (torch.nn.functional.scaled_dot_product_attention(*low).double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + ATOL[dtype], (kernel_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 713, 77, 64), (1, 3, 5, 77, 16)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_reads_the_text_keys_where_they_are(shape, dtype):
    """Image keys and text keys from two tensors give the attention over the two concatenated."""
    batch, heads, queries, text, head_dim = shape
    q, k, v = _inputs(batch, heads, queries, queries, head_dim, seed=1)
    text_k, text_v = (t * 2 for t in _inputs(batch, heads, text, text, head_dim, seed=2)[1:])
    exact = attention_ref(*(t.double() for t in (q, k, v, text_k, text_v)))
    low = [t.to(dtype) for t in (q, k, v, text_k, text_v)]
    kernel_error = (attention(*low).double() - exact).abs().max().item()
    joined = torch.nn.functional.scaled_dot_product_attention(low[0], torch.cat(low[1::2], 2), torch.cat(low[2::2], 2))
    torch_error = (joined.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + ATOL[dtype], (kernel_error, torch_error)


def test_kernel_takes_strided_views_as_the_attention_block_makes_them():
    qkv = torch.randn(2, 100, 3 * 128, device=DEVICE)  # (B, N, 3C) of one fused projection, C = 2 heads × 64
    q, k, v = (t.unflatten(-1, (2, 64)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = attention(q, k, v)
    assert torch.allclose(out, attention_ref(q, k, v), atol=1e-5)
    tokens = out.transpose(1, 2).flatten(2)  # the heads merged back for the output projection: a view
    assert tokens.shape == (2, 100, 128) and tokens.data_ptr() == out.data_ptr() and tokens.is_contiguous()


@pytest.mark.parametrize("q_shape, k_shape, dtypes, message", [
    ((1, 2, 10, 96), (1, 2, 20, 96), (torch.float32,) * 3, r"head dims 96, 96, 96 are outside this kernel's envelope"),
    ((1, 2, 10, 64), (1, 2, 20, 64), (torch.float32, torch.float16, torch.float16), r"dtypes .* expected one of"),
    ((2, 10, 64), (2, 20, 64), (torch.float32,) * 3, r"expected 4-D \(batch, heads, tokens, head dim\) tensors"),
    ((1, 2, 10, 64), (1, 3, 20, 64), (torch.float32,) * 3, r"expected the same batch and heads"),
    ((1, 2, 10, 64), (1, 2, 20, 64), (torch.float64,) * 3, r"dtypes .* expected one of"),
])
def test_kernel_refuses_what_it_does_not_cover(q_shape, k_shape, dtypes, message):
    q, k, v = (torch.randn(shape, dtype=dtype, device=DEVICE) for shape, dtype in zip(
        (q_shape, k_shape, k_shape), dtypes, strict=True))
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)


def test_kernel_refuses_text_keys_without_values_or_of_another_shape():
    q, k, v = _inputs(1, 2, 10, 10, 64)
    with pytest.raises(ValueError, match="give both text_k and text_v, or neither"):
        attention(q, k, v, k, None)
    with pytest.raises(ValueError, match=r"expected the same batch and heads"):
        attention(q, k, v, k[:, :1], v[:, :1])


def test_custom_op_traces_whole_under_compile_and_export():
    q, k, v = _inputs(2, 2, 37, 114, 64)

    def block(q, k, v):
        return attention(q * 2, k, v).sum(dim=-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), block(q, k, v))

    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return block(q, k, v)

    program = torch.export.export(Block(), (q, k, v))
    assert "torch.ops.wuerstchen.attention.default" in program.graph_module.code
    assert torch.allclose(program.module()(q, k, v), block(q, k, v))


def test_models_compile_whole_without_recompiling_across_sizes():
    """The fused prior, with the kernels inside, is one graph for every latent size (dynamic shapes, no
    recompile), and computes what the plain prior does."""
    from engine import preset
    from engine.models.fused import fuse
    from engine.models.prior import Prior
    from engine.weights import random_stage

    prior = random_stage(Prior, preset("tiny").prior, 1, DEVICE, torch.float32, shrink=("out.1.",))
    fused = fuse(copy.deepcopy(prior))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = torch.compile(fused, fullgraph=True, dynamic=True, backend="aot_eager")
        for batch, h, w in ((2, 6, 9), (3, 12, 5)):
            x, r = torch.randn(batch, 16, h, w, device=DEVICE), torch.rand(batch, device=DEVICE)
            kv = prior.condition(torch.randn(batch, 77, 32, device=DEVICE))
            assert torch.allclose(compiled(x, r, kv), prior(x, r, kv), atol=1e-4)
    torch._dynamo.reset()


class _Built:
    def __init__(self, name):
        self.name = name


def test_step_graph_cache_keeps_the_most_recent_and_evicts_the_oldest():
    graphs = StepGraphs(capacity=2)
    built = []

    def build(name):
        def make():
            built.append(name)
            return _Built(name)
        return make

    assert graphs.get("a", build("a")).name == "a"
    assert graphs.get("b", build("b")).name == "b"
    assert graphs.get("a", build("a again")).name == "a"  # a hit: not rebuilt, now the most recent
    assert graphs.get("c", build("c")).name == "c"  # evicts b, the least recently used
    assert graphs.keys() == ["a", "c"] and built == ["a", "b", "c"]
    assert graphs.get("b", build("b")).name == "b" and graphs.keys() == ["c", "b"]
    with pytest.raises(ValueError, match="capacity=0: expected at least 1"):
        StepGraphs(capacity=0)


def test_step_graph_keys_separate_everything_a_graph_depends_on():
    x, kv = torch.zeros(2, 16, 6, 9), (torch.zeros(4, 77, 64),)
    key = StepGraphs.key("prior", True, x, kv)
    assert key == ("prior", True, (2, 16, 6, 9), torch.float32, torch.device("cpu"), (((4, 77, 64), torch.float32),))
    others = [StepGraphs.key("decoder", True, x, kv), StepGraphs.key("prior", False, x, kv),
              StepGraphs.key("prior", True, x[:1], kv), StepGraphs.key("prior", True, x.half(), kv),
              StepGraphs.key("prior", True, x, (kv[0][:2],))]
    assert len({key, *others}) == 6


def test_fast_backend_makes_the_reference_images(tiny_folders):
    """On a GPU the steps are real CUDA graph replays; on a CPU they run eagerly on the same static buffers."""
    reference = WuerstchenPipeline.from_pretrained(*tiny_folders, device=DEVICE, dtype=torch.float32)
    fast = WuerstchenPipeline.from_pretrained(*tiny_folders, device=DEVICE, dtype=torch.float32, backend="torch-fast")
    for pipe in (reference, fast):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", negative_prompt="dog", height=256, width=128, prior_num_inference_steps=3,
                  num_inference_steps=2, decoder_guidance_scale=2.0, num_images_per_prompt=2, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    for seed_offset in (0, 0, 1):  # the second call replays the cached steps; the third sees new noise
        actual = fast(**kwargs, generator=torch.Generator().manual_seed(seed_offset)).images
        if seed_offset == 0:
            assert np.abs(actual - expected).max() <= 2e-3
    assert np.abs(actual - expected).max() > 1e-2
    # One captured step per (stage, shape, batch): the two images of a request share one batch of two.
    assert [(key[0], key[2][0]) for key in fast.stages.graphs.keys()] == [("prior", 2), ("decoder", 2)]


def test_backend_names_are_listed_when_wrong():
    with pytest.raises(WuerstchenError, match=r"^backend='fast' is unknown: expected one of torch, torch-fast, "
                                              r"torch-compile, onnxruntime, tensorrt$"):
        Backend.parse("fast")


@pytest.mark.parametrize("head_dim", [12, 24])
def test_a_checkpoint_that_runs_on_torch_runs_on_torch_fast(head_dim, tmp_path, caplog):
    """Attention head dims the kernel does not cover run those layers on the reference path: the command line's
    images on torch-fast equal torch's within 2/255, and the fallback is logged once."""
    tiny = preset("tiny")
    width = 2 * head_dim  # two heads everywhere
    config = dataclasses.replace(
        tiny, prior=dataclasses.replace(tiny.prior, c=width, nhead=2),
        decoder=dataclasses.replace(tiny.decoder, c_hidden=(16, width, width, width), nhead=(-1, 2, 2, 2)))
    prior, decoder = save_folders(random_reference(config, seed=head_dim), tmp_path)
    images = {}
    for backend in ("torch", "torch-fast"):
        out = tmp_path / f"{backend}.png"
        assert main(["generate", "a red boat", "--prior", str(prior), "--decoder", str(decoder), "--backend", backend,
                     "--device", DEVICE.type, "--dtype", "fp32", "--seed", "3", "--height", "256", "--width", "128",
                     "--prior-steps", "3", "--decoder-steps", "2", "--out", str(out)]) == 0
        images[backend] = np.asarray(Image.open(out), dtype=int)
    assert np.abs(images["torch-fast"] - images["torch"]).max() <= 2
    assert images["torch"].std() > 2  # a picture, not a constant
    fallbacks = [r.getMessage() for r in caplog.records if "attention kernel's envelope" in r.getMessage()]
    assert fallbacks == [f"torch-fast: 2 attention blocks of the prior run on the reference path: head dim {head_dim} "
                         "is outside the attention kernel's envelope (16, 32, 64, 128)",
                         f"torch-fast: 6 attention blocks of the decoder run on the reference path: head dim "
                         f"{head_dim} is outside the attention kernel's envelope (16, 32, 64, 128)"]


def test_fast_backend_batches_concurrent_requests_into_captured_buckets(tiny_folders):
    """Several requests at once on torch-fast: their steps share batches padded to the captured sizes (real CUDA
    graphs on a GPU), and each image is the one its own call makes on the reference path."""
    reference = WuerstchenPipeline.from_pretrained(*tiny_folders, device=DEVICE, dtype=torch.float32)
    fast = WuerstchenPipeline.from_pretrained(*tiny_folders, device=DEVICE, dtype=torch.float32, backend="torch-fast")
    for pipe in (reference, fast):
        pipe.set_progress_bar_config(disable=True)
    calls = [dict(prompt=prompt, height=128, width=256, prior_num_inference_steps=steps, num_inference_steps=2,
                  output_type="np", seed=seed)
             for seed, (prompt, steps) in enumerate([("a cat", 3), ("a dog", 2), ("a red boat", 4)])]
    expected = [reference(**{k: v for k, v in call.items() if k != "seed"},
                          generator=torch.Generator().manual_seed(call["seed"])).images for call in calls]
    futures = [fast.submit(**call) for call in calls]
    for future, image in zip(futures, expected, strict=True):
        assert np.abs(future.result(timeout=300).images - image).max() <= 2e-3
    batch_sizes = {key[2][0] for key in fast.stages.graphs.keys()}
    assert batch_sizes <= {1, 2, 4, 8}  # every captured step is one of the buckets
    assert fast.stats()["batch_occupancy"] > 1
