"""The precision types: `Precision`, what every backend, graph, engine and benchmark is asked to compute in, and
`Quantization`, the 8-bit schemes a model's Linears may hold beside it (`engine.quantization` chooses which).

A user writes a precision as `fp16`, `float16`, `half`, `FP16` or `torch.float16`; everything inside the
engine holds a `Precision`. Its `torch_dtype` is what the PyTorch stages run in, and its `onnx_name`
what a bundle's manifest and graphs call it. Importing this module does not import torch (the command
line's help lists the precisions without it).
"""

from __future__ import annotations

import sys
from enum import Enum

from engine.errors import WuerstchenError


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self):
        """The `torch.dtype`: torch.float32, torch.float16 or torch.bfloat16."""
        import torch

        return getattr(torch, self.onnx_name)

    @property
    def onnx_name(self) -> str:
        """The name a bundle's manifest uses: `float32`, `float16` or `bfloat16`."""
        return _FULL_NAMES[self]

    @classmethod
    def parse(cls, value, field: str = "dtype") -> Precision:
        """A precision from any spelling users write, in any case (`fp16`, `float16`, `half`, `FP16`), or from a
        `torch.dtype` (`torch.float16`)."""
        if isinstance(value, str):
            if value.lower() in _SPELLINGS:
                return _SPELLINGS[value.lower()]
        elif isinstance(value, _torch_dtype()):
            for precision in cls:
                if precision.torch_dtype == value:
                    return precision
        raise WuerstchenError(f"{field}={_shown(value)} is not supported: expected {cls.describe()}")

    @classmethod
    def describe(cls) -> str:
        """Every spelling `parse` takes."""
        aliases = [spelling for spelling in _SPELLINGS if spelling not in {p.value for p in cls}]
        return f"fp32, fp16 or bf16 (or {', '.join(aliases)}; in any case)"


class Quantization(str, Enum):
    """What a quantized Linear holds in 8 bits: fp8 (weights, and activations per row as they arrive; sm_89+
    GPUs) or int8 (weights only; any GPU)."""

    FP8 = "fp8"
    INT8 = "int8"

    @property
    def weight_dtype(self):
        """The `torch.dtype` its weights are stored in: torch.float8_e4m3fn or torch.int8."""
        import torch

        return torch.float8_e4m3fn if self is Quantization.FP8 else torch.int8

    @classmethod
    def parse(cls, value, field: str = "quantize") -> Quantization | None:
        """A scheme from its name (any case), or None for `None` and "none"."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str) and value.lower() == "none":
            return None
        if isinstance(value, str) and value.lower() in {scheme.value for scheme in cls}:
            return cls(value.lower())
        raise WuerstchenError(f"{field}={value!r} is not a quantization: expected none, fp8 (weights and "
                              "activations, sm_89+ GPUs) or int8 (weights only)")


_FULL_NAMES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}
_SPELLINGS = {
    spelling: precision
    for precision, spellings in (
        (Precision.FP32, ("fp32", "float32", "float", "full")),
        (Precision.FP16, ("fp16", "float16", "half")),
        (Precision.BF16, ("bf16", "bfloat16")),
    )
    for spelling in spellings
}


def _torch_dtype() -> tuple[type, ...]:
    """`torch.dtype` when torch is imported (if it is not, no value can be one)."""
    torch = sys.modules.get("torch")
    return (torch.dtype,) if torch is not None else ()


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)
