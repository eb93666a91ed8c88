"""Device and precision choices, as given by a user (`"cuda:0"`, `"bf16"`, `"auto"`) or as torch objects."""

from __future__ import annotations

import torch

from engine.errors import WuerstchenError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks the first GPU when there is one, else the CPU."""
    valid = "expected auto, cpu, cuda or cuda:N"
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise WuerstchenError(f"device={device!r} is not a device: {valid}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise WuerstchenError(f"device={device!r} is not supported: {valid}")
    if not torch.cuda.is_available():
        raise WuerstchenError(f"device={device!r}: no CUDA GPU is available on this machine; use device=cpu")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise WuerstchenError(f"device={device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` or "auto" is fp16 on a GPU and fp32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise WuerstchenError(f"dtype={dtype!r} is not supported: expected auto, fp32, fp16 or bf16")
