"""Every Triton kernel compiles for a Hopper GPU (sm_90), and the quantization kernels also for Ada (sm_89),
ahead of time, on this CPU.

Triton's interpreter, which the other kernel tests use, runs a kernel's Python with NumPy: it never sees
what a GPU build rejects (constexpr misuse, layouts, dot shapes). Compiling each kernel to a cubin, with
every set of switches its launcher uses, catches that before a GPU session, whose time is scarce. The
build runs in a subprocess because the test session imports Triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
UNAVAILABLE = 3  # the exit status of `main` where Triton cannot build for NVIDIA GPUs at all
GLUE = {  # `_residual_norm`'s switches, as each op and block launches it
    "prior and decoder chain": dict(ADD=True, FILM=True, BIAS=True, RESIDUAL=True, NORM=True, MODULATE=False,
                                    PAD=False, BLOCK_C=2048),
    "decoder CT chain": dict(ADD=True, FILM=True, BIAS=False, RESIDUAL=True, NORM=False, MODULATE=False, PAD=False,
                             BLOCK_C=512),
    "VQGAN residual and norm": dict(ADD=True, FILM=False, BIAS=True, RESIDUAL=True, NORM=True, MODULATE=True,
                                    PAD=False, BLOCK_C=512),
    "VQGAN norm and padding": dict(ADD=False, FILM=False, BIAS=False, RESIDUAL=False, NORM=True, MODULATE=True,
                                   PAD=True, BLOCK_C=512),
    "LayerNorm2d, 8192 channels": dict(ADD=False, FILM=False, BIAS=False, RESIDUAL=False, NORM=True,
                                       MODULATE=False, PAD=False, BLOCK_C=8192),
}


def cases() -> dict[str, tuple]:
    """name: (kernel, constexprs, the pointers that are not fp16 with their types, upper-case int32 arguments,
    the GPU's compute capability)."""
    from kernels import attention, matmul, norms, quant

    found = {}
    for name, switches in GLUE.items():
        rows = max(1, 4096 // switches["BLOCK_C"])  # as the launcher tiles
        found[f"_residual_norm, {name}"] = (norms._residual_norm, {**switches, "BLOCK_R": rows}, {}, (), 90)
    found["_grn_sum_squares"] = (norms._grn_sum_squares, {"BLOCK_N": 64, "BLOCK_C": 64, "GELU": True},
                                 {"Partial": "*fp32"}, (), 90)
    found["_grn_scale"] = (norms._grn_scale, {"BLOCK_C": 1024}, {"Partial": "*fp32", "Scale": "*fp32"}, (), 90)
    found["_grn_apply"] = (norms._grn_apply, {"BLOCK_N": 64, "BLOCK_C": 64}, {"Scale": "*fp32"}, (), 90)
    for text in (False, True):
        found[f"_attention_forward, text={text}"] = (attention._attention_forward, {
            "HEAD_DIM": 64, "BLOCK_M": 64, "BLOCK_N": 64, "PRECISION": "tf32", "UPCAST": False, "TEXT": text}, {},
            (), 90)
    smallest = min(matmul.CONFIGS, key=lambda config: config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]).kwargs
    found["_linear_gelu"] = (matmul._linear_gelu, {**smallest, "GROUP": matmul.GROUP_M, "PRECISION": "tf32",
                                                   "UPCAST": False}, {}, ("M", "N", "K"), 90)
    # The quantization kernels, with every set of switches their launchers use (the fp8 dot shapes and
    # conversions are what a GPU build can reject), for Hopper and Ada.
    scales, gemm = {"XScale": "*fp32", "WScale": "*fp32"}, ("M", "N", "K")
    quantized = {
        "_quantize_fp8_rows": (quant._quantize_fp8_rows, dict(BLOCK_M=1, BLOCK_K=2048, QMAX=448.0,
                                                              MIN_SCALE=quant.MIN_SCALE, EMULATE=False),
                               {"X": "*bf16", "Q": "*fp8e4nv", "Scales": "*fp32"}, ("M", "K")),
        "_scaled_linear, fp8": (quant._scaled_linear, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP=matmul.GROUP_M,
                                                           ROW_SCALE=True, BIAS=True, RESIDUAL=True, WIDEN=False,
                                                           UPCAST=False),
                                {**scales, "X": "*fp8e4nv", "W": "*fp8e4nv", "Bias": "*bf16", "Residual": "*bf16",
                                 "Out": "*bf16"}, gemm),
        "_scaled_linear, int8 weights": (quant._scaled_linear, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64,
                                                                    GROUP=matmul.GROUP_M, ROW_SCALE=False, BIAS=True,
                                                                    RESIDUAL=True, WIDEN=True, UPCAST=False),
                                         {**scales, "W": "*i8"}, gemm),
    }
    for capability in (90, 89):
        for name, case in quantized.items():
            found[f"{name}, sm_{capability}"] = (*case, capability)
    return found


def build(kernel, constexprs: dict, pointers: dict[str, str], sizes: tuple[str, ...], capability: int) -> bytes:
    """The cubin of `kernel` for sm_`capability`. Upper-case arguments are pointers, by this project's
    convention, fp16 unless `pointers` types them, except `sizes` (a GEMM's M, N, K); `eps` and `scale_log2` are
    fp32, other scalars int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper() and name not in sizes:
            signature[name] = pointers.get(name, "*fp16")
        else:
            signature[name] = "fp32" if name in ("eps", "scale_log2") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm["cubin"]


def main() -> int:
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float16))

    try:
        build(probe, {"BLOCK": 16}, {}, (), 90)
    except Exception as error:  # noqa: BLE001 - the toolchain itself, isolated by a kernel that cannot be wrong
        print(f"Triton cannot build for sm_90 here: {type(error).__name__}: {error}")
        return UNAVAILABLE
    for name, case in cases().items():
        cubin = build(*case)
        print(f"{name}: {len(cubin)} bytes")
    return 0


def test_every_kernel_compiles_for_hopper_and_the_quantization_kernels_for_ada():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, cwd=REPOSITORY,
                            env={**environment, "PYTHONPATH": str(REPOSITORY)}, timeout=600)
    if result.returncode == UNAVAILABLE:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    built = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert built == list(cases()), result.stdout


if __name__ == "__main__":
    sys.exit(main())
