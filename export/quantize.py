"""Quantized graphs: a recipe's Linears exported with explicit Q/DQ nodes, the form TensorRT's explicit
quantization builds 8-bit GEMMs from.

The PyTorch path (`engine.models.quantized.QuantizedLinear`) holds each chosen Linear's weight in 8 bits with
a scale per output channel and, for fp8, quantizes the activations per row as they arrive. The graphs hold
the same 8-bit weights, with one difference TensorRT imposes: its QuantizeLinear takes a build-time constant
scale, so fp8 activations are quantized with a static per-tensor scale, calibrated once on the recipe's
calibration inputs (`engine.quantization.calibration_steps`: the calibration prompts at three noise levels),
where the PyTorch path uses dynamic per-row ones. One quantized Linear in a graph:

    int8 (weights only):  x ───────────────────────────────────────────────┐
                          w int8 ── DequantizeLinear(s_w, axis 0) ── Transpose ── MatMul ── Add(bias)
    fp8:                  x ── QuantizeLinear(s_x) ── DequantizeLinear(s_x) ┐    (float8e4m3fn between them)
                          w float8e4m3fn ── DequantizeLinear(s_w, axis 0) ── Transpose ── MatMul ── Add(bias)

with s_x = the input's largest magnitude over the calibration inputs / 448. The scales are in the graph's
float type: TensorRT's DequantizeLinear outputs its scale's type and its QuantizeLinear takes its input's, so
the dequantized tensors meet the 16-bit MatMul without a Cast (opset 19 is the first to take 16-bit scales and
float8 types). The text keys and values that an attention block projects once per request read the
dequantized weight only, in the condition graphs as in PyTorch.

How the nodes get there: `QDQLinear` stands in for each `QuantizedLinear` of a structural copy of the stage
models (the pipeline's own models are left as they are). Traced by `torch.onnx.export`, it emits
QuantizeLinear and DequantizeLinear through `torch.onnx.ops.symbolic`; run eagerly, it computes the same
math in PyTorch, which is the reference the exported graphs are verified against (`export.verify`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from engine.bundle import QUANTIZED_GRAPHS
from engine.config import SizeGrid
from engine.errors import WuerstchenError
from engine.models.quantized import QuantizedLinear, candidates, swap
from engine.pipeline import WuerstchenPipeline
from engine.precision import Precision
from engine.quantization import (
    CALIBRATION_LEVELS,
    CALIBRATION_PROMPTS,
    STAGES,
    Quantization,
    QuantRecipe,
    calibration_steps,
    relative_error,
)
from engine.recipe import Recipe
from export.graphs import GraphSpec
from kernels.quant import FP8, QMAX

QDQ_MIN_OPSET = 19  # the first opset whose QuantizeLinear and DequantizeLinear take float8 and 16-bit scales
CALIBRATION_SEED = 0
GRAPH_DTYPES = (torch.float16, torch.bfloat16)
ONNX_WEIGHT_TYPES = {Quantization.FP8: "float8e4m3fn", Quantization.INT8: "int8"}
Layers = dict[str, tuple[str, ...]]  # per stage, the names of the Linears a recipe quantizes
EIGHT_BIT_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN})


class QDQLinear(nn.Module):
    """A `QuantizedLinear` as the graphs compute it, in the graph's float type `dtype`: the weight dequantized
    per output channel, and for fp8 the input quantized to float8e4m3fn and back with the static scale
    `input_scale` (a value of `dtype`), then x Wᵀ + b. In `torch.onnx.export` each of those steps is one ONNX
    QuantizeLinear or DequantizeLinear node; run eagerly it is the same arithmetic in PyTorch."""

    def __init__(self, linear: QuantizedLinear, dtype: torch.dtype, input_scale: float | None = None):
        super().__init__()
        if dtype not in GRAPH_DTYPES:
            raise WuerstchenError(f"quantized graphs in {dtype}: expected fp16 or bf16")
        if (input_scale is not None) != (linear.scheme is Quantization.FP8):
            raise WuerstchenError(f"a {linear.scheme.value} Linear takes {'a' if input_scale is None else 'no'} "
                                  "static input scale")
        self.scheme, self.in_features, self.out_features = linear.scheme, linear.in_features, linear.out_features
        w_q, w_scale = graph_weight(linear, dtype)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.to(dtype))
        if input_scale is not None:
            if torch.tensor(input_scale, dtype=dtype).item() != input_scale or not input_scale > 0:
                raise WuerstchenError(f"input_scale={input_scale!r}: expected a positive value of {dtype}")
            self.register_buffer("x_scale", torch.tensor(input_scale, dtype=dtype, device=w_q.device))
            # The zero point is what makes ONNX's QuantizeLinear produce float8 rather than its default uint8.
            self.register_buffer("x_zero_point", torch.zeros((), dtype=FP8, device=w_q.device))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K) in the graph's float type: w_q · s_w, rounded once."""
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic("DequantizeLinear", (self.w_q, self.w_scale), {"axis": 0},
                                           dtype=self.w_scale.dtype, shape=self.w_q.shape)
        return (self.w_q.float() * self.w_scale.float()[:, None]).to(self.w_scale.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x through float8e4m3fn and back with the static scale: round(x / s_x) saturated to ±448, times s_x,
        rounded once to x's dtype (ONNX's QuantizeLinear rounds to nearest even and saturates)."""
        if torch.onnx.is_in_onnx_export():
            q = torch.onnx.ops.symbolic("QuantizeLinear", (x, self.x_scale, self.x_zero_point), dtype=FP8,
                                        shape=x.shape)
            return torch.onnx.ops.symbolic("DequantizeLinear", (q, self.x_scale), dtype=x.dtype, shape=x.shape)
        q = (x.float() / self.x_scale.float()).clamp(-QMAX[FP8], QMAX[FP8]).to(FP8)
        return (q.float() * self.x_scale.float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme is Quantization.FP8:
            x = self.quantize_input(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        scale = f", input_scale={self.x_scale.item():.4g}" if self.scheme is Quantization.FP8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.value}{scale}"


def _to_8_bit(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values on the 8-bit grid of `dtype` (int8 or float8_e4m3fn): rounded to nearest even, saturated."""
    clamped = values.clamp(-QMAX[dtype], QMAX[dtype])
    return clamped.round().to(dtype) if dtype == torch.int8 else clamped.to(dtype)


