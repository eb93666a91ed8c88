"""The fp16/bf16 graph pass (`export.precision`) on the tiny bundle: strongly typed, valid ONNX, the float32
islands where the PyTorch models compute in float32, and fp16 numbers close to fp32 in ONNX Runtime.

ONNX Runtime's CPU provider runs many fp16 operators through float32 kernels, so its fp16 error is a lower
bound on what a GPU gives; the structural tests are what guard the islands. bf16 it hardly runs at all,
so bf16 graphs are checked for structure only.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine import WuerstchenError, WuerstchenPipeline
from engine.bundle import GRAPHS
from engine.models.blocks import attention_implementation
from engine.precision import Precision
from engine.shapes import image_shapes
from export import precision
from export.graphs import graph_specs
from export.precision import check_strongly_typed, convert_file, convert_precision, float32_islands

ort = pytest.importorskip("onnxruntime")

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
# Worst error against the fp32 graph, max |fp16 − fp32| / max |fp32|, at 256×384, batch 2. Measured with
# ONNX Runtime 1.23 on the CPU: text encoders ≤ 8e-4, the other graphs ≤ 5e-4; PyTorch's own fp16 error
# is about twice that (text ≤ 1.4e-3, others ≤ 1e-3), and the bounds leave room for real fp16 kernels.
FP16_BOUNDS = {"prior_text": 5e-3, "decoder_text": 5e-3} | dict.fromkeys(
    ("prior_condition", "prior_step", "decoder_condition", "decoder_step", "vqgan_decode"), 2e-3)
# Noise levels whose r·10000 fp16 holds exactly. Elsewhere fp16 rounds r·10000 to a multiple of up to 8,
# on purpose (as diffusers does), and the sine of the rounded angle differs from fp32's by up to 8 %.
EXACT_NOISE_LEVELS = [0.5, 0.25]


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _relative_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.abs(a.astype(np.float32) - e).max() / np.abs(e).max()) for a, e in zip(actual, expected,
                                                                                                strict=True))


@pytest.fixture(scope="module")
def fp32_graphs(tiny_bundle) -> dict[str, onnx.ModelProto]:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    return {name: onnx.load(str(tiny_bundle / manifest["graphs"][name]["file"])) for name in GRAPHS}


@pytest.fixture(scope="module")
def converted(fp32_graphs) -> dict[tuple[str, str], onnx.ModelProto]:
    """Every graph in fp16 and bf16, keyed by (precision, graph)."""
    return {(p, name): convert_precision(model, p) for p in LOW_TYPES for name, model in fp32_graphs.items()}


@pytest.fixture(scope="module")
def fp16_pipeline(tiny_folders) -> WuerstchenPipeline:
    return WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("name", GRAPHS)
def test_fp16_graph_is_valid_and_close_to_fp32_and_pytorch_fp16(name, fp32_graphs, converted, tiny_pipeline,
                                                                  fp16_pipeline):
    model = converted["fp16", name]
    check_strongly_typed(model, name)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18

    config = tiny_pipeline.config
    spec = graph_specs(tiny_pipeline, (name,))[name]
    feeds = spec.sample(config, image_shapes(config, 256, 384, batch=2), torch.Generator().manual_seed(0))
    if "r" in feeds:
        feeds["r"] = torch.tensor(EXACT_NOISE_LEVELS)
    arrays = {key: value.numpy() for key, value in feeds.items()}
    expected, actual = _run(fp32_graphs[name], arrays), _run(model, arrays)
    assert [a.dtype for a in actual] == [e.dtype for e in expected]  # the interface stays float32
    assert all(np.isfinite(a).all() for a in actual)
    error = _relative_error(actual, expected)
    assert error <= FP16_BOUNDS[name], error

    # PyTorch's engine in fp16 on the same inputs: the pass may add at most about as much error again
    # (flash-attention's rule for low-precision kernels).
    half_spec = graph_specs(fp16_pipeline, (name,))[name]
    half_feeds = {key: value.half() if value.is_floating_point() else value for key, value in feeds.items()}
    with attention_implementation(half_spec.module, "explicit"):
        pytorch = [t.float().numpy() for t in half_spec.run(half_feeds).values()]
    assert error <= 2 * _relative_error(pytorch, expected) + 1e-4


@pytest.mark.parametrize("name", ["prior_step", "decoder_step"])
@pytest.mark.parametrize("low", LOW_TYPES)
def test_step_graphs_keep_the_float32_islands(name, low, converted):
    model = converted[low, name]
    types, nodes = _dtypes(model), model.graph.node
    producer = {output: node for node in nodes for output in node.output}

    def floats_of(node):
        return [types[i] for i in node.input if i and types[i] in (TensorProto.FLOAT, LOW_TYPES[low])]

    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert norms and all(floats_of(n) == [TensorProto.FLOAT] * len(n.input) for n in norms)  # input and scale
    for op in ("ReduceL2", "Softmax", "Sin", "Cos"):
        found = [n for n in nodes if n.op_type == op]
        assert found and all(floats_of(n) == [TensorProto.FLOAT] for n in found), op

    # The angle r·frequency in float32, r·10000 before it in the low dtype, as `timestep_embedding` does.
    (sine,) = [n for n in nodes if n.op_type == "Sin"]
    angle = producer[sine.input[0]]
    assert angle.op_type == "Mul" and floats_of(angle) == [TensorProto.FLOAT] * 2
    (cast_r,) = [n for n in nodes if n.op_type == "Cast" and list(n.input) == ["r"]]
    (scale,) = [n for n in nodes if cast_r.output[0] in n.input]
    assert scale.op_type == "Mul" and types[scale.output[0]] == LOW_TYPES[low]

    # eps and everything back to the head's Conv in float32; the Conv itself runs low.
    assert types["eps"] == TensorProto.FLOAT
    head, pending = {}, [producer["eps"]]
    while pending:
        node = pending.pop()
        if node.op_type == "Cast":
            assert producer[node.input[0]].op_type == "Conv"
            continue
        assert all(types[o] == TensorProto.FLOAT for o in node.output), node.name
        head[node.name] = node.op_type
        pending += [producer[i] for i in node.input if i in producer and types[i] == TensorProto.FLOAT]
    expected = {"prior_step": ["Abs", "Add", "Div", "Split", "Sub", "Sub"],  # (x − a) / (|1 − b| + 1e-5)
                "decoder_step": ["Add", "DepthToSpace", "Div", "Mul", "Sigmoid", "Split", "Sub"]}  # (x − a) / b'
    assert sorted(head.values()) == expected[name]


def _expected_islands(name: str, fp32: onnx.ModelProto) -> Counter:
    """The compute nodes each graph keeps in float32, from the op counts of its fp32 graph."""
    ops = Counter(node.op_type for node in fp32.graph.node)
    islands = Counter({op: ops[op] for op in ("LayerNormalization", "ReduceL2", "Softmax", "Sin", "Cos")})
    grn = ops["ReduceL2"]
    islands.update({"ReduceMean": grn, "Add": grn, "Div": grn})  # norm / (mean(norm) + 1e-6)
    outputs = len(fp32.graph.output)
    islands.update({
        "prior_text": {"Add": 1},  # token + position embedding: only weights, read by a float32 LayerNorm
        "decoder_text": {"Add": 1},
        "prior_condition": {"Add": outputs},  # each output's bias
        "decoder_condition": {"Add": sum(o.name.startswith("text_kv") for o in fp32.graph.output)},
        "prior_step": {"Mul": 1, "Sub": 2, "Abs": 1, "Add": 1, "Div": 1},  # the angle, then the head
        "decoder_step": {"Mul": 2, "Sigmoid": 1, "Add": 1, "Sub": 1, "Div": 1},
        "vqgan_decode": {"Clip": 1},
    }[name])
    return +islands


@pytest.mark.parametrize("name", GRAPHS)
def test_bf16_graph_is_valid_and_low_outside_the_islands(name, fp32_graphs, converted):
    model = converted["bf16", name]
    check_strongly_typed(model, name)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 22 and model.ir_version >= 10
    types = _dtypes(model)
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            assert all(types[i] == TensorProto.BFLOAT16 for i in node.input if i), node.name
    assert float32_islands(model) == _expected_islands(name, fp32_graphs[name])
    assert float32_islands(model) == float32_islands(converted["fp16", name])
    interface = [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]
    original = fp32_graphs[name].graph
    assert interface == [(v.name, v.type.tensor_type.elem_type) for v in [*original.input, *original.output]]


@pytest.mark.parametrize("low", LOW_TYPES)
def test_attention_mask_constant_is_clamped_to_the_finite_range(low, converted):
    model = converted[low, "prior_text"]
    limit = float(precision.LOW_PRECISIONS[Precision(low)].max_finite)
    values = [numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer
              if t.data_type == LOW_TYPES[low]]
    assert all(np.isfinite(v).all() for v in values)
    assert any((v == -limit).any() for v in values)  # the mask's -3.4e38


def test_check_strongly_typed_names_a_node_that_mixes_dtypes(converted):
    model = onnx.ModelProto()
    model.CopyFrom(converted["fp16", "prior_step"])
    check_strongly_typed(model, "prior_step")
    (cast_x,) = [n for n in model.graph.node if n.op_type == "Cast" and list(n.input) == ["x"]]
    model.graph.node.append(helper.make_node("Add", ["x", cast_x.output[0]], ["planted_sum"], name="planted_add"))
    with pytest.raises(WuerstchenError, match=r"graph prior_step: node 'planted_add' \(Add\) mixes float dtypes "
                                              r"\(x FLOAT, .* FLOAT16\)") as error:
        check_strongly_typed(model, "prior_step")
    assert "\n" not in str(error.value)


def test_unknown_precision_is_refused_and_fp32_returns_the_model(fp32_graphs):
    model = fp32_graphs["prior_step"]
    assert convert_precision(model, "fp32") is model
    with pytest.raises(WuerstchenError, match=r"^precision='int8' is not supported: expected fp32, fp16 or bf16"):
        convert_precision(model, "int8")
    with pytest.raises(WuerstchenError, match=r"expects a float32 graph: tensor '.*' is already TensorProto.FLOAT16"):
        convert_precision(convert_precision(model, "fp16"), "fp16")


def test_sources_follow_their_consumers_and_constant_subgraphs_stay_float32():
    """A Cast to float, a Constant, a ConstantOfShape and a -3.4e38 mask factor read only by low nodes become
    low themselves, with no casts of their own; a constant subgraph (Range → Cast → Mul → Exp, like a
    frequency table) stays float32 and is cast once where a low node reads it; the float32 softmax gets a
    cast on each side."""
    nodes = [
        helper.make_node("Range", ["zero", "three", "one"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["steps_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["steps_float", "minus_half"], ["exponents"]),
        helper.make_node("Exp", ["exponents"], ["frequencies"]),
        helper.make_node("Mul", ["x", "frequencies"], ["scaled"]),
        helper.make_node("Cast", ["mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mask_float", "lowest"], ["bias"]),
        helper.make_node("Constant", [], ["offset"], value=numpy_helper.from_array(np.full(3, 0.5, np.float32))),
        helper.make_node("Add", ["scaled", "bias"], ["scores"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),  # float32 zeros by default
        helper.make_node("Add", ["scores", "zeros"], ["padded"]),
        helper.make_node("Add", ["padded", "offset"], ["shifted"]),
        helper.make_node("Softmax", ["shifted"], ["probabilities"]),
        helper.make_node("MatMul", ["probabilities", "weight"], ["y"]),
    ]
    constants = {"zero": np.array(0), "three": np.array(3), "one": np.array(1),
                 "minus_half": np.array(-0.5, np.float32), "lowest": np.array(-3.4028235e38, np.float32),
                 "weight": np.eye(3, dtype=np.float32)}
    graph = helper.make_graph(
        nodes, "sources",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)

    low = convert_precision(model, "fp16")
    check_strongly_typed(low, "sources")
    onnx.checker.check_model(low, full_check=True)
    by_output = {node.output[0]: node for node in low.graph.node}
    assert by_output["mask_float"].attribute[0].i == TensorProto.FLOAT16
    assert by_output["steps_float"].attribute[0].i == TensorProto.FLOAT
    assert numpy_helper.to_array(by_output["offset"].attribute[0].t).dtype == np.float16
    assert numpy_helper.to_array(by_output["zeros"].attribute[0].t).dtype == np.float16
    (lowest,) = [t for t in low.graph.initializer if t.name.startswith("lowest")]
    assert numpy_helper.to_array(lowest) == np.float16(-65504)
    casts = sorted(f"{n.input[0]}->{n.attribute[0].i}" for n in low.graph.node if n.op_type == "Cast")
    assert casts == ["frequencies->10", "mask->10", "probabilities->10", "shifted->1", "steps->1", "x->10",
                     "y_fp16->1"]
    assert float32_islands(low) == {"Exp": 1, "Mul": 1, "Softmax": 1}

    x = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], np.float32)
    mask = np.array([[1, 0, 1], [0, 0, 1]], np.int64)
    expected, actual = _run(model, {"x": x, "mask": mask}), _run(low, {"x": x, "mask": mask})
    assert np.isfinite(actual[0]).all() and np.abs(actual[0] - expected[0]).max() < 2e-3


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_convert_file_round_trip(external, tiny_bundle, tiny_pipeline, converted, tmp_path, monkeypatch):
    if external:
        monkeypatch.setattr(precision, "EXTERNAL_DATA_BYTES", 0)
    destination = tmp_path / "decoder_step-fp16.onnx"
    convert_file(tiny_bundle / "decoder_step.onnx", destination, "fp16")
    assert (tmp_path / "decoder_step-fp16.onnx.data").exists() == external
    in_memory = converted["fp16", "decoder_step"]
    saved = onnx.load(str(destination)).graph
    assert list(saved.node) == list(in_memory.graph.node)
    assert [(t.name, t.data_type, t.raw_data) for t in saved.initializer] == [
        (t.name, t.data_type, t.raw_data) for t in in_memory.graph.initializer]

    config = tiny_pipeline.config
    spec = graph_specs(tiny_pipeline, ("decoder_step",))["decoder_step"]
    feeds = spec.sample(config, image_shapes(config, 128, 256, batch=1), torch.Generator().manual_seed(1))
    arrays = {key: value.numpy() for key, value in feeds.items()}
    assert np.array_equal(_run(str(destination), arrays)[0], _run(in_memory, arrays)[0])
