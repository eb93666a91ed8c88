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
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.harness import PROMPT, instrument_diffusers, instrument_engine, matmul_peak_tflops, measure
from benchmarks.report import BASELINES
from engine.backends import Backend
from engine.errors import WuerstchenError
from engine.precision import Precision
from engine.quantization import QuantRecipe
from engine.recipe import Recipe
from engine.runtime import Runtime, describe_quantization, quantization_scheme
from engine.shapes import check_image_size

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Options:
    """What to measure: one resolved runtime per backend and quantization scheme (one source, device and
    precision for all of them, as `engine.cli.resolve_flags` resolves the command line), the workloads and the
    baselines."""

    runtimes: tuple[Runtime, ...]
    sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    recipe: Recipe
    warmup: int
    runs: int
    baselines: tuple[str, ...] = ()
    cold_start: bool = True

    @property
    def device(self) -> torch.device:
        return self.runtimes[0].device

    @property
    def precision(self) -> Precision:
        return self.runtimes[0].precision


def target_name(runtime: Runtime) -> str:
    """A target of this engine as the records name it: its backend, and its scheme when quantized
    ("torch-fast fp8")."""
    quantization = runtime.quantization
    if quantization is None:
        return runtime.backend.value
    return f"{runtime.backend.value} {quantization_scheme(quantization).value}"


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


def build_engine(runtime: Runtime):
    from engine import WuerstchenPipeline

    pipe = WuerstchenPipeline.load(runtime)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_diffusers(options: Options):
    """diffusers' pipeline, and this engine's on each backend, on one set of weights."""
    from diffusers.utils import logging

    from benchmarks.reference import diffusers_pipeline, engine_pipeline, load_diffusers, random_reference
    from engine.text import byte_level_tokenizer

    logging.set_verbosity_error()  # its deprecation and dtype-cast notices would bury the report
    source, device, dtype = options.runtimes[0].source, options.device, options.precision.torch_dtype
    if source.kind == "folders":
        engines = {target_name(runtime): build_engine(runtime) for runtime in options.runtimes}
        return engines, load_diffusers(source.prior, source.decoder, device, dtype)
    config = source.read_config()
    modules = random_reference(config, device=device, dtype=dtype)
    tokenizer = byte_level_tokenizer()
    engines = {target_name(runtime): engine_pipeline(modules, tokenizer, config, runtime)
               for runtime in options.runtimes}
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
    runtimes = {target_name(runtime): runtime for runtime in options.runtimes}
    runtime = runtimes.get(target, options.runtimes[0])
    quantization = runtime.quantization if target in runtimes else None
    spec = {"target": target if target in BASELINES else runtime.backend.value,
            "source": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(runtime.source).items()},
            "device": str(options.device), "dtype": options.precision.value, "height": height, "width": width,
            "batch": batch, "recipe": asdict(options.recipe),
            # a scheme is scanned in the child too (part of its cold start); a recipe is applied as it is
            "quantize": quantization.to_dict() if isinstance(quantization, QuantRecipe) else quantization}
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
    """target name (a backend of this engine, or a baseline) → (pipeline, its stage instrumentation or None
    (see `benchmarks.harness.measure`), a context to run it in)."""
    if options.baselines:
        engines, reference = build_diffusers(options)
    else:
        engines = {target_name(runtime): build_engine(runtime) for runtime in options.runtimes}
    targets = {name: engine_target(engine) for name, engine in engines.items()}
    if "diffusers" in options.baselines:
        targets["diffusers"] = (reference, instrument_diffusers, contextlib.nullcontext)
    if "diffusers-compile" in options.baselines:  # compiled graphs cannot carry per-stage timers
        targets["diffusers-compile"] = (reference, None, lambda: compiled(reference))
    return targets


def _call(recipe: Recipe, height: int, width: int, batch: int) -> dict:
    """The keyword arguments of one measured call, the same for this engine and diffusers."""
    return {**replace(recipe, height=height, width=width).call(batch), "prompt": PROMPT, "output_type": "pt"}


def _measure_target(pipe, instrument, setup, call: dict, options: Options, batch: int) -> dict:
    """One target at one workload: the first call (compilation, lazy init) timed on its own, then
    `measure` after the remaining warm-up."""
    def generate(target):
        return target(**call, generator=torch.Generator().manual_seed(0))

    with setup(), torch.no_grad():
        start = time.perf_counter()
        generate(pipe)
        if options.device.type == "cuda":
            torch.cuda.synchronize(options.device)
        first_call_s = time.perf_counter() - start
        found = measure(pipe, generate, instrument, options.device, options.warmup - 1, options.runs)
    return found.summary(batch) | {"first_call_s": first_call_s}


