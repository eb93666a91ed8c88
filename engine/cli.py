"""The `wuerstchen` command line. Bad input is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

from engine.errors import WuerstchenError

DEMO_NOTICE = (
    "no --prior/--decoder given: running the built-in tiny demo model, whose weights are random, so the "
    "image is noise. For real images, download warp-ai/wuerstchen-prior and warp-ai/wuerstchen on a machine "
    "with internet (e.g. `hf download warp-ai/wuerstchen-prior --local-dir wuerstchen-prior`) and pass "
    "--prior wuerstchen-prior --decoder wuerstchen."
)


# The API's field names, as the user typed them here.
FLAGS = {
    "prior_num_inference_steps": "--prior-steps", "num_inference_steps": "--decoder-steps",
    "prior_guidance_scale": "--prior-guidance", "decoder_guidance_scale": "--decoder-guidance",
    "num_images_per_prompt": "--num-images", "negative_prompt": "--negative-prompt", "height": "--height",
    "width": "--width", "device": "--device", "dtype": "--dtype", "prior": "--prior", "decoder": "--decoder",
}


def _in_flag_names(message: str) -> str:
    field, _, rest = message.partition("=")
    return f"{FLAGS[field]} {rest}" if field in FLAGS and rest else message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _output_paths(out: str, count: int) -> list[Path]:
    """`out` itself for one image; `out`'s stem with -0, -1, ... for several."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise WuerstchenError(f"--out={out!r}: expected a file name ending in .png")
    parent = path.parent
    if not parent.is_dir():
        raise WuerstchenError(f"--out={out!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise WuerstchenError(f"--out={out!r}: folder {str(parent)!r} is not writable")
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for p in paths:
        if p.is_dir() or (p.exists() and not os.access(p, os.W_OK)):
            raise WuerstchenError(f"--out={out!r}: {str(p)!r} exists and cannot be overwritten")
    return paths


def _model(args: argparse.Namespace):
    """What --prior/--decoder, --bundle and --backend ask for: the config to check a request against
    (read without loading weights), a loader, and how the PNG names the model."""
    from engine.backends import Backend
    from engine.bundle import open_bundle
    from engine.config import preset
    from engine.device import resolve_device, resolve_dtype
    from engine.pipeline import WuerstchenPipeline, read_config

    backend = Backend.parse(args.backend or (Backend.ONNXRUNTIME if args.bundle else Backend.TORCH))
    if args.bundle is not None:
        if args.prior or args.decoder:
            raise WuerstchenError("--bundle given with --prior/--decoder: pass one model source")
        if not backend.runs_bundles:
            raise WuerstchenError(f"--backend {backend.value} cannot run a --bundle: expected onnxruntime or "
                                  "tensorrt")
        config = open_bundle(args.bundle, check_hashes=False).config
        if backend is Backend.TENSORRT:
            precision = {"auto": "bf16", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
                args.dtype, args.dtype)
            return (config, lambda: WuerstchenPipeline.from_bundle(args.bundle, backend, precision=precision),
                    f"bundle {args.bundle} on tensorrt {precision}")
        if args.dtype != "auto":
            raise WuerstchenError(f"--dtype {args.dtype}: ONNX Runtime runs a bundle in the dtype it was exported in")
        device = resolve_device(args.device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        if args.device == "cpu":
            providers = ["CPUExecutionProvider"]
        return (config, lambda: WuerstchenPipeline.from_bundle(args.bundle, backend, providers=providers),
                f"bundle {args.bundle} on {backend.value}")
    if backend.runs_bundles:
        raise WuerstchenError(f"--backend {backend.value} runs a --bundle: make one with `wuerstchen export`")
    if (args.prior is None) != (args.decoder is None):
        given, missing = ("--prior", "--decoder") if args.prior else ("--decoder", "--prior")
        raise WuerstchenError(f"{given} given without {missing}: pass both folders, or neither for the demo model")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.prior is None:
        return (preset("tiny"),
                lambda: WuerstchenPipeline.from_preset("tiny", device=device, dtype=dtype, backend=backend),
                f"tiny demo (random weights) on {backend.value}")
    return (read_config(args.prior, args.decoder),
            lambda: WuerstchenPipeline.from_pretrained(args.prior, args.decoder, device=device, dtype=dtype,
                                                       variant=args.variant, backend=backend),
            f"{args.prior} + {args.decoder} on {backend.value}")


def generate(args: argparse.Namespace) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from engine.device import DTYPE_NAMES, resolve_device
    from engine.pipeline import check_request
    from engine.schedule import DEFAULT_PRIOR_TIMESTEPS

    config, load, model = _model(args)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    published_prior = args.prior_steps is None
    call = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        # Without --prior-steps, the published 29-evaluation schedule; with it, evenly spaced steps.
        prior_num_inference_steps=len(DEFAULT_PRIOR_TIMESTEPS) - 1 if published_prior else args.prior_steps,
        prior_timesteps=DEFAULT_PRIOR_TIMESTEPS if published_prior else None,
        prior_guidance_scale=args.prior_guidance,
        num_inference_steps=args.decoder_steps,
        decoder_timesteps=None,
        decoder_guidance_scale=args.decoder_guidance,
        num_images_per_prompt=args.num_images,
    )

    # 1. Check everything a user typed before loading gigabytes of weights.
    check_request(config, resolve_device(args.device), **call, generator=None, output_type="pil")
    paths = _output_paths(args.out, args.num_images)

    # 2. Load.
    start = time.perf_counter()
    if args.prior is None and args.bundle is None:
        print(f"wuerstchen: {DEMO_NOTICE}", file=sys.stderr)
    pipe = load()
    load_seconds = time.perf_counter() - start

    # 3. Generate with a CPU generator, so a seed gives the same noise on every device.
    output = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pil")

    # 4. Save with the settings in the PNG's text chunks (nothing time-dependent: same seed, same bytes).
    settings = {k: v for k, v in call.items() if not k.endswith(("prompt", "timesteps"))}
    settings.update(prior_timesteps="published" if published_prior else "linspace", model=model,
                    dtype=DTYPE_NAMES[pipe.dtype], device=pipe.device.type)
    for index, (image, path) in enumerate(zip(output.images, paths, strict=True)):
        info = PngInfo()
        info.add_text("prompt", args.prompt)
        info.add_text("negative_prompt", args.negative_prompt or "")
        info.add_text("seed", str(seed))
        info.add_text("image_index", str(index))
        info.add_text("settings", json.dumps(settings, sort_keys=True))
        try:
            image.save(path, pnginfo=info)
        except OSError as error:
            reason = error.strerror or error
            raise WuerstchenError(f"--out={args.out!r}: cannot write {str(path)!r}: {reason}") from None
        print(f"wrote {path} ({image.width}×{image.height}, seed {seed})")

    t = output.timings
    steps = call["prior_num_inference_steps"], call["num_inference_steps"]
    print(
        f"load {load_seconds:.2f} s · text {t['text']:.2f} s · prior {t['prior']:.2f} s ({steps[0]} steps) · "
        f"decoder {t['decoder']:.2f} s ({steps[1]} steps) · vqgan {t['vqgan']:.2f} s · "
        f"total {sum(t.values()):.2f} s"
    )
    return 0


def export(args: argparse.Namespace) -> int:
    import torch

    from engine.device import resolve_dtype
    from engine.pipeline import WuerstchenPipeline

    try:
        from export.bundle import export_bundle, folder_sources
        from export.verify import TOLERANCES, verify_bundle
    except ImportError as error:
        raise WuerstchenError(f"export needs the ONNX tools ({error.name} is missing): pip install -e '.[onnx]'") \
            from None
    if (args.prior is None) != (args.decoder is None):
        given, missing = ("--prior", "--decoder") if args.prior else ("--decoder", "--prior")
        raise WuerstchenError(f"{given} given without {missing}: pass both folders, or neither for the demo model")
    cpu = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, cpu)
    if args.prior is not None and args.preset is not None:
        raise WuerstchenError("--preset given with --prior/--decoder: pass one model source")
    if args.prior is None:
        name = args.preset or "tiny"
        pipe, sources = WuerstchenPipeline.from_preset(name, cpu, dtype), {"preset": name, "seed": 0}
    else:
        pipe = WuerstchenPipeline.from_pretrained(args.prior, args.decoder, cpu, dtype, variant=args.variant)
        sources = folder_sources(args.prior, args.decoder)
    start = time.perf_counter()
    export_bundle(pipe, args.out, sources, min_size=args.min_size, max_size=args.max_size)
    print(f"wrote bundle {args.out} in {time.perf_counter() - start:.1f} s")
    if not args.verify:
        return 0
    worst = verify_bundle(pipe, args.out)
    tolerance = TOLERANCES.get(dtype, 5e-2)
    print(f"worst relative error, ONNX Runtime against PyTorch (tolerance {tolerance:g}):")
    for name, error in worst.items():
        print(f"  {name:<18} {error:.2e}{'' if error <= tolerance else '  FAILED'}")
    return 0 if all(error <= tolerance for error in worst.values()) else 1


