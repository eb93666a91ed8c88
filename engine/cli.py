"""The `wuerstchen` command line. Bad input is one line on stderr and exit status 2, a run that fails for
another reason (a device error) one line and status 1, an interrupt status 130; never a
traceback.

`generate` lives here, with the flags every command shares (`model_flags`) and the one function that turns
them into a `Runtime` (`resolve_flags`). The commands of the layers above the runtime register themselves
as entry points of the group `wuerstchen.commands` (setup.py): `export` and `build` from `export`, `bench`
from `benchmarks`. The runtime never imports them.

Torch, the pipeline and the scheduler are imported by the functions that run a command, not by this module,
so that `wuerstchen --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import warnings
from importlib.metadata import entry_points, version
from pathlib import Path

import engine
from engine.errors import WuerstchenError
from engine.precision import Precision

COMMANDS_GROUP = "wuerstchen.commands"
DEMO_SIZE = 256  # the demo model's default image side: a few seconds on a CPU
DEMO_NOTICE = (
    "no --prior/--decoder given: running the built-in tiny demo model, whose weights are random (calibrated so "
    "that the image shows shapes and colours that follow the prompt and the seed, but not a picture of "
    f"anything), at {DEMO_SIZE}×{DEMO_SIZE} unless asked for another size. For real images, pass "
    "--decoder warp-ai/wuerstchen (read from the Hugging Face cache, downloaded there when the Hub is "
    "reachable), or folders downloaded with `hf download` (--prior wuerstchen-prior --decoder wuerstchen)."
)
EMBEDDINGS_FORMAT = "wuerstchen-image-embeddings"


# The API's field names, as the user typed them here.
FLAGS = {
    "prior_num_inference_steps": "--prior-steps", "num_inference_steps": "--decoder-steps",
    "prior_guidance_scale": "--prior-guidance", "decoder_guidance_scale": "--decoder-guidance",
    "num_images_per_prompt": "--num-images", "negative_prompt": "--negative-prompt", "height": "--height",
    "width": "--width", "device": "--device", "dtype": "--dtype", "prior": "--prior", "decoder": "--decoder",
    "preset": "--preset", "bundle": "--bundle", "backend": "--backend", "variant": "--variant",
    "image_embeddings": "--embeddings", "quantize": "--quantize",
}


def _in_flag_names(message: str) -> str:
    field, _, rest = message.partition("=")
    return f"{FLAGS[field]} {rest}" if field in FLAGS and rest else message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def model_flags(parser: argparse.ArgumentParser, *, default_preset: str, bundles: bool = True,
                backends: str = "one", default_device: str = "auto", default_dtype: str = "auto",
                quantize: str = "one") -> None:
    """The flags that choose what runs, the same in every command: the source (--preset, --prior/--decoder
    with --variant, --bundle), --backend (`backends`: "one", "many" or "none"), --device, --dtype and
    --quantize (`quantize`: "one", "many" or "none")."""
    parser.add_argument("--preset", help=f"random weights of an architecture: tiny or wuerstchen-v2 (default, "
                                         f"without folders: {default_preset})")
    parser.add_argument("--prior", metavar="DIR", help="warp-ai/wuerstchen-prior: a folder or a Hub repo id")
    parser.add_argument("--decoder", metavar="DIR", help="warp-ai/wuerstchen: a folder or a Hub repo id; alone, "
                                                         "diffusers' combined repo, whose model card names the prior")
    parser.add_argument("--variant", metavar="NAME", help="weight file variant to read, e.g. fp16")
    if bundles:
        parser.add_argument("--bundle", metavar="DIR", help="an exported bundle (wuerstchen export) to run instead")
    if backends != "none":
        parser.add_argument("--backend", nargs="+" if backends == "many" else None, metavar="NAME",
                            help="torch (default), torch-fast (Triton kernels, CUDA-graph steps) or torch-compile "
                                 "for weights; onnxruntime (default) or tensorrt for a --bundle"
                                 + ("; several to compare" if backends == "many" else ""))
        parser.add_argument("--build-engines", action="store_true",
                            help="with --backend tensorrt, build missing or stale engines first (else run "
                                 "`wuerstchen build`)")
    parser.add_argument("--device", default=default_device,
                        help=f"auto, cpu, cuda or cuda:N (default {default_device})")
    auto = "fp16 on a GPU, fp32 on the CPU" + ("; a bundle's own on ONNX Runtime; bf16 on TensorRT" if bundles else "")
    parser.add_argument("--dtype", default=default_dtype,
                        help=f"auto ({auto}), {Precision.describe()} (default {default_dtype})")
    if quantize != "none":
        parser.add_argument("--quantize", metavar="SCHEME", nargs="+" if quantize == "many" else None,
                            default=["none"] if quantize == "many" else "none",
                            help="hold the prior's and decoder's block Linears in 8 bits (torch backends): fp8 (sm_89+ "
                                 "GPUs) or int8, the layers picked by a sensitivity scan on load, or a recipe file "
                                 "(.json) naming them; runs in fp16 on a GPU, bf16 on the CPU (default none)"
                                 + ("; several to compare, none among them for the unquantized model (then pass "
                                    "--dtype: unquantized runs in fp32 on the CPU)" if quantize == "many" else ""))
    parser.set_defaults(default_preset=default_preset)


def resolve_flags(args: argparse.Namespace, backend: str | None = None, quantize: str | None = None):
    """The `Runtime` that `model_flags` ask for (with `backend` in place of --backend and `quantize` in place of
    --quantize, for commands that run several or one of their own): the same answer for the same flags in
    every command."""
    from engine.backends import Backend, TensorRTOptions
    from engine.runtime import ModelSource, resolve

    source = ModelSource.choose(preset=args.preset, prior=args.prior, decoder=args.decoder,
                                bundle=getattr(args, "bundle", None), variant=args.variant,
                                default_preset=args.default_preset)
    chosen = backend or getattr(args, "backend", None)
    options = None
    if chosen is not None and Backend.parse(chosen) is Backend.TENSORRT:
        options = TensorRTOptions(build_missing=getattr(args, "build_engines", False))
    return resolve(source, chosen, args.device, args.dtype, options, quantize or getattr(args, "quantize", None))


def _output_paths(out: str, count: int) -> list[Path]:
    """`out` itself for one image; `out`'s stem with -0, -1, ... for several."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise WuerstchenError(f"--out={out!r}: expected a file name ending in .png")
    _writable_folder("--out", out)
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for p in paths:
        if p.is_dir() or (p.exists() and not os.access(p, os.W_OK)):
            raise WuerstchenError(f"--out={out!r}: {str(p)!r} exists and cannot be overwritten")
    return paths


