"""`wuerstchen bench`: this engine, and optionally diffusers in the same process on the same weights, over
sizes and batch sizes, with every record carrying its provenance."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.harness import Recipe, instrument_diffusers, instrument_engine, matmul_peak_tflops, measure
from engine.backends import Backend
from engine.device import DTYPE_NAMES
from engine.errors import WuerstchenError

BASELINES = ("diffusers", "diffusers-compile")
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    """Where the weights come from: a preset's random weights, diffusers folders, or a bundle."""

    preset: str | None = None
    prior: str | None = None
    decoder: str | None = None
    bundle: str | None = None

    def describe(self) -> str:
        if self.bundle:
            return f"bundle {self.bundle}"
        if self.prior:
            return f"{self.prior} + {self.decoder}"
        return f"preset {self.preset} (random weights)"


@dataclass(frozen=True)
class Options:
    source: Source
    backends: tuple[Backend, ...]
    device: torch.device
    dtype: torch.dtype
    sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    recipe: Recipe
    warmup: int
    runs: int
    baselines: tuple[str, ...] = ()
    cold_start: bool = True


def provenance(device: torch.device) -> dict:
    """Where and with what a record was measured."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def command(*argv: str) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPOSITORY,
                                  timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    cuda = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}, {os.cpu_count()} cores",
        "driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if cuda else None,
        "cuda": torch.version.cuda,
        "versions": {name: version(name) for name in ("torch", "triton", "onnxruntime", "onnxruntime-gpu",
                                                     "diffusers", "transformers", "wuerstchen-engine")}
        | {"python": platform.python_version()},
        "git_commit": command("git", "rev-parse", "HEAD"),
    }


def build_engine(options: Options, backend: Backend):
    from engine import WuerstchenPipeline

    source = options.source
    if source.bundle:
        providers = ["CPUExecutionProvider"] if options.device.type == "cpu" else None
        pipe = WuerstchenPipeline.from_bundle(source.bundle, backend, providers=providers,
                                              precision=DTYPE_NAMES[options.dtype])
    elif source.prior:
        pipe = WuerstchenPipeline.from_pretrained(source.prior, source.decoder, options.device, options.dtype,
                                                  backend=backend)
    else:
        pipe = WuerstchenPipeline.from_preset(source.preset, options.device, options.dtype, backend=backend)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_diffusers(options: Options):
    """diffusers' pipeline, and this engine's on each backend, on one set of weights."""
    from diffusers.utils import logging

    from benchmarks.reference import diffusers_pipeline, engine_pipeline, load_diffusers, random_reference
    from engine import preset
    from engine.text import byte_level_tokenizer

    logging.set_verbosity_error()  # its deprecation and dtype-cast notices would bury the report
    source = options.source
    if source.prior:
        engines = {backend: build_engine(options, backend) for backend in options.backends}
        return engines, load_diffusers(source.prior, source.decoder, options.device, options.dtype)
    config = preset(source.preset)
    modules = random_reference(config, device=options.device, dtype=options.dtype)
    tokenizer = byte_level_tokenizer()
    engines = {backend: engine_pipeline(modules, tokenizer, config, options.device, options.dtype)._use_backend(
        backend) for backend in options.backends}
    return engines, diffusers_pipeline(modules, tokenizer)


@contextlib.contextmanager
def compiled(pipe) -> Iterator[None]:
    """diffusers' documented speed-up: prior and decoder under torch.compile(reduce-overhead, fullgraph)."""
    prior, decoder = pipe.prior_pipe.prior, pipe.decoder_pipe.decoder
    pipe.prior_pipe.prior = torch.compile(prior, mode="reduce-overhead", fullgraph=True)
    pipe.decoder_pipe.decoder = torch.compile(decoder, mode="reduce-overhead", fullgraph=True)
    try:
        yield
    finally:
        pipe.prior_pipe.prior, pipe.decoder_pipe.decoder = prior, decoder


