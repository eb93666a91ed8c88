"""TensorRT engines from a bundle: one plan per graph, with bucketed optimization profiles, built strongly
typed from graphs that carry their precision (see `export.precision`), and kept in a cache keyed by
everything that makes a plan valid.

Written against the TensorRT 10.x/11.x Python API (shared/reference/tensorrt.md holds the calls and their
sources). TensorRT is imported only where it is needed, so that `wuerstchen build --check` and everything
else here runs without it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from engine.bundle import GRAPHS, Bundle, open_bundle
from engine.errors import WuerstchenError
from engine.profiles import Bucket, Profile, default_buckets, graph_profiles, static_bucket

PRECISIONS = ("bf16", "fp16", "fp32")
BUNDLE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PRECISION_RECIPE_VERSION = 1  # bump when export.precision changes what it keeps in fp32
KEY_SCHEMA = 1
PLAN_TAG = 0x74727466  # "ftrt": the first four bytes of every TensorRT plan


@dataclass(frozen=True)
class BuildSettings:
    """How plans are built. Flags are TensorRT `BuilderFlag` names, never numbers (TensorRT 11 renumbered them)."""

    precision: str = "bf16"
    max_batch: int = 4
    optimization_level: int = 3
    workspace_bytes: int | None = 8 << 30  # the builder may take all device memory otherwise
    tactic_dram_bytes: int | None = None
    flags: tuple[str, ...] = ()
    hardware_compatibility: str = "NONE"
    timing_cache: str | None = field(default=None, compare=False)  # a path: metadata, not part of the key

    def __post_init__(self):
        if not all(isinstance(flag, str) and flag.isupper() for flag in self.flags):
            raise WuerstchenError(f"flags={self.flags!r}: expected BuilderFlag names such as 'TF32', never numbers")
        if self.precision not in PRECISIONS:
            raise WuerstchenError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.max_batch < 1:
            raise WuerstchenError(f"max_batch={self.max_batch}: expected a positive integer")
        if not 0 <= self.optimization_level <= 5:
            raise WuerstchenError(f"optimization_level={self.optimization_level}: expected 0 to 5")

    def key_fields(self) -> dict:
        fields = asdict(self)
        del fields["timing_cache"]
        return fields


def tensorrt_module():
    """The `tensorrt` module, or a one-line error saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise WuerstchenError(
            "TensorRT is not installed: it needs an NVIDIA GPU and `pip install tensorrt` from NVIDIA's index "
            "(https://pypi.nvidia.com); use --check to see what would be built"
        ) from None
    return tensorrt


def environment() -> dict:
    """What else a plan depends on: TensorRT and its ONNX parser, the CUDA major version, and the GPU. Fields
    that cannot be known without TensorRT or a GPU are None (keys computed so differ from the real ones)."""
    import torch

    try:
        trt = tensorrt_module()
    except WuerstchenError:
        trt = None
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    parser = None
    if trt is not None and hasattr(trt, "get_nv_onnx_parser_version"):
        parser = str(trt.get_nv_onnx_parser_version())
    return {
        "tensorrt": getattr(trt, "__version__", None),
        "onnx_parser": parser,
        "cuda_major": int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None,
        "gpu": gpu,
    }


