"""The quantization kernels (in Triton's interpreter on a CPU) against their fp64 references, the bounds of
their quantization error, the e4m3 rounding against torch's, and their custom ops under torch.compile.

Triton's interpreter runs the real kernels, fp8 loads and fp8 tile products included; only its fp32 → fp8
conversion is wrong, so the quantize kernel rounds there by `_round_e4m3`, checked here on every fp16 value.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from benchmarks.quant_kernels import linear_shapes
from benchmarks.quant_kernels import main as benchmark_main
from engine import preset
from engine.models.blocks import AttnBlock, ResBlock
from engine.models.decoder import Decoder
from engine.models.prior import Prior
from kernels.quant import (
    FP8,
    FP8_GEMM_MEASURED,
    MIN_SCALE,
    Fp8Gemm,
    fp8_gemm_for,
    fp8_linear,
    fp8_linear_ref,
    fp8_linear_scaled_mm,
    int8_weight_only_linear,
    int8_weight_only_linear_ref,
    quantize_fp8_rows,
    quantize_fp8_rows_ref,
    quantize_weight,
    round_to_e4m3,
    scaled_mm_unsupported,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8_DEVICE = DEVICE.type == "cpu" or torch.cuda.get_device_capability(DEVICE) >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_DEVICE, reason="fp8 needs a GPU of sm_89 or later")
# (M, N, K): one row, and row and column counts that are no multiple of any tile.
SHAPES = [(1, 24, 33), (7, 130, 100), (77, 24, 100), (257, 130, 33)]
EPILOGUES = [(False, False), (True, False), (False, True), (True, True)]  # (bias, residual)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def fp16_values() -> torch.Tensor:
    """Every finite fp16 value, as fp32."""
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    return values[values.isfinite()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def randn(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def assert_output_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The kernels sum in fp32 and the references in fp64, each rounding once to the output dtype: they may
    differ by one unit in the last place (and do often in bf16 under the interpreter, whose fp32 → bf16
    conversion truncates), and near zero by the fp32 sums' error."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual.float(), expected.float(), rtol=eps,
                               atol=2**-20 * expected.abs().max().item() + 1e-30)


# --- e4m3 rounding ----------------------------------------------------------------------------------------


def test_e4m3_emulation_matches_torch_on_every_fp16_value():
    x = fp16_values()
    clamped = x.clamp(-448, 448)
    assert torch.equal(round_to_e4m3(x).view(torch.int32), clamped.to(FP8).float().view(torch.int32))
    assert round_to_e4m3(torch.tensor([-1e30, 1e30, 449.0, 479.9])).tolist() == [-448, 448, 448, 448]
    assert round_to_e4m3(torch.tensor(float("nan"))).isnan()
    # Ties go to the even neighbour: 1.0625 lies halfway between 1 and 1.125, 2⁻¹⁰ between 0 and 2⁻⁹.
    ties = torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-10)])
    assert round_to_e4m3(ties).tolist() == [1.0, 1.25, 0.0, 2.0**-8, -0.0]
    assert torch.signbit(round_to_e4m3(ties))[-1]


@needs_fp8
def test_quantize_kernel_rounds_every_fp16_value_as_torch():
    """Rows whose absmax is 448 have scale 1, so q is x rounded: every fp16 value within ±448 goes through
    the kernel's rounding (its emulation under the interpreter) and must give torch's bits."""
    values = fp16_values()
    values = values[values.abs() <= 448]
    rows = -(-values.numel() // 255)
    x = torch.zeros(rows * 255)
    x[:values.numel()] = values
    x = torch.cat([torch.full((rows, 1), 448.0), x.reshape(rows, 255)], dim=1).to(DEVICE)
    q, scales = quantize_fp8_rows(x)
    assert torch.equal(scales, torch.ones_like(scales))
    assert same_bits(q, x.to(FP8))


# --- activation and weight quantization -----------------------------------------------------------------


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 33), (7, 100), (77, 24), (257, 130), (3, 5000)])
def test_quantize_fp8_rows_matches_reference(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    x[0, 0] = 0.0
    if shape[0] > 2:
        x[1] = 0.0  # a zero row
        x[2, shape[1] // 2] = 3e4  # a row with one huge outlier
    q, scales = quantize_fp8_rows(x)
    q_ref, scales_ref = quantize_fp8_rows_ref(x)
    assert q.shape == x.shape and scales.shape == (shape[0], 1) and scales.dtype == torch.float32
    assert same_bits(q, q_ref) and torch.equal(scales, scales_ref)
    assert scales.isfinite().all() and q.float().isfinite().all()
    if shape[0] > 2:
        assert scales[1].item() == MIN_SCALE and not q[1].float().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_quantization_error_bound(dtype):
    """Per element, |q · s − x| is at most 2⁻⁴ |x| (half of e4m3's 3-bit mantissa step) or, among the
    subnormals, half their step 2⁻⁹ · s; so at most 2⁻⁴ of the row's absmax. An outlier coarsens its own
    row only."""
    x = randn(9, 300, dtype=dtype)
    x[4, 17] = 2e4
    q, scales = quantize_fp8_rows_ref(x)
    x, error = x.double(), (q.double() * scales.double() - x.double()).abs()
    slack = 1 + 2**-19  # x / s is rounded to fp32 before it is rounded to e4m3
    assert (error <= (2**-4 * x.abs() + 2**-10 * scales.double()) * slack).all()
    assert (error <= 2**-4 * x.abs().amax(dim=1, keepdim=True)).all()
    alone_q, alone_scales = quantize_fp8_rows_ref(x[5:].to(dtype))
    assert same_bits(q[5:], alone_q) and torch.equal(scales[5:], alone_scales)


@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_quantize_weight(dtype):
    w = randn(130, 100, scale=0.05)
    w[3] = 0.0  # a zero-initialised output channel
    quantized = quantize_weight(w, dtype)
    assert quantized.data.dtype == dtype and quantized.scale.shape == (130, 1)
    assert quantized.scale[3].item() == MIN_SCALE and not quantized.data[3].float().any()
    largest = {FP8: 448, torch.int8: 127}[dtype]
    others = [row for row in range(130) if row != 3]
    assert torch.equal(quantized.data[others].float().abs().amax(dim=1), torch.full((129,), largest, device=DEVICE,
                                                                                   dtype=torch.float32))
    error = (quantized.dequantize() - w).abs()
    if dtype == torch.int8:  # round to nearest: half a step, plus the fp32 roundings of w / s and of q · s
        assert (error <= quantized.scale / 2 * (1 + 2**-14)).all()
    else:
        q_ref, scales_ref = quantize_fp8_rows_ref(w)
        assert same_bits(quantized.data, q_ref) and torch.equal(quantized.scale, scales_ref)


def test_quantize_weight_rejects_other_formats():
    with pytest.raises(ValueError, match=r"^quantize_weight: weight \(4, 4\) to torch.float16: expected a 2-D"):
        quantize_weight(torch.ones(4, 4), torch.float16)


# --- GEMMs ------------------------------------------------------------------------------------------------


def operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, residual: bool):
    x, w = randn(m, k, dtype=dtype), randn(n, k, scale=k**-0.5)
    return (x, w, randn(n, dtype=dtype) if bias else None, randn(m, n, dtype=dtype) if residual else None)


@needs_fp8
@pytest.mark.parametrize("bias, residual", EPILOGUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_fp8_linear_matches_reference(m, n, k, dtype, bias, residual):
    x, w, b, r = operands(m, n, k, dtype, bias, residual)
    x_q, x_scale = quantize_fp8_rows(x)
    weight = quantize_weight(w, FP8)
    expected = fp8_linear_ref(x_q, x_scale, weight.data, weight.scale, b, r, out_dtype=dtype)
    assert_output_close(fp8_linear(x_q, x_scale, weight.data, weight.scale, b, r, out_dtype=dtype), expected)


@pytest.mark.parametrize("bias, residual", EPILOGUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_int8_weight_only_linear_matches_reference(m, n, k, dtype, bias, residual):
    x, w, b, r = operands(m, n, k, dtype, bias, residual)
    weight = quantize_weight(w, torch.int8)
    expected = int8_weight_only_linear_ref(x, weight.data, weight.scale, b, r)
    assert_output_close(int8_weight_only_linear(x, weight.data, weight.scale, b, r), expected)


@needs_fp8
def test_fp8_linear_long_inputs_and_outliers():
    """Many K tiles, a zero row and a row with one huge outlier, against the reference."""
    x, w, b, r = operands(40, 72, 1000, torch.bfloat16, True, True)
    x[5], x[9, 123] = 0.0, 6e4
    x_q, x_scale = quantize_fp8_rows(x)
    weight = quantize_weight(w, FP8)
    out = fp8_linear(x_q, x_scale, weight.data, weight.scale, b, r, out_dtype=torch.bfloat16)
    assert_output_close(out, fp8_linear_ref(x_q, x_scale, weight.data, weight.scale, b, r, out_dtype=torch.bfloat16))
    assert_output_close(out[5], (b.double() + r[5].double()).to(torch.bfloat16))  # the zero row: bias + residual


@pytest.mark.parametrize("k", [1000, 5000])
def test_int8_weight_only_linear_long_inputs_zero_rows_and_outliers(k):
    """Many K tiles, a zero input row, an input with one huge value, and a weight row with one outlier (its
    scale set by it, the rest of the row rounding to few levels), against the reference."""
    x, w, b, r = operands(40, 72, k, torch.bfloat16, True, True)
    x[5], x[9, 123] = 0.0, 3e3
    w[7, k // 2] = 50.0
    weight = quantize_weight(w, torch.int8)
    out = int8_weight_only_linear(x, weight.data, weight.scale, b, r)
    assert_output_close(out, int8_weight_only_linear_ref(x, weight.data, weight.scale, b, r))
    assert_output_close(out[5], (b.double() + r[5].double()).to(torch.bfloat16))  # the zero row: bias + residual


@needs_fp8
def test_fp8_linear_multiplies_every_e4m3_value_exactly():
    """The outer product of all 254 finite e4m3 values with themselves: each product has at most 8
    significant bits and fits bf16, so the kernel's loads and fp8 products must give it exactly."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    codes = codes[~codes.float().isnan()].to(DEVICE)
    operand = torch.zeros(codes.numel(), 32, device=DEVICE, dtype=FP8)
    operand[:, 0] = codes
    ones = torch.ones(codes.numel(), 1, device=DEVICE)
    out = fp8_linear(operand, ones, operand, ones, out_dtype=torch.bfloat16)
    assert torch.equal(out.double(), codes.double()[:, None] * codes.double()[None, :])


@needs_fp8
def test_quantized_linears_error_against_unquantized():
    """The quantized Linears against the exact fp64 Linear of the unquantized operands (Gaussian data, K =
    100): relative Frobenius error at most 2⁻⁴ for fp8 (e4m3 rounds each operand by up to 2⁻⁴) and 2⁻⁶ for
    int8 weights (up to 1/254 of a channel's absmax)."""
    x, w, b, _ = operands(77, 130, 100, torch.bfloat16, True, False)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    x_q, x_scale = quantize_fp8_rows(x)
    fp8 = quantize_weight(w, FP8)
    int8 = quantize_weight(w, torch.int8)
    outputs = {2**-4: fp8_linear(x_q, x_scale, fp8.data, fp8.scale, b, out_dtype=torch.bfloat16),
               2**-6: int8_weight_only_linear(x, int8.data, int8.scale, b)}
    for bound, out in outputs.items():
        assert ((out.double() - exact).norm() / exact.norm()).item() <= bound


@needs_fp8
def test_envelope_errors():
    x = randn(7, 32, dtype=torch.bfloat16)
    x_q, x_scale = quantize_fp8_rows(x)
    w = quantize_weight(randn(24, 32), FP8)
    cases = [
        (lambda: quantize_fp8_rows(x.double()), r"^quantize_fp8_rows: dtype torch.float64: expected one of"),
        (lambda: quantize_fp8_rows(x[0]), r"^quantize_fp8_rows: x \(32,\): expected \(M, K\) with K ≥ 1$"),
        (lambda: fp8_linear(x, x_scale, w.data, w.scale),
         r"^fp8_linear: x torch.bfloat16, weight torch.float8_e4m3fn, output torch.bfloat16: expected x one of"),
        (lambda: fp8_linear(x_q, x_scale, w.data[:, :16], w.scale),
         r"^fp8_linear: x \(7, 32\), weight \(24, 16\): expected x \(M, K\) and weight \(N, K\) with K ≥ 1$"),
        (lambda: fp8_linear(x_q, x_scale.reshape(-1), w.data, w.scale),
         r"^fp8_linear: x_scale \(7,\) torch.float32: expected \(7, 1\) torch.float32$"),
        (lambda: fp8_linear(x_q, x_scale, w.data, w.scale, randn(24, dtype=torch.float16)),
         r"^fp8_linear: bias \(24,\) torch.float16: expected \(24,\) torch.bfloat16$"),
        (lambda: fp8_linear(x_q, x_scale, w.data, w.scale, out_dtype=torch.float32),
         r"output torch.float32: expected .* output one of \(torch.float16, torch.bfloat16\)$"),
        (lambda: int8_weight_only_linear(x, w.data, w.scale),
         r"^int8_weight_only_linear: x torch.bfloat16, weight torch.float8_e4m3fn, output torch.bfloat16: expected"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --- choosing the fp8 GEMM --------------------------------------------------------------------------------


def test_fp8_gemm_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert fp8_gemm_for(1536, 1536, torch.bfloat16, cpu) is Fp8Gemm.TRITON  # nothing measured: Triton
    monkeypatch.setitem(FP8_GEMM_MEASURED, (1536, 1536), Fp8Gemm.CUBLAS)
    assert fp8_gemm_for(1536, 1536, torch.bfloat16, cpu) is Fp8Gemm.TRITON  # cuBLAS cannot run here
    assert scaled_mm_unsupported(1536, 1536, torch.bfloat16, cpu) == (
        "torch._scaled_mm needs a CUDA GPU of sm_89 (Ada) or later, not cpu")
    if DEVICE.type == "cuda" and FP8_DEVICE:
        assert fp8_gemm_for(1536, 1536, torch.bfloat16, DEVICE) is Fp8Gemm.CUBLAS
        assert fp8_gemm_for(1536, 1536, torch.float16, DEVICE) is Fp8Gemm.TRITON
        assert "multiples of 16" in scaled_mm_unsupported(130, 100, torch.bfloat16, DEVICE)
    else:
        with pytest.raises(ValueError, match=r"^fp8_linear_scaled_mm: torch._scaled_mm needs a CUDA GPU"):
            fp8_linear_scaled_mm(torch.zeros(1, 16, dtype=FP8), torch.ones(1, 1), torch.zeros(16, 16, dtype=FP8),
                                 torch.ones(16, 1))


@pytest.mark.skipif(DEVICE.type != "cuda" or not FP8_DEVICE, reason="torch._scaled_mm needs a GPU of sm_89 or later")
@pytest.mark.parametrize("bias, residual", EPILOGUES)
def test_fp8_linear_scaled_mm_matches_reference(bias, residual):
    x, w, b, r = operands(77, 128, 96, torch.bfloat16, bias, residual)
    x_q, x_scale = quantize_fp8_rows(x)
    weight = quantize_weight(w, FP8)
    out = fp8_linear_scaled_mm(x_q, x_scale, weight.data, weight.scale, b, r)
    expected = fp8_linear_ref(x_q, x_scale, weight.data, weight.scale, b, r)
    # The residual is added to the rounded GEMM output: up to one more unit in the last place.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)


# --- custom ops under torch.compile -----------------------------------------------------------------------


@needs_fp8
def test_custom_ops_opcheck():
    """Schema, fake tensors, AOT dispatch and autograd registration. test_schema compares fp8 tensors with
    allclose, which PyTorch's CPU backend lacks for fp8, so fp8_linear skips it."""
    x, w, b, r = operands(7, 24, 40, torch.bfloat16, True, True)
    x_q, x_scale = quantize_fp8_rows(x)
    fp8, int8 = quantize_weight(w, FP8), quantize_weight(w, torch.int8)
    torch.library.opcheck(quantize_fp8_rows, (x,))
    torch.library.opcheck(int8_weight_only_linear, (x, int8.data, int8.scale, b, r))
    torch.library.opcheck(fp8_linear, (x_q, x_scale, fp8.data, fp8.scale, b, r), {"out_dtype": torch.bfloat16},
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration"))


@needs_fp8
def test_custom_ops_compile_without_graph_breaks_or_recompiles():
    w, b = randn(24, 40), randn(24, dtype=torch.bfloat16)
    fp8, int8 = quantize_weight(w, FP8), quantize_weight(w, torch.int8)

    def linears(x, residual):
        x_q, x_scale = quantize_fp8_rows(x)
        return (fp8_linear(x_q, x_scale, fp8.data, fp8.scale, b, residual, out_dtype=torch.bfloat16)
                + int8_weight_only_linear(x, int8.data, int8.scale, b, None))

    compiled = torch.compile(linears, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (7, 13):
            x, r = randn(rows, 40, dtype=torch.bfloat16), randn(rows, 24, dtype=torch.bfloat16)
            assert torch.equal(compiled(x, r), linears(x, r))


# --- the benchmark -----------------------------------------------------------------------------------------


def test_benchmark_times_every_linear_of_a_step():
    """`benchmarks.quant_kernels` times each weight shape (N, K) of the full-size models' per-step Linears
    (ResBlock MLPs, attention's qkv and out), as many times as the models hold it, at a 1024² image's rows."""
    config = preset("wuerstchen-v2")
    with torch.device("meta"):
        models = (Prior(config.prior), Decoder(config.decoder))
    expected = Counter()
    for block in (block for model in models for block in model.modules()):
        if isinstance(block, (ResBlock, AttnBlock)):
            for linear in (block.fc1, block.fc2) if isinstance(block, ResBlock) else (block.qkv, block.out):
                expected[linear.out_features, linear.in_features] += 1
    timed, rows = Counter(), set()
    for (stage, m, n, k), layers in linear_shapes(config, 1024).items():
        timed[n, k] += layers
        rows.add((stage, m))
    assert timed == expected
    assert rows == {("prior", 2 * 24 * 24), *(("decoder", side * side) for side in (128, 64, 32, 16))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the benchmark runs where there is a GPU")
def test_benchmark_refuses_without_a_gpu():
    with pytest.raises(SystemExit) as refusal:
        benchmark_main([])
    assert str(refusal.value) == "benchmarks.quant_kernels times GPU kernels: no CUDA GPU is available here"
