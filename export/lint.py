"""Checks that an exported graph is one TensorRT's ONNX parser accepts, before anything is built from it.

The rules restate, as data, the operator table and the static checks of the TensorRT 10 ONNX parser
(onnx-tensorrt `docs/operators.md` and its per-operator checkers) for the operators these graphs can
contain. The list is deliberately conservative: an operator missing here fails the export, naming the
node, and is added only once TensorRT's support for it is confirmed.

QuantizeLinear and DequantizeLinear follow the parser's `QuantDequantLinearHelper` and TensorRT's Quantize
and Dequantize layers: constant, positive scales in float32, float16 or bfloat16 (a single one for
QuantizeLinear, which TensorRT takes per tensor; one per channel along `axis`, or one, for DequantizeLinear);
zero points absent or constant zeros; the quantized type int8 or float8e4m3fn. A QuantizeLinear names that
type with its zero point (ONNX's default without one is uint8, TensorRT's int8: the graph would mean one thing
in ONNX Runtime and another in TensorRT). TensorRT treats 8-bit types as quantized types only (`docs/
operators.md`): an 8-bit tensor is read by DequantizeLinear alone (zero points aside).
"""

from __future__ import annotations

import numpy as np
import onnx

from engine.errors import WuerstchenError

MIN_OPSET = 17  # LayerNormalization
QDQ_OPSET = 19  # float8 types and 16-bit scales in QuantizeLinear and DequantizeLinear
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})
SCALE_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
QUANTIZED_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}

TENSORRT_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
    Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Einsum Elu
    Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool
    Greater GreaterOrEqual GroupNormalization HardSigmoid Identity InstanceNormalization IsNaN LayerNormalization
    LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mul Neg Not Or Pad Pow PRelu
    QuantizeLinear Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize Round Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK Transpose Trilu Unsqueeze Where
    Xor
