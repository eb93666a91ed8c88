"""fp8 and int8 Linears: activations quantized per row at run time, weights per output channel at load, and
GEMMs that apply both scales, the bias and a residual in their epilogue.

- `quantize_fp8_rows(x)`: each row (token) of x divided by its own absmax / 448 and rounded to
  float8_e4m3fn, in one kernel; returns q and the fp32 scales (M, 1), x ≈ q · scales.
- `quantize_weight(w, dtype)`: per-output-channel symmetric scales, to float8_e4m3fn or int8; PyTorch, once
  at load.
- `fp8_linear`: x_q W_qᵀ on fp8 tensor cores (Ada, Hopper) with fp32 accumulation, then
  `· x_scale · w_scale + bias + residual`. `fp8_linear_scaled_mm` is the same through cuBLASLt
  (`torch._scaled_mm`), and `fp8_gemm_for` picks one of the two per layer.
- `int8_weight_only_linear`: fp16/bf16 activations times int8 weights widened inside the kernel, the same
  epilogue: for GPUs without fp8, where it halves the weights' memory traffic.

Each kernel is a PyTorch custom op (`wuerstchen::…`) beside its PyTorch reference (`…_ref`), which computes
the same quantized math in fp64.

Triton's CPU interpreter loads fp8 and multiplies fp8 tiles exactly (through fp16, summed in fp32), but its
fp32 → fp8 conversion rounds 5,614 of the 63,488 finite fp16 values (clamped to ±448) wrongly: 31.5 becomes
16, the carry into the exponent lost, and subnormals round the wrong way. Under the interpreter the quantize
kernel therefore rounds to the e4m3 grid itself (`_round_e4m3`), after which the conversion is exact; on a
GPU the conversion instruction (cvt.rn.satfinite) rounds to nearest even on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import triton
import triton.language as tl

from kernels import DTYPES, check_device, dot_precision, interpreted
from kernels.matmul import CONFIGS as WIDE_CONFIGS
from kernels.matmul import GROUP_M, INTERPRETER_TILES, grouped_tile

FP8 = torch.float8_e4m3fn
QMAX = {FP8: 448.0, torch.int8: 127.0}  # the largest value of each format: symmetric scales map absmax to it
MIN_SCALE = 2.0**-126  # the smallest normal fp32: the scale of all-zero rows, so that no scale is ever 0
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the GEMMs' outputs, and the int8 GEMM's activations

# fp8 tiles are twice as deep as 16-bit ones for the same bytes per stage.
FP8_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=5, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128}, num_stages=4, num_warps=4),
]


# ---------------------------------------------------------------------------------------------------------
# Quantization


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8_e4m3fn value, ties to even, saturated to ±448, as fp32: what
    `.clamp(-448, 448).to(torch.float8_e4m3fn).float()` gives, in arithmetic. e4m3 keeps 3 mantissa bits for
    exponents -6 to 8, and below 2⁻⁶ steps of 2⁻⁹ (subnormals)."""
    x = x.float().clamp(-QMAX[FP8], QMAX[FP8])
    exponent = torch.frexp(x).exponent - 1  # |x| = 1.m · 2^exponent
    step = torch.ldexp(torch.ones_like(x), exponent.clamp(min=-6) - 3)
    return torch.round(x / step) * step  # both exact: step is a power of two


@triton.jit
def _round_e4m3(y):
    # `round_to_e4m3` for fp32 |y| ≤ 448: |y| / step is exact, below 16, and adding then subtracting
    # 1.5 · 2²³ rounds it to an integer, ties to even. The step, 2^(exponent - 3), is built from its bits,
    # and the sign is put back last, so that what rounds to zero keeps it (-0 is an e4m3 value of its own).
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
    magnitude = ((tl.abs(y) * inverse + 12582912.0) - 12582912.0) * step
    return tl.where(bits < 0, -magnitude, magnitude)