def graph_digest(bundle: Bundle, graph: str) -> str:
    """SHA-256 of a graph: of its file's and every external-data file's SHA-256 in the manifest, which
    `open_bundle` streams and checks. The graph is read without its weights, only to find those files."""
    relative = Path(bundle.graph(graph)["file"])
    model = onnx.load(str(bundle.path(str(relative))), load_external_data=False)
    locations = sorted({entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                        if entry.key == "location"})
    files = [str(relative), *(str(relative.parent / location) for location in locations)]
    for file in files[1:]:
        if bundle.root.resolve() not in bundle.path(file).resolve().parents:
            raise WuerstchenError(f"graph {graph}: external data {file!r} lies outside the bundle")
        if file not in bundle.manifest["files"]:
            raise WuerstchenError(f"graph {graph}: external data {file!r} is not listed in the manifest")
    listing = "\n".join(f"{file}:{bundle.manifest['files'][file]}" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def precision_recipe(precision: str, bundle_dtype: str) -> str:
    if BUNDLE_DTYPES[precision] == bundle_dtype:
        return f"as-exported-{bundle_dtype}"
    return f"{precision}+fp32-islands-v{PRECISION_RECIPE_VERSION}"


def cache_key(graph: str, digest: str, recipe: str, profiles: Sequence[Profile], settings: BuildSettings,
              env: dict) -> tuple[str, dict]:
    """SHA-256 of the canonical JSON of every input a plan depends on, and that JSON's fields."""
    fields = {
        "schema": KEY_SCHEMA,
        "graph": graph,
        "onnx_sha256": digest,
        "precision_recipe": recipe,
        "profiles": [{"bucket": p.bucket, "inputs": {n: [list(s) for s in shapes] for n, shapes in p.shapes.items()}}
                     for p in profiles],
        "builder": settings.key_fields(),
        "tensorrt": env["tensorrt"],
        "onnx_parser": env["onnx_parser"],
        "cuda_major": env["cuda_major"],
        "gpu": env["gpu"],
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest(), fields


@dataclass(frozen=True)
class PlanHeader:
    serialization: int
    version: tuple[int, int, int, int] | None  # major, minor, patch, build of the TensorRT that built it


def read_plan_header(data: bytes, name: str = "plan") -> PlanHeader:
    """The first 28 bytes of a plan, as `trtexec --getPlanVersionOnly` reads them: a friendly early check;
    deserialisation stays the authority."""
    if len(data) < 28:
        raise WuerstchenError(f"{name} is not a TensorRT plan: {len(data)} bytes, shorter than a plan header")
    tag, serialization = struct.unpack_from("<II", data)
    if tag != PLAN_TAG:
        raise WuerstchenError(f"{name} is not a TensorRT plan: it starts with {data[:4]!r}, expected b'ftrt'")
    version = tuple(data[24:28]) if serialization == 0 else None
    return PlanHeader(serialization, version)


class EngineCache:
    """Plans with their JSON records under `root`, one pair per (graph, key)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def paths(self, graph: str, key: str) -> tuple[Path, Path]:
        stem = self.root / f"{graph}-{key[:16]}"
        return stem.with_suffix(".plan"), stem.with_suffix(".json")

    def stale_reason(self, graph: str, key: str, tensorrt_version: str | None) -> str | None:
        """Why the cached plan cannot be used, or None when it can: missing, corrupt, another key, or built
        by another TensorRT. A plan is never loaded blindly."""
        plan, record = self.paths(graph, key)
        if not plan.is_file() or not record.is_file():
            return "not built yet"
        try:
            fields = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"record {record} is corrupt"
        if fields.get("key") != key:
            return f"record {record} is for another key"
        with open(plan, "rb") as f:
            start = f.read(28)  # plans are gigabytes: read the header only
        try:
            header = read_plan_header(start, str(plan))
        except WuerstchenError as error:
            return str(error)
        built_by = ".".join(map(str, header.version)) if header.version else None
        if tensorrt_version and built_by and not tensorrt_version.startswith(built_by.rsplit(".", 1)[0]):
            return f"plan {plan} was built by TensorRT {built_by}, this is {tensorrt_version}"
        return None

    def compatible(self, plan: EnginePlan) -> list[EnginePlan]:
        """Cached plans for the same graph, weights, precision, TensorRT and GPU as `plan`, whatever their
        profiles and builder settings (those of an earlier `wuerstchen build`), newest first."""
        identity = ("graph", "onnx_sha256", "precision_recipe", "tensorrt", "onnx_parser", "cuda_major", "gpu")
        found = []
        for record_path in sorted(self.root.glob(f"{plan.graph}-*.json"), key=lambda p: p.stat().st_mtime,
                                  reverse=True):
            try:
                fields = json.loads(record_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if all(fields.get(name) == plan.fields[name] for name in identity) and "key" in fields:
                profiles = [Profile(p["bucket"], {name: tuple(tuple(s) for s in shapes)
                                                  for name, shapes in p["inputs"].items()})
                            for p in fields["profiles"]]
                found.append(EnginePlan(plan.graph, plan.source, plan.onnx, profiles, fields["key"], fields))
        return found

    def store(self, graph: str, key: str, plan: bytes, record: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        plan_path, record_path = self.paths(graph, key)
        plan_path.write_bytes(plan)
        record_path.write_text(json.dumps({**record, "key": key}, indent=1) + "\n")
        return plan_path


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
        cache_file.write_bytes(bytes(timing.serialize()))
    del parser
    return bytes(plan)


@dataclass(frozen=True)
class EnginePlan:
    """What one graph's engine is built from and stored as."""

    graph: str
    source: Path  # the bundle's graph
    onnx: Path  # the graph TensorRT parses: the bundle's, or its precision-converted copy in the cache
    profiles: list[Profile]
    key: str
    fields: dict

    def prepare(self, precision: str) -> None:
        """Write the precision-converted graph if this plan parses one and it is not there yet, and check it
        as TensorRT will read it: supported operators, and one float dtype per node (strong typing)."""
        if self.onnx != self.source and not self.onnx.is_file():
            from export.lint import check_tensorrt_compatible
            from export.precision import check_strongly_typed, convert_file

            self.onnx.parent.mkdir(parents=True, exist_ok=True)
            convert_file(self.source, self.onnx, precision)
            model = onnx.load(str(self.onnx), load_external_data=False)
            check_tensorrt_compatible(model, self.graph)
            check_strongly_typed(model, self.graph)


def plan_engines(
    bundle: Bundle, settings: BuildSettings, cache: EngineCache, buckets: Sequence[Bucket] | None = None,
    graphs: Sequence[str] = GRAPHS, env: dict | None = None,
) -> list[EnginePlan]:
    """The engines a bundle needs at these settings: graph, profiles and cache key each. An fp32 bundle's
    graphs are parsed after conversion to the build precision, into the cache folder (`EnginePlan.prepare`)."""
    env = environment() if env is None else env
    config = bundle.config
    buckets = buckets or default_buckets(config, config.sizes.min, config.sizes.max)
    bundle_dtype = bundle.manifest["dtype"]
    if BUNDLE_DTYPES[settings.precision] != bundle_dtype and bundle_dtype != "float32":
        raise WuerstchenError(f"precision={settings.precision!r} needs an fp32 bundle to convert, or a bundle "
                              f"exported in that dtype; this one is {bundle_dtype}")
    recipe = precision_recipe(settings.precision, bundle_dtype)
    plans = []
    for graph in graphs:
        entry = bundle.graph(graph)
        source = bundle.path(entry["file"])
        digest = graph_digest(bundle, graph)
        onnx_path = source
        if recipe.startswith(settings.precision):
            onnx_path = cache.root / "graphs" / f"{graph}-{settings.precision}-{digest[:16]}.onnx"
        profiles = graph_profiles(config, graph, entry["inputs"], buckets, settings.max_batch)
        key, fields = cache_key(graph, digest, recipe, profiles, settings, env)
        plans.append(EnginePlan(graph, source, onnx_path, profiles, key, fields))
    return plans


def describe(plans: Sequence[EnginePlan]) -> str:
    """What would be built: every engine, its profiles (one line per input) and its cache key."""
    lines = []
    for plan in plans:
        lines.append(f"{plan.graph}  key {plan.key}  ({plan.fields['precision_recipe']}, from {plan.onnx.name})")
        for profile in plan.profiles:
            lines.append(f"  profile {profile.bucket}")
            for name, (low, opt, high) in profile.shapes.items():
                lines.append(f"    {name:<22} min {low}  opt {opt}  max {high}")
    return "\n".join(lines)


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
        plan.prepare(settings.precision)
        data = build_plan(plan.onnx, plan.profiles, settings)
        record = {**plan.fields, "build_seconds": time.perf_counter() - start, "plan_bytes": len(data)}
        paths.append(cache.store(plan.graph, plan.key, data, record))
        progress(f"built {plan.graph}: {len(data) / 1e6:.1f} MB in {record['build_seconds']:.0f} s")
    return paths


def build_command(args) -> int:
    """`wuerstchen build BUNDLE`: plan every engine; with --check print the plan, else build what is missing."""
    bundle = open_bundle(args.bundle, check_hashes=not args.check)
    settings = BuildSettings(
        precision=args.precision, max_batch=args.max_batch, optimization_level=args.opt_level,
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
