"""Quantized bundles: `wuerstchen export --quantize` writes Q/DQ graphs whose 8-bit weights are the PyTorch
path's, records the recipe and the calibration in the manifest (read back as hostile), passes TensorRT's
explicit-quantization rules as the linter states them, and runs in ONNX Runtime on the CPU close to the
quantized PyTorch models it was exported from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engine import WuerstchenError, WuerstchenPipeline
from engine.bundle import QUANTIZED_GRAPHS, open_bundle
from engine.cli import main
from engine.models import quantized
from engine.precision import Quantization
from engine.quantization import QuantRecipe
from export.bundle import export_bundle
from export.lint import check_tensorrt_compatible
from export.verify import FP8_STEP_TOLERANCE, TOLERANCES, tolerances, verify_bundle

SIZES = ["--min-size", "128", "--max-size", "256"]
EIGHT_BIT = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def fp16_pipeline():
    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu", dtype="fp16")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    """The tiny demo exported by the command line with a scanned int8 recipe, verified in ONNX Runtime."""
    out = tmp_path_factory.mktemp("quantized") / "int8"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "interpreted", lambda: False)  # scan on the kernels' references
        assert main(["export", "--quantize", "int8", "--dtype", "fp16", "--out", str(out), *SIZES, "--verify"]) == 0
    return out


@pytest.fixture(scope="module")
def fp8_bundle(fp16_pipeline, tmp_path_factory) -> Path:
    """The tiny demo with every candidate Linear in fp8, exported from Python."""
    out = tmp_path_factory.mktemp("quantized") / "fp8"
    export_bundle(fp16_pipeline, out, {"preset": "tiny", "seed": 0}, min_size=128, max_size=256,
                  progress=lambda _: None, quantization=QuantRecipe.every("fp8"))
    return out


def _graph(bundle: Path, name: str) -> onnx.ModelProto:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return onnx.load(str(bundle / manifest["graphs"][name]["file"]))


def test_the_manifest_records_the_recipe_and_the_graphs_hold_its_weights_in_8_bits(int8_bundle, capsys):
    manifest = open_bundle(int8_bundle).manifest
    entry = manifest["quantization"]
    recipe = QuantRecipe.from_dict(entry["recipe"])
    assert entry["scheme"] == "int8" and recipe.scheme is Quantization.INT8 and entry["input_scales"] is None
    assert entry["graphs"] == list(QUANTIZED_GRAPHS) and manifest["dtype"] == "float16"
    assert all(0 <= error <= 0.01 for error in entry["step_error"].values())  # the scan's bound, int8: 1 %
    for name, stage in (("prior_step", "prior"), ("decoder_step", "decoder")):
        model = _graph(int8_bundle, name)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
        eight_bit = [t.name for t in model.graph.initializer if t.data_type in EIGHT_BIT]
        assert sorted(eight_bit) == sorted(f"{stage}.{layer}.w_q" for layer in entry["layers"][stage])
        assert not any(node.op_type == "QuantizeLinear" for node in model.graph.node)  # weights only
    # The command line's verification passed; these graphs are the same, each checked within fp16's tolerance.
    assert tolerances(open_bundle(int8_bundle).precision, ["decoder_step"], entry) == {"decoder_step": 1e-2}


def test_fp8_graphs_quantize_their_inputs_statically_as_tensorrt_takes_them(fp8_bundle, fp16_pipeline):
    entry = open_bundle(fp8_bundle).manifest["quantization"]
    model = _graph(fp8_bundle, "decoder_step")
    check_tensorrt_compatible(model, "decoder_step")
    quantizers = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantizers) == len(entry["layers"]["decoder"]) == len(entry["input_scales"]["decoder"])
    zero_points = {t.name: t.data_type for t in model.graph.initializer}
    assert {zero_points[node.input[2]] for node in quantizers} == {TensorProto.FLOAT8E4M3FN}
    assert all(scale > 0 for scales in entry["input_scales"].values() for scale in scales.values())

    worst = verify_bundle(fp16_pipeline, fp8_bundle, sizes=[(128, 128)], batches=(2,))
    limits = tolerances(fp16_pipeline.precision, worst, entry)
    assert limits["decoder_step"] == FP8_STEP_TOLERANCE and limits["decoder_condition"] == TOLERANCES[
        fp16_pipeline.precision]
    assert all(error <= limits[name] for name, error in worst.items()), worst


def test_a_quantized_bundle_runs_in_onnx_runtime_near_its_pytorch_models(int8_bundle, fp16_pipeline):
    """Near the graphs' own math in PyTorch (`reference_pipeline`: weights dequantized to fp16, then fp16
    GEMMs), and near the engine's quantized PyTorch path and the unquantized model, which differ from it."""
    from export.quantize import reference_pipeline

    bundle = WuerstchenPipeline.from_bundle(int8_bundle)
    bundle.set_progress_bar_config(disable=True)
    entry = open_bundle(int8_bundle).manifest["quantization"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "interpreted", lambda: False)
        engine_path = WuerstchenPipeline.from_preset("tiny", device="cpu", dtype="fp16",
                                                     quantize=QuantRecipe.from_dict(entry["recipe"]))
        engine_path.set_progress_bar_config(disable=True)
        pipes = {"graphs' math": reference_pipeline(fp16_pipeline, entry), "engine's path": engine_path,
                 "unquantized": fp16_pipeline}
        call = dict(height=256, width=256, prior_num_inference_steps=12, num_inference_steps=8, output_type="np")
        images = {name: pipe("a red fox", generator=torch.Generator().manual_seed(2), **call).images
                  for name, pipe in {"onnxruntime": bundle, **pipes}.items()}
    apart = {name: float(np.abs(images["onnxruntime"] - images[name]).mean()) for name in pipes}
    assert apart["graphs' math"] < 0.005 and max(apart.values()) < 0.02, apart


