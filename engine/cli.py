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


def generate(args: argparse.Namespace) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from engine.config import preset
    from engine.device import DTYPE_NAMES, resolve_device, resolve_dtype
    from engine.pipeline import WuerstchenPipeline, check_request, read_config
    from engine.schedule import DEFAULT_PRIOR_TIMESTEPS

    if (args.prior is None) != (args.decoder is None):
        given, missing = ("--prior", "--decoder") if args.prior else ("--decoder", "--prior")
        raise WuerstchenError(f"{given} given without {missing}: pass both folders, or neither for the demo model")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
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
    config = preset("tiny") if args.prior is None else read_config(args.prior, args.decoder)
    check_request(config, device, **call, generator=None, output_type="pil")
    paths = _output_paths(args.out, args.num_images)

    # 2. Load.
    start = time.perf_counter()
    if args.prior is None:
        print(f"wuerstchen: {DEMO_NOTICE}", file=sys.stderr)
        pipe = WuerstchenPipeline.from_preset("tiny", device=device, dtype=dtype)
    else:
        pipe = WuerstchenPipeline.from_pretrained(args.prior, args.decoder, device=device, dtype=dtype,
                                                  variant=args.variant)
    load_seconds = time.perf_counter() - start

    # 3. Generate with a CPU generator, so a seed gives the same noise on every device.
    output = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pil")

    # 4. Save with the settings in the PNG's text chunks (nothing time-dependent: same seed, same bytes).
    settings = {k: v for k, v in call.items() if not k.endswith(("prompt", "timesteps"))}
    settings.update(prior_timesteps="published" if published_prior else "linspace",
                    dtype=DTYPE_NAMES[dtype], device=device.type,
                    model="tiny demo (random weights)" if args.prior is None else f"{args.prior} + {args.decoder}")
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