@triton.jit
def _quantize_fp8_rows(
    X, Q, Scales, M, K, stride_xm, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    EMULATE: tl.constexpr,
):
    # One program: BLOCK_M rows, read twice in BLOCK_K chunks (the second read mostly from cache): the rows'
    # absmax first, then q = x / scale, rounded and written.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    inner = tl.arange(0, BLOCK_K)
    absmax = tl.zeros([BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + inner
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    # Divisions rounded to nearest, as in PyTorch: Triton's `/` is div.full.f32 on NVIDIA GPUs, within 2 ulp.
    scale = tl.maximum(tl.div_rn(absmax, QMAX), MIN_SCALE)
    tl.store(Scales + rows, scale, mask=rows < M)
    for k in range(0, K, BLOCK_K):
        cols = k + inner
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -QMAX), QMAX)
        if EMULATE:
            y = _round_e4m3(y)
        tl.store(Q + rows[:, None] * stride_qm + cols[None, :], y.to(Q.dtype.element_ty), mask=mask)


def _check_fp8_device(name: str, device: torch.device) -> None:
    """fp8 conversions and tensor cores need sm_89 (Ada) or later; the interpreter runs them on the CPU."""
    check_device(name, device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{name}: fp8 needs a GPU of sm_89 (Ada) or later; this one is sm_{major}{minor}")


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: x {tuple(x.shape)}: expected (M, K) with K ≥ 1")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype}: expected one of {DTYPES}")


@torch.library.custom_op("wuerstchen::quantize_fp8_rows", mutates_args=())
def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) fp8 quantization of finite x (M, K), fp16, bf16 or fp32: returns
    q (M, K) float8_e4m3fn and scales (M, 1) fp32 with x ≈ q · scales. A row's scale is its absmax / 448,
    at least `MIN_SCALE` (zero rows get that, and q = 0); q = x / scale rounded to nearest, ties to even."""
    _check_rows("quantize_fp8_rows", x)
    _check_fp8_device("quantize_fp8_rows", x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    scales = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block_k = min(triton.next_power_of_2(k), 2048)
    block_m = max(1, 2048 // block_k)  # tiles of about 2,048 values: several rows per program when short
    _quantize_fp8_rows[(triton.cdiv(m, block_m),)](
        x, q, scales, m, k, x.stride(0), q.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, QMAX=QMAX[FP8],
        MIN_SCALE=MIN_SCALE, EMULATE=interpreted(), num_warps=4)
    return q, scales


@quantize_fp8_rows.register_fake
def _(x):
    _check_rows("quantize_fp8_rows", x)
    return torch.empty_like(x, dtype=FP8, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[0], 1, dtype=torch.float32)


def _quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales (rows, 1) fp32) of 2-D x, each row scaled symmetrically to `dtype`'s range, in PyTorch."""
    qmax = QMAX[dtype]
    x = x.float()
    scales = (x.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    scaled = (x / scales).clamp(-qmax, qmax)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scales


def quantize_fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch, rounded by torch's conversion to float8_e4m3fn."""
    return _quantize_rows(x, FP8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A Linear's weight (N, K) as `data` (float8_e4m3fn or int8) times `scale` (N, 1) fp32, one per output
    channel."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """data · scale in fp32."""
        return self.data.float() * self.scale


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> QuantizedWeight:
    """A weight (N, K) quantized per output channel to `dtype`, float8_e4m3fn or int8 (symmetric, ±127):
    scale = the channel's absmax / the format's largest value, at least `MIN_SCALE`; data = weight / scale
    rounded to nearest, ties to even. In PyTorch: it runs once, when a model is loaded."""
    if weight.dim() != 2 or dtype not in QMAX:
        raise ValueError(f"quantize_weight: weight {tuple(weight.shape)} to {dtype}: expected a 2-D weight (N, K) "
                         f"and one of {tuple(QMAX)}")
    return QuantizedWeight(*_quantize_rows(weight.detach(), dtype))


# ---------------------------------------------------------------------------------------------------------
# GEMMs


@triton.jit
def _scaled_linear(
    X, W, XScale, WScale, Bias, Residual, Out, M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    ROW_SCALE: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, WIDEN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program: a BLOCK_M × BLOCK_N tile of (X Wᵀ) · x_scale[m] · w_scale[n] + bias[n] + residual[m, n],
    # programs ordered in groups of GROUP tile rows (`kernels.matmul.grouped_tile`).
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
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
        elif WIDEN:  # int8 weights into the activations' fp16 or bf16, exactly (|w| ≤ 127)
            w = w.to(x.dtype)
        # Hopper sums fp8 products in a narrower accumulator than fp32: move them into `acc` every BLOCK_K
        # (the setting is ignored for 16-bit operands).
        acc = tl.dot(x, w, acc, max_num_imprecise_acc=BLOCK_K)
    acc *= tl.load(WScale + cols, mask=cols < N, other=0.0)[None, :]
    if ROW_SCALE:
        acc *= tl.load(XScale + rows, mask=rows < M, other=0.0)[:, None]
    if BIAS:
        acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if RESIDUAL:
        acc += tl.load(Residual + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


_fp8_linear_tuned = triton.autotune(FP8_CONFIGS, key=["M", "N", "K"])(_scaled_linear)
_wide_linear_tuned = triton.autotune(WIDE_CONFIGS, key=["M", "N", "K"])(_scaled_linear)


def _check_linear(name: str, x: torch.Tensor, x_dtypes: tuple, x_scale: torch.Tensor | None, weight: torch.Tensor,
                  weight_dtype: torch.dtype, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, out_dtype: torch.dtype) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.shape[1] == 0:
        raise ValueError(f"{name}: x {tuple(x.shape)}, weight {tuple(weight.shape)}: expected x (M, K) and "
                         "weight (N, K) with K ≥ 1")
    if x.dtype not in x_dtypes or weight.dtype != weight_dtype or out_dtype not in HALF_DTYPES:
        raise ValueError(f"{name}: x {x.dtype}, weight {weight.dtype}, output {out_dtype}: expected x one of "
                         f"{x_dtypes}, weight {weight_dtype}, output one of {HALF_DTYPES}")
    (m, _), n = x.shape, weight.shape[0]
    expected = {"x_scale": (x_scale, (m, 1), torch.float32), "w_scale": (w_scale, (n, 1), torch.float32),
                "bias": (bias, (n,), out_dtype), "residual": (residual, (m, n), out_dtype)}
    for label, (tensor, shape, dtype) in expected.items():
        if tensor is not None and (tuple(tensor.shape) != shape or tensor.dtype != dtype):
            raise ValueError(f"{name}: {label} {tuple(tensor.shape)} {tensor.dtype}: expected {shape} {dtype}")
    check_device(name, x.device)


def _launch_linear(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Runs `_scaled_linear` on checked operands; fp8 x with its row scales, or 16-bit x with int8 weights."""
    x, weight = (t if t.stride(1) == 1 else t.contiguous() for t in (x, weight))
    residual = None if residual is None else residual if residual.stride(1) == 1 else residual.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=out_dtype)
    _, upcast = dot_precision(x.dtype)
    fp8 = x.dtype == FP8
    # `out` and `w_scale` stand in for the pointers the kernel does not read.
    arguments = (x, weight, w_scale if x_scale is None else x_scale.contiguous(), w_scale.contiguous(),
                 out if bias is None else bias.contiguous(), out if residual is None else residual, out,
                 m, n, k, x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0), out.stride(0))
    options = dict(GROUP=GROUP_M, ROW_SCALE=fp8, BIAS=bias is not None, RESIDUAL=residual is not None,
                   WIDEN=not fp8, UPCAST=upcast)
    if interpreted():
        tiles = INTERPRETER_TILES
        _scaled_linear[(triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)](
            *arguments, **tiles, **options)
    else:
        kernel = _fp8_linear_tuned if fp8 else _wide_linear_tuned
        kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            *arguments, **options)
    return out


