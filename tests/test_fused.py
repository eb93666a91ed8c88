"""The fused norm kernels (in Triton's interpreter on a CPU) against their references, and the fused,
channels-last blocks against the plain ones."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine.models.blocks import ResBlock, use_channels_last, use_fused_kernels
from engine.models.vqgan import MixingResidualBlock
from kernels.norms import global_response_norm, global_response_norm_ref, layer_norm_modulate, layer_norm_modulate_ref

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
    exact = reference(*[t.double() if isinstance(t, torch.Tensor) else t for t in inputs])
    low = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = kernel(*low)
    assert out.dtype == dtype and out.shape == exact.shape and torch.isfinite(out).all()
    return (out.double() - exact).abs().max().item(), (reference(*low).double() - exact).abs().max().item()


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
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gelu", [False, True], ids=["grn", "gelu+grn"])
def test_global_response_norm_matches_its_reference(shape, dtype, gelu):
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


def test_kernels_refuse_what_they_do_not_cover():
    with pytest.raises(ValueError, match=r"expected \(batch, pixels, channels\), got shape \(4, 8\)"):
        layer_norm_modulate(torch.randn(4, 8, device=DEVICE), None, None, 1e-6)
    with pytest.raises(ValueError, match="give both scale and shift, or neither"):
        layer_norm_modulate(torch.randn(1, 4, 8, device=DEVICE), torch.ones(8, device=DEVICE), None, 1e-6)
    with pytest.raises(ValueError, match=r"dtype torch.float64: expected one of"):
        global_response_norm(torch.randn(1, 4, 8, dtype=torch.float64, device=DEVICE), torch.ones(8),
                             torch.ones(8), True)


def test_ops_trace_whole_under_compile():
    x = torch.randn(2, 35, 24, device=DEVICE)
    gamma, beta = torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)

    def block(x):
        return global_response_norm(layer_norm_modulate(x, gamma, beta, 1e-6), gamma, beta, True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), block(x))


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
    for plain, arguments in ((res, (x, skip)), (mixing, (x,))):
        fused = copy.deepcopy(plain)
        use_fused_kernels(fused)
        use_channels_last(fused)
        with torch.no_grad():
            expected = plain(*arguments)
            actual = fused(*(a.contiguous(memory_format=torch.channels_last) for a in arguments))
        assert ((actual.float() - expected.float()).norm() / expected.float().norm()).item() < bound
