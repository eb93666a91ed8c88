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
from engine.bundle import DTYPES, Bundle
from engine.errors import WuerstchenError
from engine.shapes import resolve_dims

ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise WuerstchenError(
            "backend='onnxruntime' needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu on a GPU)"
        ) from None
    return onnxruntime


def choose_providers(providers: Sequence[str] | None) -> list[str]:
    """The execution providers to use: those asked for (each must be available), or CUDA when this
    build of ONNX Runtime has it and a GPU is present, then the CPU. TensorRT's provider builds engines
    on first use, which takes minutes, so it runs only when asked for."""
    available = _onnxruntime().get_available_providers()
    if providers is None:
        gpu = torch.cuda.is_available()
        return [p for p in PREFERRED_PROVIDERS if p in available and (gpu or p != "CUDAExecutionProvider")]
    providers = list(providers)
    unknown = [p for p in providers if p not in available]
    if not providers or unknown:
        raise WuerstchenError(f"providers={providers!r}: expected a non-empty list of available ones, {available}")
    return providers


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
            tensor = tensor.to(self.device, DTYPES[spec["dtype"]]).contiguous()
            self._learn_symbols(spec, tensor.shape, symbols)
            binding.bind_input(spec["name"], device_type, device_id, ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape),
                               tensor.data_ptr())
            bound.append(tensor)
        outputs = []
        for spec in self.outputs:
            output = torch.empty(resolve_dims(spec["shape"], symbols), dtype=DTYPES[spec["dtype"]], device=self.device)
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


def load_stages(bundle: Bundle, providers: Sequence[str] | None) -> tuple[dict, torch.device]:
    """The pipeline's stages on ONNX Runtime, and the device their tensors live on."""
    if bundle.dtype not in ELEMENT_TYPES:
        raise WuerstchenError(f"bundle dtype {bundle.manifest['dtype']} cannot be bound by ONNX Runtime's Python "
                              "API: export with --dtype fp32 or fp16, or run it with TensorRT")
    providers = choose_providers(providers)
    device = torch.device("cuda" if providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                          else "cpu")
    return graph_stages(bundle, lambda name: OnnxGraph(bundle, name, providers, device), device), device
