"""The `wuerstchen` command line. Bad input is one line on stderr and exit status 2, never a traceback.

`generate` lives here, with the flags every command shares (`model_flags`) and the one function that turns
them into a `Runtime` (`resolve_flags`). The commands of the layers above the runtime register themselves
as entry points of the group `wuerstchen.commands` (setup.py): `export` and `build` from `export`, `bench`
from `benchmarks`. The runtime never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from engine.errors import WuerstchenError

COMMANDS_GROUP = "wuerstchen.commands"
DEMO_NOTICE = (
    "no --prior/--decoder given: running the built-in tiny demo model, whose weights are random, so the "
    "image is noise. For real images, pass --decoder warp-ai/wuerstchen (read from the Hugging Face cache, "
    "downloaded there when the Hub is reachable), or folders downloaded with `hf download` "
    "(--prior wuerstchen-prior --decoder wuerstchen)."
)
EMBEDDINGS_FORMAT = "wuerstchen-image-embeddings"


# The API's field names, as the user typed them here.
FLAGS = {
    "prior_num_inference_steps": "--prior-steps", "num_inference_steps": "--decoder-steps",
    "prior_guidance_scale": "--prior-guidance", "decoder_guidance_scale": "--decoder-guidance",
    "num_images_per_prompt": "--num-images", "negative_prompt": "--negative-prompt", "height": "--height",
    "width": "--width", "device": "--device", "dtype": "--dtype", "prior": "--prior", "decoder": "--decoder",
    "preset": "--preset", "bundle": "--bundle", "backend": "--backend", "variant": "--variant",
    "image_embeddings": "--embeddings",
}


def _in_flag_names(message: str) -> str:
    field, _, rest = message.partition("=")
    return f"{FLAGS[field]} {rest}" if field in FLAGS and rest else message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def model_flags(parser: argparse.ArgumentParser, *, default_preset: str, bundles: bool = True,
                backends: str = "one", default_device: str = "auto", default_dtype: str = "auto") -> None:
    """The flags that choose what runs, the same in every command: the source (--preset, --prior/--decoder
    with --variant, --bundle), --backend (`backends`: "one", "many" or "none"), --device and --dtype."""
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
    auto = ": fp16 on a GPU, fp32 on the CPU; a bundle's own on ONNX Runtime; bf16 on TensorRT"
    parser.add_argument("--dtype", default=default_dtype, help=f"auto, fp32, fp16 or bf16 (default {default_dtype}"
                                                               f"{auto if default_dtype == 'auto' else ''})")
    parser.set_defaults(default_preset=default_preset)


def resolve_flags(args: argparse.Namespace, backend: str | None = None):
    """The `Runtime` that `model_flags` ask for (with `backend` in place of --backend, for commands that run
    several or one of their own): the same answer for the same flags in every command."""
    from engine.backends import Backend, TensorRTOptions
    from engine.runtime import ModelSource, resolve

    source = ModelSource.choose(preset=args.preset, prior=args.prior, decoder=args.decoder,
                                bundle=getattr(args, "bundle", None), variant=args.variant,
                                default_preset=args.default_preset)
    chosen = backend or getattr(args, "backend", None)
    options = None
    if chosen is not None and Backend.parse(chosen) is Backend.TENSORRT:
        options = TensorRTOptions(build_missing=getattr(args, "build_engines", False))
    return resolve(source, chosen, args.device, args.dtype, options)


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


def _recipe(args: argparse.Namespace):
    """The recipe the flags ask for: the published one where a flag is not given."""
    from engine.recipe import Recipe

    published = Recipe()
    given = {name: getattr(args, flag) for name, flag in (
        ("height", "height"), ("width", "width"), ("prior_steps", "prior_steps"),
        ("prior_guidance", "prior_guidance"), ("decoder_steps", "decoder_steps"),
        ("decoder_guidance", "decoder_guidance"))}
    return Recipe(**{name: getattr(published, name) if value is None else value for name, value in given.items()})


def write_embeddings(path: str, embeddings, generator, metadata: dict) -> None:
    """The prior's image embeddings as safetensors, with the generator's state after the prior (so that
    decoding them later with that state gives the image the whole pipeline gives) and the settings."""
    from safetensors.torch import save

    from engine.files import write_atomically

    tensors = {"image_embeddings": embeddings.float().cpu().contiguous()}
    if generator is not None:
        tensors["generator_state"] = generator.get_state()
    header = {"format": EMBEDDINGS_FORMAT, "format_version": "1", **{k: str(v) for k, v in metadata.items()}}
    try:
        write_atomically(path, save(tensors, metadata=header))
    except OSError as error:
        raise WuerstchenError(f"--save-embeddings={path!r}: cannot write it: {error.strerror or error}") from None


def read_embeddings(path: str) -> tuple:
    """(image embeddings, the generator state after the prior or None, metadata) from `write_embeddings`'s
    file; anything else is a one-line error naming the file."""
    import torch
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise WuerstchenError(f"--embeddings={path!r}: file does not exist")
    try:
        with safe_open(path, framework="pt") as file:
            metadata, keys = file.metadata() or {}, set(file.keys())
            if metadata.get("format") != EMBEDDINGS_FORMAT or metadata.get("format_version") != "1" or \
                    not keys <= {"image_embeddings", "generator_state"} or "image_embeddings" not in keys:
                raise WuerstchenError(f"--embeddings={path!r}: not a file of image embeddings written by "
                                      "`wuerstchen generate --save-embeddings`")
            embeddings = file.get_tensor("image_embeddings")
            state = file.get_tensor("generator_state") if "generator_state" in keys else None
    except (SafetensorError, OSError, RuntimeError) as error:
        raise WuerstchenError(f"--embeddings={path!r} is not a readable safetensors file: {error}") from None
    expected_state = torch.Generator().get_state()
    if state is not None and (state.dtype != expected_state.dtype or state.shape != expected_state.shape):
        raise WuerstchenError(f"--embeddings={path!r}: its generator_state is not a CPU generator's state")
    return embeddings, state, metadata


def generate(args: argparse.Namespace) -> int:
    import torch

    from engine.pipeline import WuerstchenPipeline, check_decoder_request, check_image_embeddings, check_prior_request

    runtime = resolve_flags(args)
    config = runtime.source.read_config()
    recipe = _recipe(args)

    # 1. Check everything a user typed before loading gigabytes of weights.
    if args.out is None and args.save_embeddings is None:
        raise WuerstchenError("--out is missing: name the PNG to write (or only --save-embeddings FILE, to run "
                              "the prior alone)")
    decoder_args = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
                        num_inference_steps=recipe.decoder_steps, timesteps=None,
                        guidance_scale=recipe.decoder_guidance, guidance_name="decoder_guidance_scale")
    stored_state = None
    if args.embeddings is not None:
        for flag in ("height", "width", "prior_steps", "prior_guidance", "save_embeddings"):
            if getattr(args, flag) is not None:
                raise WuerstchenError(f"--{flag.replace('_', '-')} does not apply with --embeddings: the prior has "
                                      "already run (the size follows from the embeddings)")
        embeddings, stored_state, _ = read_embeddings(args.embeddings)
        embeddings = check_image_embeddings(config, embeddings, torch.device("cpu"), torch.float32)
        decoder = check_decoder_request(config, embeddings.shape, num_images_per_prompt=args.num_images,
                                        **decoder_args)
        count = decoder.shapes.batch
    else:
        prior = check_prior_request(
            config, prompt=args.prompt, negative_prompt=args.negative_prompt, height=recipe.height,
            width=recipe.width, num_inference_steps=recipe.prior_evaluations, timesteps=recipe.prior_timesteps,
            guidance_scale=recipe.prior_guidance, num_images_per_prompt=args.num_images,
            steps_name="prior_num_inference_steps", guidance_name="prior_guidance_scale")
        check_decoder_request(config, prior.shapes.prior_latent, num_images_per_prompt=1, **decoder_args)
        count = prior.shapes.batch
    paths = _output_paths(args.out, count) if args.out is not None else []
    if args.save_embeddings is not None:
        _writable_folder("--save-embeddings", args.save_embeddings)

    # 2. Load.
    start = time.perf_counter()
    if runtime.source.kind == "preset" and runtime.source.preset == "tiny":
        print(f"wuerstchen: {DEMO_NOTICE}", file=sys.stderr)
    pipe = WuerstchenPipeline.load(runtime)
    load_seconds = time.perf_counter() - start

    # 3. Generate with a CPU generator, so a seed gives the same noise on every device: the prior, then the
    #    decoder on its embeddings (what one pipeline call does), or the decoder alone on embeddings from a file.
    generator = torch.Generator()
    if args.seed is None and stored_state is not None:
        generator.set_state(stored_state)  # where the prior that made the embeddings left off
        seed = None
    else:
        seed = secrets.randbelow(2**31) if args.seed is None else args.seed
        generator.manual_seed(seed)
    timings = {}
    settings = {"prior_num_inference_steps": recipe.prior_evaluations,
                "prior_timesteps": "published" if recipe.published_prior else "linspace",
                "prior_guidance_scale": recipe.prior_guidance, "height": recipe.height, "width": recipe.width,
                "num_inference_steps": recipe.decoder_steps, "decoder_guidance_scale": recipe.decoder_guidance,
                "num_images_per_prompt": args.num_images,
                "model": runtime.describe(), "dtype": runtime.precision.value, "device": runtime.device.type}
    if args.embeddings is None:
        output = pipe.run_prior(args.prompt, recipe.height, recipe.width, recipe.prior_evaluations,
                                recipe.prior_timesteps, recipe.prior_guidance, args.negative_prompt, args.num_images,
                                generator)
        embeddings, timings = output.image_embeddings, output.timings
        if args.save_embeddings is not None:
            write_embeddings(args.save_embeddings, embeddings, generator,
                             {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "seed": seed,
                              "settings": json.dumps(settings, sort_keys=True)})
            print(f"wrote {args.save_embeddings} (image embeddings {tuple(embeddings.shape)}, seed {seed})")
    else:
        settings.update(embeddings=Path(args.embeddings).name, height=None, width=None)
        for key in ("prior_num_inference_steps", "prior_timesteps", "prior_guidance_scale"):
            del settings[key]
    if paths:
        output = pipe.run_decoder(embeddings, args.prompt, recipe.decoder_steps, None, recipe.decoder_guidance,
                                  args.negative_prompt, 1 if args.embeddings is None else args.num_images, generator)
        for stage, seconds in output.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        _write_pngs(output.images, paths, args, seed, settings)

    # 4. Report the time of each stage that ran.
    steps = {"prior": recipe.prior_evaluations, "decoder": recipe.decoder_steps}
    parts = [f"load {load_seconds:.2f} s"] + [
        f"{stage} {seconds:.2f} s" + (f" ({steps[stage]} steps)" if stage in steps else "")
        for stage, seconds in timings.items()]
    print(" · ".join(parts + [f"total {sum(timings.values()):.2f} s"]))
    return 0


def _write_pngs(images, paths: list[Path], args: argparse.Namespace, seed: int | None, settings: dict) -> None:
    """Each image with the settings in its text chunks (nothing time-dependent: same seed, same bytes)."""
    from PIL.PngImagePlugin import PngInfo

    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        info = PngInfo()
        info.add_text("prompt", args.prompt)
        info.add_text("negative_prompt", args.negative_prompt or "")
        info.add_text("seed", "" if seed is None else str(seed))
        info.add_text("image_index", str(index))
        info.add_text("settings", json.dumps(settings, sort_keys=True))
        try:
            image.save(path, pnginfo=info)
        except OSError as error:
            reason = error.strerror or error
            raise WuerstchenError(f"--out={args.out!r}: cannot write {str(path)!r}: {reason}") from None
        shown = f"seed {seed}" if seed is not None else "generator state from --embeddings"
        print(f"wrote {path} ({image.width}×{image.height}, {shown})")


def build_parser() -> argparse.ArgumentParser:
    from engine.recipe import Recipe

    published = Recipe()
    parser = _Parser(prog="wuerstchen", description="Würstchen v2 text-to-image inference engine.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="make images from a prompt",
                              description="Make images from a prompt. Without --prior/--decoder, runs a tiny "
                                          "demo model with random weights.")
    gen.add_argument("prompt", help="what the image shows (empty is allowed)")
    gen.add_argument("--out", metavar="FILE.png",
                     help="where to write the image; with --num-images N, FILE-0.png … FILE-(N-1).png")
    model_flags(gen, default_preset="tiny")
    gen.add_argument("--negative-prompt", help="what the image should not show (used by every guided stage)")
    gen.add_argument("--height", type=int, help=f"pixels, a multiple of 128 (default {published.height})")
    gen.add_argument("--width", type=int, help=f"pixels, a multiple of 128 (default {published.width})")
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
    gen.add_argument("--seed", type=int, help="random seed (default: a random one, printed and saved; with "
                                              "--embeddings, where the prior that made them left off)")
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
        return args.run(args)
    except WuerstchenError as error:
        print(f"wuerstchen {args.command}: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