""".split())

# Inputs that the parser needs as constants (initializers or Constant outputs), by operator: input index.
CONSTANT_INPUTS = {
    "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (3,), "ReduceL1": (1,), "ReduceL2": (1,),
    "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceMax": (1,), "ReduceMean": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "ReduceSum": (1,), "ReduceSumSquare": (1,), "Conv": (1,), "ConvTranspose": (1,),
}
PAD_MODES = {"constant", "reflect", "edge", "wrap"}
RESIZE_MODES = {"nearest", "linear", "cubic"}


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _decoded(value):
    return value.decode() if isinstance(value, bytes) else value


def check_tensorrt_compatible(model: onnx.ModelProto, graph: str) -> None:
    """Raise a one-line error naming the first node, tensor or setting TensorRT's parser would refuse:
    an unsupported operator, Resize with antialiasing, an unknown pad mode, a non-constant axes or
    weight input, any float64 tensor, an opset below 17, or a Q/DQ node outside TensorRT's explicit
    quantization (see the module docstring)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise WuerstchenError(f"graph {graph}: opset {opset} is below {MIN_OPSET}, which LayerNormalization needs")
    if model.functions:
        names = sorted(f.name for f in model.functions)
        raise WuerstchenError(f"graph {graph}: has ONNX functions {names}; TensorRT needs them inlined")

    nodes = model.graph.node
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in nodes if node.op_type == "Constant" for out in node.output}
    if any(node.op_type in QDQ_OPS for node in nodes):
        _check_quantization(model, graph, opset)
    for node in nodes:
        where = f"graph {graph}: node {node.name!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            raise WuerstchenError(f"{where} is not supported by TensorRT's ONNX parser")
        for index in CONSTANT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                raise WuerstchenError(f"{where}: input {index} must be a constant for TensorRT")
        if node.op_type == "Resize":
            if _attribute(node, "antialias", 0):
                raise WuerstchenError(f"{where}: antialiasing is not supported by TensorRT")
            if _decoded(_attribute(node, "mode", b"nearest")) not in RESIZE_MODES:
                raise WuerstchenError(f"{where}: mode must be one of {sorted(RESIZE_MODES)}")
        if node.op_type == "Pad" and _decoded(_attribute(node, "mode", b"constant")) not in PAD_MODES:
            raise WuerstchenError(f"{where}: pad mode must be one of {sorted(PAD_MODES)}")
        if node.op_type == "Cast" and _attribute(node, "to", 0) == onnx.TensorProto.DOUBLE:
            raise WuerstchenError(f"{where}: casts to float64, which TensorRT does not run")

    tensors = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for tensor in tensors:
        if tensor.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            raise WuerstchenError(f"graph {graph}: tensor {tensor.name!r} is float64, which TensorRT does not run")
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            raise WuerstchenError(f"graph {graph}: initializer {init.name!r} is float64, which TensorRT does not run")


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _check_quantization(model: onnx.ModelProto, graph: str, opset: int) -> None:
    """The Q/DQ rules of the module docstring, each failure one line naming the node or tensor."""
    if opset < QDQ_OPSET:
        raise WuerstchenError(f"graph {graph}: has QuantizeLinear/DequantizeLinear at opset {opset}; float8 and "
                              f"16-bit scales need opset {QDQ_OPSET}")
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    types = tensor_types(model)
    quantized = {}  # the 8-bit tensors: name → the node or initializer they come from
    for init in model.graph.initializer:
        if init.data_type in QUANTIZED_TYPES:
            quantized[init.name] = f"initializer {init.name!r}"
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        where = f"graph {graph}: node {node.name!r} ({node.op_type})"
        scale = _constant(values, node, 1, where, "scale")
        if scale.data_type not in SCALE_TYPES:
            raise WuerstchenError(f"{where}: scale {scale.name!r} is {_type_name(scale.data_type)}; TensorRT takes "
                                  "float32, float16 or bfloat16 scales")
        scale_values = _values(scale)
        if scale_values is not None and not (scale_values > 0).all():
            raise WuerstchenError(f"{where}: scale {scale.name!r} holds values that are not positive")
        if _attribute(node, "block_size", 0):
            raise WuerstchenError(f"{where}: block quantization is for int4 weights in TensorRT")
        zero_point = _constant(values, node, 2, where, "zero point") if len(node.input) > 2 and node.input[2] \
            else None
        if zero_point is not None:
            zeros = _values(zero_point)
            if zeros is not None and zeros.astype(np.float32).any():
                raise WuerstchenError(f"{where}: zero point {zero_point.name!r} is not all zeros; TensorRT "
                                      "quantizes symmetrically")
            if np.prod(zero_point.dims) != np.prod(scale.dims):
                raise WuerstchenError(f"{where}: its zero point and scale differ in size")
        if node.op_type == "QuantizeLinear":
            target = zero_point.data_type if zero_point is not None else _attribute(node, "output_dtype", 0)
            if not target:
                raise WuerstchenError(f"{where}: names no quantized type (no zero point or output_dtype): ONNX "
                                      "reads that as uint8, TensorRT as int8")
            if target not in QUANTIZED_TYPES:
                raise WuerstchenError(f"{where}: quantizes to {_type_name(target)}; TensorRT quantizes to int8 or "
                                      "float8e4m3fn")
            if int(np.prod(scale.dims)) != 1:
                raise WuerstchenError(f"{where}: scale {scale.name!r} has shape {list(scale.dims)}; TensorRT "
                                      "quantizes activations with a single scale")
            if types.get(node.input[0]) not in (None, scale.data_type):
                raise WuerstchenError(f"{where}: input {node.input[0]!r} is {_type_name(types[node.input[0]])} and "
                                      f"its scale {_type_name(scale.data_type)}; they must be one type")
            quantized[node.output[0]] = where
        else:
            source = types.get(node.input[0])
            if source not in QUANTIZED_TYPES:
                raise WuerstchenError(f"{where}: dequantizes {_type_name(source) if source else 'an untyped'} input "
                                      f"{node.input[0]!r}; TensorRT dequantizes int8 or float8e4m3fn")
            weight, axis, count = values.get(node.input[0]), _attribute(node, "axis", 1), int(np.prod(scale.dims))
            per_channel = weight is not None and count > 1
            if per_channel and not -len(weight.dims) <= axis < len(weight.dims):
                raise WuerstchenError(f"{where}: axis {axis} is outside its input's {len(weight.dims)} dimensions")
            if len(scale.dims) > 1 or (per_channel and count != weight.dims[axis]):
                raise WuerstchenError(f"{where}: scale {scale.name!r} of shape {list(scale.dims)} is neither one "
                                      "scale nor one per channel along its axis")
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            dequantized = node.op_type == "DequantizeLinear" and index == 0
            if name in quantized and not dequantized and not (node.op_type in QDQ_OPS and index == 2):
                raise WuerstchenError(f"graph {graph}: node {node.name!r} ({node.op_type}) reads the 8-bit tensor "
                                      f"{name!r} ({quantized[name]}); TensorRT reads 8-bit tensors through "
                                      "DequantizeLinear only")
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type in QUANTIZED_TYPES:
            raise WuerstchenError(f"graph {graph}: {value.name!r} is an 8-bit graph input or output; TensorRT takes "
                                  "8-bit tensors only inside the graph, between QuantizeLinear and DequantizeLinear")


def _constant(values: dict, node: onnx.NodeProto, index: int, where: str, what: str) -> onnx.TensorProto:
    name = node.input[index] if index < len(node.input) else ""
    if name not in values:
        raise WuerstchenError(f"{where}: its {what} {name!r} must be a constant (an initializer) for TensorRT")
    return values[name]


def _values(tensor: onnx.TensorProto) -> np.ndarray | None:
    """A constant's values, or None where they live in external data that was not loaded."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:
        return None
    return onnx.numpy_helper.to_array(tensor).astype(np.float32)


def _type_name(data_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor, by ONNX shape inference (existing value_info is ignored).

    Inference runs on a copy without the float and 8-bit weights, which become typed graph inputs: only their
    dtypes matter, and a graph with its weights can exceed protobuf's 2 GB."""
    graph = model.graph
    declared = {v.name for v in graph.input}
    weight_types = FLOAT_TYPES | set(QUANTIZED_TYPES)
    weights = [t for t in graph.initializer if t.data_type in weight_types and t.name not in declared]
    moved = {t.name for t in weights}
    skeleton = onnx.helper.make_graph(
        nodes=graph.node, name=graph.name,
        inputs=[*graph.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights)],
        outputs=graph.output, initializer=[t for t in graph.initializer if t.name not in moved],
    )
    typed = onnx.shape_inference.infer_shapes(
        onnx.helper.make_model(skeleton, opset_imports=model.opset_import, ir_version=model.ir_version,
                               functions=model.functions))
    values = [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types
