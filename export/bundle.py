"""Writing a bundle: every graph exported to ONNX and checked, the tokenizers, and `manifest.json`.

The manifest's format is read by `engine.bundle` and documented in the README.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

import engine
from engine.backends import Backend
from engine.bundle import FORMAT, FORMAT_VERSION, MANIFEST, TENSOR_DTYPE_NAMES, sha256
from engine.config import SizeGrid, WuerstchenConfig
from engine.errors import WuerstchenError
from engine.files import write_atomically
from engine.models.blocks import attention_implementation
from engine.models.decoder import injected_levels
from engine.pipeline import WuerstchenPipeline
from engine.precision import Precision
from engine.quantization import QuantRecipe
from engine.recipe import Recipe
from engine.shapes import TEXT_TOKENS, image_shapes, symbol_values
from export.graphs import GraphSpec, graph_specs
from export.lint import check_tensorrt_compatible

OPSETS = {Precision.FP32: 18, Precision.FP16: 18, Precision.BF16: 22}  # ONNX has no bf16 Conv before opset 22
FP32_ISLANDS = [
    "LayerNorm2d and the decoder's text LayerNorm: inputs cast to float32, normalised, cast back",
    "GlobalResponseNorm: the sum of squares over height and width (ReduceL2 on float32)",
    "attention: scores and softmax in float32",
    "prior and decoder output heads: the noise prediction `eps` is a float32 output",
    "timestep embedding: sin and cos in float32",
    "CLIP text encoders: LayerNormalization statistics (stash_type=1)",
]
MAX_BATCH = 64  # a bound for the exporter's symbolic batch, not a limit of the graphs


def _describe(spec_tensors) -> list[dict]:
    return [{"name": t.name, "dtype": TENSOR_DTYPE_NAMES[t.dtype], "shape": list(t.dims)} for t in spec_tensors]


def export_graph(spec: GraphSpec, config: WuerstchenConfig, grid: SizeGrid, folder: Path, opset: int,
                 device: torch.device) -> list[str]:
    """Export one graph to `folder/<name>.onnx` at a non-square sample size inside the range (traced on
    `device`, where its module is), check it against TensorRT's parser and the spec, and return its files
    (the graph, then its external data)."""
    height, width = min(grid.min + grid.step, grid.max), min(grid.min + 2 * grid.step, grid.max)
    sample = spec.sample(config, image_shapes(config, height, width, batch=2), torch.Generator().manual_seed(0))
    sample = {name: tensor.to(device) for name, tensor in sample.items()}
    max_sizes = symbol_values(config, image_shapes(config, grid.max, grid.max, batch=MAX_BATCH))
    path = folder / f"{spec.name}.onnx"
    with attention_implementation(spec.module, "explicit"), warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, spec.args(sample), dynamo=True, dynamic_shapes=spec.dynamic_shapes(max_sizes),
            opset_version=opset, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs], verbose=False,
        )
        program.save(str(path))  # weights go to `<name>.onnx.data` past protobuf's 2 GB
    model = onnx.load(str(path), load_external_data=False)
    check_tensorrt_compatible(model, spec.name)
    _name_dims(model, spec)
    onnx.save(model, str(path))  # external data stays where it is: only the interface's names changed
    files = [path.name]
    data = folder / f"{path.name}.data"
    if data.exists():
        files.append(data.name)
    return files


@contextlib.contextmanager
def _quiet():
    """The exporter narrates every step on stdout and through logging; a bundle export prints its own summary."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(level)