def graph_weight(linear: QuantizedLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear's 8-bit weight (N, K) and its per-channel scales (N,) in `dtype`, the graph's float type.

    A scale rounded to 16 bits moves by at most half a unit in its last place (2⁻⁹ in bf16), which moves no
    8-bit value by half a step: requantizing against the rounded scales returns the PyTorch path's 8-bit
    weights unchanged. It matters only where a scale lies below the type's smallest normal number (fp16:
    2⁻¹⁴, channels whose largest weight is under 0.008 in int8, 0.03 in fp8): such scales are raised to it,
    so that none is subnormal or zero (TensorRT refuses scales that are not positive), and their channels'
    values requantized, within half a step of that scale of the PyTorch path's."""
    scale = linear.w_scale.float().flatten()
    graph_scale = scale.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    ratio = (scale / graph_scale.float())[:, None]
    return _to_8_bit(linear.w_q.float() * ratio, linear.w_q.dtype), graph_scale


def input_scale(absmax: float, dtype: torch.dtype) -> float:
    """The static fp8 scale of an input whose largest magnitude is `absmax`: absmax / 448, as a value of
    `dtype` (rounded to nearest; at least the type's smallest normal number, so never zero)."""
    scale = max(absmax / QMAX[FP8], torch.finfo(dtype).tiny)
    return torch.tensor(scale, dtype=torch.float32).to(dtype).item()


def quantized_layers(pipe: WuerstchenPipeline, recipe: QuantRecipe) -> Layers:
    """The names of the Linears `recipe` quantizes, per stage: its lists, or every candidate where it has none."""
    return {stage: tuple(candidates(getattr(pipe.stages, stage)) if recipe.layers[stage] is None
                         else recipe.layers[stage]) for stage in STAGES}