def _writable_folder(flag: str, file: str) -> None:
    parent = Path(file).parent
    if not parent.is_dir():
        raise WuerstchenError(f"{flag}={file!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise WuerstchenError(f"{flag}={file!r}: folder {str(parent)!r} is not writable")


def _recipe(args: argparse.Namespace, demo: bool):
    """The recipe the flags ask for: the published one where a flag is not given, at `DEMO_SIZE` for the demo."""
    from engine.recipe import Recipe

    published = Recipe(height=DEMO_SIZE, width=DEMO_SIZE) if demo else Recipe()
    given = {name: getattr(args, flag) for name, flag in (
        ("height", "height"), ("width", "width"), ("prior_steps", "prior_steps"),
        ("prior_guidance", "prior_guidance"), ("decoder_steps", "decoder_steps"),
        ("decoder_guidance", "decoder_guidance"))}
    return Recipe(**{name: getattr(published, name) if value is None else value for name, value in given.items()})


def write_embeddings(path: str, embeddings, states: list, seeds: list[int], metadata: dict) -> None:
    """The prior's image embeddings as safetensors, with each image's generator state after the prior (so that
    decoding them later from those states gives the images the whole pipeline gives), its seed, and the
    settings."""
    import torch
    from safetensors.torch import save

    from engine.files import write_atomically

    tensors = {"image_embeddings": embeddings.float().cpu().contiguous(),
               "generator_states": torch.stack(states)}
    header = {"format": EMBEDDINGS_FORMAT, "format_version": "2", "seeds": json.dumps(seeds),
              **{k: str(v) for k, v in metadata.items()}}
    try:
        write_atomically(path, save(tensors, metadata=header))
    except OSError as error:
        raise WuerstchenError(f"--save-embeddings={path!r}: cannot write it: {error.strerror or error}") from None


def read_embeddings(path: str) -> tuple:
    """(image embeddings, each image's generator state after the prior, their seeds) from `write_embeddings`'s
    file; anything else is a one-line error naming the file."""
    import torch
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise WuerstchenError(f"--embeddings={path!r}: file does not exist")
    expected = (f"--embeddings={path!r}: not a file of image embeddings written by `wuerstchen generate "
                "--save-embeddings`")
    try:
        with safe_open(path, framework="pt") as file:
            metadata, keys = file.metadata() or {}, set(file.keys())
            if metadata.get("format") != EMBEDDINGS_FORMAT or metadata.get("format_version") != "2" or \
                    keys != {"image_embeddings", "generator_states"}:
                raise WuerstchenError(expected)
            embeddings, states = file.get_tensor("image_embeddings"), file.get_tensor("generator_states")
        seeds = json.loads(metadata.get("seeds", "null"))
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as error:
        raise WuerstchenError(f"--embeddings={path!r} is not a readable safetensors file: {error}") from None
    state = torch.Generator().get_state()
    rows = embeddings.shape[0] if embeddings.dim() else 0
    if states.dtype != state.dtype or tuple(states.shape) != (rows, state.numel()) or \
            not isinstance(seeds, list) or len(seeds) != rows or not all(_is_seed(s) for s in seeds):
        raise WuerstchenError(f"{expected}: its generator states or seeds do not match its {rows} embeddings")
    return embeddings, [row.clone() for row in states], seeds  # a generator takes a state of its own


def _is_seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _generators(seeds: list[int], states: list | None = None) -> list:
    """One CPU generator per image: seeded, or continuing where a saved state left off. A seed gives the same
    noise on every device, and each image's noise is its own, whatever the batch it runs in."""
    import torch

    if states is not None:
        generators = [torch.Generator() for _ in states]
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
        return generators
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def generate(args: argparse.Namespace) -> int:
    import torch

    from engine.memory import check_fits, request_bytes
    from engine.pipeline import WuerstchenPipeline, check_decoder_request, check_image_embeddings, check_prior_request
    from engine.png import png_settings
    from engine.runtime import describe_quantization

    runtime = resolve_flags(args)
    config = runtime.source.read_config()
    demo = runtime.source.demo
    recipe = _recipe(args, demo)

    # 1. Check everything a user typed before loading gigabytes of weights.
    if args.out is None and args.save_embeddings is None:
        raise WuerstchenError("--out is missing: name the PNG to write (or only --save-embeddings FILE, to run "
                              "the prior alone)")
    if args.seed is not None and not _is_seed(args.seed):
        raise WuerstchenError(f"--seed {args.seed}: expected an integer from 0 to 2**64 - 1")
    if args.batch_size < 1:
        raise WuerstchenError(f"--batch-size {args.batch_size}: expected a positive integer")
    decoder_args = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
                        num_inference_steps=recipe.decoder_steps, timesteps=None,
                        guidance_scale=recipe.decoder_guidance, guidance_name="decoder_guidance_scale")
    if args.embeddings is not None:
        for flag in ("height", "width", "prior_steps", "prior_guidance", "save_embeddings"):
            if getattr(args, flag) is not None:
                raise WuerstchenError(f"--{flag.replace('_', '-')} does not apply with --embeddings: the prior has "
                                      "already run (the size follows from the embeddings)")
        embeddings, states, stored_seeds = read_embeddings(args.embeddings)
        embeddings = check_image_embeddings(config, embeddings, torch.device("cpu"), torch.float32)
        decoder = check_decoder_request(config, embeddings.shape, num_images_per_prompt=args.num_images,
                                        **decoder_args)
        if args.seed is None and args.num_images > 1:
            raise WuerstchenError("--num-images with --embeddings needs --seed: each saved generator state continues "
                                  "one image")
        count = embeddings.shape[0] * args.num_images  # image i decodes embedding i // --num-images
        chunk = check_decoder_request(config, (min(count, args.batch_size), *embeddings.shape[1:]),
                                      num_images_per_prompt=1, **decoder_args)
        check_fits(request_bytes(config, chunk.shapes, runtime.dtype, None,
                                 (len(chunk.grid) - 1, chunk.guidance > 1)), runtime.device)
    else:
        prior = check_prior_request(
            config, prompt=args.prompt, negative_prompt=args.negative_prompt, height=recipe.height,
            width=recipe.width, num_inference_steps=recipe.prior_evaluations, timesteps=recipe.prior_timesteps,
            guidance_scale=recipe.prior_guidance, num_images_per_prompt=min(args.num_images, args.batch_size),
            steps_name="prior_num_inference_steps", guidance_name="prior_guidance_scale")
        decoder = check_decoder_request(config, prior.shapes.prior_latent, num_images_per_prompt=1, **decoder_args)
        check_fits(request_bytes(config, prior.shapes, runtime.dtype, (len(prior.grid) - 1, prior.guidance > 1),
                                 (len(decoder.grid) - 1, decoder.guidance > 1)), runtime.device)
        count = args.num_images
    paths = _output_paths(args.out, count) if args.out is not None else []
    if args.save_embeddings is not None:
        _writable_folder("--save-embeddings", args.save_embeddings)

    # 2. Say what runs (the command line's defaults are the published recipe's, not the Python API's), and load.
    if demo:
        print(f"wuerstchen: {DEMO_NOTICE}", file=sys.stderr)
    if args.embeddings is None:
        work = recipe.describe()
    else:
        work = (f"decoding {args.embeddings} into {count} image{'s' if count > 1 else ''} of "
                f"{decoder.shapes.height}×{decoder.shapes.width}, {recipe.decoder_steps} decoder steps (guidance "
                f"{recipe.decoder_guidance:g})")
    quantized = "" if runtime.quantization is None else f", quantized {describe_quantization(runtime.quantization)}"
    print(f"wuerstchen: {work}; {runtime.precision.value} on {runtime.device}, backend {runtime.backend.value}"
          f"{quantized}", file=sys.stderr)
    start = time.perf_counter()
    pipe = WuerstchenPipeline.load(runtime)
    load_seconds = time.perf_counter() - start

    # 3. Generate in chunks of --batch-size images, writing each chunk's files as it finishes. Image i has the
    #    seed --seed + i (so it can be made again alone), or continues the generator state its embedding saved:
    #    the prior, then the decoder on its embeddings (what one pipeline call does), or the decoder alone.
    first = secrets.randbelow(2**31) if args.seed is None else args.seed
    seeds = [(first + i) % 2**64 for i in range(count)]
    if args.embeddings is not None and args.seed is None:
        seeds = stored_seeds
    settings = png_settings(recipe, pipe.runtime)  # with the recipe a scan chose
    if args.embeddings is not None:
        settings.update(embeddings=Path(args.embeddings).name, height=None, width=None)
        for key in ("prior_num_inference_steps", "prior_timesteps", "prior_guidance_scale"):
            del settings[key]
    timings: dict[str, float] = {}
    saved = []
    for chunk in range(0, count, args.batch_size):
        rows = slice(chunk, min(chunk + args.batch_size, count))
        resumed = states[rows] if args.embeddings is not None and args.seed is None else None
        generators = _generators(seeds[rows], resumed)
        if args.embeddings is None:
            output = pipe.run_prior(args.prompt, recipe.height, recipe.width, recipe.prior_evaluations,
                                    recipe.prior_timesteps, recipe.prior_guidance, args.negative_prompt,
                                    len(generators), generators)
            chunk_embeddings = output.image_embeddings
            _add(timings, output.timings)
            saved.append((chunk_embeddings, [g.get_state() for g in generators]))  # copies of the states
        else:
            chunk_embeddings = embeddings[torch.arange(rows.start, rows.stop) // args.num_images]
        if paths:
            output = pipe.run_decoder(chunk_embeddings, args.prompt, recipe.decoder_steps, None,
                                      recipe.decoder_guidance, args.negative_prompt, 1, generators)
            _add(timings, output.timings)
            _write_pngs(output.images, paths[rows], range(rows.start, rows.stop), args, seeds[rows], settings)
    if args.save_embeddings is not None:
        all_embeddings = torch.cat([e for e, _ in saved])
        write_embeddings(args.save_embeddings, all_embeddings, [s for _, states in saved for s in states], seeds,
                         {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
                          "settings": json.dumps(settings, sort_keys=True)})
        print(f"wrote {args.save_embeddings} (image embeddings {tuple(all_embeddings.shape)}, seeds from {seeds[0]})")

    # 4. Report the time of each stage that ran.
    steps = {"prior": recipe.prior_evaluations, "decoder": recipe.decoder_steps}
    parts = [f"load {load_seconds:.2f} s"] + [
        f"{stage} {seconds:.2f} s" + (f" ({steps[stage]} steps)" if stage in steps else "")
        for stage, seconds in timings.items()]
    print(" · ".join(parts + [f"total {sum(timings.values()):.2f} s"]))
    return 0


def _add(timings: dict[str, float], more: dict[str, float]) -> None:
    for stage, seconds in more.items():
        timings[stage] = timings.get(stage, 0.0) + seconds


def _write_pngs(images, paths: list[Path], indices: range, args: argparse.Namespace, seeds: list[int],
                settings: dict) -> None:
    """Each image with its prompt, seed and the settings in its text chunks (nothing time-dependent: same
    seed, same bytes), each file written whole or not at all."""
    from engine.png import write_png

    for index, image, path, seed in zip(indices, images, paths, seeds, strict=True):
        text = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "seed": str(seed),
                "image_index": str(index), "settings": settings}
        try:
            write_png(path, image, text)
        except OSError as error:
            reason = error.strerror or error
            raise WuerstchenError(f"--out={args.out!r}: cannot write {str(path)!r}: {reason}") from None
        print(f"wrote {path} ({image.width}×{image.height}, seed {seed})")


