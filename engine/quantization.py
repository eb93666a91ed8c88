"""Quantization recipes: which Linears of the prior and the decoder run in 8 bits (`engine.models.quantized`).

A recipe names a scheme (fp8 or int8) and, per stage, the candidate Linears it quantizes; the others stay in
16 bits. `QuantRecipe.every(scheme)` quantizes every candidate. `scan` makes a recipe from the model itself:
it measures each candidate's sensitivity (one step's output error with only that layer quantized), then
keeps the most sensitive layers in 16 bits, fewest first, until one step with all the rest quantized is
within the scheme's bound (`BOUNDS`: the relative error of the step's predicted noise against the
unquantized model's, from the same input). The step is the model's forward on calibration inputs: a few
prompts through the stage's own text encoder, seeded random latents at three noise levels, and for the
decoder seeded random image embeddings.

A recipe is a JSON file (`save`, `load`) that the bundle and the benchmark record. Read, it is checked key
by key like every file this engine reads.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.files import write_atomically
from engine.models.decoder import resize_image_embeddings
from engine.precision import Quantization
from engine.shapes import image_shapes
from engine.text import TextEncoder

FORMAT = "wuerstchen-quantization-recipe"
FORMAT_VERSION = 1
STAGES = ("prior", "decoder")
CALIBRATION_PROMPTS = ("a photograph of a red fox in fresh snow", "an oil painting of a lighthouse at dusk",
                       "a bowl of ramen, studio lighting", "")
CALIBRATION_LEVELS = (0.9, 0.5, 0.1)  # noise levels r of the calibration step: early, middle, late


# One step's relative error (predicted noise, against the unquantized model from the same input) a recipe
# must stay within, per stage.
BOUNDS = {Quantization.FP8: 0.02, Quantization.INT8: 0.01}


@dataclass(frozen=True)
class QuantRecipe:
    """`scheme`, and per stage the Linears it quantizes (None: every candidate). `scan` holds what a scan
    measured (per stage: the bound, the step error reached, the layers kept in 16 bits with their
    sensitivities), or is empty."""

    scheme: Quantization
    layers: dict[str, tuple[str, ...] | None] = field(default_factory=lambda: dict.fromkeys(STAGES))
    scan: dict = field(default_factory=dict)

    @classmethod
    def every(cls, scheme: Quantization | str) -> QuantRecipe:
        return cls(Quantization.parse(scheme))

    def describe(self) -> str:
        if all(layers is None for layers in self.layers.values()):
            return f"{self.scheme.value} (every block Linear)"
        counts = ", ".join(f"{stage} {len(layers)}" for stage, layers in self.layers.items() if layers is not None)
        return f"{self.scheme.value} ({counts} Linears, {'from a scan' if self.scan else 'as listed'})"

    def apply(self, stage: str, model: nn.Module) -> nn.Module:
        """The stage's model with this recipe's Linears quantized (in place)."""
        from engine.models.quantized import quantize  # Triton's kernels, needed only here

        return quantize(model, self.scheme, self.layers[stage])

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "scheme": self.scheme.value,
                "layers": {stage: None if layers is None else list(layers) for stage, layers in self.layers.items()},
                "scan": self.scan}

    def save(self, path: str | Path) -> None:
        write_atomically(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())

    @classmethod
    def from_dict(cls, values, where: str = "recipe") -> QuantRecipe:
        """A recipe from its JSON form, every key checked (a file is hostile until checked)."""
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise WuerstchenError(f"{where}: not a quantization recipe: expected a JSON object with format {FORMAT!r}")
        if type(values.get("format_version")) is not int or values["format_version"] != FORMAT_VERSION:
            raise WuerstchenError(f"{where}: format_version={values.get('format_version')!r} is not supported: "
                                  f"this engine reads version {FORMAT_VERSION}")
        scheme = Quantization.parse(values.get("scheme"), field=f"{where}: scheme")
        if scheme is None:
            raise WuerstchenError(f"{where}: scheme='none': expected fp8 or int8")
        layers = values.get("layers")
        if not isinstance(layers, dict) or set(layers) != set(STAGES):
            raise WuerstchenError(f"{where}: layers={layers!r:.80}: expected an object with {list(STAGES)}")
        for stage, names in layers.items():
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise WuerstchenError(f"{where}: layers.{stage}: expected a list of layer names, or null for all")
        scan_record = values.get("scan", {})
        if not isinstance(scan_record, dict):
            raise WuerstchenError(f"{where}: scan: expected an object")
        return cls(scheme, {stage: None if names is None else tuple(names) for stage, names in layers.items()},
                   scan_record)

    @classmethod
    def load(cls, path: str | Path) -> QuantRecipe:
        path = Path(path)
        if not path.is_file():
            raise WuerstchenError(f"quantize={str(path)!r}: file does not exist")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise WuerstchenError(f"quantize={str(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(values, where=str(path))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖ / ‖reference‖, in fp64."""
    reference = reference.double()
    return ((output.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class StageScan:
    """What `scan_stage` found for one stage."""

    quantized: tuple[str, ...]  # the Linears quantized
    kept: dict[str, float]  # the Linears kept in 16 bits, with their sensitivities
    sensitivities: dict[str, float]  # every candidate's step error when quantized alone
    step_error: float  # one step's error with `quantized` quantized
    bound: float

    def record(self) -> dict:
        return {"bound": self.bound, "step_error": self.step_error, "kept": self.kept,
                "quantized": len(self.quantized), "sensitivities": self.sensitivities}


@torch.no_grad()
def scan_stage(model: nn.Module, step: Callable[[nn.Module], torch.Tensor], scheme: Quantization,
               bound: float) -> StageScan:
    """Each candidate's sensitivity, then the fewest most-sensitive Linears to keep in 16 bits for one step
    with the rest quantized to be within `bound` (keeping all of them, if need be). `model` is left as it
    was; at most one quantized copy of one Linear lives beside it at a time, and one quantized model."""
    from engine.models.quantized import QuantizedLinear, candidates, swap

    names = candidates(model)
    reference = step(model)
    sensitivities = {}
    for name in names:
        original = swap(model, name, QuantizedLinear(model.get_submodule(name), scheme))
        try:
            sensitivities[name] = relative_error(step(model), reference)
        finally:
            swap(model, name, original)
    order = sorted(names, key=lambda name: -sensitivities[name])

    def error_keeping(count: int) -> float:
        """One step's error with all but the `count` most sensitive candidates quantized."""
        chosen = order[count:]
        originals = {name: swap(model, name, QuantizedLinear(model.get_submodule(name), scheme)) for name in chosen}
        try:
            return relative_error(step(model), reference)
        finally:
            for name, original in originals.items():
                swap(model, name, original)

    # The error falls as more sensitive layers are kept (not strictly: a bisection over the count, checked).
    low, high, errors = 0, len(order), {len(order): 0.0}
    errors[0] = error_keeping(0)
    if errors[0] > bound:
        while high - low > 1:
            middle = (low + high) // 2
            errors[middle] = error_keeping(middle)
            low, high = (middle, high) if errors[middle] > bound else (low, middle)
    else:
        high = 0
    kept = order[:high]
    return StageScan(tuple(name for name in names if name not in kept), {name: sensitivities[name] for name in kept},
                     sensitivities, errors[high], bound)


def calibration_steps(config: WuerstchenConfig, prior_text: TextEncoder, prior: nn.Module,
                      decoder_text: TextEncoder, decoder: nn.Module, size: int,
                      seed: int = 0) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
    """For each stage, one denoising step of a model of that stage on fixed calibration inputs: the
    calibration prompts through the stage's text encoder, seeded random latents (and for the decoder random
    image embeddings) at `size`², each prompt at each of `CALIBRATION_LEVELS`."""
    device, dtype = next(prior.parameters()).device, next(prior.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    prompts, levels = list(CALIBRATION_PROMPTS), CALIBRATION_LEVELS
    rows = len(prompts) * len(levels)
    shapes = image_shapes(config, size, size, batch=rows)
    r = torch.tensor(levels, dtype=dtype).repeat(len(prompts)).to(device)

    def draw(shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    with torch.no_grad():
        prior_states = prior_text(prompts).repeat_interleave(len(levels), dim=0)
        decoder_states = decoder_text(prompts).repeat_interleave(len(levels), dim=0)
    prior_x, decoder_x = draw(shapes.prior_latent), draw(shapes.decoder_latent)
    pyramid = resize_image_embeddings(draw(shapes.prior_latent), config.decoder, shapes.decoder_levels)

    def prior_step(model: nn.Module) -> torch.Tensor:
        return model(prior_x, r, model.condition(prior_states))

    def decoder_step(model: nn.Module) -> torch.Tensor:
        return model(decoder_x, r, model.condition(pyramid, decoder_states))

    return {"prior": prior_step, "decoder": decoder_step}


def scan(config: WuerstchenConfig, prior_text: TextEncoder, prior: nn.Module, decoder_text: TextEncoder,
         decoder: nn.Module, scheme: Quantization | str, size: int, bound: float | None = None,
         progress: Callable[[str], None] = lambda _: None) -> QuantRecipe:
    """A recipe for these models (plain, unquantized, in fp16 or bf16) from a sensitivity scan at `size`²;
    `bound` defaults to the scheme's (`BOUNDS`)."""
    scheme = Quantization.parse(scheme)
    bound = BOUNDS[scheme] if bound is None else bound
    if isinstance(bound, bool) or not (isinstance(bound, numbers.Real) and math.isfinite(bound) and bound > 0):
        raise WuerstchenError(f"bound={bound!r}: expected a positive number")
    bound = float(bound)
    steps = calibration_steps(config, prior_text, prior, decoder_text, decoder, size)
    layers, record = {}, {"size": size, "prompts": list(CALIBRATION_PROMPTS), "levels": list(CALIBRATION_LEVELS)}
    for stage, model in (("prior", prior), ("decoder", decoder)):
        found = scan_stage(model, steps[stage], scheme, bound)
        progress(f"{stage}: {len(found.quantized)} of {len(found.sensitivities)} Linears quantized, "
                 f"{len(found.kept)} kept in 16 bits; one step's error {found.step_error:.2%} (bound {bound:.0%})")
        layers[stage], record[stage] = found.quantized, found.record()
    return QuantRecipe(scheme, layers, record)