def denoiser_weights_gb(pipe) -> float | None:
    """The prior's and decoder's weights in memory, GB (what --quantize shrinks), of this engine's PyTorch stages
    or of diffusers' pipeline; None on a bundle's backends."""
    from engine.models.quantized import weight_bytes

    if hasattr(pipe, "prior_pipe"):  # diffusers
        models = (pipe.prior_pipe.prior, pipe.decoder_pipe.decoder)
    else:
        models = (getattr(pipe.stages, "prior", None), getattr(pipe.stages, "decoder", None))
    if not all(isinstance(model, torch.nn.Module) for model in models):
        return None
    return sum(weight_bytes(model) for model in models) / 1e9


def engine_target(pipe) -> tuple:
    """A target entry for one of this engine's pipelines (see `_targets`)."""
    return pipe, instrument_engine, contextlib.nullcontext


def run(options: Options, progress=print, targets: dict | None = None) -> list[dict]:
    """Measure every target at every (size, batch); one record each, with provenance and workload. The
    targets are built from `options` unless given (name → `engine_target(pipe)` or the like)."""
    targets = targets or _targets(options)
    config = next(iter(targets.values()))[0].config
    peak = matmul_peak_tflops(options.device, options.precision.torch_dtype)
    origin = provenance(options.device)
    records = []
    for height, width in options.sizes:
        for batch in options.batches:
            call = _call(options.recipe, height, width, batch)
            flops = _flops(config, options.recipe, height, width, batch)
            measured = {}
            for target, (pipe, instrument, setup) in targets.items():
                progress(f"measuring {target} at {height}×{width}, batch {batch} …")
                summary = _measure_target(pipe, instrument, setup, call, options, batch)
                summary["tflops"] = flops["request"]["total"] / summary["latency_s"]["median"] / 1e12
                summary["fraction_of_matmul_peak"] = summary["tflops"] / peak
                summary["weights_gb"] = denoiser_weights_gb(pipe)
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
                # what the engine runs (given targets too); diffusers: the run's source, device and precision
                runtime = getattr(targets[target][0], "runtime", None) or options.runtimes[0]
                quantization = None if target in BASELINES else runtime.quantization
                recipe = asdict(options.recipe) | {"prior_evaluations": options.recipe.prior_evaluations}
                records.append({
                    "provenance": origin,
                    "workload": {"target": target, "source": runtime.source.describe(),
                                 "backend": "torch" if target in BASELINES else runtime.backend.value,
                                 "dtype": runtime.precision.value,
                                 "quantization": quantization and describe_quantization(quantization),
                                 # the recipe itself (layers and scan), as a recipe file holds it
                                 "quantization_recipe": quantization.to_dict()
                                 if isinstance(quantization, QuantRecipe) else None,
                                 "height": height, "width": width,
                                 "batch": batch, "warmup": options.warmup, "runs": options.runs,
                                 "recipe": {k: v for k, v in recipe.items() if k not in ("height", "width")}},
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
    """Check the command line, one field at a time, and turn it into `Options`: the source, device and
    precision resolved for each backend and --quantize scheme as every command resolves them
    (`engine.cli.resolve_flags`)."""
    from engine.cli import resolve_flags

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
    if args.bundle and args.baseline:
        raise WuerstchenError("--baseline needs the weights: pass --preset or --prior/--decoder, not --bundle")
    runtimes = tuple(resolve_flags(args, backend, scheme) for backend in dict.fromkeys(args.backend or [None])
                     for scheme in dict.fromkeys(args.quantize))
    names = [target_name(runtime) for runtime in runtimes]
    if len(set(names)) < len(names):
        raise WuerstchenError(f"--quantize {' '.join(args.quantize)}: expected each scheme once (two recipes of "
                              "one scheme are two runs)")
    if len({(runtime.device, runtime.precision) for runtime in runtimes}) > 1:
        found = ", ".join(f"{name} {r.device} {r.precision.value}" for name, r in zip(names, runtimes, strict=True))
        flags = ([f"--backend {' '.join(args.backend)}"] if args.backend else []) + (
            [f"--quantize {' '.join(args.quantize)}"] if args.quantize != ["none"] else [])
        raise WuerstchenError(f"{' '.join(flags)}: these run on different devices or precisions ({found}); pass "
                              "--dtype, or bench them in separate runs")
    config = runtimes[0].source.read_config()
    sizes = tuple(_size(text) for text in args.sizes)
    for text, (height, width) in zip(args.sizes, sizes, strict=True):
        try:
            check_image_size(config, height, width)
        except WuerstchenError as error:
            raise WuerstchenError(f"--sizes {text}: {error}") from None
    recipe = Recipe(prior_steps=args.prior_steps, prior_guidance=args.prior_guidance,
                    decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance)
    return Options(runtimes=runtimes, sizes=sizes, batches=tuple(args.batch), recipe=recipe, warmup=args.warmup,
                   runs=args.runs, baselines=tuple(args.baseline), cold_start=not args.no_cold_start)


def load_command(args, options: Options) -> int:
    """`wuerstchen bench --load`: the scheduler under load against one request at a time (`benchmarks.load`)."""
    from benchmarks import load
    from engine.files import write_atomically

    if len(options.runtimes) > 1 or options.baselines:
        raise WuerstchenError("--load measures one backend, one --quantize and no baseline: the sequential run is "
                              "its baseline")
    for name in ("requests", *(["rate"] if args.rate is not None else [])):
        if not getattr(args, name) > 0:
            raise WuerstchenError(f"--{name} {getattr(args, name)}: expected a positive number")
    if any(c < 1 for c in args.concurrency):
        raise WuerstchenError(f"--concurrency {' '.join(map(str, args.concurrency))}: expected positive integers")
    runtime = options.runtimes[0]
    mix = load.read_mix(args.mix) if args.mix else load.default_mix(list(options.sizes), options.recipe)
    config = runtime.source.read_config()
    for i, workload in enumerate(mix):
        try:
            check_image_size(config, workload.height, workload.width)
        except WuerstchenError as error:
            raise WuerstchenError(f"--mix entry {i}: {error}") from None
    pipe = load.HttpPipeline(args.url) if args.url else build_engine(runtime)
    runtime = pipe.runtime  # with --url, what the server runs
    origin = provenance(runtime.device)
    rows = load.run(pipe, mix, list(args.concurrency), args.requests, args.rate,
                    progress=lambda line: print(line, file=sys.stderr))
    pipe.close()
    header = (f"{origin['device']} · torch {origin['versions']['torch']} · {origin['date']} · "
              f"{runtime.describe()}\nmix: {load.describe_mix(mix)}")
    print(load.table(rows, header))
    if args.json:
        write_atomically(args.json, (json.dumps(load.record(rows, mix, origin, runtime), indent=1) + "\n").encode())
    return 0


def quality_command(args, options: Options) -> int:
    """`wuerstchen bench --quantize ... --quality`: what each scheme costs in quality against the unquantized
    model in the same precision (`benchmarks.quant_quality`)."""
    from benchmarks import quant_quality

    quantized = [runtime for runtime in options.runtimes if runtime.quantization is not None]
    if not quantized:
        raise WuerstchenError(f"--quantize {' '.join(args.quantize)}: --quality measures quantized models against "
                              "the unquantized one; expected fp8, int8 or a recipe file")
    other = [runtime.backend.value for runtime in options.runtimes if runtime.backend is not Backend.TORCH]
    if other or options.baselines:
        found = f"--backend {' '.join(dict.fromkeys(other))}" if other else f"--baseline {' '.join(options.baselines)}"
        raise WuerstchenError(f"{found}: --quality runs on the torch backend against its own unquantized model (the "
                              "fast backends equal it, tested)")
    if len(options.sizes) != 1:
        raise WuerstchenError(f"--sizes {' '.join(args.sizes)}: --quality measures at one size")
    prompts, seeds = quant_quality.workload(args.prompts, args.seeds)
    (height, width), = options.sizes
    report = quant_quality.measure(replace(quantized[0], quantization=None),
                                   [runtime.quantization for runtime in quantized], height, width, prompts, seeds,
                                   progress=lambda line: print(line, file=sys.stderr))
    print(quant_quality.table(report))
    if args.json:
        quant_quality.write_report(report, args.json)
    return 0


def check_outputs(args) -> None:
    """Every file the run will write, checked before anything is built or measured: a run of many minutes must
    not end in a traceback that loses its results."""
    from benchmarks.report import check_csv, check_output, check_plot

    outputs = {flag: getattr(args, flag) for flag in ("json", "csv", "plot") if getattr(args, flag)}
    unwritten = [flag for flag in outputs if flag != "json"]
    if args.load and args.quality:
        raise WuerstchenError("--load and --quality are two measurements: pass one of them")
    mode = "--load" if args.load else "--quality" if args.quality else None
    if mode and unwritten:
        raise WuerstchenError(f"--{unwritten[0]} does not apply with {mode}: it writes --json only")
    if args.json:
        check_output("--json", args.json)
    if args.csv:
        check_csv(args.csv)
    if args.plot:
        check_plot(args.plot)
    if len({Path(value).resolve() for value in outputs.values()}) < len(outputs):
        raise WuerstchenError(f"{' '.join(f'--{flag} {value!r}' for flag, value in outputs.items())}: expected a "
                              "different file for each")


def command(args) -> int:
    """`wuerstchen bench`: check the outputs, measure, print the table, write what was asked for."""
    from benchmarks.report import append_csv, plot, table, write_json

    check_outputs(args)
    options = options_from_args(args)
    if args.load:
        return load_command(args, options)
    if args.quality:
        return quality_command(args, options)
    records = run(options, progress=lambda line: print(line, file=sys.stderr))
    print(table(records))
    if args.json:
        write_json(records, args.json)
    if args.csv:
        append_csv(records, args.csv)
    if args.plot:
        plot(records, args.plot)
    return 0
