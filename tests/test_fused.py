"""The fused norm kernels (in Triton's interpreter on a CPU) against their references, and the fused,
channels-last blocks against the plain ones."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine import preset
from engine.models.blocks import (
    AttnBlock,
    ResBlock,
    StackedFiLM,
    TimestepBlock,
    fusable_chains,
    use_channels_last,
    use_fused_kernels,
)
from engine.models.decoder import Decoder, resize_image_embeddings
from engine.models.prior import Prior
from engine.models.vqgan import MixingResidualBlock, VQGANDecoder
from engine.shapes import image_shapes
from kernels.matmul import linear_gelu, linear_gelu_ref
from kernels.norms import (
    global_response_norm,
    global_response_norm_ref,
    layer_norm_modulate,
    layer_norm_modulate_pad,
    layer_norm_modulate_pad_ref,
    layer_norm_modulate_ref,
    residual_film,
    residual_film_ref,
    residual_norm,
    residual_norm_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, pixels, channels): a 23×31 latent with channels no power of two, and a 7×5 one.
SHAPES = [(2, 23 * 31, 40), (1, 7 * 5, 72), (2, 23 * 31, 1536)]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _within_rule(kernel_error: float, torch_error: float, dtype: torch.dtype) -> bool:
    """flash-attention's rule: at most twice PyTorch's own error in the dtype, plus a small atol. Triton's
    CPU interpreter truncates to bf16 where GPUs round to nearest, which doubles the error there."""
    factor = 4 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 2
    return kernel_error <= factor * torch_error + ATOL[dtype]


def _errors(kernel, reference, inputs: list, dtype: torch.dtype) -> tuple[float, float]:
    """The kernel's and PyTorch's worst errors in `dtype` against the reference in fp64, over every output."""
    exact = reference(*[t.double() if isinstance(t, torch.Tensor) else t for t in inputs])
    low = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in inputs]
    outputs, torch_outputs = kernel(*low), reference(*low)
    if isinstance(exact, torch.Tensor):
        exact, outputs, torch_outputs = (exact,), (outputs,), (torch_outputs,)
    kernel_error = torch_error = 0.0
    for out, by_torch, expected in zip(outputs, torch_outputs, exact, strict=True):
        assert out.dtype == dtype and out.shape == expected.shape and torch.isfinite(out).all()
        kernel_error = max(kernel_error, (out.double() - expected).abs().max().item())
        torch_error = max(torch_error, (by_torch.double() - expected).abs().max().item())
    return kernel_error, torch_error


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("modulation", [None, "scalar", "channel", "batch"])
def test_layer_norm_modulate_matches_its_reference(shape, dtype, modulation):
    batch, _, channels = shape
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(DEVICE)
    sizes = {None: None, "scalar": (), "channel": (channels,), "batch": (batch, channels)}[modulation]
    scale = shift = None
    if sizes is not None:
        scale, shift = (torch.randn(sizes, generator=generator).to(DEVICE) * 0.5 for _ in range(2))
    kernel_error, torch_error = _errors(layer_norm_modulate, layer_norm_modulate_ref, [x, scale, shift, 1e-6], dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 23, 31, 40), (1, 7, 5, 72), (1, 1, 3, 16)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_modulate_pad_matches_its_reference(shape, dtype):
    """The padded border, corners included, replicates the edge pixels, also of a one-pixel-high image."""
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(DEVICE)
    scale, shift = (torch.randn((), generator=generator).to(DEVICE) for _ in range(2))
    kernel_error, torch_error = _errors(layer_norm_modulate_pad, layer_norm_modulate_pad_ref, [x, scale, shift, 1e-6],
                                        dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gelu", [False, True], ids=["grn", "gelu+grn"])
def test_global_response_norm_matches_its_reference(shape, dtype, gelu):
    """Channels beyond one block of the norms' finishing kernel (1,536 > 1,024) included."""
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=generator) * 2).to(DEVICE)
    gamma, beta = (torch.randn(shape[-1], generator=generator).to(DEVICE) for _ in range(2))
    kernel_error, torch_error = _errors(global_response_norm, global_response_norm_ref, [x, gamma, beta, gelu], dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


def test_global_response_norm_sums_squares_that_overflow_fp16():
    """128×128 pixels of activations ~300: their sum of squares, ~1.5e9, is far past fp16's 65504."""
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 128 * 128, 24, generator=generator) * 300).to(DEVICE)
    gamma, beta = (torch.randn(24, generator=generator).to(DEVICE) for _ in range(2))
    exact = global_response_norm_ref(x.double(), gamma.double(), beta.double(), False)
    out = global_response_norm(x.half(), gamma.half(), beta.half(), False)
    assert torch.isfinite(out).all()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 2e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_film_matches_its_reference(shape, dtype):
    batch, _, channels = shape
    generator = torch.Generator().manual_seed(6)
    x, branch = ((torch.randn(shape, generator=generator) * 3).to(DEVICE) for _ in range(2))
    scale, shift = (torch.randn(batch, channels, generator=generator).to(DEVICE) * 0.5 for _ in range(2))
    kernel_error, torch_error = _errors(residual_film, residual_film_ref, [x, branch, scale, shift], dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


def test_residual_kernels_add_a_branch_that_is_the_input_itself():
    x = torch.randn(2, 35, 24, device=DEVICE)
    residual, normed = residual_norm(x, x, None, None, None, None, None, 1e-6)
    assert torch.allclose(residual, 2 * x)
    assert torch.allclose(normed, layer_norm_modulate_ref(2 * x, None, None, 1e-6), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["film+bias", "modulated+bias", "plain"])
def test_residual_norm_matches_its_reference(shape, dtype, variant):
    """As the prior and decoder use it (FiLM, then the attention's LayerNorm and output bias), as the VQGAN
    does (no FiLM, a scalar modulation), and with neither."""
    batch, _, channels = shape
    generator = torch.Generator().manual_seed(7)
    x, branch = ((torch.randn(shape, generator=generator) * 3 + 1).to(DEVICE) for _ in range(2))
    film = [torch.randn(batch, channels, generator=generator).to(DEVICE) * 0.5 for _ in range(2)]
    bias = torch.randn(channels, generator=generator).to(DEVICE)
    modulation = [torch.randn((), generator=generator).to(DEVICE) for _ in range(2)]
    arguments = {"film+bias": [*film, bias, None, None], "modulated+bias": [None, None, bias, *modulation],
                 "plain": [None] * 5}[variant]
    kernel_error, torch_error = _errors(residual_norm, residual_norm_ref, [x, branch, *arguments, 1e-6], dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 23 * 31, 40, 72), (1, 7 * 5, 384, 1536)], ids=lambda s: "x".join(map(str, s)))
