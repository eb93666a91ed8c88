"""The ONNX bundle: every graph equal to PyTorch in ONNX Runtime, the whole pipeline from the bundle, the
TensorRT op check, the manifest and its errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine import WuerstchenError, WuerstchenPipeline
from engine.bundle import FORMAT_VERSION, GRAPHS, open_bundle, sha256
from engine.config import WuerstchenConfig
from export.bundle import export_bundle
from export.lint import check_tensorrt_compatible
from export.verify import verify_bundle

SIZES = [(128, 128), (256, 384), (512, 128)]  # square, the export size, and neither


@pytest.fixture(scope="session")
def bundle_pipeline(tiny_bundle) -> WuerstchenPipeline:
    pipe = WuerstchenPipeline.from_bundle(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_graph_matches_pytorch_at_several_sizes_and_batches(tiny_pipeline, tiny_bundle):
    worst = verify_bundle(tiny_pipeline, tiny_bundle, sizes=SIZES, batches=(1, 2))
    assert list(worst) == list(GRAPHS)
    assert all(error < 1e-4 for error in worst.values()), worst


def test_images_from_the_bundle_equal_the_pytorch_engine(tiny_pipeline, bundle_pipeline):
    kwargs = dict(prompt="a lighthouse", negative_prompt="fog", height=512, width=256, num_images_per_prompt=2,
                  prior_num_inference_steps=4, num_inference_steps=3, decoder_guidance_scale=2.0, output_type="np")
    expected = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(3)).images
    actual = bundle_pipeline(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert expected.shape == actual.shape == (2, 512, 256, 3) and expected.std() > 0.02
    assert np.abs(actual - expected).max() <= 2e-3


def test_manifest_describes_every_graph_as_exported(tiny_bundle, tiny_pipeline):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["dtype"] == "float32"
    assert manifest["sizes"] == {"step": 128, "min": 128, "max": 512} and manifest["opset"] >= 17
    formula = "image_embeddings = prior_latents · latent_mean − latent_std"
    assert manifest["schedule"]["image_embeddings"] == {"latent_mean": 42.0, "latent_std": 1.0, "formula": formula}
    assert len(manifest["schedule"]["default_prior_timesteps"]) == 30
    assert manifest["schedule"]["default_size"] == [1024, 1024] and manifest["schedule"]["default_decoder_steps"] == 12
    assert WuerstchenConfig.from_dict(manifest["config"]) == tiny_pipeline.config
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        model = onnx.load(str(tiny_bundle / entry["file"]), load_external_data=False)
        locations = {e.value for tensor in model.graph.initializer for e in tensor.external_data if e.key == "location"}
        assert sorted(locations) == entry["external_data"]
        for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            exported = [[v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]] for v in values]
            assert exported == [[t["name"], t["shape"]] for t in entry[kind]]
    files = sorted(str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert all(sha256(tiny_bundle / f) == digest for f, digest in manifest["files"].items())


def test_readme_documents_every_manifest_key(tiny_bundle):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    undocumented = [key for key in manifest if f"`{key}`" not in readme]
    assert not undocumented


def test_steps_see_the_decoder_levels_as_multiples_of_one_symbol(tiny_bundle):
    step = json.loads((tiny_bundle / "manifest.json").read_text())["graphs"]["decoder_step"]
    shapes = {t["name"]: t["shape"] for t in step["inputs"]}
    assert shapes["x"] == ["batch", 4, "16*dh", "16*dw"]
    assert [shapes[f"effnet.{i}"][2] for i in range(6)] == ["4*dh", "2*dh", "dh", "dh", "2*dh", "4*dh"]


def _graph(tiny_bundle, name="vqgan_decode") -> onnx.ModelProto:
    return onnx.load(str(tiny_bundle / f"{name}.onnx"))


def test_op_check_passes_the_exported_graphs_and_catches_planted_problems(tiny_bundle):
    for name in GRAPHS:
        check_tensorrt_compatible(_graph(tiny_bundle, name), name)

    model = _graph(tiny_bundle)
    model.graph.node.append(onnx.helper.make_node("NonZero", ["latents"], ["planted"], name="planted_nonzero"))
    with pytest.raises(WuerstchenError, match=r"^graph vqgan_decode: node 'planted_nonzero' \(NonZero\) is not "
                                              r"supported by TensorRT's ONNX parser$"):
        check_tensorrt_compatible(model, "vqgan_decode")

    model = _graph(tiny_bundle)
    model.graph.node.append(onnx.helper.make_node("Resize", ["latents", "", "scales"], ["big"], name="aa_resize",
                                                  mode="cubic", antialias=1))
    with pytest.raises(WuerstchenError, match=r"node 'aa_resize' \(Resize\): antialiasing is not supported"):
        check_tensorrt_compatible(model, "vqgan_decode")

    model = _graph(tiny_bundle)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float64), "doubles"))
    with pytest.raises(WuerstchenError, match=r"initializer 'doubles' is float64"):
        check_tensorrt_compatible(model, "vqgan_decode")

    model = _graph(tiny_bundle)
    model.graph.node.append(onnx.helper.make_node("Pad", ["latents", "pads"], ["padded"], name="odd_pad",
                                                  mode="symmetric"))
    with pytest.raises(WuerstchenError, match=r"node 'odd_pad' \(Pad\): pad mode must be one of"):
        check_tensorrt_compatible(model, "vqgan_decode")


@pytest.fixture
def damaged(tiny_bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_unknown_format_version_is_refused(damaged):
    _edit_manifest(damaged, format_version=99)
    with pytest.raises(WuerstchenError, match=rf"format_version=99 is not supported: this engine reads version "
                                              rf"{FORMAT_VERSION}$"):
        WuerstchenPipeline.from_bundle(damaged)


def test_missing_file_is_named(damaged):
    (damaged / "prior_step.onnx").unlink()
    with pytest.raises(WuerstchenError, match=rf"^bundle file {re.escape(str(damaged / 'prior_step.onnx'))} is "
                                              r"missing$"):
        WuerstchenPipeline.from_bundle(damaged)


def test_altered_file_is_named(damaged):
    path = damaged / "decoder_step.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WuerstchenError, match=rf"^bundle file {re.escape(str(path))} was altered: its SHA-256 "
                                              r"differs from the manifest's"):
        WuerstchenPipeline.from_bundle(damaged)
    WuerstchenPipeline.from_bundle(damaged, check_hashes=False)  # the check can be skipped for a fast start


def test_not_a_bundle_and_escaping_paths_are_refused(damaged, tmp_path):
    with pytest.raises(WuerstchenError, match=r"no manifest.json; expected a folder written by `wuerstchen export`"):
        open_bundle(tmp_path)
    _edit_manifest(damaged, files={"../outside.onnx": "0" * 64})
    with pytest.raises(WuerstchenError, match=r"files key='../outside.onnx': expected a relative path inside the "
                                              r"folder, without '..'"):
        open_bundle(damaged)


def test_sizes_outside_the_bundle_range_are_refused(bundle_pipeline):
    with pytest.raises(WuerstchenError, match=r"^height=640 is outside the sizes served here: expected a multiple "
                                              r"of 128 from 128 to 512$"):
        bundle_pipeline("a cat", height=640, width=256)


def test_backend_names_are_checked(tiny_bundle):
    with pytest.raises(WuerstchenError, match=r"^backend='tensorrt-llm' is unknown: expected one of torch, "
                                              r"torch-fast, torch-compile, onnxruntime, tensorrt$"):
        WuerstchenPipeline.from_bundle(tiny_bundle, backend="tensorrt-llm")
    with pytest.raises(WuerstchenError, match=r"^backend='torch' cannot run a bundle"):
        WuerstchenPipeline.from_bundle(tiny_bundle, backend="torch")


def test_export_refuses_a_used_folder_and_sizes_off_the_grid(tiny_pipeline, tiny_bundle, tmp_path):
    with pytest.raises(WuerstchenError, match=r"exists and is not an empty folder"):
        export_bundle(tiny_pipeline, tiny_bundle, {})
    with pytest.raises(WuerstchenError, match=r"^min_size=200 is off the model's size grid"):
        export_bundle(tiny_pipeline, tmp_path / "new", {}, min_size=200)
    with pytest.raises(WuerstchenError, match=r"^min_size=512 is above max_size=256$"):
        export_bundle(tiny_pipeline, tmp_path / "new", {}, min_size=512, max_size=256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_bundles(tiny_folders, tmp_path, dtype):
    """fp16 graphs run in ONNX Runtime on the CPU and stay within fp16's error of PyTorch; bf16 graphs
    (opset 22) pass the TensorRT check, and the ONNX Runtime backend says it cannot bind them."""
    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=dtype)
    manifest = export_bundle(pipe, tmp_path / "bundle", {}, min_size=128, max_size=256, progress=lambda _: None)
    assert manifest["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert manifest["graphs"]["prior_step"]["outputs"][0]["dtype"] == "float32"  # the fp32 noise head
    if dtype == torch.bfloat16:
        assert manifest["opset"] == 22
        with pytest.raises(WuerstchenError, match=r"holds bf16 graphs, which ONNX Runtime's Python API cannot bind"):
            WuerstchenPipeline.from_bundle(tmp_path / "bundle")
        return
    worst = verify_bundle(pipe, tmp_path / "bundle", sizes=[(128, 256)], batches=(2,))
    assert all(error < 1e-2 for error in worst.values()), worst