def _build(args: argparse.Namespace) -> int:
    from export.tensorrt import build_command

    return build_command(args)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import command

    return command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wuerstchen", description="Würstchen v2 text-to-image inference engine.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="make images from a prompt",
                              description="Make images from a prompt. Without --prior/--decoder, runs a tiny "
                                          "demo model with random weights.")
    gen.add_argument("prompt", help="what the image shows (empty is allowed)")
    gen.add_argument("--out", required=True, metavar="FILE.png",
                     help="where to write the image; with --num-images N, FILE-0.png … FILE-(N-1).png")
    gen.add_argument("--prior", metavar="DIR", help="folder with warp-ai/wuerstchen-prior")
    gen.add_argument("--decoder", metavar="DIR", help="folder with warp-ai/wuerstchen")
    gen.add_argument("--variant", metavar="NAME", help="weight file variant to read, e.g. fp16")
    gen.add_argument("--bundle", metavar="DIR", help="an exported bundle (wuerstchen export) to run instead")
    gen.add_argument("--backend", help="torch (default), torch-fast (Triton attention, CUDA-graph steps) or "
                                       "torch-compile for folders and the demo; onnxruntime (default) or tensorrt "
                                       "for a --bundle")
    gen.add_argument("--negative-prompt", help="what the image should not show (used by every guided stage)")
    gen.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 128 (default 1024)")
    gen.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 128 (default 1024)")
    gen.add_argument("--prior-steps", type=int, metavar="N",
                     help="evenly spaced prior steps (default: the published 29-step schedule)")
    gen.add_argument("--decoder-steps", type=int, default=12, metavar="N", help="decoder steps (default 12)")
    gen.add_argument("--prior-guidance", type=float, default=4.0, help="classifier-free guidance (default 4)")
    gen.add_argument("--decoder-guidance", type=float, default=0.0,
                     help="decoder guidance, on above 1 (default 0: off)")
    gen.add_argument("--num-images", type=int, default=1, metavar="N", help="images to make (default 1)")
    gen.add_argument("--seed", type=int, help="random seed (default: a random one, printed and saved)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    gen.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    gen.set_defaults(run=generate)

    exp = commands.add_parser("export", help="export every stage to ONNX as one bundle",
                              description="Export every stage to ONNX as one bundle folder. Without "
                                          "--prior/--decoder, exports the tiny demo model.")
    exp.add_argument("--out", required=True, metavar="BUNDLE", help="a new (or empty) folder for the bundle")
    exp.add_argument("--prior", metavar="DIR", help="folder with warp-ai/wuerstchen-prior")
    exp.add_argument("--decoder", metavar="DIR", help="folder with warp-ai/wuerstchen")
    exp.add_argument("--variant", metavar="NAME", help="weight file variant to read, e.g. fp16")
    exp.add_argument("--preset", help="without folders: tiny (default) or wuerstchen-v2, with random weights")
    exp.add_argument("--dtype", default="fp32", help="fp32 (default), fp16 or bf16: the graphs' precision")
    exp.add_argument("--min-size", type=int, default=256, help="smallest image side served (default 256)")
    exp.add_argument("--max-size", type=int, default=1536, help="largest image side served (default 1536)")
    exp.add_argument("--verify", action="store_true",
                     help="compare every graph in ONNX Runtime with PyTorch at several sizes and batch sizes")
    exp.set_defaults(run=export)

    build = commands.add_parser(
        "build", help="build TensorRT engines from a bundle (GPU and TensorRT needed; --check needs neither)",
        description="Build one TensorRT engine per graph of a bundle, with resolution buckets as optimization "
                    "profiles, into a cache keyed by everything a plan depends on. --check prints the engines, "
                    "profiles and cache keys without building.")
    build.add_argument("bundle", metavar="BUNDLE", help="a bundle folder written by `wuerstchen export`")
    build.add_argument("--precision", default="bf16", help="bf16 (default), fp16 or fp32")
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
    build.set_defaults(run=lambda args: _build(args))

    bench = commands.add_parser(
        "bench", help="measure latency, throughput and efficiency, optionally against diffusers",
        description="Measure end-to-end latency, per-stage times, throughput, peak memory, cold start and "
                    "achieved TFLOP/s. Without a source, the full-size architecture with random weights.")
    bench.add_argument("--preset", help="wuerstchen-v2 (default: random full-size weights) or tiny")
    bench.add_argument("--prior", metavar="DIR", help="folder with warp-ai/wuerstchen-prior")
    bench.add_argument("--decoder", metavar="DIR", help="folder with warp-ai/wuerstchen")
    bench.add_argument("--bundle", metavar="DIR", help="an exported bundle, run with --backend onnxruntime")
    bench.add_argument("--backend", nargs="+", metavar="NAME",
                       help="one or more of torch (default), torch-fast, torch-compile; onnxruntime or tensorrt "
                            "with --bundle")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    bench.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    bench.add_argument("--sizes", nargs="+", default=["1024"], metavar="SIZE",
                       help="image sizes: 1024 or HEIGHTxWIDTH (default 1024)")
    bench.add_argument("--batch", nargs="+", type=int, default=[1], metavar="N", help="images per call (default 1)")
    bench.add_argument("--prior-steps", type=int, metavar="N", help="evenly spaced prior steps (default: the "
                                                                   "published 29-evaluation schedule)")
    bench.add_argument("--decoder-steps", type=int, default=12, metavar="N", help="decoder steps (default 12)")
    bench.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance (default 4)")
    bench.add_argument("--decoder-guidance", type=float, default=0.0, help="decoder guidance (default 0: off)")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed runs first, at least 1 (default 2)")
    bench.add_argument("--baseline", nargs="+", default=[], metavar="NAME",
                       help="also measure, same process and weights: diffusers, diffusers-compile")
    bench.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start runs")
    bench.add_argument("--json", metavar="FILE", help="write every record, with provenance, as JSON")
    bench.add_argument("--csv", metavar="FILE", help="append one row per record")
    bench.add_argument("--plot", metavar="FILE.png", help="plot per-stage latency and throughput (matplotlib)")
    bench.set_defaults(run=lambda args: _bench(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except WuerstchenError as error:
        print(f"wuerstchen {args.command}: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
