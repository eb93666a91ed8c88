"""The TensorRT engine cache as the runtime reads it: which plan each graph of a bundle needs, its key, and
whether a cached plan can be used. Building plans is `export.tensorrt`'s job; this module only names them.

A plan is valid for one graph (its file and weights, by the manifest's SHA-256), one precision recipe, one
set of optimization profiles, the builder settings, the TensorRT and ONNX-parser versions, the CUDA major
version and the GPU. All of it goes into the key. TensorRT itself is imported only where it is needed, so
that everything here runs without it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.bundle import GRAPHS, Bundle
from engine.errors import WuerstchenError
from engine.files import write_atomically
from engine.precision import Precision
from engine.profiles import Bucket, Profile, default_buckets, graph_profiles

PRECISION_RECIPE_VERSION = 1  # bump when export.precision changes what it keeps in fp32
KEY_SCHEMA = 2  # 2: a graph's digest covers the external-data files its manifest entry lists
PLAN_TAG = 0x74727466  # "ftrt": the first four bytes of every TensorRT plan


@dataclass(frozen=True)
class BuildSettings:
    """How plans are built. Flags are TensorRT `BuilderFlag` names, never numbers (TensorRT 11 renumbered them)."""

    precision: Precision = Precision.BF16
    max_batch: int = 4
    optimization_level: int = 3
    workspace_bytes: int | None = 8 << 30  # the builder may take all device memory otherwise
    tactic_dram_bytes: int | None = None
    flags: tuple[str, ...] = ()
    hardware_compatibility: str = "NONE"
    timing_cache: str | None = field(default=None, compare=False)  # a path: metadata, not part of the key

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision.parse(self.precision, field="precision"))
        if not all(isinstance(flag, str) and flag.isupper() for flag in self.flags):
            raise WuerstchenError(f"flags={self.flags!r}: expected BuilderFlag names such as 'TF32', never numbers")
        if self.max_batch < 1:
            raise WuerstchenError(f"max_batch={self.max_batch}: expected a positive integer")
        if not 0 <= self.optimization_level <= 5:
            raise WuerstchenError(f"optimization_level={self.optimization_level}: expected 0 to 5")

    def key_fields(self) -> dict:
        fields = asdict(self)
        del fields["timing_cache"]
        fields["precision"] = self.precision.value
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
    """SHA-256 of a graph: of the manifest's SHA-256 of its file and of every external-data file its entry
    lists (which `open_bundle` streams and checks). That the graph reads no other file is checked with ONNX
    when a plan is built (`export.tensorrt.prepare_graph`)."""
    files = bundle.graph_files(graph)
    for file in files:
        if bundle.root.resolve() not in bundle.path(file).resolve().parents:
            raise WuerstchenError(f"graph {graph}: file {file!r} lies outside the bundle")
        if file not in bundle.manifest["files"]:
            raise WuerstchenError(f"graph {graph}: file {file!r} is not listed in the manifest's files")
    listing = "\n".join(f"{file}:{bundle.manifest['files'][file]}" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def precision_recipe(precision: Precision, exported: Precision) -> str:
    if precision is exported:
        return f"as-exported-{exported.onnx_name}"
    return f"{precision.value}+fp32-islands-v{PRECISION_RECIPE_VERSION}"


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


@dataclass(frozen=True)
class EnginePlan:
    """What one graph's engine is built from and stored as."""

    graph: str
    source: Path  # the bundle's graph
    data: tuple[Path, ...]  # the external-data files the bundle's manifest lists for it
    onnx: Path  # the graph TensorRT parses: the bundle's, or its precision-converted copy in the cache
    profiles: list[Profile]
    key: str
    fields: dict