def test_linear_gelu_matches_its_reference(shape, dtype):
    """Rows, inputs and outputs that are no multiple of a tile, and the VQGAN's 384 → 1,536 expansion."""
    batch, rows, inputs, outputs = shape
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(batch, rows, inputs, generator=generator).to(DEVICE)
    weight = (torch.randn(outputs, inputs, generator=generator) * inputs**-0.5).to(DEVICE)
    bias = torch.randn(outputs, generator=generator).to(DEVICE)
    kernel_error, torch_error = _errors(linear_gelu, _linear_then_gelu, [x, weight, bias], dtype)
    assert _within_rule(kernel_error, torch_error, dtype), (kernel_error, torch_error)


def _linear_then_gelu(x, weight, bias):
    """PyTorch's unfused Linear and GELU: the reference in fp64, PyTorch's own error in low precision."""
    if x.dtype == torch.float64:
        return linear_gelu_ref(x, weight, bias)
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))


def test_kernels_refuse_what_they_do_not_cover():
    with pytest.raises(ValueError, match=r"expected \(batch, pixels, channels\), got shape \(4, 8\)"):
        layer_norm_modulate(torch.randn(4, 8, device=DEVICE), None, None, 1e-6)
    with pytest.raises(ValueError, match="give both scale and shift, or neither"):
        layer_norm_modulate(torch.randn(1, 4, 8, device=DEVICE), torch.ones(8, device=DEVICE), None, 1e-6)
    with pytest.raises(ValueError, match=r"dtype torch.float64: expected one of"):
        global_response_norm(torch.randn(1, 4, 8, dtype=torch.float64, device=DEVICE), torch.ones(8),
                             torch.ones(8), True)
    x, film = torch.randn(1, 4, 8, device=DEVICE), torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual_film: branch \(1, 4, 7\) torch.float32: expected x's shape"):
        residual_film(x, torch.randn(1, 4, 7, device=DEVICE), film, film)
    with pytest.raises(ValueError, match=r"layer_norm_modulate_pad: expected \(batch, height, width, channels\), "
                                         r"got shape \(1, 4, 8\)"):
        layer_norm_modulate_pad(x, film[0, 0], film[0, 0], 1e-6)
    with pytest.raises(ValueError, match="residual_norm: give both scale and shift, or neither"):
        residual_norm(x, x, film, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match=r"linear_gelu: x \(1, 4, 8\), weight \(6, 7\), bias \(6,\): expected"):
        linear_gelu(x, torch.zeros(6, 7, device=DEVICE), torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match=r"linear_gelu: dtypes torch.float32, torch.float16, torch.float32"):
        linear_gelu(x, torch.zeros(6, 8, device=DEVICE).half(), torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match="residual_norm: 9000 channels: expected at most 8192"):
        wide = torch.zeros(1, 1, 9000, device=DEVICE)
        residual_norm(wide, wide, None, None, None, None, None, 1e-6)


