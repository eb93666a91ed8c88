"""A Linear with its bias and an exact GELU in the GEMM's epilogue: gelu(x Wᵀ + b) in one kernel.

The VQGAN's MixingResidualBlocks expand 384 channels to 1,536 at 256² pixels, and a separate GELU reads
and writes those 1,536 channels once more: 400 MB per block in fp16, about a third of the block's memory
traffic. Here the activation is applied to the fp32 accumulator before the one store. Whether that beats
cuBLAS plus PyTorch's GELU depends on how close this GEMM comes to cuBLAS at the shape, so the fast path
uses it only where `benchmarks.fusions` says it wins (`engine.models.fused.Fusions.gemm_gelu`).

`linear_gelu` is the PyTorch custom op `wuerstchen::linear_gelu`; `linear_gelu_ref` is the same in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import DTYPES, check_device, dot_precision, interpreted

# Tiles for a GPU, chosen by Triton's autotuner per (M, N, K); the interpreter runs the small one.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=4, num_warps=4),
]
INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
GROUP_M = 8  # rows of tiles walked together, so that neighbouring programs share weight tiles in L2


@triton.jit
def grouped_tile(program, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The (row, column) tile of an M × N output that `program` computes, programs ordered in groups of GROUP
    tile rows, so that neighbouring programs share weight tiles in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = program // (GROUP * tiles_n) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + program % (GROUP * tiles_n) % group_rows, program % (GROUP * tiles_n) // group_rows


@triton.jit
def _linear_gelu(
    X, W, Bias, Out, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program: a BLOCK_M × BLOCK_N tile of the output, programs ordered in groups of GROUP tile rows.
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    # 64-bit offsets: rows · N passes 2³¹ from 11 images of 1024² at once in the VQGAN.
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + inner
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K),
                    other=0.0)  # a tile of Wᵀ: (BLOCK_K, BLOCK_N)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact (erf) GELU, as nn.GELU()
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], y.to(Out.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


_linear_gelu_tuned = triton.autotune(CONFIGS, key=["M", "N", "K"])(_linear_gelu)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_gelu: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}: "
                         "expected x (..., K), weight (N, K) and bias (N,)")
    if not (x.dtype == weight.dtype == bias.dtype) or x.dtype not in DTYPES:
        raise ValueError(f"linear_gelu: dtypes {x.dtype}, {weight.dtype}, {bias.dtype}: expected one of {DTYPES} "
                         "for all three")
    check_device("linear_gelu", x.device)


@torch.library.custom_op("wuerstchen::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x Wᵀ + b) with the exact GELU, for x (..., K), weight (N, K) and bias (N,) of one dtype (fp16,
    bf16 or fp32). Accumulates and activates in fp32; returns (..., N) in x's dtype, contiguous."""
    _check(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    rows, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (rows, weight))
    (m, k), n = rows.shape, weight.shape[0]
    out = x.new_empty(m, n)
    precision, upcast = dot_precision(x.dtype)
    arguments = (rows, weight, bias.contiguous(), out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0))
    options = dict(GROUP=GROUP_M, PRECISION=precision, UPCAST=upcast)
    if interpreted():
        tiles = INTERPRETER_TILES
        _linear_gelu[(triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)](
            *arguments, **tiles, **options)
    else:
        _linear_gelu_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            *arguments, **options)
    return out.reshape(*x.shape[:-1], n)


@linear_gelu.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch: in fp32, or fp64 for fp64 inputs."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.linear(x.to(compute), weight.to(compute), bias.to(compute))
    return torch.nn.functional.gelu(y).to(x.dtype)
