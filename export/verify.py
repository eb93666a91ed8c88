"""Every graph of a bundle against the PyTorch engine it was exported from, on random inputs at several
sizes and batch sizes, compared with Polygraphy's comparator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.backends.onnxruntime import OnnxGraph, resolve_providers
from engine.bundle import open_bundle
from engine.pipeline import WuerstchenPipeline
from engine.precision import Precision
from engine.shapes import image_shapes
from export.graphs import graph_specs

# Worst error allowed, relative to the largest magnitude of the reference output.
TOLERANCES = {Precision.FP32: 1e-4, Precision.FP16: 1e-2, Precision.BF16: 5e-2}
# The step graphs of an fp8 bundle quantize their Linears' inputs to fp8, whose steps are 1/16 of a value: where
# ONNX Runtime's and PyTorch's 16-bit arithmetic differ in the last place, an input can round to the next fp8
# value, and the step's output moves by more than the 16-bit tolerance (measured on the tiny model: 6 %).
FP8_STEP_TOLERANCE = 0.1


def tolerances(precision: Precision, names, quantization: dict | None = None) -> dict[str, float]:
    """The largest relative error `verify_bundle` accepts for each graph in `names`, of a bundle in
    `precision` with the manifest's `quantization` entry (None: not quantized)."""
    fp8 = quantization is not None and quantization["scheme"] == "fp8"
    return {name: FP8_STEP_TOLERANCE if fp8 and name.endswith("_step") else TOLERANCES[precision] for name in names}


def verification_sizes(grid) -> list[tuple[int, int]]:
    """Both ends of a size range and a non-square size between them, as (height, width)."""
    middle = grid.min + (grid.max - grid.min) // 2 // grid.step * grid.step
    return list(dict.fromkeys([(grid.min, grid.min), (grid.max, middle), (grid.max, grid.max)]))


def verify_bundle(
    pipe: WuerstchenPipeline,
    bundle: str | Path,
    sizes: Sequence[tuple[int, int]] | None = None,
    batches: Sequence[int] = (1, 2),
    providers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """The worst relative error, max |ONNX Runtime − PyTorch| / max |PyTorch|, of each graph over every
    (size, batch) pair and output. `pipe` is the PyTorch pipeline the bundle was exported from (unquantized,
    for a quantized bundle too: the graphs are then compared with the quantized models that the manifest's
    `quantization` describes, `export.quantize.reference_pipeline`); ONNX Runtime runs on the providers and
    device that `engine.backends.onnxruntime.resolve_providers` picks."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    opened = open_bundle(bundle)
    providers, device = resolve_providers(device, providers)
    if "quantization" in opened.manifest:
        from export.quantize import reference_pipeline  # needs Triton's kernels module

        pipe = reference_pipeline(pipe, opened.manifest["quantization"])
    specs = graph_specs(pipe)
    graphs = {name: OnnxGraph(opened, name, list(providers), device) for name in specs}
    sizes = sizes or verification_sizes(opened.config.sizes)
    tolerance = tolerances(pipe.precision, specs, opened.manifest.get("quantization"))
    generator = torch.Generator().manual_seed(0)
    worst = dict.fromkeys(specs, 0.0)
    for height, width in sizes:
        for batch in batches:
            shapes = image_shapes(opened.config, height, width, batch)
            for name, spec in specs.items():
                feeds = {k: v.to(pipe.device) for k, v in spec.sample(pipe.config, shapes, generator).items()}
                expected = {k: v.float().cpu().numpy() for k, v in spec.run(feeds).items()}
                actual = {o["name"]: t.float().cpu().numpy() for o, t in zip(
                    graphs[name].outputs, graphs[name](*feeds.values()), strict=True)}
                results = RunResults()
                results.append(("pytorch", [IterationResult(expected, runner_name="pytorch")]))
                results.append(("onnxruntime", [IterationResult(actual, runner_name="onnxruntime")]))
                scales = {k: max(float(abs(v).max()), 1e-12) for k, v in expected.items()}
                compare = SimpleCompareFunc(atol={k: tolerance[name] * s for k, s in scales.items()}, rtol=0)
                for result in Comparator.compare_accuracy(results, compare_func=compare):
                    for comparisons in result.values():
                        for output, comparison in comparisons[0].items():
                            worst[name] = max(worst[name], comparison.max_absdiff / scales[output])
    return worst