def calibration_size(recipe: QuantRecipe, grid: SizeGrid) -> int:
    """The square image side the activations are calibrated at: the recipe's scan size where it has one the
    bundle serves, else the default image side (1024) brought into the bundle's range."""
    size = recipe.scan.get("size")
    if type(size) is int and grid.min <= size <= grid.max and size % grid.step == 0:
        return size
    return min(max(Recipe().height, grid.min), grid.max)


@torch.no_grad()
def calibrate(steps: dict, models: dict[str, nn.Module], layers: Layers) -> dict[str, dict[str, float]]:
    """The largest input magnitude of each Linear in `layers`, per stage, over one calibration step (`steps`,
    from `engine.quantization.calibration_steps`) of that stage's unquantized model in `models`."""
    found: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        model, seen = models[stage], {}
        handles = [model.get_submodule(name).register_forward_pre_hook(_absmax_recorder(seen, name))
                   for name in layers[stage]]
        try:
            steps[stage](model)
        finally:
            for handle in handles:
                handle.remove()
        bad = [name for name in layers[stage] if not math.isfinite(seen.get(name, math.nan))]
        if bad:
            raise WuerstchenError(f"calibration: the {stage}'s Linears {bad[:3]} saw no finite input on the "
                                  "calibration step; they cannot have a static scale")
        found[stage] = {name: seen[name] for name in layers[stage]}
    return found


def _absmax_recorder(seen: dict[str, float], name: str):
    """A forward pre-hook that keeps in `seen[name]` the largest input magnitude its module has been called on."""
    def hook(module: nn.Module, args: tuple) -> None:
        seen[name] = max(seen.get(name, 0.0), args[0].detach().abs().max().float().item())
    return hook


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its parameters and buffers: swapping a submodule of the copy
    leaves `model` as it is, and costs no weight memory."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def quantized_pipeline(pipe: WuerstchenPipeline, scheme: Quantization, layers: Layers,
                       input_scales: dict[str, dict[str, float]] | None) -> WuerstchenPipeline:
    """`pipe` with its prior and decoder replaced by copies whose `layers` are `QDQLinear`s of `scheme` (with
    `input_scales`, values of the pipeline's dtype, for fp8): the models the quantized graphs are exported
    from and checked against. `pipe`'s own models are left as they are."""
    if pipe.dtype not in GRAPH_DTYPES:
        raise WuerstchenError(f"quantize={scheme.value!r} needs a pipeline in fp16 or bf16 (its weights are "
                              f"quantized from 16 bits); this one is {pipe.precision.value}")
    recipe = QuantRecipe(scheme, {stage: tuple(names) for stage, names in layers.items()})
    models = {}
    for stage in STAGES:
        model = recipe.apply(stage, _structural_copy(getattr(pipe.stages, stage)))
        for name in layers[stage]:
            scale = None if input_scales is None else input_scales[stage][name]
            swap(model, name, QDQLinear(model.get_submodule(name), pipe.dtype, scale))
        models[stage] = model
    return pipe.with_stages(dataclasses.replace(pipe.stages, **models))


@dataclass(frozen=True)
class QuantizedExport:
    """What a quantized export needs: the pipeline whose graphs are exported, and the manifest's entry."""

    pipe: WuerstchenPipeline
    entry: dict


def prepare(pipe: WuerstchenPipeline, recipe: QuantRecipe, grid: SizeGrid) -> QuantizedExport:
    """Calibrate `recipe`'s fp8 inputs (int8 needs no calibration), build the quantized models, and measure
    one step of their graphs' math against the unquantized models on the calibration inputs."""
    if not hasattr(torch.onnx, "ops"):
        raise WuerstchenError(f"quantized graphs need torch 2.8 or later (torch.onnx.ops), not {torch.__version__}")
    scheme, stages = recipe.scheme, pipe.stages
    layers = quantized_layers(pipe, recipe)
    size = calibration_size(recipe, grid)
    steps = calibration_steps(pipe.config, stages.prior_text, stages.prior, stages.decoder_text, stages.decoder,
                              size, seed=CALIBRATION_SEED)
    models = {stage: getattr(stages, stage) for stage in STAGES}
    input_scales = None
    if scheme is Quantization.FP8:
        input_scales = {stage: {name: input_scale(absmax, pipe.dtype) for name, absmax in found.items()}
                        for stage, found in calibrate(steps, models, layers).items()}
    quantized = quantized_pipeline(pipe, scheme, layers, input_scales)
    with torch.no_grad():
        step_error = {stage: relative_error(steps[stage](getattr(quantized.stages, stage)), steps[stage](model))
                      for stage, model in models.items()}
    calibration = {"prompts": list(CALIBRATION_PROMPTS), "levels": list(CALIBRATION_LEVELS), "size": size,
                   "seed": CALIBRATION_SEED}
    return QuantizedExport(quantized, manifest_entry(recipe, layers, pipe.precision, calibration, input_scales,
                                                     step_error))


