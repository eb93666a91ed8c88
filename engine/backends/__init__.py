"""Where the stages run. Each backend is a module here with one entry point, `load(runtime) -> (config,
Stages)`, and its options are one small dataclass below; `engine.runtime.resolve` decides which backend,
device, precision and options a request for a model gets, and nothing else decides again.

A new backend: a member of `Backend`, an options class in `OPTIONS`, a module with `load`, and its rule for
device and precision in `engine.runtime.resolve`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import WuerstchenError

if TYPE_CHECKING:
    from engine.config import WuerstchenConfig
    from engine.runtime import Runtime
    from engine.stages import Stages


class Backend(str, Enum):
    TORCH = "torch"  # the PyTorch modules, from diffusers folders or a preset, eagerly
    TORCH_FAST = "torch-fast"  # the same with Triton kernels and every denoising step as one CUDA graph
    TORCH_COMPILE = "torch-compile"  # torch-fast, with the prior and the decoder under torch.compile
    ONNXRUNTIME = "onnxruntime"  # the graphs of a bundle, in ONNX Runtime
    TENSORRT = "tensorrt"  # the graphs of a bundle, as TensorRT engines

    @property
    def runs_bundles(self) -> bool:
        return self in (Backend.ONNXRUNTIME, Backend.TENSORRT)

    @property
    def fast(self) -> bool:
        """Runs this project's Triton kernels (on a CUDA GPU, or in Triton's interpreter for tests)."""
        return self in (Backend.TORCH_FAST, Backend.TORCH_COMPILE)

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        try:
            return cls(value)
        except ValueError:
            raise WuerstchenError(
                f"backend={value!r} is unknown: expected one of {', '.join(b.value for b in cls)}"
            ) from None


@dataclass(frozen=True)
class TorchOptions:
    """The eager PyTorch backend has nothing to choose."""


@dataclass(frozen=True)
class FastOptions:
    """`torch-fast` and `torch-compile`: which fusions run (`engine.models.fused.Fusions`) and how steps replay."""

    chains: bool = True  # the glue between blocks fused (residual, FiLM, LayerNorm; residuals in GEMM epilogues)
    gemm_gelu: bool = False  # the VQGAN's first Linear and GELU as one Triton GEMM: off until a GPU shows it wins
    cuda_graphs: bool = True  # every denoising step captured once per (stage, shape, batch size) and replayed
    graph_cache_size: int = 32  # captured steps kept, the least recently used dropped first

    def __post_init__(self):
        if self.gemm_gelu and not self.chains:
            raise WuerstchenError("gemm_gelu=True needs chains=True: the Triton GEMM runs inside the VQGAN's fused "
                                  "blocks")
        if isinstance(self.graph_cache_size, bool) or not isinstance(self.graph_cache_size, int) \
                or self.graph_cache_size < 1:
            raise WuerstchenError(f"graph_cache_size={self.graph_cache_size!r}: expected a positive integer")


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """ONNX Runtime: its execution providers, in order of preference (default: CUDA when this build of ONNX
    Runtime has it and the device is a GPU, else the CPU)."""

    providers: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.providers is not None:
            if isinstance(self.providers, str) or not all(isinstance(p, str) for p in self.providers) \
                    or not self.providers:
                raise WuerstchenError(f"providers={self.providers!r}: expected a non-empty list of provider names")
            object.__setattr__(self, "providers", tuple(self.providers))


@dataclass(frozen=True)
class TensorRTOptions:
    """TensorRT: where the engines are cached (default BUNDLE/engines), whether each engine call replays as a
    CUDA graph, and whether missing or stale engines are built on load (with the builder that the build tools
    register; otherwise they are refused with the `wuerstchen build` command that makes them)."""

    engines: str | Path | None = None
    cuda_graphs: bool = False
    build_missing: bool = False


OPTIONS = {
    Backend.TORCH: TorchOptions, Backend.TORCH_FAST: FastOptions, Backend.TORCH_COMPILE: FastOptions,
    Backend.ONNXRUNTIME: OnnxRuntimeOptions, Backend.TENSORRT: TensorRTOptions,
}
BackendOptions = TorchOptions | FastOptions | OnnxRuntimeOptions | TensorRTOptions


def backend_options(backend: Backend, options: BackendOptions | None) -> BackendOptions:
    """`options` checked against the backend, or the backend's defaults."""
    expected = OPTIONS[backend]
    if options is None:
        return expected()
    if type(options) is not expected:
        raise WuerstchenError(f"options={options!r} do not fit backend {backend.value!r}: expected "
                              f"{expected.__name__}")
    return options


# Each backend's module, imported when it loads: ONNX Runtime, TensorRT and Triton are optional.
MODULES = {
    Backend.TORCH: "engine.backends.pytorch", Backend.TORCH_FAST: "engine.backends.pytorch",
    Backend.TORCH_COMPILE: "engine.backends.pytorch", Backend.ONNXRUNTIME: "engine.backends.onnxruntime",
    Backend.TENSORRT: "engine.backends.tensorrt",
}


def load(runtime: Runtime) -> tuple[WuerstchenConfig, Stages]:
    """The model's config and its stages, loaded by the runtime's backend."""
    return importlib.import_module(MODULES[runtime.backend]).load(runtime)