def _name_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the spec's symbolic dims (the exporter names some output dims
    after its internal symbols), after checking that every static size matches and that no size the
    spec keeps symbolic was baked in as a constant."""
    for kind, values, tensors in (("input", model.graph.input, spec.inputs), ("output", model.graph.output,
                                                                             spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise WuerstchenError(f"graph {spec.name}: exported {kind}s {names} differ from the spec's")
        for value, tensor in zip(values, tensors, strict=True):
            dims = value.type.tensor_type.shape.dim
            exported = [d.dim_param or d.dim_value for d in dims]
            baked = [e for e, t in zip(exported, tensor.dims, strict=False)
                     if isinstance(t, str) != isinstance(e, str) or (isinstance(t, int) and t != e)]
            if len(exported) != len(tensor.dims) or baked:
                raise WuerstchenError(f"graph {spec.name}: {kind} {value.name} was exported as {exported}, "
                                      f"expected {list(tensor.dims)}")
            for dim, wanted in zip(dims, tensor.dims, strict=True):
                if isinstance(wanted, str):
                    dim.dim_param = wanted


def _schedule(pipe: WuerstchenPipeline) -> dict:
    config, recipe = pipe.config, Recipe()
    return {
        "prior": vars(config.prior_schedule),
        "decoder": vars(config.decoder_schedule),
        "alpha_cumprod": "clamp(cos((t + s) / (1 + s) · π/2)² / cos(s / (1 + s) · π/2)², 1e-4, 0.9999)",
        "step": "α = ᾱ(t)/ᾱ(t_next); x ← √(1/α)·(x − (1 − α)·eps/√(1 − ᾱ(t))) "
                "+ [t_next ≠ 0]·√((1 − α)(1 − ᾱ(t_next))/(1 − ᾱ(t)))·z, z ~ N(0, 1), in float32",
        "timesteps": "model evaluations at every grid point but the last; the model sees t in the bundle dtype",
        "default_prior_timesteps": recipe.prior_timesteps,
        "default_decoder_steps": recipe.decoder_steps,
        "default_prior_guidance": recipe.prior_guidance,
        "default_decoder_guidance": recipe.decoder_guidance,
        "default_size": [recipe.height, recipe.width],
        "guidance": "on when the scale exceeds 1: the batch is [images, images] against [prompt, negative] text, "
                    "eps = lerp(eps_negative, eps_prompt, scale); the decoder's negative half sees a zero embedding",
        "image_embeddings": {"latent_mean": config.latent_mean, "latent_std": config.latent_std,
                             "formula": "image_embeddings = prior_latents · latent_mean − latent_std"},
        "effnet_pyramid": {
            "resize": "bicubic, antialiased (Keys a = −0.5, as PyTorch), align_corners, in float32",
            "levels": injected_levels(config.decoder),
            "inputs": [t["name"] for t in _describe(graph_specs(pipe)["decoder_condition"].inputs)[1:]],
        },
        "vqgan_scale_factor": config.vqgan.scale_factor,
        "vqgan": "vqgan_decode multiplies by vqgan_scale_factor itself and clamps the images to [0, 1]",
    }


def export_bundle(
    pipe: WuerstchenPipeline, out: str | Path, sources: dict, min_size: int = 256, max_size: int = 1536,
    progress=print, quantization: QuantRecipe | None = None,
) -> dict:
    """Export a PyTorch pipeline, in its dtype, to a new bundle folder `out`; return the manifest.

    `sources` records where the weights came from (file hashes, or a preset and seed). Sizes must lie
    on the model's grid; the graphs serve every grid size from `min_size` to `max_size`. With `quantization`,
    a recipe for the pipeline's unquantized fp16 or bf16 models, the prior's and the decoder's condition and
    step graphs hold the recipe's Linears in 8 bits behind Q/DQ nodes (see `export.quantize`); the pipeline
    itself is left unquantized.
    """
    out = Path(out)
    if pipe.backend is not Backend.TORCH:
        raise WuerstchenError(f"the pipeline runs on backend {pipe.backend.value!r}: export one on 'torch' (its "
                              "Triton kernels and CUDA graphs are not ONNX)")
    if quantization is not None and not isinstance(quantization, QuantRecipe):
        raise WuerstchenError(f"quantization={quantization!r}: expected a QuantRecipe (QuantRecipe.every('fp8'), "
                              "or one loaded from a recipe file), or None")
    check_target(pipe.config, out, min_size, max_size)
    grid = pipe.config.sizes
    # Everything is written into a staging folder beside `out`, renamed to it whole at the end: an export that
    # fails or is interrupted leaves nothing that loads, and two exports into one folder cannot mix.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as error:
        raise WuerstchenError(f"--out={str(out)!r}: cannot write in {str(out.parent)!r}: "
                              f"{error.strerror or error}") from None
    try:
        manifest = _write_bundle(pipe, staging, sources, SizeGrid(step=grid.step, min=min_size, max=max_size),
                                 progress, quantization)
        try:
            os.replace(staging, out)  # over an empty folder too
        except OSError as error:
            raise WuerstchenError(f"--out={str(out)!r}: another export filled it meanwhile "
                                  f"({error.strerror or error})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_target(config, out: str | Path, min_size: int, max_size: int) -> None:
    """What an export of a model of `config` into `out` for sides `min_size` to `max_size` would refuse, checked
    before anything is loaded: sizes on the model's grid, and `out` new or an empty folder."""
    grid, out = config.sizes, Path(out)
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        on_grid = isinstance(value, int) and not isinstance(value, bool) and value % grid.step == 0
        if not on_grid or not grid.min <= value <= grid.max:
            raise WuerstchenError(f"{name}={value!r} is off the model's size grid: expected {grid.describe()}")
    if min_size > max_size:
        raise WuerstchenError(f"min_size={min_size} is above max_size={max_size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WuerstchenError(f"--out={str(out)!r} exists and is not an empty folder")


def _write_bundle(pipe: WuerstchenPipeline, out: Path, sources: dict, bundle_grid: SizeGrid, progress,
                  quantization: QuantRecipe | None) -> dict:
    """Every graph, the tokenizers and the manifest into the folder `out`; the manifest."""
    config = pipe.config
    opset = OPSETS[pipe.precision]
    exported, quantized = pipe, None
    if quantization is not None:
        from export.quantize import QDQ_MIN_OPSET, check_8_bit_weights, prepare  # needs Triton's kernels module

        start = time.perf_counter()
        quantized = prepare(pipe, quantization, bundle_grid)
        exported, opset = quantized.pipe, max(opset, QDQ_MIN_OPSET)
        progress(f"quantized  {quantization.describe()}; one step's error on the calibration inputs: "
                 + ", ".join(f"{stage} {error:.2%}" for stage, error in quantized.entry["step_error"].items())
                 + f"  {time.perf_counter() - start:6.1f} s")
    graphs, files = {}, []
    for name, spec in graph_specs(exported).items():
        start = time.perf_counter()
        graph_files = export_graph(spec, config, bundle_grid, out, opset, pipe.device)
        if quantized is not None and name in quantized.entry["graphs"]:
            check_8_bit_weights(onnx.load(str(out / graph_files[0]), load_external_data=False), spec, name)
        size = sum((out / f).stat().st_size for f in graph_files)
        progress(f"exported {name:<18} {size / 1e6:9.1f} MB  {time.perf_counter() - start:6.1f} s")
        graphs[name] = {"file": graph_files[0], "external_data": graph_files[1:], "inputs": _describe(spec.inputs),
                        "outputs": _describe(spec.outputs)}
        files += graph_files
    for stage, encoder in (("prior", pipe.stages.prior_text), ("decoder", pipe.stages.decoder_text)):
        saved = encoder.tokenizer.save_pretrained(out / f"tokenizer_{stage}")
        files += [str(Path(f).relative_to(out)) for f in saved if Path(f).is_file()]

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"engine": engine.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "opset": opset,
        "dtype": pipe.precision.onnx_name,
        "fp32_islands": FP32_ISLANDS,
        "sources": sources,
        "config": config.to_dict(),
        "sizes": vars(bundle_grid),
        "symbols": {
            "batch": "images per call; doubled where guidance batches the negative prompts",
            "ph": f"ceil(height / {config.resolution_multiple})",
            "pw": f"ceil(width / {config.resolution_multiple})",
            "dh": f"int(ph · {config.latent_dim_scale}) / {config.decoder.downscale}",
            "dw": f"int(pw · {config.latent_dim_scale}) / {config.decoder.downscale}",
        },
        "tokenizers": {"prior": "tokenizer_prior", "decoder": "tokenizer_decoder", "max_length": TEXT_TOKENS,
                       "padding": "max_length", "truncation": True},
        "schedule": _schedule(pipe),
        "graphs": graphs,
        "files": {relative: sha256(out / relative) for relative in sorted(set(files))},
    }
    if quantized is not None:
        manifest["quantization"] = quantized.entry  # absent: no graph is quantized
    write_atomically(out / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest


def folder_sources(prior: str | Path, decoder: str | Path) -> dict:
    """SHA-256 of every weight and config file in the two diffusers folders an export read."""
    hashes = {}
    for root in (Path(prior), Path(decoder)):
        for file in sorted(root.rglob("*")):
            if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".txt"):
                hashes[f"{root.name}/{file.relative_to(root)}"] = sha256(file)
    return {"files": hashes}
