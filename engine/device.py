"""Devices as users name them (`"auto"`, `"cpu"`, `"cuda:0"`), checked against this machine."""

from __future__ import annotations

import torch

from engine.errors import WuerstchenError


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
