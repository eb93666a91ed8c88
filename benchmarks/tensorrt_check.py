"""The TensorRT path, checked for real: on a machine with an NVIDIA GPU, TensorRT and diffusers.

1. exports the full-size architecture (random weights, seed 0) to an fp32 bundle serving 512 to 1536 px;
2. builds its engines at --precision (bf16 by default): the default buckets and a static 1024² profile;
3. compares every engine with the PyTorch graph it came from (fp32, on the GPU), on random inputs at each
   profile's smallest, middle and largest size, and reports the worst relative error per graph;
4. times the whole pipeline on TensorRT against torch-fast and diffusers, in the same run, at 1024².

With `--quantize fp8|int8`, the bundle is exported in --precision with every candidate Linear behind Q/DQ
nodes (TensorRT's explicit quantization), its engines are compared with the same quantized math in PyTorch
(`export.quantize.reference_pipeline`), and torch-fast runs the same recipe.

    python -m benchmarks.tensorrt_check --work /scratch/wuerstchen-trt [--precision bf16] [--quantize fp8]
        [--runs 5]

None of this can run on the project's development machines (no TensorRT, no GPU): it is written against
the TensorRT API so that a user with both can run it as it is; its output is the evidence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from engine.precision import Precision
from export.verify import tolerances

# Worst |TensorRT − PyTorch| / max |PyTorch|, per output.
TOLERANCES = {Precision.FP32: 1e-3, Precision.FP16: 2e-2, Precision.BF16: 6e-2}


def compare_graphs(bundle, pipe, settings, cache, buckets) -> dict[str, float]:
    """Every engine against the PyTorch graph it came from, at each profile's corners and middle."""
    from engine.backends.tensorrt import CudaStreams, TensorRTGraph, aligned_empty, device_memory_size
    from engine.engine_cache import plan_engines, tensorrt_module
    from engine.profiles import GUIDED_GRAPHS
    from engine.shapes import image_shapes
    from export.graphs import graph_specs
    from export.tensorrt import build_engines

    trt = tensorrt_module()
    plans = plan_engines(bundle, settings, cache, buckets)
    build_engines(plans, settings, cache)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    specs = graph_specs(pipe)
    device = torch.device("cuda")
    streams = CudaStreams(device)
    by_name = {bucket.name: bucket for bucket in buckets}
    generator = torch.Generator().manual_seed(0)
    worst = {}
    for plan in plans:
        engine = runtime.deserialize_cuda_engine(cache.paths(plan.graph, plan.key)[0].read_bytes())
        entry = bundle.graph(plan.graph)
        graph = TensorRTGraph(trt, engine, plan.profiles, [t["name"] for t in entry["inputs"]],
                              [t["name"] for t in entry["outputs"]],
                              aligned_empty((device_memory_size(engine),), torch.uint8, device), streams)
        doubled = plan.graph in GUIDED_GRAPHS and plan.graph.startswith("prior")  # the prior's guidance batch
        errors = []
        for profile in plan.profiles:
            bucket = by_name[profile.bucket]
            images = bucket.batch[0] if bucket.batch else 1
            for side in sorted({bucket.min, bucket.opt, bucket.max}):
                shapes = image_shapes(pipe.config, side, side, images * (2 if doubled else 1))
                feeds = {k: v.to(device) for k, v in specs[plan.graph].sample(pipe.config, shapes, generator).items()}
                expected = specs[plan.graph].run(feeds)
                for reference, output in zip(expected.values(), graph(*feeds.values()), strict=True):
                    if not torch.isfinite(output).all():
                        errors.append(float("inf"))
                    scale = reference.float().abs().max().clamp_min(1e-12)
                    errors.append(((output.float() - reference.float()).abs().max() / scale).item())
        worst[plan.graph] = max(errors)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a folder for the bundle and the engines (about 25 GB)")
    parser.add_argument("--dtype", "--precision", dest="dtype", default="bf16",
                        help="the engines' precision: bf16 (default), fp16 or fp32")
    parser.add_argument("--quantize", choices=("fp8", "int8"),
                        help="check a quantized bundle (every candidate Linear) instead, in --precision fp16 or bf16")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per pipeline (default 5)")
    args = parser.parse_args(argv)

    from benchmarks.bench import Options, engine_target, run
    from benchmarks.harness import instrument_diffusers
    from benchmarks.reference import diffusers_pipeline, random_reference
    from benchmarks.report import table, write_json
    from engine import ModelSource, TensorRTOptions, WuerstchenPipeline, preset, resolve
    from engine.bundle import open_bundle
    from engine.engine_cache import BuildSettings, EngineCache, tensorrt_module
    from engine.profiles import default_buckets, static_bucket
    from engine.quantization import QuantRecipe
    from engine.recipe import Recipe
    from engine.text import byte_level_tokenizer
    from export.bundle import export_bundle

    tensorrt_module()
    precision = Precision.parse(args.dtype)
    if not torch.cuda.is_available():
        print("tensorrt_check needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quantize and precision is Precision.FP32:
        print("tensorrt_check: --quantize needs --precision fp16 or bf16", file=sys.stderr)
        return 2
    recipe = QuantRecipe.every(args.quantize) if args.quantize else None
    work = Path(args.work)
    bundle_path = work / (f"bundle-{args.quantize}-{precision.value}" if recipe else "bundle")
    cache = EngineCache(work / "engines")

    # 1. The bundle: fp32, exported on the CPU from the full-size architecture with seed-0 random weights; a
    #    quantized one in its 16-bit precision, exported on the GPU (its fp8 calibration runs the models).
    if not (bundle_path / "manifest.json").is_file():
        source = WuerstchenPipeline.from_preset("wuerstchen-v2", device="cuda" if recipe else "cpu",
                                                dtype=precision.torch_dtype if recipe else torch.float32)
        export_bundle(source, bundle_path, {"preset": "wuerstchen-v2", "seed": 0}, min_size=512, max_size=1536,
                      quantization=recipe)
        del source
    bundle = open_bundle(bundle_path)

    # 2 and 3. The engines, then every graph against PyTorch at each of its profiles.
    settings = BuildSettings(precision=precision)
    config = bundle.config
    buckets = [*default_buckets(config, config.sizes.min, config.sizes.max), static_bucket((1024, 1024), 1)]
    if recipe is None:
        reference = WuerstchenPipeline.from_preset("wuerstchen-v2", device="cuda", dtype=torch.float32)
    else:  # the graphs' own quantized math, in PyTorch
        from export.quantize import reference_pipeline

        reference = reference_pipeline(WuerstchenPipeline.from_preset("wuerstchen-v2", device="cuda",
                                                                      dtype=precision.torch_dtype),
                                       bundle.manifest["quantization"])
    worst = compare_graphs(bundle, reference, settings, cache, buckets)
    del reference
    limits = {name: max(TOLERANCES[precision], tolerance) for name, tolerance in
              tolerances(precision, worst, bundle.manifest.get("quantization")).items()}
    print(f"worst relative error per graph, TensorRT {precision.value} against PyTorch "
          f"{reference_name(recipe, precision)}:")
    for name, error in worst.items():
        print(f"  {name:<18} {error:.2e} (tolerance {limits[name]:g}){'' if error <= limits[name] else '  FAILED'}")

    # 4. The pipeline on TensorRT, torch-fast and diffusers, in one run (diffusers on other random weights:
    #    the same cost, and only its time is compared).
    dtype = precision.torch_dtype
    diffusers = diffusers_pipeline(random_reference(preset("wuerstchen-v2"), device="cuda", dtype=dtype),
                                   byte_level_tokenizer())
    tensorrt = resolve(ModelSource.from_bundle(bundle_path), "tensorrt", "cuda", precision,
                       TensorRTOptions(engines=cache.root))
    targets = {
        "tensorrt": engine_target(WuerstchenPipeline.load(tensorrt)),
        "torch-fast": engine_target(WuerstchenPipeline.from_preset("wuerstchen-v2", "cuda", dtype,
                                                                   backend="torch-fast", quantize=recipe)),
        "diffusers": (diffusers, instrument_diffusers, contextlib.nullcontext),
    }
    options = Options(runtimes=(tensorrt,), sizes=((1024, 1024),), batches=(1,), recipe=Recipe(), warmup=2,
                      runs=args.runs, cold_start=False)
    records = run(options, targets=targets)
    print(table(records))
    write_json(records, work / "tensorrt_check.json")
    (work / "graph_errors.json").write_text(json.dumps(worst, indent=1))
    return 0 if all(error <= limits[name] for name, error in worst.items()) else 1


def reference_name(recipe, precision: Precision) -> str:
    return "fp32" if recipe is None else f"{precision.value}, {recipe.scheme.value} Q/DQ math"


if __name__ == "__main__":
    sys.exit(main())
