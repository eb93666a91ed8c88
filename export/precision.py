"""Converting a float32 graph of the bundle to bf16 or fp16, with float32 islands, for TensorRT's strongly typed builds.

TensorRT 11 takes the precision of every layer from the ONNX dtypes, and every float input of a node must
have the same dtype. The PyTorch models compute some parts in float32 whatever their dtype (`x.float()` …
`.to(x.dtype)` in `engine.models.blocks`), but in a float32 export those casts leave no trace. This pass
recreates them: each node is assigned float32 or the low dtype by the rules below, and `Cast` nodes are
inserted where the two meet, one per (tensor, dtype), shared by its consumers.

How a node's precision is decided, in order:
1. `FP32_OPS` (LayerNorm, the GRN's norm, softmax, resize, sin and cos), the op that computes the angle
   of sin and cos, and the output heads (`_output_heads`) run in float32.
2. A compute node that depends on no graph input (a constant subgraph, such as a frequency table) runs in
   float32: TensorRT folds it at build time, so float32 costs nothing there.
3. Data movement (`DATA_MOVEMENT_OPS`) and nodes without a float output (Shape, IsNaN) take the precision
   of their float inputs when those agree, so moving a float32 tensor around does not cast it twice.
4. Any other compute node runs in float32 when all its non-constant float inputs carry the float32 that
   `SPREADING_OPS` start (the GRN's mean, add and divide after its norm), and in the low dtype otherwise.
5. Sources of constant-like values (`Constant`, `ConstantOfShape`, `Cast` to float, and nodes that read
   only those and initializers) take the precision of their consumers: the low dtype when every consumer
   runs low, float32 otherwise. Initializers are converted per consumer, float32 ones kept where a float32
   node reads them.

The graph's inputs and outputs keep their float32 dtype; integer tensors are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from engine.errors import WuerstchenError
from engine.precision import Precision
from export.lint import FLOAT_TYPES, MIN_OPSET, tensor_types

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class LowPrecision:
    """A low dtype: its ONNX type, its NumPy type, and the lowest default-domain opset whose operators take
    it (with the IR version that opset needs)."""

    onnx_type: int
    numpy_type: np.dtype
    min_opset: int
    min_ir_version: int

    @property
    def max_finite(self) -> float:
        return float(ml_dtypes.finfo(self.numpy_type).max)


LOW_PRECISIONS = {
    Precision.FP16: LowPrecision(onnx.TensorProto.FLOAT16, np.dtype(np.float16), MIN_OPSET, 8),
    # ONNX types Conv, ConvTranspose, Sin, Cos and others for bfloat16 only from opset 22.
    Precision.BF16: LowPrecision(onnx.TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16), 22, 10),
}

# Operators that always run in float32, and why.
FP32_OPS = {
    "LayerNormalization": "a strongly typed TensorRT LayerNorm computes in its input dtype (stash_type is "
                          "ignored), so the statistics of fp16 activations would overflow; its scale and bias "
                          "must be float32 too",
    "ReduceL2": "the GRN's sum of squares over height and width overflows fp16 (TensorRT imports ReduceL2 as "
                "ReduceSumSquare + Sqrt); its mean and divide stay float32 after it (`SPREADING_OPS`)",
    "ReduceSumSquare": "the same sum of squares",
    "Softmax": "the attention probabilities: the exported models take the scores' softmax in float32",
    "Resize": "TensorRT does not run bf16 Resize (NVIDIA's demo casts its inputs and outputs to float32)",
    "Sin": "the timestep embedding's angles reach 10000 radians: a low-precision angle or sine of one is noise",
    "Cos": "the same angles",
}
# Float32 islands whose float32 carries forward to every compute node that reads only float32 from them,
# as the GRN's `norm / (norm.mean() + eps)` does; the other islands are cast back right after, as in PyTorch.
SPREADING_OPS = frozenset({"ReduceL2", "ReduceSumSquare"})
# The op that computes the input of Sin and Cos (the angle r·frequency) runs in float32 too, when it is one of these.
ANGLE_OPS = frozenset({"Sin", "Cos"})
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
# The output heads run in float32: walking back from each float32 graph output, every node up to one of
# these (not included). The noise heads divide by as little as 1e-5 after the last Conv. LayerNormalization,
# float32 anyway, ends the walk too: past a text encoder's final LayerNorm lies its whole residual stream.
HEAD_STOP_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LayerNormalization"})
# Operators that move or select values without arithmetic: exact in any dtype, so they follow their input.
DATA_MOVEMENT_OPS = frozenset("""
    Concat DepthToSpace Expand Flatten Gather GatherElements GatherND Identity Pad Reshape Slice SpaceToDepth
    Split Squeeze Tile Transpose Unsqueeze Where