def test_ops_trace_whole_under_compile():
    x = torch.randn(2, 35, 24, device=DEVICE)
    gamma, beta = torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)

    def block(x):
        return global_response_norm(layer_norm_modulate(x, gamma, beta, 1e-6), gamma, beta, True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), block(x))


def test_fused_stages_trace_whole_under_compile():
    """The torch-compile backend's view: every op of the fused stages, in-place GEMM epilogues included,
    in one graph."""
    config = preset("tiny")
    shapes = image_shapes(config, 128, 128, batch=2)
    prior, decoder, vqgan = (_perturbed(model, 12) for model in (
        Prior(config.prior), Decoder(config.decoder), VQGANDecoder(config.vqgan)))
    for model in (prior, decoder, vqgan):
        use_fused_kernels(model)
        use_channels_last(model)
    for block in vqgan.modules():
        if isinstance(block, MixingResidualBlock):
            block.gemm_gelu = True
    x, r = torch.randn(shapes.prior_latent, device=DEVICE), torch.rand(2, device=DEVICE)
    latent = torch.randn(shapes.decoder_latent, device=DEVICE)
    with torch.no_grad():
        kv = prior.condition(torch.randn(2, 77, 32, device=DEVICE))
        pyramid = resize_image_embeddings(x, config.decoder, shapes.decoder_levels)
        decoder_kv, effnet = decoder.condition(pyramid, torch.randn(2, 77, 24, device=DEVICE))
        for model, inputs in ((prior, (x, r, kv)), (decoder, (latent, r, decoder_kv, effnet)), (vqgan, (latent,))):
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            assert torch.allclose(compiled(*inputs), model(*inputs), atol=1e-5)
    torch._dynamo.reset()


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.to(DEVICE).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_channels_last_blocks_equal_the_plain_ones(dtype):
    generator = torch.Generator().manual_seed(3)
    res = _perturbed(ResBlock(24, c_skip=8), 4).to(dtype)
    mixing = _perturbed(MixingResidualBlock(24, 96), 5).to(dtype)
    x = torch.randn(2, 24, 23, 31, generator=generator).to(DEVICE, dtype)
    skip = torch.randn(2, 8, 23, 31, generator=generator).to(DEVICE, dtype)
    bound = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for plain, arguments, gemm_gelu in ((res, (x, skip), False), (mixing, (x,), False), (mixing, (x,), True)):
        fused = copy.deepcopy(plain)
        use_fused_kernels(fused)
        use_channels_last(fused)
        if gemm_gelu:
            fused.gemm_gelu = True
        with torch.no_grad():
            expected = plain(*arguments)
            actual = fused(*(a.contiguous(memory_format=torch.channels_last) for a in arguments))
        assert ((actual.float() - expected.float()).norm() / expected.float().norm()).item() < bound


