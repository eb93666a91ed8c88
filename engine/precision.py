"""The one precision type: what every backend, graph, engine and benchmark is asked to compute in.

A user writes a precision as `fp16`, `float16`, `half`, `FP16` or `torch.float16`; everything inside the
engine holds a `Precision`. Its `torch_dtype` is what the PyTorch stages run in, and its `onnx_name`
what a bundle's manifest and graphs call it.
"""

from __future__ import annotations

from enum import Enum

import torch

from engine.errors import WuerstchenError


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self]

    @property
    def onnx_name(self) -> str:
        """The name a bundle's manifest uses: `float32`, `float16` or `bfloat16`."""
        return str(self.torch_dtype).removeprefix("torch.")

    @classmethod
    def parse(cls, value: str | torch.dtype | Precision, field: str = "dtype") -> Precision:
        """A precision from any spelling users write: `fp16`, `float16`, `half`, `FP16`, `torch.float16`."""
        if isinstance(value, torch.dtype):
            for precision, dtype in _TORCH.items():
                if dtype == value:
                    return precision
        elif isinstance(value, str) and value.lower() in _SPELLINGS:
            return _SPELLINGS[value.lower()]
        raise WuerstchenError(f"{field}={_shown(value)} is not supported: expected {cls.describe()}")

    @classmethod
    def describe(cls) -> str:
        return "fp32, fp16 or bf16 (or float32, float16/half, bfloat16)"


_TORCH = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
_SPELLINGS = {
    spelling: precision
    for precision, spellings in (
        (Precision.FP32, ("fp32", "float32", "float", "full")),
        (Precision.FP16, ("fp16", "float16", "half")),
        (Precision.BF16, ("bf16", "bfloat16")),
    )
    for spelling in spellings
}


def _shown(value) -> str:
    return str(value) if isinstance(value, torch.dtype) else repr(value)
