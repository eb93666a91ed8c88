"""`wuerstchen export` and `wuerstchen build`, registered as entry points of `wuerstchen.commands` (setup.py):
the build tools add their commands to the runtime's command line, which never imports them. Every
`wuerstchen` invocation imports this module to build its parser, so it imports nothing heavy: the tools are
imported by the commands that run them."""

from __future__ import annotations

import argparse
import dataclasses
import time

from engine.cli import model_flags, resolve_flags
from engine.errors import WuerstchenError
from engine.precision import Precision


def add_export(commands) -> None:
    exp = commands.add_parser("export", help="export every stage to ONNX as one bundle",
                              description="Export every stage to ONNX as one bundle folder. Without "
                                          "--prior/--decoder, exports the tiny demo model.")
    exp.add_argument("--out", required=True, metavar="BUNDLE", help="a new (or empty) folder for the bundle")
    model_flags(exp, default_preset="tiny", bundles=False, backends="none", default_device="cpu",
                default_dtype="fp32")
    exp.add_argument("--min-size", type=int, default=256, help="smallest image side served (default 256)")
    exp.add_argument("--max-size", type=int, default=1536, help="largest image side served (default 1536)")
    exp.add_argument("--verify", action="store_true",
                     help="compare every graph in ONNX Runtime with PyTorch at several sizes and batch sizes")
    exp.set_defaults(run=export)


def export_runtime(args: argparse.Namespace):
    """What the flags resolve to, on the `torch` backend: an export traces the plain PyTorch modules."""
    return resolve_flags(args, backend="torch")


def export(args: argparse.Namespace) -> int:
    """Load the source as `export_runtime` resolves it, and write its bundle."""
    from engine.pipeline import WuerstchenPipeline
    from engine.precision import Quantization

    try:
        from export.bundle import check_target, export_bundle, folder_sources
        from export.verify import tolerances, verify_bundle
    except ImportError as error:
        raise WuerstchenError(f"export needs the ONNX tools ({error.name} is missing): pip install -e '.[onnx]'") \
            from None
    runtime = export_runtime(args)
    source = runtime.source
    check_target(source.read_config(), args.out, args.min_size, args.max_size)  # before loading gigabytes
    # The graphs are traced from the unquantized models, with the recipe (scanned here for a scheme) beside them.
    pipe = WuerstchenPipeline.load(dataclasses.replace(runtime, quantization=None))
    recipe = runtime.quantization
    if isinstance(recipe, Quantization):
        from engine.backends.pytorch import SCAN_SIZE
        from engine.quantization import scan

        stages = pipe.stages
        recipe = scan(pipe.config, stages.prior_text, stages.prior, stages.decoder_text, stages.decoder, recipe,
                      SCAN_SIZE, progress=lambda line: print(f"scan {line}"))
    sources = folder_sources(source.prior, source.decoder) if source.kind == "folders" else \
        {"preset": source.preset, "seed": source.seed}
    start = time.perf_counter()
    manifest = export_bundle(pipe, args.out, sources, min_size=args.min_size, max_size=args.max_size,
                             quantization=recipe)
    print(f"wrote bundle {args.out} in {time.perf_counter() - start:.1f} s")
    if not args.verify:
        return 0
    worst = verify_bundle(pipe, args.out)
    limits = tolerances(runtime.precision, worst, manifest.get("quantization"))
    print("worst relative error, ONNX Runtime against PyTorch:")
    for name, error in worst.items():
        print(f"  {name:<18} {error:.2e} (tolerance {limits[name]:g}){'' if error <= limits[name] else '  FAILED'}")
    return 0 if all(error <= limits[name] for name, error in worst.items()) else 1


def add_build(commands) -> None:
    build = commands.add_parser(
        "build", help="build TensorRT engines from a bundle (GPU and TensorRT needed; --check needs neither)",
        description="Build one TensorRT engine per graph of a bundle, with resolution buckets as optimization "
                    "profiles, into a cache keyed by everything a plan depends on. --check prints the engines, "
                    "profiles and cache keys without building.")
    build.add_argument("bundle", metavar="BUNDLE", help="a bundle folder written by `wuerstchen export`")
    build.add_argument("--dtype", "--precision", dest="dtype", default="auto",
                       help="the engines' precision: auto (bf16 for an fp32 bundle, else the bundle's own), "
                            f"{Precision.describe()}")
    build.add_argument("--check", action="store_true", help="print what would be built, and build nothing")
    build.add_argument("--cache", metavar="DIR", help="the engine cache (default BUNDLE/engines)")
    build.add_argument("--max-batch", type=int, default=4, help="images per call the engines accept (default 4)")
    build.add_argument("--static", type=int, nargs="*", default=[], metavar="SIZE",
                       help="also a static profile per square size, for CUDA graphs (e.g. 1024)")
    build.add_argument("--static-batch", type=int, default=1, help="batch of the static profiles (default 1)")
    build.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 "
                                                                "(default 3)")
    build.add_argument("--workspace-gb", type=float, default=8.0, help="workspace limit in GiB (default 8)")
    build.add_argument("--tactic-dram-gb", type=float, help="limit on tactic memory during the build, GiB")
    build.add_argument("--timing-cache", metavar="FILE", help="a timing cache to read and extend")
    build.set_defaults(run=_build)


def _build(args: argparse.Namespace) -> int:
    from export.tensorrt import build_command

    return build_command(args)