@torch.library.custom_op("wuerstchen::fp8_linear", mutates_args=())
def fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x_q · x_scale)(w_q · w_scale)ᵀ + bias + residual for x_q (M, K) and w_q (N, K) float8_e4m3fn,
    x_scale (M, 1) and w_scale (N, 1) fp32, bias (N,) and residual (M, N) in out_dtype (fp16 or bf16).
    fp8 products summed in fp32 (on Hopper, moved there from the tensor cores' narrower accumulator every
    BLOCK_K products); scales, bias and residual applied to the fp32 sums; returns (M, N)."""
    _check_linear("fp8_linear", x_q, (FP8,), x_scale, w_q, FP8, w_scale, bias, residual, out_dtype)
    _check_fp8_device("fp8_linear", x_q.device)
    return _launch_linear(x_q, x_scale, w_q, w_scale, bias, residual, out_dtype)


@fp8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias=None, residual=None, out_dtype=torch.bfloat16):
    _check_linear("fp8_linear", x_q, (FP8,), x_scale, w_q, FP8, w_scale, bias, residual, out_dtype)
    return x_q.new_empty(x_q.shape[0], w_q.shape[0], dtype=out_dtype)


def _linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """x Wᵀ + bias + residual in fp64, rounded once to out_dtype."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y.to(out_dtype)


