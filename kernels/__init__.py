"""Triton kernels, each beside its PyTorch reference: attention, the norms and block glue, a GEMM with a
GELU epilogue. This module holds what their launchers share: the dtypes they take, where they run, and how
their tile products are taken."""

from __future__ import annotations

import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), as the tests on a CPU do."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(name: str, device: torch.device) -> None:
    """Refuse tensors that no kernel can read: anywhere but a CUDA GPU, unless in the interpreter."""
    if device.type != "cuda" and not interpreted():
        raise ValueError(f"{name}: tensors on {device}: the kernel runs on a CUDA GPU, or on the CPU in Triton's "
                         "interpreter (TRITON_INTERPRET=1)")


def dot_precision(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast) for `tl.dot` on tiles of `dtype`. fp32 keeps IEEE products: TF32 would cost
    the accuracy fp32 is asked for. Triton's interpreter multiplies bf16 tiles wrongly (NumPy has no bf16),
    so there they are upcast and multiplied in fp32."""
    upcast = dtype == torch.bfloat16 and interpreted()
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast
