"""Reading a bundle: the directory of exported graphs that every non-PyTorch backend runs.

A bundle holds seven ONNX graphs (see `export.graphs`), the two tokenizers and `manifest.json`. The
manifest says what a program in any language needs to run the pipeline: the graphs' files, inputs and
outputs with symbolic shapes, the size range, the schedule constants, and a SHA-256 of every file.
`export.bundle` writes it; this module checks it before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import SizeGrid, WuerstchenConfig
from engine.errors import WuerstchenError
from engine.precision import Precision

FORMAT = "wuerstchen-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("prior_text", "prior_condition", "prior_step", "decoder_text", "decoder_condition", "decoder_step",
          "vqgan_decode")
# The element types of the graphs' inputs and outputs, by the names the manifest gives them.
TENSOR_DTYPES = {precision.onnx_name: precision.torch_dtype for precision in Precision} | {"int64": torch.int64}
TENSOR_DTYPE_NAMES = {dtype: name for name, dtype in TENSOR_DTYPES.items()}


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
        sizes = self.manifest["sizes"]
        return WuerstchenConfig.from_dict({**config.to_dict(), "sizes": vars(SizeGrid(**sizes))})

    def graph(self, name: str) -> dict:
        """A graph's manifest entry: file, inputs and outputs (name, dtype, symbolic shape)."""
        return self.manifest["graphs"][name]

    def graph_files(self, name: str) -> list[str]:
        """A graph's file, then the external-data files its weights live in, as the manifest lists them."""
        entry = self.graph(name)
        return [entry["file"], *entry.get("external_data", [])]

    def path(self, relative: str) -> Path:
        return self.root / relative


def open_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Open a bundle, checking its format version, that every file it lists exists inside it and, unless
    `check_hashes` is off, that no file was altered. Each failure is one line naming what and why."""
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WuerstchenError(f"{manifest_path}: format is not {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise WuerstchenError(
            f"{manifest_path}: format_version={version!r} is not supported: this engine reads version {FORMAT_VERSION}"
        )
    missing = [name for name in GRAPHS if name not in manifest.get("graphs", {})]
    if missing:
        raise WuerstchenError(f"{manifest_path}: graphs {missing} are missing; a bundle has {list(GRAPHS)}")
    for relative, digest in manifest["files"].items():
        file = (root / relative).resolve()
        if root.resolve() not in file.parents:
            raise WuerstchenError(f"{manifest_path}: file {relative!r} lies outside the bundle")
        if not file.is_file():
            raise WuerstchenError(f"bundle file {root / relative} is missing")
        if check_hashes and sha256(file) != digest:
            raise WuerstchenError(
                f"bundle file {root / relative} was altered: its SHA-256 differs from the manifest's {digest[:12]}…"
            )
    return Bundle(root, manifest)
