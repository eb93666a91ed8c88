"""Resolve once: which weights, backend, device, precision and backend options a pipeline gets.

The Python API's keyword arguments and the command line's flags (`generate`, `export`, `build`, `bench`)
all become one `Runtime` through `resolve` before anything loads; loading and every later step read it and
none decides again. The rules, in one place:
- source: a preset (seeded random weights), the two published diffusers folders, or an exported bundle;
- backend: `torch` for weights, `onnxruntime` for a bundle, unless asked; it must fit the source;
- device: "auto" is the first GPU when there is one; ONNX Runtime derives it from its execution providers;
  TensorRT needs a GPU;
- precision: "auto" is fp16 on a GPU and fp32 on the CPU for the PyTorch backends, the bundle's own for
  ONNX Runtime (which cannot convert it), and bf16 for TensorRT (its engines' default build); fp16 or bf16
  asked of the PyTorch backends on the CPU runs, with a `SlowPrecisionWarning` (once) unless quantizing needs it;
- quantization (`quantize`, the PyTorch backends only; a bundle is quantized when exported): a scheme, fp8 or
  int8, has its recipe scanned when the models load, a `QuantRecipe` or a recipe file is applied as it is. It
  quantizes 16-bit weights: "auto" precision becomes fp16 on a GPU and bf16 on the CPU, fp32 is refused, and
  fp8 needs an sm_89+ GPU (Ada, Hopper) or the CPU (its PyTorch reference, slow: for checks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.backends import Backend, BackendOptions, backend_options
from engine.config import WuerstchenConfig, preset
from engine.device import resolve_device
from engine.errors import WuerstchenError
from engine.hub import connected_prior, local_folder, snapshot
from engine.precision import Precision, Quantization
from engine.quantization import QuantRecipe
from kernels import interpreted


class SlowPrecisionWarning(UserWarning):
    """A precision that runs slower where it was asked for than fp32 would: fp16 or bf16 on the CPU."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: exactly one of a named preset (with the seed of its random weights),
    the two published diffusers folders (warp-ai/wuerstchen-prior and warp-ai/wuerstchen layouts, local or
    from the Hub's cache, with an optional weight-file variant such as fp16), or an exported bundle (its
    hashes checked on load unless `check_hashes` is off). Build one with `from_preset`, `from_folders`,
    `from_bundle` or `choose`."""

    preset: str | None = None
    seed: int = 0
    prior: Path | None = None
    decoder: Path | None = None
    variant: str | None = None
    bundle: Path | None = None
    check_hashes: bool = True
    names: tuple[str, str] | None = None  # the folders or repo ids as they were given, for `describe`

    def __post_init__(self):
        for name in ("prior", "decoder", "bundle"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> ModelSource:
        preset(name)  # an unknown name is refused here, before anything else
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise WuerstchenError(f"seed={seed!r}: expected a non-negative integer")
        return cls(preset=name, seed=seed)

    @classmethod
    def from_folders(cls, prior: str | Path | None, decoder: str | Path,
                     variant: str | None = None) -> ModelSource:
        """The two folders, each a path or a Hub repo id (`warp-ai/wuerstchen-prior`: the local cache first, a
        download only when online). Without `prior`, `decoder` is diffusers' combined repo, whose model card
        names the prior repo (as `warp-ai/wuerstchen`'s does)."""
        decoder_root = local_folder(decoder, "decoder")
        if prior is not None:
            prior_root = local_folder(prior, "prior")
        else:
            prior = connected_prior(decoder_root)
            if prior is None:
                raise WuerstchenError(f"decoder={str(decoder)!r} names no prior: pass the prior folder too, or a "
                                      "combined repo whose model card names its prior (as warp-ai/wuerstchen does)")
            prior_root = snapshot(prior, "prior")  # a repo id the card names: never a local path
        return cls(prior=prior_root, decoder=decoder_root, variant=variant, names=(str(prior), str(decoder)))

    @classmethod
    def from_bundle(cls, bundle: str | Path, check_hashes: bool = True) -> ModelSource:
        return cls(bundle=Path(bundle), check_hashes=check_hashes)

    @classmethod
    def choose(cls, *, preset: str | None = None, prior: str | None = None, decoder: str | None = None,
               bundle: str | None = None, variant: str | None = None, default_preset: str = "tiny") -> ModelSource:
        """The one source that the given fields name (the command line's --preset, --prior/--decoder,
        --bundle), or `default_preset` when none is given. A decoder alone is diffusers' combined repo."""
        if prior is not None and decoder is None:
            raise WuerstchenError(f"prior={prior!r} needs the decoder folder too: pass both folders, or neither for "
                                  "the demo model")
        named = [name for name, value in (("preset", preset), ("prior", prior or decoder), ("bundle", bundle))
                 if value]
        if len(named) > 1:
            first = named[0]
            value = {"preset": preset, "prior": prior or decoder, "bundle": bundle}[first]
            field = "decoder" if first == "prior" and prior is None else first
            others = " and ".join("prior/decoder folders" if n == "prior" else n for n in named[1:])
            raise WuerstchenError(f"{field}={value!r} given with {others}: pass one model source")
        if variant is not None and decoder is None:
            raise WuerstchenError(f"variant={variant!r} selects weight files of --prior/--decoder folders, and none "
                                  "were given")
        if bundle is not None:
            return cls.from_bundle(bundle)
        if decoder is not None:
            return cls.from_folders(prior, decoder, variant)
        return cls.from_preset(preset or default_preset)

    @property
    def kind(self) -> str:
        return "bundle" if self.bundle else "folders" if self.prior else "preset"

    @property
    def demo(self) -> bool:
        """Whether this is the built-in tiny demo model (random weights), whose commands default to small images."""
        return self.kind == "preset" and self.preset == "tiny"

    @property
    def default_backend(self) -> Backend:
        return Backend.ONNXRUNTIME if self.bundle else Backend.TORCH

    def describe(self) -> str:
        if self.bundle:
            return f"bundle {self.bundle}"
        if self.prior:
            prior, decoder = self.names or (self.prior, self.decoder)
            return f"{prior} + {decoder}"
        return f"{self.preset}{' demo' if self.demo else ''} (random weights, seed {self.seed})"

    def read_config(self) -> WuerstchenConfig:
        """The model's config, read without loading any weights; a bundle's narrows the sizes to its range."""
        if self.bundle:
            from engine.bundle import open_bundle

            return open_bundle(self.bundle, check_hashes=False).config
        if self.prior:
            from engine.weights import read_config

            return read_config(self.prior, self.decoder)
        return preset(self.preset)

    def bundle_precision(self) -> Precision:
        """The precision a bundle's graphs were exported in, from its manifest (hashes are checked on load)."""
        from engine.bundle import open_bundle

        return open_bundle(self.bundle, check_hashes=False).precision


@dataclass(frozen=True)
class Runtime:
    """What runs: the resolved source, backend, device, precision and backend options. Load it with
    `WuerstchenPipeline.load(runtime)`."""

    source: ModelSource
    backend: Backend
    device: torch.device
    precision: Precision
    options: BackendOptions
    # The PyTorch models' quantization: a scheme whose recipe a scan finds on load, a recipe, or None.
    quantization: Quantization | QuantRecipe | None = field(default=None, hash=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.torch_dtype

    def describe(self) -> str:
        quantized = "" if self.quantization is None else f", quantized {describe_quantization(self.quantization)}"
        return f"{self.source.describe()} on {self.backend.value}, {self.device}, {self.precision.value}{quantized}"


def quantization_scheme(quantization: Quantization | QuantRecipe) -> Quantization:
    """The scheme of a runtime's quantization: itself, or its recipe's."""
    return quantization.scheme if isinstance(quantization, QuantRecipe) else quantization


def describe_quantization(quantization: Quantization | QuantRecipe) -> str:
    if isinstance(quantization, QuantRecipe):
        return quantization.describe()
    return f"{quantization.value} (recipe scanned on load)"


def resolve(
    source: ModelSource,
    backend: str | Backend | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | Precision | None = None,
    options: BackendOptions | None = None,
    quantize: str | Path | Quantization | QuantRecipe | None = None,
) -> Runtime:
    """The one decision of what runs (see the module's docstring for the rules). `device` and `dtype` take
    "auto" or None for the default; `quantize` takes none, fp8, int8, a `QuantRecipe` or a recipe file's path;
    every refusal is one line naming the field."""
    quantization = parse_quantize(quantize)
    backend = source.default_backend if backend is None else Backend.parse(backend)
    if backend.runs_bundles and not source.bundle:
        raise WuerstchenError(f"backend={backend.value!r} runs a bundle: make one with `wuerstchen export`")
    if quantization is not None and backend.runs_bundles:
        raise WuerstchenError(f"quantize={_shown_quantize(quantize)} applies to the torch backends: a bundle is "
                              "quantized when it is exported (wuerstchen export --quantize)")
    if source.bundle and not backend.runs_bundles:
        raise WuerstchenError(f"backend={backend.value!r} cannot run a bundle: expected onnxruntime or tensorrt "
                              "(the torch backends load a preset or diffusers folders)")
    options = backend_options(backend, options)
    requested = _requested(dtype)

    if backend is Backend.ONNXRUNTIME:
        from engine.backends.onnxruntime import resolve_providers

        providers, device = resolve_providers(device, options.providers)
        options = replace(options, providers=providers)
        precision = _as_exported(source.bundle_precision(), requested, "ONNX Runtime")
        if precision is Precision.BF16:
            raise WuerstchenError(f"bundle={str(source.bundle)!r} holds bf16 graphs, which ONNX Runtime's Python API "
                                  "cannot bind: export with dtype fp32 or fp16, or run it with TensorRT")
    elif backend is Backend.TENSORRT:
        from engine.engine_cache import tensorrt_module

        tensorrt_module()  # says what to install before anything else
        device = resolve_device(device)
        if device.type != "cuda":
            raise WuerstchenError("backend='tensorrt' needs a CUDA GPU, and none is available here")
        precision = tensorrt_precision(dtype, source.bundle_precision())
    else:
        device = resolve_device(device)
        if quantization is not None:
            precision = _quantized_precision(quantization, quantize, requested, device)
        else:
            precision = requested or (Precision.FP16 if device.type == "cuda" else Precision.FP32)
        if backend.fast and device.type != "cuda" and not interpreted():
            raise WuerstchenError(f"backend={backend.value!r} runs Triton kernels on a CUDA GPU (on a CPU only in "
                                  "Triton's interpreter, TRITON_INTERPRET=1, for tests): use backend='torch'")
        if device.type == "cpu" and precision is not Precision.FP32 and quantization is None:
            # Attributed to this line (stacklevel 1), so Python's default filter shows it once per process.
            warnings.warn(f"dtype={precision.value!r} on the CPU is slower than fp32 on most CPUs (PyTorch's CPU "
                          "kernels are fastest in fp32): pass fp32 unless you need the lower precision's numbers",
                          SlowPrecisionWarning, stacklevel=1)
    return Runtime(source, backend, device, precision, options, quantization)


def parse_quantize(value: str | Path | Quantization | QuantRecipe | None) -> Quantization | QuantRecipe | None:
    """`quantize` as `resolve` takes it: None or "none", a scheme (fp8, int8, in any case), a `QuantRecipe`, or
    the path of a recipe file (written by `QuantRecipe.save`, e.g. a loaded pipeline's `quantization`)."""
    if isinstance(value, QuantRecipe):
        return value
    if isinstance(value, Path) or (isinstance(value, str) and value.lower().endswith(".json")):
        return QuantRecipe.load(value)
    try:
        return Quantization.parse(value)
    except WuerstchenError:
        raise WuerstchenError(f"quantize={_shown_quantize(value)} is not supported: expected none, fp8 (weights and "
                              "activations, sm_89+ GPUs), int8 (weights only), or a recipe file (.json)") from None


def _quantized_precision(quantization: Quantization | QuantRecipe, quantize, requested: Precision | None,
                         device: torch.device) -> Precision:
    """The precision of quantized models: as asked, or fp16 on a GPU and bf16 on the CPU; never fp32."""
    scheme = quantization_scheme(quantization)
    if requested is Precision.FP32:
        raise WuerstchenError(f"quantize={_shown_quantize(quantize)} quantizes fp16 or bf16 weights, and dtype is "
                              "fp32: pass dtype fp16 or bf16")
    if scheme is Quantization.FP8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise WuerstchenError(f"quantize={_shown_quantize(quantize)} needs fp8 tensor cores (sm_89 or later: Ada, "
                              f"Hopper); {device} is sm_{major}{minor}: use quantize='int8'")
    return requested or (Precision.FP16 if device.type == "cuda" else Precision.BF16)


def _shown_quantize(value) -> str:
    if isinstance(value, QuantRecipe):
        return f"<recipe {value.describe()}>"
    return repr(str(value) if isinstance(value, Path) else value)


def tensorrt_precision(dtype: str | torch.dtype | Precision | None, exported: Precision) -> Precision:
    """The precision of TensorRT engines for a bundle exported in `exported`: "auto" or None is bf16, and a
    bundle that is not fp32 builds only in its own precision (the precision pass converts fp32 graphs)."""
    requested = _requested(dtype)
    if exported is not Precision.FP32:
        return _as_exported(exported, requested, "TensorRT (it converts only fp32 bundles)")
    return requested or Precision.BF16


def _requested(dtype: str | torch.dtype | Precision | None) -> Precision | None:
    """The precision asked for, or None for "auto"."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    try:
        return Precision.parse(dtype)
    except WuerstchenError:
        shown = str(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)
        raise WuerstchenError(f"dtype={shown} is not supported: expected auto, {Precision.describe()}") from None


def _as_exported(exported: Precision, requested: Precision | None, runner: str) -> Precision:
    if requested is not None and requested is not exported:
        raise WuerstchenError(f"dtype={requested.value!r}: {runner} runs this bundle in the precision it was "
                              f"exported in, {exported.value}; export another bundle for {requested.value}")
    return exported
