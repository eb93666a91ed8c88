"""Resolve once: every command and the Python API turn the same source, backend, device and dtype into the
same runtime; the precision type, the recipe, and the layers that point one way."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from engine import (
    FastOptions,
    ModelSource,
    OnnxRuntimeOptions,
    Precision,
    Recipe,
    WuerstchenError,
    WuerstchenPipeline,
    resolve,
)
from engine.backends import Backend, TorchOptions
from engine.cli import build_parser, resolve_flags

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spelling, expected", [
    ("fp32", Precision.FP32), ("FP32", Precision.FP32), ("float32", Precision.FP32), (torch.float32, Precision.FP32),
    ("fp16", Precision.FP16), ("half", Precision.FP16), ("Float16", Precision.FP16), (torch.float16, Precision.FP16),
    ("bf16", Precision.BF16), ("bfloat16", Precision.BF16), (torch.bfloat16, Precision.BF16),
    (Precision.BF16, Precision.BF16),
])
def test_precision_takes_every_spelling(spelling, expected):
    assert Precision.parse(spelling) is expected
    assert expected.torch_dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        expected.value]
    assert expected.onnx_name == str(expected.torch_dtype).removeprefix("torch.")


@pytest.mark.parametrize("value, shown", [("fp8", "'fp8'"), (torch.float64, "torch.float64"), (16, "16")])
def test_unknown_precisions_are_one_line(value, shown):
    with pytest.raises(WuerstchenError, match=rf"^dtype={shown} is not supported: expected auto, fp32, fp16 or bf16"):
        resolve(ModelSource.from_preset("tiny"), dtype=value)


def test_the_published_recipe_is_the_default_of_every_command():
    recipe = Recipe()
    assert (recipe.height, recipe.width, recipe.prior_evaluations, recipe.prior_guidance, recipe.decoder_steps,
            recipe.decoder_guidance) == (1024, 1024, 29, 4.0, 12, 0.0)
    call = recipe.call(images_per_prompt=2)
    assert call["prior_timesteps"][0] == 1.0 and call["prior_timesteps"][-1] == 0.0
    assert call["prior_num_inference_steps"] == 29 and call["num_images_per_prompt"] == 2
    assert Recipe(prior_steps=3).call()["prior_timesteps"] is None
    parser = build_parser()
    for command in (["generate", "x", "--out", "x.png"], ["bench"]):
        args = parser.parse_args(command)
        assert getattr(args, "decoder_steps", None) in (None, recipe.decoder_steps)
    bench = parser.parse_args(["bench"])
    assert (bench.sizes, bench.decoder_steps, bench.prior_guidance) == (["1024"], 12, 4.0)


def test_resolution_rules():
    tiny = ModelSource.from_preset("tiny")
    runtime = resolve(tiny)
    assert (runtime.backend, runtime.device.type, runtime.precision) == (
        Backend.TORCH, "cuda" if torch.cuda.is_available() else "cpu",
        Precision.FP16 if torch.cuda.is_available() else Precision.FP32)
    assert runtime.options == TorchOptions()
    cpu = resolve(tiny, "torch-fast", "cpu", "bf16", FastOptions(chains=False))
    assert (cpu.backend, cpu.device, cpu.precision, cpu.options.chains) == (
        Backend.TORCH_FAST, torch.device("cpu"), Precision.BF16, False)
    with pytest.raises(WuerstchenError, match=r"^options=OnnxRuntimeOptions\(providers=None\) do not fit backend "
                                              r"'torch': expected TorchOptions$"):
        resolve(tiny, "torch", options=OnnxRuntimeOptions())
    with pytest.raises(WuerstchenError, match=r"^backend='onnxruntime' runs a bundle: make one with `wuerstchen "
                                              r"export`$"):
        resolve(tiny, "onnxruntime")
    with pytest.raises(WuerstchenError, match=r"^graph_cache_size=0: expected a positive integer$"):
        FastOptions(graph_cache_size=0)


def test_a_bundle_runs_in_onnxruntime_in_the_precision_it_was_exported_in(tiny_bundle):
    source = ModelSource.from_bundle(tiny_bundle)
    runtime = resolve(source)
    assert (runtime.backend, runtime.precision) == (Backend.ONNXRUNTIME, Precision.FP32)
    assert runtime.options.providers[-1] == "CPUExecutionProvider"
    assert resolve(source, dtype="float32").precision is Precision.FP32
    on_cpu = resolve(source, device="cpu", options=OnnxRuntimeOptions(providers=["CPUExecutionProvider"]))
    assert (on_cpu.device, on_cpu.options.providers) == (torch.device("cpu"), ("CPUExecutionProvider",))
    with pytest.raises(WuerstchenError, match=r"^dtype='fp16': ONNX Runtime runs this bundle in the precision it was "
                                              r"exported in, fp32; export another bundle for fp16$"):
        resolve(source, dtype="fp16")
    with pytest.raises(WuerstchenError, match=r"^providers=\['NoSuchExecutionProvider'\]: \['NoSuch"):
        resolve(source, options=OnnxRuntimeOptions(providers=["NoSuchExecutionProvider"]))
    with pytest.raises(WuerstchenError, match=r"^backend='torch' cannot run a bundle: expected onnxruntime or "
                                              r"tensorrt"):
        resolve(source, "torch")


@pytest.mark.parametrize("fields, message", [
    (dict(prior="p"), "prior='p' needs the decoder folder too: pass both folders, or neither for the demo model"),
    (dict(decoder="d"), "decoder='d' names no prior: pass the prior folder too, or a combined repo whose model "
                        "card names its prior"),
    (dict(preset="tiny", prior="p", decoder="d"), "preset='tiny' given with prior/decoder folders: pass one model "
                                                  "source"),
    (dict(prior="p", decoder="d", bundle="b"), "prior='p' given with bundle: pass one model source"),
    (dict(preset="huge"), "preset='huge' is unknown: expected one of ['tiny', 'wuerstchen-v2']"),
    (dict(variant="fp16"), "variant='fp16' selects weight files of --prior/--decoder folders, and none were given"),
])
def test_one_model_source(fields, message):
    with pytest.raises(WuerstchenError) as excinfo:
        ModelSource.choose(**fields)
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


# --- the same flags, the same answer in every command ---------------------------------------------------


def _outcome(resolve_command):
    """(backend, device, precision) the command resolves, or its one-line error."""
    try:
        runtime = resolve_command()
    except WuerstchenError as error:
        return str(error)
    return runtime.backend, runtime.device, runtime.precision


def _generate(flags):
    return _outcome(lambda: resolve_flags(build_parser().parse_args(["generate", "x", "--out", "x.png", *flags])))


def _bench(flags):
    from benchmarks.bench import options_from_args

    return _outcome(lambda: options_from_args(build_parser().parse_args(["bench", "--sizes", "256", *flags])
                                              ).runtimes[0])


def _export(flags):
    from export.cli import export_runtime

    return _outcome(lambda: export_runtime(build_parser().parse_args(["export", "--out", "b", *flags])))


@pytest.fixture(scope="module")
def sources(tiny_folders, tiny_bundle):
    prior, decoder = (str(folder) for folder in tiny_folders)
    return {"preset": ["--preset", "tiny"], "folders": ["--prior", prior, "--decoder", decoder],
            "bundle": ["--bundle", str(tiny_bundle)]}


BACKENDS = [None, "torch", "torch-fast", "torch-compile", "onnxruntime", "tensorrt"]
DTYPES = ["auto", "fp32", "FP32", "float16", "half", "bf16"]
DEVICES = ["auto", "cpu"]


def test_generate_bench_and_export_resolve_the_same_flags_alike(sources):
    compared = 0
    for (kind, source), backend, dtype, device in itertools.product(sources.items(), BACKENDS, DTYPES, DEVICES):
        common = [*source, "--dtype", dtype, "--device", device]
        flags = common + (["--backend", backend] if backend else [])
        generated = _generate(flags)
        assert _bench(flags) == generated, flags
        if backend in (None, "torch") and kind != "bundle":  # export has no --backend: it exports from torch
            assert _export(common) == generated, flags
        compared += 1
    assert compared == 3 * len(BACKENDS) * len(DTYPES) * len(DEVICES)
    # What they agree on is the rule: weights on the CPU in the asked precision, a bundle as exported.
    assert _generate(sources["preset"] + ["--device", "cpu"]) == (Backend.TORCH, torch.device("cpu"), Precision.FP32)
    assert _generate(sources["bundle"] + ["--dtype", "half"]).startswith("dtype='fp16': ONNX Runtime runs")
    assert _generate(sources["folders"] + ["--device", "cpu", "--dtype", "bf16", "--backend", "torch-fast"]) == (
        Backend.TORCH_FAST, torch.device("cpu"), Precision.BF16)


def test_the_python_api_resolves_as_the_command_line(tiny_folders):
    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype="half")
    assert (pipe.backend, pipe.device, pipe.precision, pipe.dtype) == (
        Backend.TORCH, torch.device("cpu"), Precision.FP16, torch.float16)
    flags = ["--prior", str(tiny_folders[0]), "--decoder", str(tiny_folders[1]), "--device", "cpu", "--dtype", "half"]
    assert _generate(flags) == (pipe.backend, pipe.device, pipe.precision)


# --- layers that point one way ---------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer, above", [("kernels", ("engine", "export", "benchmarks")),
                                          ("engine", ("export", "benchmarks")), ("export", ("benchmarks",))])
def test_layers_import_only_what_lies_below_them(layer, above):
    offending = {str(path.relative_to(REPOSITORY)): sorted(m for m in _imports(path) if m.split(".")[0] in above)
                 for path in (REPOSITORY / layer).rglob("*.py")}
    assert {path: modules for path, modules in offending.items() if modules} == {}


def test_the_runtime_loads_without_the_build_tools(tiny_bundle, tmp_path):
    """A service that installs the runtime alone: a bundle runs with export and benchmarks unimportable."""
    import subprocess
    import sys

    script = ("import sys; sys.modules.update(export=None, benchmarks=None)\n"
              "from engine import WuerstchenPipeline\n"
              f"pipe = WuerstchenPipeline.from_bundle({str(tiny_bundle)!r})\n"
              "pipe.set_progress_bar_config(disable=True)\n"
              "out = pipe('a boat', height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,"
              " output_type='np')\n"
              "print(out.images.shape)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 128, 128, 3)"


def test_nothing_in_the_repository_points_outside_it():
    files = [p for pattern in ("*.py", "*.md", "*.toml", "*.cfg") for p in REPOSITORY.rglob(pattern)
             if ".venv" not in p.parts and "build" not in p.parts]
    outside = "/".join(("shared", "reference"))  # spelled so that this file does not match itself
    pointing = [str(p.relative_to(REPOSITORY)) for p in files if outside in p.read_text(errors="ignore")]
    assert pointing == []
