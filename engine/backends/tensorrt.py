"""The TensorRT backend: a bundle's engines run on torch tensors, on a torch CUDA stream.

One runtime. Per engine, one execution context per (optimization profile, input shapes), each created on
its profile, so no profile ever switches inside the step loop; all contexts share one activation buffer
sized to the largest engine, which is safe because the stages run one after another on one stream. Each
context has static, 256-byte-aligned input and output buffers, bound once; a call copies its inputs in,
enqueues with `execute_async_v3`, and copies the outputs out. With `cuda_graphs`, a context's enqueue is
captured as a CUDA graph after one plain enqueue and replayed from then on.

Engines come from the cache that `wuerstchen build` fills (`engine.engine_cache` names them); this module
reads plans and refuses stale ones, and builds none unless asked to.

Written against the TensorRT 10.x/11.x Python API; tests/test_tensorrt.py checks the order of these calls
against a stand-in module, not TensorRT itself (see benchmarks/tensorrt_check.py for that).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch

from engine.backends.graphs import graph_stages
from engine.bundle import Bundle, open_bundle
from engine.config import WuerstchenConfig
from engine.engine_cache import BuildSettings, EngineCache, EnginePlan, plan_engines, tensorrt_module
from engine.errors import WuerstchenError
from engine.profiles import Profile, select_profile
from engine.runtime import Runtime
from engine.stages import Stages

BUILDERS_GROUP = "wuerstchen.builders"
ALIGNMENT = 256  # TensorRT requires I/O and activation addresses aligned to 256 bytes
TORCH_DTYPES = {  # by TensorRT DataType *name*: the values differ between versions
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
}


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose data starts on a 256-byte boundary, whatever the allocator gives."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    storage = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -storage.data_ptr() % ALIGNMENT
    return storage[offset : offset + nbytes].view(dtype).view(tuple(shape))


class CudaStreams:
    """The CUDA side of the runtime: a non-default stream ordered against torch's current stream (TensorRT
    adds syncs on the default stream), and CUDA-graph capture and replay on it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    @contextlib.contextmanager
    def enqueue(self) -> Iterator[None]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def capture(self, launch: Callable[[], bool]):
        """A CUDA graph of `launch()`, or None when the engine cannot be captured (then it runs plainly)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                captured = launch()
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture of a TensorRT engine failed, running it uncaptured: {error}",
                          stacklevel=3)
            return None
        return graph if captured else None

    def replay(self, graph) -> None:
        graph.replay()


@dataclass
class Binding:
    """One execution context bound to fixed input shapes: its buffers, launches so far, and its graph."""

    context: object
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    launches: int = 0
    graph: object = None
    shapes: dict = field(default_factory=dict)


class TensorRTGraph:
    """One engine as a callable: input tensors in manifest order in, output tensors (copies) out."""

    def __init__(self, trt, engine, profiles: Sequence[Profile], inputs: Sequence[str], outputs: Sequence[str],
                 scratch: torch.Tensor, streams, cuda_graphs: bool = False):
        self.trt, self.engine, self.profiles = trt, engine, list(profiles)
        self.input_names, self.output_names = list(inputs), list(outputs)
        self.scratch, self.streams, self.cuda_graphs = scratch, streams, cuda_graphs
        self._bindings: dict[tuple, Binding] = {}

    def _dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> Binding:
        """A context on the profile that serves `shapes`: memory, profile, then shapes, then every address."""
        trt = self.trt
        profile = select_profile(self.profiles, shapes)
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        context.set_optimization_profile_async(profile, self.streams.handle)  # before any input shape
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise WuerstchenError(f"TensorRT refused shape {shape} for input {name} of profile "
                                      f"{self.profiles[profile].bucket}")
        unresolved = context.infer_shapes()
        if unresolved:
            raise WuerstchenError(f"TensorRT could not infer the shapes of {list(unresolved)} from {shapes}")
        device = self.scratch.device
        inputs = {name: aligned_empty(shape, self._dtype(name), device) for name, shape in shapes.items()}
        outputs = {name: aligned_empty(tuple(context.get_tensor_shape(name)), self._dtype(name), device)
                   for name in self.output_names}
        for name, tensor in {**inputs, **outputs}.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise WuerstchenError(f"TensorRT refused the address of {name}")
        return Binding(context, inputs, outputs, shapes=shapes)

    def _launch(self, binding: Binding) -> None:
        with self.streams.enqueue():
            if binding.graph is not None:
                self.streams.replay(binding.graph)
                return
            if not binding.context.execute_async_v3(self.streams.handle):
                raise WuerstchenError("TensorRT's execute_async_v3 failed (see its log above)")
            binding.launches += 1
            if self.cuda_graphs and binding.launches == 1:  # captured after one plain enqueue, never before
                binding.graph = self.streams.capture(
                    lambda: binding.context.execute_async_v3(self.streams.handle))

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in zip(self.input_names, tensors, strict=True)}
        key = tuple(shapes.values())
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = self._bind(shapes)
        for name, tensor in zip(self.input_names, tensors, strict=True):
            binding.inputs[name].copy_(tensor)
        self._launch(binding)
        # Copies: a graph is called again (prompts, then negative prompts) while its last outputs are in use.
        return [binding.outputs[name].clone() for name in self.output_names]


def device_memory_size(engine) -> int:
    """The activation memory an engine needs at its largest profile (the v2 name since TensorRT 10.1)."""
    return engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size


def load(runtime: Runtime) -> tuple[WuerstchenConfig, Stages]:
    """A bundle's engines, from the cache (`TensorRTOptions.engines`, default BUNDLE/engines), as the pipeline's
    stages. An engine that an earlier `wuerstchen build` made with any profiles is used; one that is missing,
    stale or does not deserialize is refused with the command that builds it, or built now when the options
    ask for it (`build_missing`, with the builder the build tools register: see `_builder`)."""
    options = runtime.options
    trt = tensorrt_module()
    bundle = open_bundle(runtime.source.bundle, check_hashes=runtime.source.check_hashes)
    settings = BuildSettings(precision=runtime.precision)
    cache = EngineCache(Path(options.engines) if options.engines else bundle.root / "engines")
    build = _builder(bundle, settings, cache) if options.build_missing else None

    def usable(plan: EnginePlan) -> bool:
        return cache.stale_reason(plan.graph, plan.key, plan.fields["tensorrt"]) is None

    chosen, missing = {}, []
    for default in plan_engines(bundle, settings, cache):
        found = next((plan for plan in [default, *cache.compatible(default)] if usable(plan)), None)
        chosen[default.graph] = found or default
        if found is None:
            missing.append(default)
    if missing:
        if build is None:
            reason = cache.stale_reason(missing[0].graph, missing[0].key, missing[0].fields["tensorrt"])
            raise WuerstchenError(
                f"no usable {runtime.precision.value} TensorRT engine for {', '.join(p.graph for p in missing)} in "
                f"{cache.root} ({reason}): run `wuerstchen build {bundle.root} --dtype {runtime.precision.value}`, "
                "or load with TensorRTOptions(build_missing=True)")
        build(missing)

    runtime_trt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    loaded = {}
    for graph_name, plan in chosen.items():
        entry = bundle.graph(graph_name)
        expected = sorted(t["name"] for t in (*entry["inputs"], *entry["outputs"]))
        path = cache.paths(graph_name, plan.key)[0]
        engine = runtime_trt.deserialize_cuda_engine(cache.read_plan(graph_name, plan.key))
        if engine is None or sorted(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)) != expected:
            problem = "could not be deserialized" if engine is None else "has other inputs and outputs"
            if build is None:
                raise WuerstchenError(f"engine {path} {problem}: rebuild it with `wuerstchen build {bundle.root}`")
            warnings.warn(f"engine {path} {problem}: rebuilding it", stacklevel=2)
            path.unlink()
            plan = next(p for p in plan_engines(bundle, settings, cache, graphs=(graph_name,)))
            build([plan])
            path = cache.paths(graph_name, plan.key)[0]
            engine = runtime_trt.deserialize_cuda_engine(cache.read_plan(graph_name, plan.key))
            if engine is None:
                raise WuerstchenError(f"engine {path} could not be deserialized even after a rebuild")
        loaded[graph_name] = (engine, plan.profiles)

    device = runtime.device
    scratch = aligned_empty((max(device_memory_size(engine) for engine, _ in loaded.values()),), torch.uint8, device)
    streams = CudaStreams(device)

    def graph(name: str) -> TensorRTGraph:
        engine, profiles = loaded[name]
        entry = bundle.graph(name)
        return TensorRTGraph(trt, engine, profiles, [t["name"] for t in entry["inputs"]],
                             [t["name"] for t in entry["outputs"]], scratch, streams, options.cuda_graphs)

    return bundle.config, graph_stages(bundle, graph, device)


def _builder(bundle: Bundle, settings: BuildSettings, cache: EngineCache) -> Callable[[list[EnginePlan]], None]:
    """Builds plans into the cache with the builder that the build tools register as the entry point
    `tensorrt` of `wuerstchen.builders` (setup.py: `export.tensorrt.build_engines`); the runtime names no
    build tool itself, and asks for one only when building on load was asked for."""
    found = entry_points(group=BUILDERS_GROUP, name="tensorrt")
    if not found:
        raise WuerstchenError("building TensorRT engines on load needs the build tools (the `export` package), "
                              f"which are not installed here: build them elsewhere with `wuerstchen build "
                              f"{bundle.root}` and copy {cache.root}")
    build_engines = next(iter(found)).load()

    def build(plans: list[EnginePlan]) -> None:
        build_engines(plans, settings, cache, progress=lambda line: warnings.warn(line, stacklevel=4))

    return build
