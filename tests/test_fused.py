"""The fused norm kernels (in Triton's interpreter on a CPU) against their references, and the fast path's
fused, channels-last modules (`engine.models.fused.fuse`) against the plain ones."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os

import pytest
import torch

import engine.models.blocks
import engine.models.decoder
import engine.models.prior
import engine.models.vqgan
import kernels.norms
from engine import WuerstchenError, preset
from engine.models.blocks import AttnBlock, ResBlock, TimestepBlock, sdpa_attention
from engine.models.decoder import Decoder, resize_image_embeddings
from engine.models.fused import (
    FusedAttnBlock,
    FusedChain,
    FusedLayerNorm2d,
    FusedMixingBlock,
    FusedResBlock,
    Fusions,
    StackedFiLM,
    fusable_chains,
    fuse,
)
from engine.models.prior import Prior
from engine.models.vqgan import MixingResidualBlock, VQGANDecoder
from engine.shapes import image_shapes
from kernels.attention import attention
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
    plain = [_perturbed(model, 12) for model in (
        Prior(config.prior), Decoder(config.decoder), VQGANDecoder(config.vqgan))]
    prior, decoder, vqgan = (fuse(model, Fusions(gemm_gelu=True)) for model in plain)
    x, r = torch.randn(shapes.prior_latent, device=DEVICE), torch.rand(2, device=DEVICE)
    latent = torch.randn(shapes.decoder_latent, device=DEVICE)
    with torch.no_grad():
        kv = prior.condition(torch.randn(2, 77, 32, device=DEVICE))
        pyramid = resize_image_embeddings(x, config.decoder, shapes.decoder_levels)
        conditioning = decoder.condition(pyramid, torch.randn(2, 77, 24, device=DEVICE))
        for model, inputs in ((prior, (x, r, kv)), (decoder, (latent, r, conditioning)), (vqgan, (latent,))):
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
    for plain, arguments, make_fused in (
        (res, (x, skip), lambda block: FusedResBlock(block, FusedLayerNorm2d(block.norm.eps))),
        (mixing, (x,), lambda block: FusedMixingBlock(block, gemm_gelu=False)),
        (mixing, (x,), lambda block: FusedMixingBlock(block, gemm_gelu=True)),
    ):
        fused = make_fused(copy.deepcopy(plain)).to(memory_format=torch.channels_last)
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


def _stage_runs(config, dtype: torch.dtype, generator: torch.Generator, height: int = 256, width: int = 384) -> dict:
    """Each stage of `config` and how to run it once on random inputs drawn from `generator`: the same inputs
    again when the generator's state is restored."""
    shapes = image_shapes(config, height, width, batch=2)

    def randn(*size):
        return torch.randn(size, generator=generator).to(DEVICE, dtype)

    r = torch.rand(2, generator=generator).to(DEVICE, dtype)
    embedding = randn(*shapes.prior_latent)
    return {
        "prior": (Prior(config.prior), lambda m: m(randn(*shapes.prior_latent), r,
                                                   m.condition(randn(2, 77, config.prior.c_cond)))),
        "decoder": (Decoder(config.decoder), lambda m: m(randn(*shapes.decoder_latent), r, m.condition(
            resize_image_embeddings(embedding, config.decoder, shapes.decoder_levels),
            randn(2, 77, config.decoder.clip_embd)))),
        "vqgan": (VQGANDecoder(config.vqgan), lambda m: m(randn(*shapes.decoder_latent))),
    }


def _fused_error(plain: torch.nn.Module, fused: torch.nn.Module, run, generator: torch.Generator) -> float:
    """The relative difference between what `plain` and `fused` feed their noise heads on the same inputs."""
    state = generator.get_state()
    expected = _head_input(plain, run)
    generator.set_state(state)  # the same inputs again
    actual = _head_input(fused, run)
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype, fusions", [
    (torch.float32, Fusions()), (torch.float16, Fusions()), (torch.float32, Fusions(chains=False)),
    (torch.float32, Fusions(gemm_gelu=True)),
], ids=["fp32", "fp16", "fp32-kernels-only", "fp32-gemm-gelu"])
def test_fused_stages_equal_the_plain_ones(dtype, fusions):
    """Every fusion of the fast path at once, on the tiny preset's stages with perturbed weights: the
    prior's and decoder's chains (with attention, FiLM only, effnet and level skips) and the VQGAN; then the
    kernels alone, each block on its own; then with the VQGAN's Linear and GELU as one GEMM.

    The noise heads divide by as little as 1e-5, which turns any rounding difference near that pole into
    an arbitrary one; the heads' unfused code is shared, so the stages are compared on the heads' inputs."""
    generator = torch.Generator().manual_seed(8)
    bound = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for name, (plain, run) in _stage_runs(preset("tiny"), dtype, generator).items():
        if fusions.gemm_gelu and name != "vqgan":  # linear_gelu only changes the VQGAN
            continue
        plain = _perturbed(plain, 9).to(dtype)
        fused = fuse(copy.deepcopy(plain), fusions)
        assert fused.fallbacks == {}
        chains = [unit for unit in fused.modules() if isinstance(unit, FusedChain | FusedMixingBlock)]
        assert bool(chains) == fusions.chains
        error = _fused_error(plain, fused, run, generator)
        assert error < bound, (name, error)


def _head_input(model: torch.nn.Module, run) -> torch.Tensor:
    """What `model` feeds its noise head (the output of `out` or `clf`), or its output if it has none."""
    head = next((getattr(model, name) for name in ("out", "clf") if hasattr(model, name)), None)
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(output)) if head else None
    with torch.no_grad():
        output = run(model)
    if hook:
        hook.remove()
    return (captured[0] if captured else output).float()