def fp8_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The same in PyTorch: fp64 arithmetic on the dequantized operands."""
    return _linear_ref(x_q.double() * x_scale.double(), w_q.double() * w_scale.double(), bias, residual, out_dtype)


def scaled_mm_unsupported(n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `fp8_linear_scaled_mm` cannot run a weight (N, K) into out_dtype on `device`, in one line, or None
    when it can."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return f"torch._scaled_mm needs a CUDA GPU of sm_89 (Ada) or later, not {device}"
    if n % 16 or k % 16:
        return f"weight ({n}, {k}): torch._scaled_mm needs N and K to be multiples of 16"
    if out_dtype != torch.bfloat16:
        return f"output {out_dtype}: row-wise scaled torch._scaled_mm is used for bf16 only (older torch refuses fp16)"
    return None


def fp8_linear_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`fp8_linear` through cuBLASLt (`torch._scaled_mm` with row-wise scales, fp32 accumulation), in its
    envelope (`scaled_mm_unsupported`). The residual is added after the GEMM: one more pass, and one more
    rounding to out_dtype."""
    _check_linear("fp8_linear_scaled_mm", x_q, (FP8,), x_scale, w_q, FP8, w_scale, bias, residual, out_dtype)
    reason = scaled_mm_unsupported(w_q.shape[0], w_q.shape[1], out_dtype, x_q.device)
    if reason:
        raise ValueError(f"fp8_linear_scaled_mm: {reason}")
    # cuBLASLt takes x row-major and the weight column-major: Wᵀ of a row-major (N, K) weight is.
    out = torch._scaled_mm(x_q.contiguous(), w_q.contiguous().t(), scale_a=x_scale.contiguous(),
                           scale_b=w_scale.contiguous().t(), bias=bias, out_dtype=out_dtype)
    return out if residual is None else out.add_(residual)


class Fp8Gemm(str, Enum):
    TRITON = "triton"  # `fp8_linear`
    CUBLAS = "cublas"  # `fp8_linear_scaled_mm`


FP8_GEMMS = {Fp8Gemm.TRITON: fp8_linear, Fp8Gemm.CUBLAS: fp8_linear_scaled_mm}

# The faster fp8 GEMM per weight shape (N, K), at the activation rows of a 1024² image, as measured by
# `python -m benchmarks.quant_kernels` on a GPU, which prints these entries. No GPU has measured them yet:
# until one does, every layer runs the Triton kernel, a default owed to that measurement and not taken from it.
FP8_GEMM_MEASURED: dict[tuple[int, int], Fp8Gemm] = {}


def fp8_gemm_for(n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> Fp8Gemm:
    """Which fp8 GEMM a Linear of weight (N, K) runs: the measured faster one where it can run, else Triton's."""
    choice = FP8_GEMM_MEASURED.get((n, k), Fp8Gemm.TRITON)
    if choice is Fp8Gemm.CUBLAS and scaled_mm_unsupported(n, k, out_dtype, device):
        return Fp8Gemm.TRITON
    return choice


@torch.library.custom_op("wuerstchen::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (w_q · w_scale)ᵀ + bias + residual for x (M, K) fp16 or bf16, w_q (N, K) int8 and w_scale (N, 1)
    fp32, bias (N,) and residual (M, N) in x's dtype. The int8 tiles are widened to x's dtype in the kernel
    and multiplied on 16-bit tensor cores, summed in fp32; the scale, bias and residual are applied to the
    sums. Returns (M, N) in x's dtype."""
    _check_linear("int8_weight_only_linear", x, HALF_DTYPES, None, w_q, torch.int8, w_scale, bias, residual, x.dtype)
    return _launch_linear(x, None, w_q, w_scale, bias, residual, x.dtype)


@int8_weight_only_linear.register_fake
def _(x, w_q, w_scale, bias=None, residual=None):
    _check_linear("int8_weight_only_linear", x, HALF_DTYPES, None, w_q, torch.int8, w_scale, bias, residual, x.dtype)
    return x.new_empty(x.shape[0], w_q.shape[0])


def int8_weight_only_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The same in PyTorch: fp64 arithmetic on the dequantized weight."""
    return _linear_ref(x, w_q.double() * w_scale.double(), bias, residual, x.dtype)
