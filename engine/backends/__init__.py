"""Where the stages run. Every backend provides the same stage objects (text encoders, prior, decoder,
VQGAN with the call signatures of the PyTorch modules), so the pipeline never knows which one it drives."""

from __future__ import annotations

from enum import Enum

from engine.errors import WuerstchenError


class Backend(str, Enum):
    TORCH = "torch"  # the PyTorch modules, from diffusers folders or a preset, eagerly
    TORCH_FAST = "torch-fast"  # the same with Triton attention and every denoising step as one CUDA graph
    TORCH_COMPILE = "torch-compile"  # torch-fast, with the prior and the decoder under torch.compile
    ONNXRUNTIME = "onnxruntime"  # the graphs of a bundle, in ONNX Runtime
    TENSORRT = "tensorrt"  # the graphs of a bundle, as TensorRT engines

    @property
    def runs_bundles(self) -> bool:
        return self in (Backend.ONNXRUNTIME, Backend.TENSORRT)

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        try:
            return cls(value)
        except ValueError:
            raise WuerstchenError(
                f"backend={value!r} is unknown: expected one of {', '.join(b.value for b in cls)}"
            ) from None