@pytest.mark.parametrize("edit, pattern", [
    (lambda q, m: q.update(scheme="int4"), r"quantization.scheme='int4': expected one of fp8, int8$"),
    (lambda q, m: q.pop("calibration"), r"quantization=.*: expected an object with activations, calibration"),
    (lambda q, m: q["layers"]["prior"].append(q["layers"]["prior"][0]), r"quantization.layers.prior=.*distinct"),
    (lambda q, m: q["layers"]["decoder"].pop(), r"quantization.recipe=.*: expected the recipe of these layers"),
    (lambda q, m: q.update(input_scales={"prior": {}, "decoder": {}}), r"quantization.input_scales=.*: expected "
                                                                        r"null: int8 quantizes weights only$"),
    (lambda q, m: q["step_error"].update(prior=float("nan")), r"quantization.step_error=.*: expected a relative"),
    (lambda q, m: m.update(dtype="float32"), r"dtype='float32': expected float16 or bfloat16 in a quantized bundle"),
])
def test_a_tampered_quantization_entry_is_one_line_naming_the_key(int8_bundle, tmp_path, edit, pattern):
    bundle = Path(shutil.copytree(int8_bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest["quantization"], manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WuerstchenError) as excinfo:
        open_bundle(bundle)
    message = str(excinfo.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_export_refuses_what_it_cannot_quantize(tmp_path, capsys):
    fp32 = WuerstchenPipeline.from_preset("tiny", device="cpu", dtype="fp32")
    with pytest.raises(WuerstchenError, match=r"^quantize='int8' needs a pipeline in fp16 or bf16 .* is fp32$"):
        export_bundle(fp32, tmp_path / "b", {}, min_size=128, max_size=256, quantization=QuantRecipe.every("int8"))
    with pytest.raises(WuerstchenError, match=r"^quantization='int8': expected a QuantRecipe"):
        export_bundle(fp32, tmp_path / "b", {}, min_size=128, max_size=256, quantization="int8")
    assert not (tmp_path / "b").exists()
    assert main(["export", "--quantize", "int8", "--out", str(tmp_path / "c")]) == 2  # export's default is fp32
    assert "--quantize 'int8' quantizes fp16 or bf16 weights, and dtype is fp32" in capsys.readouterr().err


def _qdq_model(*, opset: int = 19, zero_point: int | None = TensorProto.INT8, scale_shape=(), reader: str = "DQ",
               scale_type: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """x (fp16) → QuantizeLinear → DequantizeLinear (or a MatMul reading the 8-bit tensor) → y."""
    count = int(np.prod(scale_shape)) if scale_shape else 1
    inits = [helper.make_tensor("s", scale_type, list(scale_shape), [0.5] * count)]
    q_inputs = ["x", "s"]
    if zero_point is not None:
        inits.append(helper.make_tensor("z", zero_point, list(scale_shape), [0] * count))
        q_inputs.append("z")
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="quantize")]
    nodes.append(helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dequantize") if reader == "DQ"
                 else helper.make_node("Identity", ["q"], ["y"], name="reader"))
    y_type = TensorProto.FLOAT16 if reader == "DQ" else (zero_point or TensorProto.UINT8)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
                              [helper.make_tensor_value_info("y", y_type, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(), None),
    (dict(opset=18), r"has QuantizeLinear/DequantizeLinear at opset 18; float8 and 16-bit scales need opset 19"),
    (dict(zero_point=None), r"names no quantized type .* ONNX reads that as uint8, TensorRT as int8"),
    (dict(zero_point=TensorProto.UINT8), r"quantizes to uint8; TensorRT quantizes to int8 or float8e4m3fn"),
    (dict(scale_shape=(4,)), r"scale 's' has shape \[4\]; TensorRT quantizes activations with a single scale"),
    (dict(scale_type=TensorProto.DOUBLE), r"scale 's' is double"),
    (dict(reader="Identity"), r"node 'reader' \(Identity\) reads the 8-bit tensor 'q'"),
])
def test_the_linter_states_tensorrts_explicit_quantization_rules(kwargs, pattern):
    model = _qdq_model(**kwargs)
    if pattern is None:
        check_tensorrt_compatible(model, "g")
        return
    with pytest.raises(WuerstchenError) as excinfo:
        check_tensorrt_compatible(model, "g")
    assert "\n" not in str(excinfo.value) and re.search(pattern, str(excinfo.value)), str(excinfo.value)