def test_stacked_film_gives_every_block_its_own_modulation():
    blocks = [_perturbed(TimestepBlock(channels, 8), seed) for seed, channels in enumerate((16, 24, 16))]
    r_embed = torch.randn(3, 8, device=DEVICE)
    with torch.no_grad():
        films = list(StackedFiLM(blocks)(r_embed))
        assert len(films) == 3
        for block, (a, b) in zip(blocks, films, strict=True):
            expected_a, expected_b = block.modulation(r_embed)
            assert a.shape == expected_a.shape and torch.allclose(a, expected_a, atol=1e-6)
            assert torch.allclose(b, expected_b, atol=1e-6)


def test_chains_group_each_resblock_with_the_film_and_attention_after_it():
    res, time, attn = ResBlock(8), TimestepBlock(8, 4), AttnBlock(8, 8, 2)
    other = torch.nn.Identity()
    blocks = [res, time, attn, res, time, res, other, time, attn, res, time]
    assert fusable_chains(blocks) == [(res, time, attn), (res, time), (res,), (other,), (time,), (attn,),
                                      (res, time)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_stages_equal_the_plain_ones(dtype):
    """Every fusion of the fast path at once, on the tiny preset's stages with perturbed weights: the
    prior's and decoder's chains (with attention, FiLM only, effnet and level skips) and the VQGAN.

    The noise heads divide by as little as 1e-5, which turns any rounding difference near that pole into
    an arbitrary one; the heads' unfused code is shared, so the stages are compared on the heads' inputs."""
    config = preset("tiny")
    shapes = image_shapes(config, 256, 384, batch=2)
    generator = torch.Generator().manual_seed(8)

    def randn(*size):
        return torch.randn(size, generator=generator).to(DEVICE, dtype)

    r = torch.rand(2, generator=generator).to(DEVICE, dtype)
    embedding = randn(*shapes.prior_latent)
    stages = {
        "prior": (Prior(config.prior), lambda m: m(randn(*shapes.prior_latent), r, m.condition(randn(2, 77, 32)))),
        "decoder": (Decoder(config.decoder), lambda m: m(randn(*shapes.decoder_latent), r, *m.condition(
            resize_image_embeddings(embedding, config.decoder, shapes.decoder_levels), randn(2, 77, 24)))),
        "vqgan": (VQGANDecoder(config.vqgan), lambda m: m(randn(*shapes.decoder_latent))),
    }
    bound = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for name, (plain, run) in stages.items():
        plain = _perturbed(plain, 9).to(dtype)
        fused = copy.deepcopy(plain)
        use_fused_kernels(fused)
        use_channels_last(fused)
        state = generator.get_state()
        expected = _head_input(plain, run)
        generator.set_state(state)  # the same inputs again
        actual = _head_input(fused, run)
        error = ((actual - expected).norm() / expected.norm()).item()
        assert error < bound, (name, error)


def _head_input(model: torch.nn.Module, run) -> torch.Tensor:
    """What `model` feeds its noise head (the output of `out` or `clf`), or its output if it has none."""
    head = model.out if isinstance(model, Prior) else model.clf if isinstance(model, Decoder) else None
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(output)) if head else None
    with torch.no_grad():
        output = run(model)
    if hook:
        hook.remove()
    return (captured[0] if captured else output).float()