""".split())
# Operators that produce a float value from attributes or other dtypes: they follow their consumers.
SOURCE_OPS = frozenset({"Constant", "ConstantOfShape", "Cast"})
# Inputs that are not data: read as they are, exempt from the one-dtype rule. Op: input indices.
NON_DATA_INPUTS = {"Resize": frozenset({1, 2, 3})}  # roi, scales, sizes
TYPE_EXEMPT_OPS = frozenset({"Cast", "QuantizeLinear", "DequantizeLinear"})
EXTERNAL_DATA_BYTES = 1_800_000_000  # initializers past this are saved next to the graph: protobuf stops at 2 GB

# Node precisions. FLEX: not yet decided, follows its consumers; FP32_SPREADING: float32 that carries forward.
LOW, FP32, FP32_SPREADING, FLEX = "low", "fp32", "fp32-spreading", "flex"


def convert_precision(model: onnx.ModelProto, precision: Precision | str) -> onnx.ModelProto:
    """A copy of the float32 `model` computing in `precision` (bf16 or fp16) with float32 islands (see the
    module docstring); fp32 returns `model` itself. bf16 raises the opset to 22."""
    precision = Precision.parse(precision, field="precision")
    if precision is Precision.FP32:
        return model
    low = LOW_PRECISIONS[precision]
    types = tensor_types(model)
    converted = sorted({name for name, kind in types.items() if kind in FLOAT_TYPES - {FLOAT}})
    if converted:
        raise WuerstchenError(f"convert_precision expects a float32 graph: tensor {converted[0]!r} is already "
                              f"{onnx.helper.tensor_dtype_to_string(types[converted[0]])}")

    graph = gs.import_onnx(model)
    graph.toposort()
    precisions = _node_precisions(graph, types)
    _Rewriter(graph, types, precisions, low, precision.value).run()

    opset = max(graph.opset, low.min_opset)
    domains = [onnx.helper.make_opsetid(d.domain, opset if d.domain in ("", "ai.onnx") else d.version)
               for d in graph.import_domains]
    graph.ir_version = max(model.ir_version, low.min_ir_version)
    result = gs.export_onnx(graph, opset_imports=domains)
    result.metadata_props.extend(model.metadata_props)
    return result


def convert_file(src: Path, dst: Path, precision: Precision | str) -> None:
    """Convert the graph file `src` (with its external data) to `precision` and save it as `dst`, with the
    weights in `dst.name + ".data"` beside it when they exceed `EXTERNAL_DATA_BYTES`, else inline.

    `dst` appears only once complete (written under another name, then renamed), so that a caller which
    checks for it never parses half a graph."""
    src, dst = Path(src), Path(dst)
    model = convert_precision(onnx.load(str(src), load_external_data=True), precision)
    data, partial = dst.with_name(dst.name + ".data"), dst.with_name(dst.name + ".partial")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(partial), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(partial))
    partial.replace(dst)


def check_strongly_typed(model: onnx.ModelProto, graph_name: str) -> None:
    """Raise a one-line error naming the first node whose float inputs have different dtypes, which a
    strongly typed TensorRT network refuses. Casts, Q/DQ and Resize's roi, scales and sizes are exempt."""
    types = tensor_types(model)
    for node in model.graph.node:
        if node.op_type in TYPE_EXEMPT_OPS:
            continue
        skip = NON_DATA_INPUTS.get(node.op_type, frozenset())
        found = {}
        for index, name in enumerate(node.input):
            if not name or index in skip:
                continue
            if name not in types:
                raise WuerstchenError(f"graph {graph_name}: node {node.name!r} ({node.op_type}): the dtype of "
                                      f"input {name!r} is unknown after shape inference")
            if types[name] in FLOAT_TYPES:
                found[name] = onnx.helper.tensor_dtype_to_string(types[name]).removeprefix("TensorProto.")
        if len(set(found.values())) > 1:
            mixed = ", ".join(f"{name} {dtype}" for name, dtype in found.items())
            raise WuerstchenError(f"graph {graph_name}: node {node.name!r} ({node.op_type}) mixes float dtypes "
                                  f"({mixed}); a strongly typed TensorRT network needs one")