def test_attention_outside_the_kernels_envelope_falls_back_to_sdpa(caplog):
    """Head dims 12 and 24, which the attention kernel does not take: those blocks attend with SDPA, still
    inside their fused chains; every other layer stays on the kernels; each reason is logged once."""
    tiny = preset("tiny")
    config = dataclasses.replace(
        tiny, prior=dataclasses.replace(tiny.prior, c=24, nhead=2),  # head dim 12
        decoder=dataclasses.replace(tiny.decoder, c_hidden=(16, 24, 48, 32), nhead=(-1, 2, 2, 2)))  # 12, 24, 16
    twelve = "head dim 12 is outside the attention kernel's envelope (16, 32, 64, 128)"
    twenty_four = "head dim 24 is outside the attention kernel's envelope (16, 32, 64, 128)"
    expected = {"prior": ({twelve: 2}, [f"torch-fast: 2 attention blocks of the prior run on the reference path: "
                                        f"{twelve}"]),
                "decoder": ({twelve: 2, twenty_four: 2}, [
                    f"torch-fast: 2 attention blocks of the decoder run on the reference path: {twelve}",
                    f"torch-fast: 2 attention blocks of the decoder run on the reference path: {twenty_four}"])}
    generator = torch.Generator().manual_seed(13)
    for name, (plain, run) in _stage_runs(config, torch.float32, generator).items():
        if name == "vqgan":
            continue
        plain = _perturbed(plain, 14)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engine.models.fused"):
            fused = fuse(copy.deepcopy(plain))
        fallbacks, messages = expected[name]
        assert fused.fallbacks == fallbacks
        assert [record.getMessage() for record in caplog.records] == messages
        chains = [unit for unit in fused.modules() if isinstance(unit, FusedChain) and unit.attn is not None]
        assert chains and all(isinstance(chain.res, FusedResBlock) for chain in chains)
        functions = [chain.attn.attention for chain in chains]
        assert functions.count(sdpa_attention) == sum(fallbacks.values())
        assert functions.count(attention) == len(chains) - sum(fallbacks.values())
        assert _fused_error(plain, fused, run, generator) < 1e-5


def test_widths_outside_the_layer_norm_kernels_run_unfused(monkeypatch, caplog):
    """With the LayerNorm kernels' envelope narrowed to 24 channels, the tiny decoder's 32-channel levels run
    their norms and glue on the reference path (a kernel called there would refuse them) and its 16-channel
    level stays fused; the result is the plain decoder's."""
    monkeypatch.setattr(kernels.norms, "MAX_CHANNELS", 24)
    generator = torch.Generator().manual_seed(15)
    plain, run = _stage_runs(preset("tiny"), torch.float32, generator)["decoder"]
    plain = _perturbed(plain, 16)
    with caplog.at_level(logging.WARNING, logger="engine.models.fused"):
        fused = fuse(copy.deepcopy(plain))
    reason = "width 32 is outside the LayerNorm kernels' envelope (at most 24 channels)"
    assert list(fused.fallbacks) == [reason]
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith("torch-fast: ") and "LayerNorms and 6 block chains of the decoder run" in message
    assert isinstance(fused.down_levels[0][0], FusedChain) and isinstance(fused.embedding[2], FusedLayerNorm2d)
    for level in (*fused.down_levels[1:], *fused.up_levels[:-1]):
        assert not any(isinstance(unit, FusedChain) for unit in level)
        attn = next(unit for unit in level if isinstance(unit, FusedAttnBlock))
        assert attn.attention is attention and not isinstance(attn.norm, FusedLayerNorm2d)
    assert _fused_error(plain, fused, run, generator) < 1e-5


def test_plain_model_files_know_nothing_of_the_fast_path():
    for module in (engine.models.blocks, engine.models.prior, engine.models.decoder, engine.models.vqgan):
        source = inspect.getsource(module)
        for word in ("from kernels", "import kernels", "fused", "channels_last", "triton"):
            assert word not in source, (module.__name__, word)


def test_fusing_leaves_the_plain_model_computing_what_it_did():
    """The fused module shares the plain model's weights and adds nothing to it; the plain model's results,
    with its convolution weights now channels-last, are the same up to fp32 rounding."""
    generator = torch.Generator().manual_seed(17)
    for name, (plain, run) in _stage_runs(preset("tiny"), torch.float32, generator).items():
        plain = _perturbed(plain, 18)
        state = generator.get_state()
        before = _head_input(plain, run)
        names = set(plain.state_dict())
        fused = fuse(plain, Fusions(gemm_gelu=True))
        assert set(plain.state_dict()) == names
        assert {id(p) for p in fused.parameters()} == {id(p) for p in plain.parameters()}
        generator.set_state(state)
        after = _head_input(plain, run)
        assert ((after - before).norm() / before.norm()).item() < 1e-6, name


def test_fuse_refuses_what_it_does_not_know():
    with pytest.raises(WuerstchenError, match="^fuse: model of type ResBlock: expected a Prior, Decoder or "
                                              "VQGANDecoder$"):
        fuse(ResBlock(8))
    with torch.device("meta"):
        prior = Prior(preset("tiny").prior)
    with pytest.raises(WuerstchenError, match="the model's weights are on the meta device: expected them loaded"):
        fuse(prior)
    with pytest.raises(WuerstchenError, match=r"Fusions\(gemm_gelu=True, chains=False\): expected chains=True"):
        Fusions(chains=False, gemm_gelu=True)
