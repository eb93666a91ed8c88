"""Reading a bundle: the directory of exported graphs that every non-PyTorch backend runs.

A bundle holds seven ONNX graphs (see `export.graphs`), the two tokenizers and `manifest.json`. The
manifest says what a program in any language needs to run the pipeline: the graphs' files, inputs and
outputs with symbolic shapes, the size range, the schedule constants, and a SHA-256 of every file.
`export.bundle` writes it; this module trusts none of it until checked: the manifest's schema, key by key;
every path inside the bundle (no absolute path, no `..`, no link leading out); every file that is opened
(each graph, its external data, every tokenizer file) listed with a hash, and the hashes checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.files import inside
from engine.precision import Precision, Quantization
from engine.quantization import STAGES, QuantRecipe

FORMAT = "wuerstchen-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("prior_text", "prior_condition", "prior_step", "decoder_text", "decoder_condition", "decoder_step",
          "vqgan_decode")
TOKENIZERS = ("prior", "decoder")
# The graphs a quantized bundle quantizes (manifest key `quantization`), and the keys of that entry.
QUANTIZED_GRAPHS = ("prior_condition", "prior_step", "decoder_condition", "decoder_step")
QUANTIZATION_KEYS = frozenset({"scheme", "graphs", "layers", "weights", "activations", "calibration", "input_scales",
                               "step_error", "recipe"})
CALIBRATION_KEYS = frozenset({"prompts", "levels", "size", "seed"})
# The element types of the graphs' inputs and outputs, by the names the manifest gives them.
TENSOR_DTYPES = {precision.onnx_name: precision.torch_dtype for precision in Precision} | {"int64": torch.int64}
TENSOR_DTYPE_NAMES = {dtype: name for name, dtype in TENSOR_DTYPES.items()}
SYMBOLIC_DIM = re.compile(r"^([1-9][0-9]*\*)?(batch|ph|pw|dh|dw)$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Every key a manifest may hold (`check` names those it must), and every key of a graph's entry.
MANIFEST_KEYS = frozenset({"format", "format_version", "dtype", "config", "sizes", "tokenizers", "graphs", "files",
                           "producer", "opset", "fp32_islands", "sources", "symbols", "schedule", "quantization"})
GRAPH_KEYS = frozenset({"file", "external_data", "inputs", "outputs"})


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, streamed (graph weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle."""

    root: Path
    manifest: dict

    @property
    def precision(self) -> Precision:
        """The precision the graphs were exported in."""
        return Precision.parse(self.manifest["dtype"], field=f"{self.root / MANIFEST}: dtype")

    @property
    def config(self) -> WuerstchenConfig:
        """The model's config, with the size grid narrowed to the range the graphs were exported for."""
        config = WuerstchenConfig.from_dict(self.manifest["config"])
        return WuerstchenConfig.from_dict({**config.to_dict(), "sizes": dict(self.manifest["sizes"])})

    def graph(self, name: str) -> dict:
        """A graph's manifest entry: file, external data, inputs and outputs (name, dtype, symbolic shape)."""
        return self.manifest["graphs"][name]

    def graph_files(self, name: str) -> list[str]:
        """A graph's file, then the external-data files its weights live in, as the manifest lists them."""
        entry = self.graph(name)
        return [entry["file"], *entry["external_data"]]

    def tokenizer(self, stage: str) -> Path:
        """The tokenizer folder of a stage ("prior" or "decoder"), every file of which the manifest hashes."""
        return self.root / self.manifest["tokenizers"][stage]

    def path(self, relative: str) -> Path:
        return self.root / relative