def manifest_entry(recipe: QuantRecipe, layers: Layers, precision: Precision,
                   calibration: dict, input_scales: dict | None, step_error: dict[str, float]) -> dict:
    """The manifest's `quantization` key (read back by `engine.bundle`; documented in the README)."""
    scheme, dtype = recipe.scheme, precision.onnx_name
    weights = (f"{ONNX_WEIGHT_TYPES[scheme]} initializers with one scale per output channel "
               f"(DequantizeLinear, axis 0), scales in {dtype}")
    if scheme is Quantization.FP8:
        activations = (f"static per-tensor: QuantizeLinear → DequantizeLinear through float8e4m3fn before each "
                       f"quantized Linear, scale = the input's largest magnitude / 448 over one step on the "
                       f"calibration inputs ({len(calibration['prompts'])} prompts × {len(calibration['levels'])} "
                       f"noise levels at {calibration['size']}², seed {calibration['seed']}), in {dtype}; the "
                       "PyTorch path quantizes per row at run time instead")
    else:
        activations = f"not quantized: {dtype} (weight-only)"
    return {
        "scheme": scheme.value,
        "graphs": list(QUANTIZED_GRAPHS),
        "layers": {stage: list(names) for stage, names in layers.items()},
        "weights": weights,
        "activations": activations,
        "calibration": calibration,
        "input_scales": input_scales,
        "step_error": step_error,
        "recipe": recipe.to_dict(),
    }


def check_8_bit_weights(model: onnx.ModelProto, spec: GraphSpec, graph: str) -> None:
    """Raise a one-line error unless the exported graph holds in 8 bits exactly the weights of the quantized
    Linears it computes with, each read by DequantizeLinear alone: in a step graph every one of them, in a
    condition graph those of the attention blocks' `qkv`, whose key and value rows project the text once
    per request. An 8-bit weight missing means the exporter folded its DequantizeLinear into a 16-bit copy."""
    expected = set()
    for name, module in spec.module.named_modules():
        if isinstance(module, QDQLinear) and (graph.endswith("_step") or name.endswith(".qkv")):
            expected.add(f"{name}.w_q")
    eight_bit = {t.name for t in model.graph.initializer if t.data_type in EIGHT_BIT_TYPES}
    weights = eight_bit - {f"{name}.x_zero_point" for name, module in spec.module.named_modules()
                           if isinstance(module, QDQLinear)}
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            if name in weights:
                readers.setdefault(name, set()).add(node.op_type)
    if weights != expected or any(ops != {"DequantizeLinear"} for ops in readers.values()):
        missing, unexpected = sorted(expected - weights), sorted(weights - expected)
        misread = sorted(name for name, ops in readers.items() if ops != {"DequantizeLinear"})
        raise WuerstchenError(f"graph {graph}: its 8-bit weights are not those of its quantized Linears (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, read by other ops than "
                              f"DequantizeLinear {misread[:3]})")


def reference_pipeline(pipe: WuerstchenPipeline, entry: dict) -> WuerstchenPipeline:
    """The quantized models a bundle's `quantization` entry (checked by `engine.bundle`) describes, built from
    the unquantized pipeline it was exported from: the PyTorch reference of its graphs."""
    layers = {stage: tuple(names) for stage, names in entry["layers"].items()}
    return quantized_pipeline(pipe, Quantization(entry["scheme"]), layers, entry["input_scales"])