def float32_islands(model: onnx.ModelProto) -> dict[str, int]:
    """How many compute nodes of each op type produce float32 (data movement, casts and constants are not
    counted): the float32 islands of a converted graph, for reports and tests."""
    types = tensor_types(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in DATA_MOVEMENT_OPS or node.op_type in SOURCE_OPS:
            continue
        if any(types.get(name) == FLOAT for name in node.output):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _node_precisions(graph: gs.Graph, types: dict[str, int]) -> dict[int, str]:
    """Each node's precision, LOW or FP32, keyed by `id(node)`; nodes without float inputs or outputs are
    absent. `graph` is topologically sorted."""

    def is_float(tensor: gs.Tensor) -> bool:
        return bool(tensor.name) and types.get(tensor.name) == FLOAT

    def data_inputs(node: gs.Node) -> list[gs.Tensor]:
        if node.op in SOURCE_OPS:
            return []  # a Cast reads any dtype as it is
        skip = NON_DATA_INPUTS.get(node.op, frozenset())
        return [t for i, t in enumerate(node.inputs) if i not in skip and is_float(t)]

    forced = _output_heads(graph, is_float)
    for node in graph.nodes:
        if node.op in ANGLE_OPS and node.inputs[0].inputs:
            producer = node.inputs[0].inputs[0]
            if producer.op in ELEMENTWISE_OPS:
                forced.add(id(producer))

    # Forward: decide every node that reads a non-constant float; `state` holds what each tensor carries.
    # Constants (initializers, constant subgraphs, undecided sources) do not take part in the decision.
    state: dict[str, str] = {t.name: FLEX for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    constant = set(state)
    precisions: dict[int, str] = {}
    for node in graph.nodes:
        inputs, outputs = data_inputs(node), [t for t in node.outputs if is_float(t)]
        if all(t.name in constant for t in node.inputs if t.name):
            constant.update(t.name for t in node.outputs)
        if not inputs and not outputs:
            continue
        bound = {state.get(t.name, FP32) for t in inputs} - {FLEX}  # graph inputs carry plain float32
        moves = node.op in DATA_MOVEMENT_OPS or not outputs
        if node.op in SOURCE_OPS:
            decided = FLEX
        elif node.op in FP32_OPS or id(node) in forced:
            decided = FP32_SPREADING if node.op in SPREADING_OPS else FP32
        elif not moves and node.outputs[0].name in constant:
            decided = FP32  # a constant subgraph
        elif not bound:
            decided = FLEX
        elif moves:
            decided = bound.pop() if len(bound) == 1 else (FP32 if LOW not in bound else LOW)
        else:
            decided = FP32_SPREADING if bound == {FP32_SPREADING} else LOW
        precisions[id(node)] = decided
        for tensor in outputs:
            state[tensor.name] = FLEX if tensor.name in constant else decided

    # Backward: undecided nodes take the precision of their consumers.
    indifferent = set()
    for node in reversed(graph.nodes):
        if precisions.get(id(node)) != FLEX:
            continue
        wanted = set()
        for tensor in node.outputs:
            if not is_float(tensor):
                continue
            if tensor in graph.outputs:
                wanted.add(FP32)
            for consumer in tensor.outputs:
                reads = any(t is tensor for t in data_inputs(consumer))
                if reads and id(consumer) not in indifferent:
                    wanted.add(precisions[id(consumer)])
        if not wanted:
            indifferent.add(id(node))
        precisions[id(node)] = LOW if wanted == {LOW} else FP32
    return {key: LOW if value == LOW else FP32 for key, value in precisions.items()}


def _output_heads(graph: gs.Graph, is_float) -> set[int]:
    """The ids of the nodes between each float32 graph output and the last `HEAD_STOP_OPS` node before it."""
    heads: set[int] = set()
    pending = [t.inputs[0] for t in graph.outputs if is_float(t) and t.inputs]
    while pending:
        node = pending.pop()
        if id(node) in heads or node.op in HEAD_STOP_OPS:
            continue
        heads.add(id(node))
        pending += [t.inputs[0] for t in node.inputs if is_float(t) and t.inputs]
    return heads


class _Rewriter:
    """Applies node precisions to a graph: converts initializers and constant values, retargets casts,
    inserts the casts where precisions meet and sets the dtype of every low tensor."""

    def __init__(self, graph: gs.Graph, types: dict[str, int], precisions: dict[int, str], low: LowPrecision,
                 suffix: str):
        self.graph, self.types, self.precisions, self.low, self.suffix = graph, types, precisions, low, suffix
        self.floats = {name for name, kind in types.items() if kind == FLOAT}  # before any is lowered
        self.names = set(graph.tensors()) | {node.name for node in graph.nodes}
        self.versions: dict[tuple[str, str], gs.Tensor] = {}

    def run(self) -> None:
        graph = self.graph
        for node in list(graph.nodes):
            if self.precisions.get(id(node)) == LOW:
                self._lower_outputs(node)
        for node in list(graph.nodes):
            precision = self.precisions.get(id(node))
            if precision is None or node.op in TYPE_EXEMPT_OPS:
                continue
            skip = NON_DATA_INPUTS.get(node.op, frozenset())
            for index, tensor in enumerate(node.inputs):
                if index not in skip and tensor.name in self.floats:
                    node.inputs[index] = self._version(tensor, precision)
        graph.toposort()

    def _lower_outputs(self, node: gs.Node) -> None:
        """Make a low node produce the low dtype: its float outputs, its constant value or cast target.
        A graph output keeps its name and float32 dtype, through a cast of the new low tensor."""
        if node.op == "Cast":
            node.attrs["to"] = self.low.onnx_type
        elif node.op in ("Constant", "ConstantOfShape"):
            self._lower_attribute_value(node)
        for index, tensor in enumerate(node.outputs):
            if tensor.name not in self.floats:
                continue
            if tensor in self.graph.outputs:
                lowered = gs.Variable(self._unique(f"{tensor.name}_{self.suffix}"), self.low.numpy_type, tensor.shape)
                for consumer in list(tensor.outputs):
                    for i, read in enumerate(consumer.inputs):
                        if read is tensor:
                            consumer.inputs[i] = lowered
                node.outputs[index] = lowered
                self._cast(lowered, FLOAT, np.dtype(np.float32), output=tensor)
                self.types[lowered.name] = self.low.onnx_type
            else:
                tensor.dtype = self.low.numpy_type
                self.types[tensor.name] = self.low.onnx_type

    def _lower_attribute_value(self, node: gs.Node) -> None:
        if node.op == "ConstantOfShape" and "value" not in node.attrs:
            node.attrs["value"] = gs.Constant("", np.zeros(1, np.float32))  # ONNX's default: a float32 zero
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant) and value.dtype == np.float32:
            node.attrs["value"] = gs.Constant(value.name, self._lowered_values(value.values))
        for name in ("value_float", "value_floats"):
            if name in node.attrs:
                values = np.array(node.attrs.pop(name), dtype=np.float32)
                node.attrs["value"] = gs.Constant(self._unique(node.name + "_value"), self._lowered_values(values))

    def _lowered_values(self, values: np.ndarray) -> np.ndarray:
        """`values` in the low dtype, finite ones clamped to its range: fp16 turns a -3.4e38 attention mask
        into -inf otherwise, and -inf - -inf is NaN."""
        limit = self.low.max_finite
        return np.where(np.isfinite(values), np.clip(values, -limit, limit), values).astype(self.low.numpy_type)

    def _version(self, tensor: gs.Tensor, precision: str) -> gs.Tensor:
        """`tensor` in `precision`: itself, a converted initializer or the output of a (shared) cast."""
        if isinstance(tensor, gs.Constant):
            if precision == FP32:
                return tensor
            key = (tensor.name, precision)
            if key not in self.versions:
                self.versions[key] = gs.Constant(self._unique(f"{tensor.name}_{self.suffix}"),
                                                 self._lowered_values(tensor.values))
            return self.versions[key]
        native = LOW if self.types.get(tensor.name) == self.low.onnx_type else FP32
        if native == precision:
            return tensor
        key = (tensor.name, precision)
        if key not in self.versions:
            target = (self.low.onnx_type, self.low.numpy_type) if precision == LOW else (FLOAT, np.dtype(np.float32))
            self.versions[key] = self._cast(tensor, *target)
        return self.versions[key]

    def _cast(self, tensor: gs.Tensor, onnx_type: int, numpy_type: np.dtype,
              output: gs.Variable | None = None) -> gs.Variable:
        name = onnx.helper.tensor_dtype_to_string(onnx_type).removeprefix("TensorProto.").lower()
        if output is None:
            output = gs.Variable(self._unique(f"{tensor.name}_{name}"), numpy_type, tensor.shape)
        node = gs.Node("Cast", self._unique(f"cast_{tensor.name}_{name}"), {"to": onnx_type}, [tensor], [output])
        self.graph.nodes.append(node)
        return output

    def _unique(self, name: str) -> str:
        candidate, count = name, 1
        while candidate in self.names:
            candidate, count = f"{name}_{count}", count + 1
        self.names.add(candidate)
        return candidate