def open_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Open a bundle, checking its manifest's schema, that every file it opens lies inside it and is listed,
    and, unless `check_hashes` is off (the caller's choice, never the manifest's), that no file was altered.
    Each failure is one line naming the key or the file and what was expected."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise WuerstchenError(f"bundle={str(root)!r}: folder does not exist")
    if not manifest_path.is_file():
        raise WuerstchenError(f"bundle={str(root)!r}: no {MANIFEST}; expected a folder written by `wuerstchen export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WuerstchenError(f"{manifest_path} is not valid JSON: {error}") from None
    _Schema(manifest_path).check(manifest)
    bundle = Bundle(root, manifest)
    files = manifest["files"]
    for relative in files:
        file = inside(root, relative, f"{manifest_path}: files key")
        if not file.is_file():
            raise WuerstchenError(f"bundle file {file} is missing")
    opened = [file for name in GRAPHS for file in bundle.graph_files(name)]
    for stage in TOKENIZERS:
        folder = inside(root, manifest["tokenizers"][stage], f"{manifest_path}: tokenizers.{stage}")
        if not folder.is_dir():
            raise WuerstchenError(f"bundle tokenizer folder {folder} is missing")
        for file in sorted(folder.rglob("*")):
            if file.is_symlink() or not (file.is_file() or file.is_dir()):
                raise WuerstchenError(f"bundle tokenizer folder {folder} holds {file.name!r}, which is not a plain "
                                      "file")
            if file.is_file():
                opened.append(str(file.relative_to(root)))
    for relative in opened:
        inside(root, relative, f"{manifest_path}: a graph's or tokenizer's file")
        if relative not in files:
            raise WuerstchenError(f"{manifest_path}: {relative!r} is read but not listed in files with its SHA-256: "
                                  "expected every graph, external-data and tokenizer file listed")
    if check_hashes:
        for relative, digest in files.items():
            if sha256(root / relative) != digest:
                raise WuerstchenError(f"bundle file {root / relative} was altered: its SHA-256 differs from the "
                                      f"manifest's {digest[:12]}…")
    return bundle


class _Schema:
    """The manifest's keys, types and ranges, checked before any of it is used."""

    def __init__(self, manifest_path: Path):
        self.where = str(manifest_path)

    def fail(self, key: str, value, expected: str):
        raise WuerstchenError(f"{self.where}: {key}={_shown(value)}: expected {expected}")

    def check(self, manifest) -> None:
        if not isinstance(manifest, dict):
            self.fail("manifest", type(manifest).__name__, "a JSON object")
        if manifest.get("format") != FORMAT:
            self.fail("format", manifest.get("format"), repr(FORMAT))
        version = manifest.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise WuerstchenError(f"{self.where}: format_version={_shown(version)} is not supported: this engine "
                                  f"reads version {FORMAT_VERSION}")
        for key in ("dtype", "config", "sizes", "tokenizers", "graphs", "files"):
            if key not in manifest:
                raise WuerstchenError(f"{self.where}: the key {key!r} is missing")
        unknown = sorted(set(manifest) - MANIFEST_KEYS)
        if unknown:
            raise WuerstchenError(f"{self.where}: unknown keys {unknown}: a version {FORMAT_VERSION} manifest has "
                                  f"{sorted(MANIFEST_KEYS)}")
        if manifest["dtype"] not in {p.onnx_name for p in Precision}:
            self.fail("dtype", manifest["dtype"], f"one of {', '.join(p.onnx_name for p in Precision)}")
        config = self._config(manifest["config"])
        self._sizes(manifest["sizes"], config)
        self._files(manifest["files"])
        self._tokenizers(manifest["tokenizers"])
        self._graphs(manifest["graphs"])
        if "quantization" in manifest:  # absent: no graph is quantized
            self._quantization(manifest["quantization"], manifest["dtype"])

    def _config(self, values) -> WuerstchenConfig:
        if not isinstance(values, dict):
            self.fail("config", values, "an object of the stages' configs")
        try:
            return WuerstchenConfig.from_dict(values)
        except WuerstchenError as error:
            raise WuerstchenError(f"{self.where}: config: {error}") from None
        except (TypeError, ValueError, KeyError) as error:
            raise WuerstchenError(f"{self.where}: config is not a Würstchen config: {error}") from None

    def _sizes(self, sizes, config: WuerstchenConfig) -> None:
        grid = config.sizes
        if not isinstance(sizes, dict) or set(sizes) != {"step", "min", "max"}:
            self.fail("sizes", sizes, "an object with step, min and max")
        for key, value in sizes.items():
            if type(value) is not int or value < 1:
                self.fail(f"sizes.{key}", value, "a positive integer")
        if sizes["step"] != grid.step or sizes["min"] % grid.step or sizes["max"] % grid.step:
            self.fail("sizes", sizes, f"sides on the model's grid, step {grid.step}")
        if not grid.min <= sizes["min"] <= sizes["max"] <= grid.max:
            self.fail("sizes", sizes, f"min ≤ max within the model's range, {grid.describe()}")

    def _files(self, files) -> None:
        if not isinstance(files, dict) or not files:
            self.fail("files", files, "an object of every file's SHA-256")
        for relative, digest in files.items():
            if not isinstance(digest, str) or not SHA256.match(digest):
                self.fail(f"files[{relative!r}]", digest, "a SHA-256 in 64 lowercase hex digits")

    def _tokenizers(self, tokenizers) -> None:
        if not isinstance(tokenizers, dict) or not all(isinstance(tokenizers.get(s), str) for s in TOKENIZERS):
            self.fail("tokenizers", tokenizers, "an object naming the prior's and the decoder's tokenizer folders")

    def _graphs(self, graphs) -> None:
        if not isinstance(graphs, dict):
            self.fail("graphs", graphs, f"an object of the graphs {list(GRAPHS)}")
        missing = [name for name in GRAPHS if name not in graphs]
        if missing:
            raise WuerstchenError(f"{self.where}: graphs {missing} are missing; a bundle has {list(GRAPHS)}")
        for name in GRAPHS:
            entry = graphs[name]
            where = f"graphs.{name}"
            if not isinstance(entry, dict):
                self.fail(where, entry, "an object with file, external_data, inputs and outputs")
            for key in ("file", "external_data", "inputs", "outputs"):
                if key not in entry:
                    raise WuerstchenError(f"{self.where}: {where}: the key {key!r} is missing")
            unknown = sorted(set(entry) - GRAPH_KEYS)
            if unknown:
                raise WuerstchenError(f"{self.where}: {where}: unknown keys {unknown}: a graph has "
                                      f"{sorted(GRAPH_KEYS)}")
            if not isinstance(entry["file"], str):
                self.fail(f"{where}.file", entry["file"], "a file name")
            data = entry["external_data"]
            if not isinstance(data, list) or not all(isinstance(f, str) for f in data):
                self.fail(f"{where}.external_data", data, "a list of file names")
            for kind in ("inputs", "outputs"):
                tensors = entry[kind]
                if not isinstance(tensors, list) or not tensors:
                    self.fail(f"{where}.{kind}", tensors, "a non-empty list of tensors")
                for i, tensor in enumerate(tensors):
                    self._tensor(f"{where}.{kind}[{i}]", tensor)

    def _quantization(self, entry, dtype: str) -> None:
        if not isinstance(entry, dict) or set(entry) != QUANTIZATION_KEYS:
            self.fail("quantization", entry, f"an object with {', '.join(sorted(QUANTIZATION_KEYS))}")
        scheme = entry["scheme"]
        if scheme not in {q.value for q in Quantization}:
            self.fail("quantization.scheme", scheme, f"one of {', '.join(q.value for q in Quantization)}")
        if dtype not in (Precision.FP16.onnx_name, Precision.BF16.onnx_name):
            self.fail("dtype", dtype, "float16 or bfloat16 in a quantized bundle")
        if entry["graphs"] != list(QUANTIZED_GRAPHS):
            self.fail("quantization.graphs", entry["graphs"], repr(list(QUANTIZED_GRAPHS)))
        for key in ("weights", "activations"):
            if not isinstance(entry[key], str) or not entry[key]:
                self.fail(f"quantization.{key}", entry[key], "a description")
        layers = entry["layers"]
        if not isinstance(layers, dict) or set(layers) != set(STAGES):
            self.fail("quantization.layers", layers, f"an object with {', '.join(STAGES)}")
        for stage, names in layers.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) \
                    or len(set(names)) != len(names):
                self.fail(f"quantization.layers.{stage}", names, "a list of distinct layer names")
        self._calibration(entry["calibration"])
        self._input_scales(entry["input_scales"], scheme, layers)
        errors = entry["step_error"]
        if not isinstance(errors, dict) or set(errors) != set(STAGES) or not all(
                _finite_number(e) and e >= 0 for e in errors.values()):
            self.fail("quantization.step_error", errors, f"a relative error ≥ 0 for each of {', '.join(STAGES)}")
        recipe = QuantRecipe.from_dict(entry["recipe"], where=f"{self.where}: quantization.recipe")
        listed = {stage: list(names) for stage, names in recipe.layers.items() if names is not None}
        if recipe.scheme.value != scheme or any(names != layers[stage] for stage, names in listed.items()):
            self.fail("quantization.recipe", entry["recipe"], f"the recipe of these layers, scheme {scheme}")

    def _calibration(self, calibration) -> None:
        if not isinstance(calibration, dict) or set(calibration) != CALIBRATION_KEYS:
            self.fail("quantization.calibration", calibration, f"an object with {', '.join(sorted(CALIBRATION_KEYS))}")
        prompts, levels = calibration["prompts"], calibration["levels"]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            self.fail("quantization.calibration.prompts", prompts, "a list of prompts")
        if not isinstance(levels, list) or not levels or not all(_finite_number(r) and 0 <= r <= 1 for r in levels):
            self.fail("quantization.calibration.levels", levels, "a list of noise levels in [0, 1]")
        if type(calibration["size"]) is not int or calibration["size"] < 1:
            self.fail("quantization.calibration.size", calibration["size"], "a positive image side")
        if type(calibration["seed"]) is not int:
            self.fail("quantization.calibration.seed", calibration["seed"], "an integer")

    def _input_scales(self, scales, scheme: str, layers: dict) -> None:
        if scheme == Quantization.INT8.value:
            if scales is not None:
                self.fail("quantization.input_scales", scales, "null: int8 quantizes weights only")
            return
        if not isinstance(scales, dict) or set(scales) != set(STAGES):
            self.fail("quantization.input_scales", scales, f"an object with {', '.join(STAGES)}")
        for stage, found in scales.items():
            if not isinstance(found, dict) or set(found) != set(layers[stage]) or not all(
                    _finite_number(s) and s > 0 for s in found.values()):
                self.fail(f"quantization.input_scales.{stage}", found,
                          f"a positive scale for each of the {stage}'s quantized layers")

    def _tensor(self, where: str, tensor) -> None:
        if not isinstance(tensor, dict) or set(tensor) != {"name", "dtype", "shape"}:
            self.fail(where, tensor, "an object with name, dtype and shape")
        if not isinstance(tensor["name"], str) or not tensor["name"]:
            self.fail(f"{where}.name", tensor["name"], "a tensor name")
        if tensor["dtype"] not in TENSOR_DTYPES:
            self.fail(f"{where}.dtype", tensor["dtype"], f"one of {', '.join(TENSOR_DTYPES)}")
        shape = tensor["shape"]
        valid = isinstance(shape, list) and all(
            (type(dim) is int and dim > 0) or (isinstance(dim, str) and SYMBOLIC_DIM.match(dim)) for dim in shape)
        if not valid:
            self.fail(f"{where}.shape", shape, "a list of positive sizes and symbols such as 'batch' or '16*dh'")


def _finite_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"