class EngineCache:
    """Plans with their JSON records under `root`, one pair per (graph, key)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def paths(self, graph: str, key: str) -> tuple[Path, Path]:
        stem = self.root / f"{graph}-{key[:16]}"
        return stem.with_suffix(".plan"), stem.with_suffix(".json")

    def stale_reason(self, graph: str, key: str, tensorrt_version: str | None) -> str | None:
        """Why the cached plan cannot be used, or None when it can: missing, corrupt, another key, cut short, or
        built by another TensorRT. A plan is never loaded blindly (and `read_plan` checks its hash)."""
        plan, record = self.paths(graph, key)
        if not plan.is_file() or not record.is_file():
            return "not built yet"
        fields = _read_record(record)
        if fields is None:
            return f"record {record} is corrupt"
        if fields["key"] != key:
            return f"record {record} is for another key"
        if plan.stat().st_size != fields["plan_bytes"]:
            return f"plan {plan} holds {plan.stat().st_size} bytes, its record says {fields['plan_bytes']}"
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

    def read_plan(self, graph: str, key: str) -> bytes:
        """A plan's bytes, checked against the SHA-256 its record holds: TensorRT deserializes what it is given,
        and a damaged plan may crash the process instead of failing."""
        plan, record = self.paths(graph, key)
        data = plan.read_bytes()
        fields = _read_record(record)
        if fields is None or hashlib.sha256(data).hexdigest() != fields["plan_sha256"]:
            raise WuerstchenError(f"engine {plan} was altered: its SHA-256 differs from its record's; rebuild it "
                                  "with `wuerstchen build`")
        return data

    def compatible(self, plan: EnginePlan) -> list[EnginePlan]:
        """Cached plans for the same graph, weights, precision, TensorRT and GPU as `plan`, whatever their
        profiles and builder settings (those of an earlier `wuerstchen build`), newest first. Records that do
        not parse are skipped."""
        identity = ("graph", "onnx_sha256", "precision_recipe", "tensorrt", "onnx_parser", "cuda_major", "gpu")
        found = []
        for record_path in sorted(self.root.glob(f"{plan.graph}-*.json"), key=lambda p: p.stat().st_mtime,
                                  reverse=True):
            fields = _read_record(record_path)
            if fields is None or not all(fields.get(name) == plan.fields[name] for name in identity):
                continue
            try:
                profiles = [Profile(p["bucket"], {name: tuple(tuple(s) for s in shapes)
                                                  for name, shapes in p["inputs"].items()})
                            for p in fields["profiles"]]
            except (KeyError, TypeError, AttributeError, ValueError, WuerstchenError):
                continue
            found.append(EnginePlan(plan.graph, plan.source, plan.data, plan.onnx, profiles, fields["key"], fields))
        return found

    def store(self, graph: str, key: str, plan: bytes, record: dict) -> Path:
        """Write a plan, then its record with the plan's size and hash, each atomically: a reader sees a whole
        plan or none, and a record only beside the plan it describes."""
        self.root.mkdir(parents=True, exist_ok=True)
        plan_path, record_path = self.paths(graph, key)
        write_atomically(plan_path, plan)
        record = {**record, "key": key, "plan_bytes": len(plan), "plan_sha256": hashlib.sha256(plan).hexdigest()}
        write_atomically(record_path, (json.dumps(record, indent=1) + "\n").encode())
        return plan_path


def _read_record(path: Path) -> dict | None:
    """A plan's record, or None where it is not one: JSON naming its key, the plan's size and hash."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    valid = (isinstance(fields, dict) and isinstance(fields.get("key"), str)
             and type(fields.get("plan_bytes")) is int and isinstance(fields.get("plan_sha256"), str))
    return fields if valid else None


def plan_engines(
    bundle: Bundle, settings: BuildSettings, cache: EngineCache, buckets: Sequence[Bucket] | None = None,
    graphs: Sequence[str] = GRAPHS, env: dict | None = None,
) -> list[EnginePlan]:
    """The engines a bundle needs at these settings: graph, profiles and cache key each. An fp32 bundle's
    graphs are parsed after conversion to the build precision, into the cache folder (made at build time by
    `export.tensorrt.prepare_graph`)."""
    env = environment() if env is None else env
    config = bundle.config
    buckets = buckets or default_buckets(config, config.sizes.min, config.sizes.max)
    exported = bundle.precision
    if settings.precision is not exported and exported is not Precision.FP32:
        raise WuerstchenError(f"precision={settings.precision.value!r} needs an fp32 bundle to convert, or a bundle "
                              f"exported in that precision; this one is {exported.value}")
    recipe = precision_recipe(settings.precision, exported)
    plans = []
    for graph in graphs:
        entry = bundle.graph(graph)
        source = bundle.path(entry["file"])
        digest = graph_digest(bundle, graph)
        onnx_path = source
        if settings.precision is not exported:
            onnx_path = cache.root / "graphs" / f"{graph}-{settings.precision.value}-{digest[:16]}.onnx"
        profiles = graph_profiles(config, graph, entry["inputs"], buckets, settings.max_batch)
        key, fields = cache_key(graph, digest, recipe, profiles, settings, env)
        data = tuple(bundle.path(file) for file in bundle.graph_files(graph)[1:])
        plans.append(EnginePlan(graph, source, data, onnx_path, profiles, key, fields))
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
