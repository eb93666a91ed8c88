"""Building TensorRT engines from a bundle: one plan per graph, with bucketed optimization profiles, built
strongly typed from graphs that carry their precision (see `export.precision`), into the engine cache that
`engine.engine_cache` names and the TensorRT backend reads.

Written against the TensorRT 10.x/11.x Python API: `trt.Builder`, `NetworkDefinitionCreationFlag.
STRONGLY_TYPED` (needed on 10.x, the only mode on 11.x), `OnnxParser.parse_from_file` (which resolves
external data next to the graph), `IOptimizationProfile.set_shape`, `IBuilderConfig.set_memory_pool_limit`,
`builder_optimization_level`, `hardware_compatibility_level`, the timing cache, and
`build_serialized_network` (NVIDIA's TensorRT Python API reference). TensorRT is imported only where it is
needed, so that `wuerstchen build --check` and everything else here runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from engine.bundle import open_bundle
from engine.engine_cache import (
    BuildSettings,
    EngineCache,
    EnginePlan,
    describe,
    environment,
    plan_engines,
    tensorrt_module,
)
from engine.errors import WuerstchenError
from engine.files import write_atomically
from engine.precision import Precision
from engine.profiles import Profile, default_buckets, static_bucket
from engine.runtime import tensorrt_precision


def build_plan(onnx_path: Path, profiles: Sequence[Profile], settings: BuildSettings) -> bytes:
    """Build one strongly typed plan with one optimization profile per `profiles` entry."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # needed on 10.x, ignored on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # keep it alive until the build ends: it owns the weights
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise WuerstchenError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.tactic_dram_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, settings.tactic_dram_bytes)
    config.builder_optimization_level = settings.optimization_level
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, settings.hardware_compatibility)
    cache_file = Path(settings.timing_cache) if settings.timing_cache else None
    previous = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(previous), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise WuerstchenError(f"TensorRT failed to build {onnx_path} (see its log above)")
    if cache_file:  # merge what this build timed into the file, as Polygraphy does
        timing = config.get_timing_cache()
        if previous:
            timing.combine(config.create_timing_cache(previous), True)
        write_atomically(cache_file, bytes(timing.serialize()))  # a build interrupted here leaves the old one
    del parser
    return bytes(plan)


def prepare_graph(plan: EnginePlan, precision: Precision) -> None:
    """Check the bundle's graph reads no file its manifest entry does not list, then write the
    precision-converted graph if the plan parses one and it is not there yet, and check that as TensorRT
    will read it: supported operators, and one float dtype per node (strong typing)."""
    from export.lint import check_tensorrt_compatible
    from export.precision import check_strongly_typed, convert_file

    model = onnx.load(str(plan.source), load_external_data=False)
    locations = {(plan.source.parent / entry.value).resolve() for tensor in model.graph.initializer
                 for entry in tensor.external_data if entry.key == "location"}
    listed = {path.resolve() for path in plan.data}
    unlisted = sorted(locations - listed)
    if unlisted:
        raise WuerstchenError(f"graph {plan.graph}: reads external data {[str(p) for p in unlisted]} that its "
                              "manifest entry does not list, so no hash vouches for it")
    if plan.onnx != plan.source and not plan.onnx.is_file():
        plan.onnx.parent.mkdir(parents=True, exist_ok=True)
        convert_file(plan.source, plan.onnx, precision)
        converted = onnx.load(str(plan.onnx), load_external_data=False)
        check_tensorrt_compatible(converted, plan.graph)
        check_strongly_typed(converted, plan.graph)


def build_engines(plans: Sequence[EnginePlan], settings: BuildSettings, cache: EngineCache,
                  progress: Callable[[str], None] = print) -> list[Path]:
    """Build every plan the cache lacks or holds stale; return the plan files."""
    env_version = plans[0].fields["tensorrt"] if plans else None
    paths = []
    for plan in plans:
        reason = cache.stale_reason(plan.graph, plan.key, env_version)
        if reason is None:
            paths.append(cache.paths(plan.graph, plan.key)[0])
            continue
        progress(f"building {plan.graph} ({reason}) …")
        start = time.perf_counter()
        prepare_graph(plan, settings.precision)
        data = build_plan(plan.onnx, plan.profiles, settings)
        record = {**plan.fields, "build_seconds": time.perf_counter() - start}
        paths.append(cache.store(plan.graph, plan.key, data, record))
        progress(f"built {plan.graph}: {len(data) / 1e6:.1f} MB in {record['build_seconds']:.0f} s")
    return paths


def build_command(args) -> int:
    """`wuerstchen build BUNDLE`: plan every engine; with --check print the plan, else build what is missing."""
    bundle = open_bundle(args.bundle)
    settings = BuildSettings(
        precision=tensorrt_precision(args.dtype, bundle.precision), max_batch=args.max_batch,
        optimization_level=args.opt_level,
        workspace_bytes=int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None,
        tactic_dram_bytes=int(args.tactic_dram_gb * (1 << 30)) if args.tactic_dram_gb else None,
        timing_cache=args.timing_cache,
    )
    config = bundle.config
    buckets = default_buckets(config, config.sizes.min, config.sizes.max)
    buckets += [static_bucket((size, size), args.static_batch) for size in args.static]
    cache = EngineCache(Path(args.cache) if args.cache else bundle.root / "engines")
    env = environment()
    plans = plan_engines(bundle, settings, cache, buckets, env=env)
    print(describe(plans))
    if args.check:
        if env["tensorrt"] is None or env["gpu"] is None:
            print("note: TensorRT or a GPU is missing here, so these keys lack their version and GPU fields and "
                  "differ from the keys of a real build")
        return 0
    tensorrt_module()
    build_engines(plans, settings, cache)
    return 0
