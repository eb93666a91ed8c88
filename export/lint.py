"""Checks that an exported graph is one TensorRT's ONNX parser accepts, before anything is built from it.

The rules restate, as data, the operator table and the static checks of the TensorRT 10 ONNX parser
(onnx-tensorrt `docs/operators.md` and its per-operator checkers) for the operators these graphs can
contain. The list is deliberately conservative: an operator missing here fails the export, naming the
node, and is added only once TensorRT's support for it is confirmed.
"""

from __future__ import annotations

import onnx

from engine.errors import WuerstchenError

MIN_OPSET = 17  # LayerNormalization

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
    weight input, any float64 tensor, or an opset below 17."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise WuerstchenError(f"graph {graph}: opset {opset} is below {MIN_OPSET}, which LayerNormalization needs")
    if model.functions:
        names = sorted(f.name for f in model.functions)
        raise WuerstchenError(f"graph {graph}: has ONNX functions {names}; TensorRT needs them inlined")

    nodes = model.graph.node
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in nodes if node.op_type == "Constant" for out in node.output}
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
