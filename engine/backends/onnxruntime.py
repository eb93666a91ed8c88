"""The bundle's graphs in ONNX Runtime, behind the call signatures of the PyTorch stages.

Tensors stay torch tensors: inputs and preallocated outputs are bound to ONNX Runtime by device pointer
(I/O binding), so on a GPU nothing travels through the host, and sessions run on torch's current CUDA
stream, so no synchronisation is needed between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.backends.graphs import graph_stages
from engine.bundle import TENSOR_DTYPES, Bundle, open_bundle
from engine.config import WuerstchenConfig
from engine.device import resolve_device
from engine.errors import WuerstchenError
from engine.runtime import Runtime
from engine.shapes import resolve_dims
from engine.stages import Stages

# ONNX Runtime's Python API binds these element types; it has none for bfloat16.
ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise WuerstchenError(
            "backend='onnxruntime' needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu on a GPU)"
        ) from None
    return onnxruntime


def resolve_providers(device: str | torch.device | None,
                      providers: Sequence[str] | None) -> tuple[tuple[str, ...], torch.device]:
    """The execution providers and the device their tensors live on: one rule for every caller.

    Given providers must all be available here, and the device is the GPU when the first of them runs on one.
    Otherwise the device decides: "cpu" is the CPU provider; "cuda" or "cuda:N" the CUDA provider (which
    this build of ONNX Runtime must have) before the CPU; "auto" or None the GPU when there is one and this
    build has the CUDA provider, else the CPU. TensorRT's provider builds engines on first use, which takes
    minutes, so it runs only when asked for."""
    available = _onnxruntime().get_available_providers()
    explicit = device is not None and device != "auto"
    if providers is not None:
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise WuerstchenError(f"providers={list(providers)!r}: {unknown} are not available in this ONNX Runtime, "
                                  f"which has {available}")
        on_gpu = providers[0] in GPU_PROVIDERS
        resolved = resolve_device(device if explicit else "cuda" if on_gpu else "cpu")
        if (resolved.type == "cuda") != on_gpu:
            raise WuerstchenError(f"device={str(device)!r} disagrees with providers={list(providers)!r}, which run on "
                                  f"the {'GPU' if on_gpu else 'CPU'}")
        return tuple(providers), resolved
    cuda = "CUDAExecutionProvider" in available
    if not explicit:
        resolved = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    else:
        resolved = resolve_device(device)
        if resolved.type == "cuda" and not cuda:
            raise WuerstchenError(f"device={str(device)!r}: this ONNX Runtime has no CUDA provider (it has "
                                  f"{available}): pip install onnxruntime-gpu, or use device=cpu")
    if resolved.type == "cuda":
        return ("CUDAExecutionProvider", "CPUExecutionProvider"), resolved
    return ("CPUExecutionProvider",), resolved


class OnnxGraph:
    """One graph of a bundle as a callable: tensors in, in the manifest's input order; tensors out."""

    def __init__(self, bundle: Bundle, name: str, providers: list[str], device: torch.device):
        ort = _onnxruntime()
        entry = bundle.graph(name)
        self.name, self.inputs, self.outputs, self.device = name, entry["inputs"], entry["outputs"], device
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        provider_options = [self._provider_options(p) for p in providers]
        self.session = ort.InferenceSession(str(bundle.path(entry["file"])), options, providers=providers,
                                            provider_options=provider_options)

    def _provider_options(self, provider: str) -> dict:
        if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            return {"device_id": self.device.index or 0, "user_compute_stream": str(stream)}
        return {}

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        device_type, device_id = self.device.type, self.device.index or 0
        symbols: dict[str, int] = {}
        bound = []  # keeps every bound tensor alive until the run ends
        for spec, tensor in zip(self.inputs, tensors, strict=True):
            tensor = tensor.to(self.device, TENSOR_DTYPES[spec["dtype"]]).contiguous()
            self._learn_symbols(spec, tensor.shape, symbols)
            binding.bind_input(spec["name"], device_type, device_id, ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape),
                               tensor.data_ptr())
            bound.append(tensor)
        outputs = []
        for spec in self.outputs:
            output = torch.empty(resolve_dims(spec["shape"], symbols), dtype=TENSOR_DTYPES[spec["dtype"]],
                                 device=self.device)
            binding.bind_output(spec["name"], device_type, device_id, ELEMENT_TYPES[output.dtype],
                                tuple(output.shape), output.data_ptr())
            outputs.append(output)
        self.session.run_with_iobinding(binding)
        return outputs

    def _learn_symbols(self, spec: dict, shape: torch.Size, symbols: dict[str, int]) -> None:
        """Read the symbolic sizes off an input; an input that contradicts the others is an error."""
        for dim, size in zip(spec["shape"], shape, strict=True):
            if isinstance(dim, int):
                known = dim
            else:
                factor, _, symbol = dim.rpartition("*")
                symbols.setdefault(symbol, size // int(factor or 1))
                known = resolve_dims([dim], symbols)[0]
            if known != size:
                raise WuerstchenError(f"graph {self.name}: input {spec['name']} has shape {tuple(shape)}, "
                                      f"expected {spec['shape']} with {symbols}")


def load(runtime: Runtime) -> tuple[WuerstchenConfig, Stages]:
    """A bundle's graphs as the pipeline's stages on ONNX Runtime, with the resolved providers and device."""
    bundle = open_bundle(runtime.source.bundle, check_hashes=runtime.source.check_hashes)
    providers, device = list(runtime.options.providers), runtime.device
    return bundle.config, graph_stages(bundle, lambda name: OnnxGraph(bundle, name, providers, device), device)