def cold_start_seconds(options: Options, target: str, height: int, width: int, batch: int) -> float:
    """Seconds from starting a fresh Python process to its first image (imports, loading, one call)."""
    spec = {"target": target, "source": asdict(options.source), "device": str(options.device),
            "dtype": DTYPE_NAMES[options.dtype], "height": height, "width": width, "batch": batch,
            "recipe": asdict(options.recipe)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.cold_start", json.dumps(spec)], cwd=REPOSITORY,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == "first image":
            seconds = time.perf_counter() - start
            child.wait()
            return seconds
    raise WuerstchenError(f"cold start of {target} failed: {child.stderr.read().strip().splitlines()[-1:]}")


def _flops(config, recipe: Recipe, height: int, width: int, batch: int) -> dict:
    """FLOPs of the whole call (one prompt, `batch` images) and of one call of each timed step."""
    from benchmarks.flops import (
        decoder_step_flops,
        model_shapes,
        prior_step_flops,
        request_flops,
        vqgan_decode_flops,
    )
    from engine.shapes import image_shapes

    prior_guided, decoder_guided = recipe.prior_guidance > 1, recipe.decoder_guidance > 1
    shapes = image_shapes(config, height, width, batch)
    request = request_flops(config, shapes, recipe.prior_evaluations, recipe.decoder_steps, prior_guided,
                            decoder_guided, prompts=1)
    per_call = {
        "prior_step": prior_step_flops(config, model_shapes(shapes, prior_guided)),
        "decoder_step": decoder_step_flops(config, model_shapes(shapes, decoder_guided)),
        "vqgan_decode": vqgan_decode_flops(config, shapes),
    }
    return {"request": request, "per_call": per_call}


def _targets(options: Options) -> dict:
    """target name (a backend of this engine, or a baseline) → (pipeline, its stage instrumentation or None,
    a context to run it in)."""
    if options.baselines:
        engines, reference = build_diffusers(options)
    else:
        engines = {backend: build_engine(options, backend) for backend in options.backends}
    targets = {backend.value: engine_target(engine) for backend, engine in engines.items()}
    if "diffusers" in options.baselines:
        targets["diffusers"] = (reference, lambda timer: instrument_diffusers(reference, timer),
                                contextlib.nullcontext)
    if "diffusers-compile" in options.baselines:  # compiled graphs cannot carry per-stage timers
        targets["diffusers-compile"] = (reference, None, lambda: compiled(reference))
    return targets


def _measure_target(pipe, instrument, setup, call: dict, options: Options, batch: int) -> dict:
    """One target at one workload: the first call (compilation, lazy init) timed on its own, then
    `measure` after the remaining warm-up."""
    def generate():
        return pipe(**call, generator=torch.Generator().manual_seed(0))

    with setup(), torch.no_grad():
        start = time.perf_counter()
        generate()
        if options.device.type == "cuda":
            torch.cuda.synchronize(options.device)
        first_call_s = time.perf_counter() - start
        found = measure(generate, instrument, options.device, options.warmup - 1, options.runs)
    return found.summary(batch) | {"first_call_s": first_call_s}


def engine_target(pipe) -> tuple:
    """A target entry for one of this engine's pipelines (see `_targets`)."""
    return pipe, lambda timer: instrument_engine(pipe, timer), contextlib.nullcontext


def run(options: Options, progress=print, targets: dict | None = None) -> list[dict]:
    """Measure every target at every (size, batch); one record each, with provenance and workload. The
    targets are built from `options` unless given (name → `engine_target(pipe)` or the like)."""
    targets = targets or _targets(options)
    config = next(iter(targets.values()))[0].config
    peak = matmul_peak_tflops(options.device, options.dtype)
    origin = provenance(options.device)
    records = []
    for height, width in options.sizes:
        for batch in options.batches:
            call = options.recipe.call(height, width, batch)
            flops = _flops(config, options.recipe, height, width, batch)
            measured = {}
            for target, (pipe, instrument, setup) in targets.items():
                progress(f"measuring {target} at {height}×{width}, batch {batch} …")
                summary = _measure_target(pipe, instrument, setup, call, options, batch)
                summary["tflops"] = flops["request"]["total"] / summary["latency_s"]["median"] / 1e12
                summary["fraction_of_matmul_peak"] = summary["tflops"] / peak
                for stage, stage_flops in flops["per_call"].items():
                    if stage in summary["stages_ms"]:
                        stage_ms = summary["stages_ms"][stage]
                        stage_ms["tflops"] = stage_flops / (stage_ms["median"] / 1e3) / 1e12
                if options.cold_start and (height, width, batch) == (*options.sizes[0], options.batches[0]):
                    summary["cold_start_s"] = cold_start_seconds(options, target, height, width, batch)
                measured[target] = summary
            for target, summary in measured.items():
                summary["speedup_vs"] = {other: result["latency_s"]["median"] / summary["latency_s"]["median"]
                                         for other, result in measured.items() if other != target}
                records.append({
                    "provenance": origin,
                    "workload": {"target": target, "source": options.source.describe(),
                                 "backend": "torch" if target in BASELINES else target,
                                 "dtype": DTYPE_NAMES[options.dtype], "height": height, "width": width,
                                 "batch": batch, "warmup": options.warmup, "runs": options.runs,
                                 "recipe": asdict(options.recipe) | {
                                     "prior_evaluations": options.recipe.prior_evaluations}},
                    "matmul_peak_tflops": peak,
                    "flops": flops,
                    "results": summary,
                })
    return records


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise WuerstchenError(f"--sizes {text!r}: expected a side such as 1024 or HEIGHTxWIDTH such as 768x1280") \
            from None


def options_from_args(args) -> Options:
    """Check the command line, one field at a time, and turn it into `Options`."""
    from engine.bundle import open_bundle
    from engine.config import preset
    from engine.device import resolve_device, resolve_dtype
    from engine.pipeline import read_config
    from engine.shapes import check_image_size

    for name in ("runs", "decoder_steps"):
        if getattr(args, name) < 1:
            raise WuerstchenError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.prior_steps is not None and args.prior_steps < 1:
        raise WuerstchenError(f"--prior-steps {args.prior_steps}: expected a positive integer")
    if args.warmup < 1:
        raise WuerstchenError(f"--warmup {args.warmup}: expected at least 1 (the first call is never timed)")
    if any(batch < 1 for batch in args.batch):
        raise WuerstchenError(f"--batch {' '.join(map(str, args.batch))}: expected positive integers")
    unknown = [b for b in args.baseline if b not in BASELINES]
    if unknown:
        raise WuerstchenError(f"--baseline {' '.join(unknown)}: expected any of {', '.join(BASELINES)}")
    if (args.prior is None) != (args.decoder is None):
        raise WuerstchenError("--prior and --decoder go together: pass both folders, a --bundle or a --preset")
    if sum(x is not None for x in (args.preset, args.prior, args.bundle)) > 1:
        raise WuerstchenError("--preset, --prior/--decoder and --bundle are alternatives: pass one")
    source = Source(preset=args.preset or ("wuerstchen-v2" if not (args.prior or args.bundle) else None),
                    prior=args.prior, decoder=args.decoder, bundle=args.bundle)
    backends = tuple(dict.fromkeys(Backend.parse(b) for b in args.backend or
                                   [Backend.ONNXRUNTIME if args.bundle else Backend.TORCH]))
    for backend in backends:
        if backend.runs_bundles != bool(args.bundle):
            raise WuerstchenError(f"--backend {backend.value}: onnxruntime and tensorrt run a --bundle, the torch "
                                  "backends a preset or folders")
    if args.bundle and args.baseline:
        raise WuerstchenError("--baseline needs the weights: pass --preset or --prior/--decoder, not --bundle")
    if source.bundle:
        config = open_bundle(source.bundle, check_hashes=False).config
    elif source.prior:
        config = read_config(source.prior, source.decoder)
    else:
        config = preset(source.preset)
    sizes = tuple(_size(text) for text in args.sizes)
    for text, (height, width) in zip(args.sizes, sizes, strict=True):
        try:
            check_image_size(config, height, width)
        except WuerstchenError as error:
            raise WuerstchenError(f"--sizes {text}: {error}") from None
    device = resolve_device(args.device)
    return Options(source=source, backends=backends, device=device, dtype=resolve_dtype(args.dtype, device),
                   sizes=sizes, batches=tuple(args.batch), recipe=Recipe(args.prior_steps, args.prior_guidance,
                                                                          args.decoder_steps, args.decoder_guidance),
                   warmup=args.warmup, runs=args.runs, baselines=tuple(args.baseline),
                   cold_start=not args.no_cold_start)


def command(args) -> int:
    """`wuerstchen bench`: measure, print the table, write what was asked for."""
    from benchmarks.report import append_csv, plot, table, write_json

    options = options_from_args(args)
    records = run(options, progress=lambda line: print(line, file=sys.stderr))
    print(table(records))
    if args.json:
        write_json(records, args.json)
    if args.csv:
        append_csv(records, args.csv)
    if args.plot:
        plot(records, args.plot)
    return 0