def build_parser() -> argparse.ArgumentParser:
    from engine.recipe import Recipe

    published = Recipe()
    parser = _Parser(prog="wuerstchen", description="Würstchen v2 text-to-image inference engine.")
    parser.add_argument("--version", action="version",
                        version=f"wuerstchen {engine.__version__} (torch {version('torch')})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="make images from a prompt",
                              description="Make images from a prompt. Without --prior/--decoder, runs a tiny "
                                          f"demo model with random weights, at {DEMO_SIZE}×{DEMO_SIZE}.")
    gen.add_argument("prompt", help="what the image shows (empty is allowed)")
    gen.add_argument("--out", metavar="FILE.png",
                     help="where to write the image; with --num-images N, FILE-0.png … FILE-(N-1).png")
    model_flags(gen, default_preset="tiny")
    gen.add_argument("--negative-prompt", help="what the image should not show (used by every guided stage)")
    gen.add_argument("--height", type=int, help=f"pixels, a multiple of 128 (default {published.height}; "
                                                f"{DEMO_SIZE} for the demo model)")
    gen.add_argument("--width", type=int, help=f"pixels, a multiple of 128 (default {published.width}; "
                                               f"{DEMO_SIZE} for the demo model)")
    gen.add_argument("--prior-steps", type=int, metavar="N",
                     help="evenly spaced prior steps (default: the published 29-step schedule)")
    gen.add_argument("--decoder-steps", type=int, metavar="N",
                     help=f"decoder steps (default {published.decoder_steps})")
    gen.add_argument("--prior-guidance", type=float,
                     help=f"classifier-free guidance (default {published.prior_guidance:g})")
    gen.add_argument("--decoder-guidance", type=float,
                     help=f"decoder guidance, on above 1 (default {published.decoder_guidance:g}: off)")
    gen.add_argument("--num-images", type=int, default=1, metavar="N",
                     help="images to make (default 1); with --embeddings, per embedding")
    gen.add_argument("--batch-size", type=int, default=4, metavar="N",
                     help="images per call: more images run in chunks of N, each written as it finishes (default 4)")
    gen.add_argument("--seed", type=int, help="random seed of the first image, the next image's is one more (default: "
                                              "a random one, printed and saved; with --embeddings, where the prior "
                                              "that made them left off)")
    gen.add_argument("--save-embeddings", metavar="FILE",
                     help="also write the prior's image embeddings (safetensors) to decode later; without --out, "
                          "run the prior only")
    gen.add_argument("--embeddings", metavar="FILE",
                     help="decode image embeddings from --save-embeddings instead of running the prior")
    gen.set_defaults(run=generate)

    for command in entry_points(group=COMMANDS_GROUP):
        command.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except WuerstchenError as error:
        print(f"wuerstchen {args.command}: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file is written whole or not at all, so an interrupted command leaves nothing half-written.
        print(f"wuerstchen {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, _scheduler_failures()):
            raise
        # Not the input's fault (a device error, a deadline): one line, and a status that says "failed".
        print(f"wuerstchen {args.command}: failed: {error}", file=sys.stderr)
        return 1


def _scheduler_failures() -> tuple[type[Exception], ...]:
    """The scheduler's refusals and failures, if a command loaded the scheduler (else none can be raised)."""
    scheduler = sys.modules.get("engine.scheduler")
    return (scheduler.Refused, scheduler.DeadlineExceeded, scheduler.RequestFailed) if scheduler else ()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, without the source line Python shows under it."""
    print(f"wuerstchen: warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
