"""Hostile input: tampered bundles and model folders, absurd numbers, undecodable prompts, interrupted and failed
writes. Each is refused with one line naming the field, the value and what was expected, and none of them
changes what the next good request gets."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import export.bundle
from engine import WuerstchenError, WuerstchenPipeline
from engine.bundle import open_bundle
from engine.cli import main
from export.bundle import export_bundle

FAST = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=2, output_type="pt")
CLI_FAST = ["--height", "128", "--width", "128", "--prior-steps", "2", "--decoder-steps", "2"]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- bundles --------------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _refused(bundle: Path, pattern: str) -> None:
    with pytest.raises(WuerstchenError) as excinfo:
        open_bundle(bundle)
    assert re.search(pattern, _one_line(excinfo)), _one_line(excinfo)


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(format_version=True), r"format_version=True is not supported: this engine reads version 1$"),
    (lambda m: m.update(format_version=1.0), r"format_version=1.0 is not supported"),
    (lambda m: m.pop("graphs"), r"the key 'graphs' is missing$"),
    (lambda m: m.update(run_after="rm -rf ~"), r"unknown keys \['run_after'\]: a version 1 manifest has \["),
    (lambda m: m["graphs"]["prior_step"].update(evil=1), r"graphs.prior_step: unknown keys \['evil'\]: a graph has "),
    (lambda m: m.update(dtype="float8"), r"dtype='float8': expected one of float32, float16, bfloat16$"),
    (lambda m: m["sizes"].update(max=8192), r"sizes=\{.*'max': 8192\}: expected min ≤ max within the model's range"),
    (lambda m: m["sizes"].update(min="128"), r"sizes.min='128': expected a positive integer$"),
    (lambda m: m["config"]["prior"].update(depth="8"), r"config: prior depth='8': expected a positive integer$"),
    (lambda m: m["config"]["decoder"].update(blocks=[1, "x"]), r"decoder blocks=\(1, 'x'\): expected a list of "),
    (lambda m: m["config"]["prior_schedule"].update(s=float("nan")), r"scheduler s=nan: expected a finite number"),
    (lambda m: m["files"].update({next(iter(m["files"])): None}), r"files\['.*'\]=None: expected a SHA-256"),
    (lambda m: m["graphs"]["prior_step"].update(file="/etc/passwd"),
     r"a graph's or tokenizer's file='/etc/passwd': expected a relative path inside the folder"),
    (lambda m: m["graphs"]["vqgan_decode"].update(external_data=["../weights.bin"]), r"without '\.\.'$"),
    (lambda m: m["graphs"]["prior_text"]["inputs"][0].update(dtype="float64"),
     r"graphs.prior_text.inputs\[0\].dtype='float64': expected one of"),
    (lambda m: m["graphs"]["decoder_step"]["outputs"][0].update(shape=["batch", -4]), r"\.shape=.*expected a list"),
    (lambda m: m["tokenizers"].update(prior="../../tokenizer"), r"tokenizers.prior='../../tokenizer': expected a "),
])
def test_a_tampered_manifest_is_one_line_naming_the_key(bundle, edit, pattern):
    manifest = _manifest(bundle)
    edit(manifest)
    _write_manifest(bundle, manifest)
    _refused(bundle, pattern)


def test_a_manifest_that_is_not_an_object_or_not_utf8_is_refused(bundle):
    (bundle / "manifest.json").write_bytes(b'{"format": "\xff"}')
    _refused(bundle, r"manifest.json is not valid JSON")
    _write_manifest(bundle, [1, 2])
    _refused(bundle, r"manifest='list': expected a JSON object$")


def test_an_emptied_file_is_altered(bundle):
    (bundle / "prior_text.onnx").write_bytes(b"")
    _refused(bundle, rf"^bundle file {re.escape(str(bundle / 'prior_text.onnx'))} was altered")


def test_files_read_must_be_listed_and_stay_inside(bundle, tmp_path):
    tokenizer = bundle / _manifest(bundle)["tokenizers"]["prior"]
    (tokenizer / "added_tokens.json").write_text("{}")  # read by transformers, hashed by no one
    _refused(bundle, r"'tokenizer_prior/added_tokens.json' is read but not listed in files with its SHA-256")
    (tokenizer / "added_tokens.json").unlink()
    (tmp_path / "secret.json").write_text("{}")
    (tokenizer / "vocab_link.json").symlink_to(tmp_path / "secret.json")
    _refused(bundle, r"holds 'vocab_link.json', which is not a plain file$")
    (tokenizer / "vocab_link.json").unlink()

    graph = bundle / "prior_step.onnx"  # a listed file replaced by a link out of the bundle
    shutil.move(graph, tmp_path / "prior_step.onnx")
    graph.symlink_to(tmp_path / "prior_step.onnx")
    _refused(bundle, r"files key='prior_step.onnx' lies outside the folder \(through a link\)$")


def test_a_damaged_bundle_leaves_a_loaded_pipeline_untouched(bundle, tiny_bundle):
    pipe = WuerstchenPipeline.from_bundle(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a cat", generator=torch.Generator().manual_seed(3), **FAST).images
    (bundle / "decoder_step.onnx").write_bytes(b"\0" * 64)
    with pytest.raises(WuerstchenError, match="was altered"):
        WuerstchenPipeline.from_bundle(bundle)
    after = pipe("a cat", generator=torch.Generator().manual_seed(3), **FAST).images
    assert torch.equal(before, after)


def test_an_interrupted_export_leaves_nothing_behind(tiny_pipeline, tmp_path, monkeypatch):
    real, calls = export.bundle.export_graph, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export.bundle, "export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_pipeline, tmp_path / "out", {}, min_size=128, max_size=256, progress=lambda _: None)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


# --- model folders --------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tiny_folders, tmp_path):
    return tuple(Path(shutil.copytree(src, tmp_path / src.name)) for src in tiny_folders)


def _edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("where, changes, pattern", [
    ("prior/config.json", {"c": 64.5}, r"prior c=64.5: expected a positive integer$"),
    ("prior/config.json", {"nhead": True}, r"prior nhead=True: expected a positive integer$"),
    ("decoder/config.json", {"inject_effnet": [True, "yes"]}, r"decoder inject_effnet=.*expected a list of true or "),
    ("vqgan/config.json", {"scale_factor": 0}, r"vqgan scale_factor=0: expected a finite number in \(0, inf\)$"),
    ("scheduler/scheduler_config.json", {"scaler": -1.0}, r"scheduler scaler=-1.0: expected a finite number"),
    ("model_index.json", {"latent_dim_scale": "10.67"}, r"model_index.json: latent_dim_scale='10.67': expected a "
                                                        r"positive number$"),
])
def test_a_bad_config_value_is_named(folders, where, changes, pattern):
    folder = folders[0] if where.startswith("prior/") else folders[1]
    _edit_json(folder / where, **changes)
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    message = _one_line(excinfo)
    assert message.startswith(f"{folder / where}: ") and re.search(pattern, message), message  # the file named


def test_a_shard_index_cannot_name_files_outside_its_folder(folders, tmp_path):
    weights = folders[0] / "prior" / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    names = load_file(outside).keys()
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../../elsewhere.safetensors")}
    (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert "a shard='../../elsewhere.safetensors': expected a relative path inside the folder" in _one_line(excinfo)


def test_a_nan_in_the_weights_fails_the_command_in_one_line(folders, tmp_path, capsys):
    path = folders[0] / "prior" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    name = next(n for n, t in state.items() if t.is_floating_point() and t.dim() == 2)
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--prior", str(folders[0]), "--decoder", str(folders[1]), "--out", str(out)]
    assert main([*argv, *CLI_FAST]) == 2
    err = capsys.readouterr().err  # after transformers' progress bars
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "the prior produced non-finite values for this request" in err.splitlines()[-1]
    assert not out.exists()


# --- requests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1e30, 3e38])
def test_a_guidance_that_overflows_fails_that_request_only(tiny_pipeline, guidance):
    before = tiny_pipeline("a cat", generator=torch.Generator().manual_seed(5), **FAST).images
    with pytest.raises(WuerstchenError) as excinfo:
        tiny_pipeline("a cat", prior_guidance_scale=guidance, generator=torch.Generator().manual_seed(5), **FAST)
    assert _one_line(excinfo).startswith("the prior produced non-finite values for this request")
    after = tiny_pipeline("a cat", generator=torch.Generator().manual_seed(5), **FAST).images
    assert torch.equal(before, after)


@pytest.mark.parametrize("changes, message", [
    ({"num_images_per_prompt": 10**7}, "the request needs about "),
    ({"prior_num_inference_steps": 10**6}, "prior_num_inference_steps=1000000: expected a positive integer up to 1000"),
    ({"height": 2**40}, "height=1099511627776 is outside the sizes served here"),
    ({"prior_guidance_scale": float("inf")}, "prior_guidance_scale=inf: expected a finite number"),
    ({"prior_timesteps": [1.0 - i / 5000 for i in range(5000)]},
     "prior_timesteps=[1.0, 0.9998, "),
    ({"prompt": "a \udcff cat"}, "prompt holds bytes that are not UTF-8 (at character 2): expected UTF-8 text"),
    ({"negative_prompt": "\ud800"}, "negative_prompt holds bytes that are not UTF-8"),
])
def test_absurd_requests_are_refused_before_any_work(tiny_pipeline, changes, message):
    args = {**FAST, **changes}
    prompt = args.pop("prompt", "a cat")
    with pytest.raises(WuerstchenError) as excinfo:
        tiny_pipeline(prompt, **args)
    assert message in _one_line(excinfo) and len(_one_line(excinfo)) < 400
    assert tiny_pipeline.stats()["in_flight"] == 0


def test_numpy_numbers_are_numbers(tiny_pipeline):
    plain = tiny_pipeline("a cat", prior_guidance_scale=2.0, generator=torch.Generator().manual_seed(1), **FAST)
    args = {**FAST, "prior_num_inference_steps": np.int64(3), "height": np.int32(128)}
    numpy = tiny_pipeline("a cat", prior_guidance_scale=np.float32(2.0), generator=torch.Generator().manual_seed(1),
                          **args)
    assert torch.equal(plain.images, numpy.images)


# --- the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "--seed 18446744073709551616: expected an integer from 0 to 2**64 - 1"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to 2**64 - 1"),
    (["--prior-guidance", "nan"], "--prior-guidance nan: expected a finite number"),
])
def test_command_line_numbers_are_checked(tmp_path, capsys, args, message):
    assert main(["generate", "a cat", "--out", str(tmp_path / "x.png"), *CLI_FAST, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and list(tmp_path.iterdir()) == []


def test_an_undecodable_argument_is_one_line(tmp_path, capsys):
    prompt = os.fsdecode(b"a \xff cat")  # what Python makes of a command line's invalid bytes
    assert main(["generate", prompt, "--out", str(tmp_path / "x.png"), *CLI_FAST]) == 2
    assert "prompt holds bytes that are not UTF-8" in capsys.readouterr().err


def test_an_interrupt_keeps_the_finished_images_and_no_partial_one(tmp_path, capsys, monkeypatch):
    real, saved = Image.Image.save, []

    def interrupted(image, file, *args, **kwargs):
        if saved:
            file.write(b"\x89PNG, cut short")
            raise KeyboardInterrupt
        saved.append(file)
        return real(image, file, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted)
    out = tmp_path / "cat.png"
    status = main(["generate", "a cat", "--out", str(out), "--num-images", "3", "--batch-size", "1", "--seed", "4",
                   *CLI_FAST])
    assert status == 130 and capsys.readouterr().err.endswith("wuerstchen generate: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png"]
    assert Image.open(tmp_path / "cat-0.png").text["seed"] == "4"


def test_an_atomic_write_keeps_the_replaced_file_s_permissions(tmp_path):
    from engine.files import write_atomically

    path = tmp_path / "results.json"
    write_atomically(path, b"{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    path.chmod(0o640)
    write_atomically(path, b"[]")
    assert path.read_bytes() == b"[]" and path.stat().st_mode & 0o777 == 0o640 and len(list(tmp_path.iterdir())) == 1


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
