"""Dump what the C++ tests compare against, from the Python engine and its oracles.

    python cpp/tests/make_fixtures.py --bundle BUNDLE --vocab bpe_simple_vocab_16e6.txt --out DIR

writes DIR/index.json and raw little-endian arrays beside it (float32 `.f32`, int64 `.i64`):
- tokens: transformers' CLIP tokenizer (AutoTokenizer over a tokenizer.json built from CLIP's real 49,408-entry
  vocabulary, which DIR/clip_tokenizer holds for the C++ side) and the bundle's two tokenizers, on 500+ prompts;
- per torch CPU build (default, avx2, avx512; each in a subprocess with ATEN_CPU_CAPABILITY set): torch.randn
  draws from seeded generators, the antialiased bicubic pyramid resize, lerp and the sampler step, the schedules;
- images: the bundle's pipeline on ONNX Runtime (WuerstchenPipeline.from_bundle, output_type="np") at three sizes.
The C++ tests read nothing else, so this script is the one place where Python's numbers come from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np

CPU_BUILDS = ("default", "avx2", "avx512")
NOISE_SEEDS = (0, 1, 42, 2**32 + 7, 987654321)
# Element counts drawn one after another from one generator: below 16 (torch's double path, with its cached
# second value), multiples of 16, tails, and the pipeline's latents (prior 16·3·3 … decoder 4·128·128).
NOISE_COUNTS = (16, 17, 5, 1, 31, 144, 2304, 7, 8, 100, 4096, 15, 33, 65536)
RESIZES = [((3, 3), (8, 8)), ((3, 3), (4, 4)), ((3, 3), (2, 2)), ((6, 9), (16, 24)), ((6, 9), (8, 12)),
           ((6, 9), (4, 6)), ((12, 12), (32, 32)), ((12, 12), (16, 16)), ((12, 12), (8, 8)), ((24, 24), (64, 64)),
           ((24, 24), (16, 16)), ((5, 7), (3, 11)), ((16, 16), (5, 5)), ((2, 4), (2, 9)), ((7, 3), (2, 2))]
STEP_COUNTS = (1, 2, 3, 4, 5, 7, 10, 12, 15, 16, 20, 29, 30, 31, 40, 60, 64, 100)
IMAGES = [
    # The CLI's defaults: the published 29-evaluation prior schedule, prior guidance 4, 12 unguided decoder steps.
    {"name": "128x128", "prompt": "a photo of a corgi on the beach", "negative_prompt": "", "height": 128,
     "width": 128, "seed": 0, "prior_steps": None, "decoder_steps": 12, "prior_guidance": 4.0,
     "decoder_guidance": 0.0},
    # Non-square, a negative prompt, and guidance in the decoder too (its negative half sees a zero embedding).
    {"name": "256x384", "prompt": "Ein Würstchen im Café, 東京 🌭\tat dusk", "negative_prompt": "blurry, low quality",
     "height": 256, "width": 384, "seed": 7, "prior_steps": 4, "decoder_steps": 3, "prior_guidance": 4.0,
     "decoder_guidance": 2.5},
    # The bundle's largest size, unguided prior.
    {"name": "512x512", "prompt": "an astronaut riding a horse, oil painting", "negative_prompt": "", "height": 512,
     "width": 512, "seed": 123, "prior_steps": 2, "decoder_steps": 2, "prior_guidance": 1.0,
     "decoder_guidance": 0.0},
]


class Writer:
    """Raw arrays beside one JSON index."""

    def __init__(self, out: Path, prefix: str = ""):
        self.out, self.prefix = out, prefix
        self.count = 0

    def array(self, values, dtype) -> dict:
        array = np.ascontiguousarray(np.asarray(values, dtype=dtype))
        suffix = {np.float32: "f32", np.int64: "i64"}[dtype]
        name = f"{self.prefix}{self.count:04d}.{suffix}"
        self.count += 1
        array.tofile(self.out / name)
        return {"file": name, "shape": list(array.shape)}


# ---------------------------------------------------------------------------------------------------- tokens

def clip_tokenizer_folder(vocab_file: Path, folder: Path) -> None:
    """A transformers CLIP tokenizer over CLIP's own BPE file (the open-clip-torch wheel's), saved as
    tokenizer.json: the same kind of folder `wuerstchen export` writes into a bundle."""
    from transformers import CLIPTokenizer

    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_symbols = _bytes_to_unicode()
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)


def _bytes_to_unicode() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def prompts() -> list[str]:
    """500+ prompts: plain English, accents in composed and decomposed forms, other scripts, emoji (with
    skin tones, flags, joiners), tabs, newlines and odd spaces, contractions in any case, digits, CLIP's own
    special tokens, and prompts of 300 characters and more (truncated to 77 tokens)."""
    words = ("a photo of the corgi beach sunset astronaut riding horse oil painting cinematic lighting highly "
             "detailed 4k portrait of an old man with a beard in the style of van gogh watercolor city at night "
             "neon rain reflections cat wearing sunglasses sitting on a red sofa").split()
    unusual = ["café", "naïve", "résumé", "Würstchen", "Ångström", "crème brûlée", "São Paulo", "Dvořák", "ÆØÅ",
               "straße", "ΣΊΣΥΦΟΣ", "Ελληνικά", "Москва", "東京タワー", "北京烤鸭", "서울", "ภาษาไทย", "עברית",
               "العربية",
               "हिन्दी", "İstanbul", "ǅemal", "ﬁne ﬂour", "Ⅻ", "½ cup", "x²+y³", "①②③", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ｆｕｌｌｗｉｄｔｈ",
               "🐶", "🌭🔥", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪", "❤️", "e\u0301", "a\u0308\u0301", "\u0301lone mark",
               "Z\u0335a\u0336l",
               "don't", "DON'T", "it's", "IT'S", "we'll", "they've", "I'm", "you'd", "they're", "rock'n'roll",
               "3.14159", "2024-11-27", "#hashtag", "@user", "C++", "e-mail", "...", "?!", "¿qué?", "«quotes»",
               "“smart”", "—dash—", "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "tab\there",
               "new\nline", "cr\r\nlf", "\u00a0nbsp", "\u3000ideographic", "\u2003em space", "zero\u200bwidth",
               "soft\u00adhyphen", "\x00nul", "\x7fdel", "\ufeffbom", "ﾊﾝｶｸ", "Ǆ", "ß", "ﬀ", "Ω", "K"]
    fixed = ["", " ", "\t\n", "a", "A", "hello world", "Hello, World!", "  leading and trailing  ",
             "a photo of a corgi on the beach", "an astronaut riding a horse, oil painting",
             "multiple   spaces\t\ttabs\n\nnewlines", "UPPER lower MiXeD", "numbers 1234567890 and 3rd 21st",
             "emoji only 🐶🐱🐭🐹🐰🦊🐻🐼", "accents: é (composed) vs e\u0301 (decomposed)",
             unicodedata.normalize("NFD", "Ça coûte très cher à Zürich"),
             unicodedata.normalize("NFC", "Ça coûte très cher à Zürich"),
             "ΣΊΣΥΦΟΣ σίσυφος ς", "İIıi", "x" * 300, "word " * 80, "🐶" * 100, "é" * 150,
             "a" + "\u0301" * 20, "<|startoftext|>hello<|endoftext|>", "'s 't 're 've 'm 'll 'd", "''s'''t"]
    generated = []
    rng = random.Random(16)
    while len(generated) < 520:
        kind = rng.random()
        count = rng.randint(1, 12) if kind < 0.8 else rng.randint(40, 90)
        parts = [rng.choice(unusual) if rng.random() < 0.35 else rng.choice(words) for _ in range(count)]
        separators = [rng.choice([" ", " ", " ", ", ", "\t", "\n", "  ", "-", "", ". "]) for _ in parts]
        text = "".join(p + s for p, s in zip(parts, separators, strict=True))
        form = rng.random()
        if form < 0.15:
            text = unicodedata.normalize("NFD", text)
        elif form < 0.25:
            text = text.upper()
        elif form < 0.3:
            text = text.title()
        if kind >= 0.8:
            text = (text * 3)[:rng.randint(300, 400)]
        generated.append(text)
    return fixed + generated


def dump_tokens(out: Path, bundle: Path, vocab_file: Path, writer: Writer) -> dict:
    from transformers import AutoTokenizer

    clip_folder = out / "clip_tokenizer"
    clip_tokenizer_folder(vocab_file, clip_folder)
    texts = prompts()
    result = {"prompts": texts, "tokenizers": []}
    manifest = json.loads((bundle / "manifest.json").read_text())
    folders = [("clip", clip_folder)]
    folders += [(stage, bundle / manifest["tokenizers"][stage]) for stage in ("prior", "decoder")]
    for name, folder in folders:
        # The same call the Python engine makes (engine/text.py TextEncoder.tokenize).
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoded = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        result["tokenizers"].append({"name": name, "folder": str(folder),
                                     "ids": writer.array(encoded.input_ids, np.int64),
                                     "mask": writer.array(encoded.attention_mask, np.int64)})
    return result


# -------------------------------------------------------------------------------- numerics per torch CPU build

def dump_numerics(out: Path, build: str) -> dict:
    """Run in a subprocess with ATEN_CPU_CAPABILITY=build: every number depends on the kernel torch picked."""
    import torch
    import torch.nn.functional as F

    from engine.config import ScheduleConfig
    from engine.recipe import DEFAULT_PRIOR_TIMESTEPS
    from engine.schedule import make_schedule, sampler_step, timestep_grid

    assert torch.backends.cpu.get_cpu_capability().lower() == build, torch.backends.cpu.get_cpu_capability()
    writer = Writer(out, prefix=f"{build}-")
    result = {"build": build, "noise": [], "resize": [], "schedules": [], "steps": []}

    for seed in NOISE_SEEDS:
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.randn(count, generator=generator, dtype=torch.float32) for count in NOISE_COUNTS]
        result["noise"].append({"seed": seed, "counts": list(NOISE_COUNTS),
                                "values": writer.array(torch.cat(draws).numpy(), np.float32)})

    generator = torch.Generator().manual_seed(3)
    for (in_h, in_w), (out_h, out_w) in RESIZES:
        x = torch.randn(2, 16, in_h, in_w, generator=generator) * 3
        y = F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=True)
        result["resize"].append({"input": writer.array(x.numpy(), np.float32),
                                 "output": writer.array(y.numpy(), np.float32)})

    config = ScheduleConfig()
    grids = [("linear", n, timestep_grid(n)) for n in STEP_COUNTS]
    grids.append(("default_prior", len(DEFAULT_PRIOR_TIMESTEPS) - 1, timestep_grid(0, DEFAULT_PRIOR_TIMESTEPS)))
    for kind, steps, grid in grids:
        schedule = make_schedule(grid, config, torch.float32, torch.device("cpu"))
        result["schedules"].append({"kind": kind, "steps": steps, "s": config.s, "scaler": config.scaler,
                                    "grid": writer.array(grid.numpy(), np.float32),
                                    "ratios": writer.array(schedule.ratios.numpy(), np.float32),
                                    "coefficients": writer.array(schedule.coefficients.numpy(), np.float32)})

    # Guidance and the sampler update on latents of the pipeline's sizes and odd ones (vector tails).
    schedule = make_schedule(timestep_grid(12), config, torch.float32, torch.device("cpu"))
    for count, scale, row in ((144, 4.0, 0), (2304, 4.0, 5), (4 * 32 * 32, 2.5, 11), (37, 7.5, 3), (1000, 0.25, 2)):
        x, eps_prompt, eps_negative, noise = (torch.randn(count, generator=generator) * 2 for _ in range(4))
        eps = torch.lerp(eps_negative, eps_prompt, scale)
        stepped = sampler_step(schedule.coefficients[row], x, eps, noise)
        result["steps"].append({"scale": scale, "coefficients": schedule.coefficients[row].tolist(),
                                "x": writer.array(x.numpy(), np.float32),
                                "eps_prompt": writer.array(eps_prompt.numpy(), np.float32),
                                "eps_negative": writer.array(eps_negative.numpy(), np.float32),
                                "noise": writer.array(noise.numpy(), np.float32),
                                "eps": writer.array(eps.numpy(), np.float32),
                                "stepped": writer.array(stepped.numpy(), np.float32)})
    return result


# ------------------------------------------------------------------------------------------------------ images

def dump_images(bundle: Path, writer: Writer) -> list[dict]:
    import torch

    from engine import OnnxRuntimeOptions, WuerstchenPipeline

    pipe = WuerstchenPipeline.from_bundle(bundle, options=OnnxRuntimeOptions(providers=["CPUExecutionProvider"]))
    pipe.set_progress_bar_config(disable=True)
    results = []
    published = json.loads((bundle / "manifest.json").read_text())["schedule"]["default_prior_timesteps"]
    for case in IMAGES:
        steps = {"prior_num_inference_steps": case["prior_steps"]} if case["prior_steps"] else \
            {"prior_timesteps": published}
        output = pipe(case["prompt"], negative_prompt=case["negative_prompt"] or None, height=case["height"],
                      width=case["width"], **steps, prior_guidance_scale=case["prior_guidance"],
                      num_inference_steps=case["decoder_steps"], decoder_guidance_scale=case["decoder_guidance"],
                      generator=torch.Generator().manual_seed(case["seed"]), output_type="np")
        results.append({**case, "image": writer.array(output.images[0], np.float32)})  # (H, W, 3) in [0, 1]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True, help="CLIP's bpe_simple_vocab_16e6.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--numerics-only", metavar="BUILD", help=argparse.SUPPRESS)  # the per-build subprocess
    args = parser.parse_args()
    args.out, args.bundle = args.out.resolve(), args.bundle.resolve()  # the tests run from their build folder
    args.out.mkdir(parents=True, exist_ok=True)
    if args.numerics_only:
        numerics = dump_numerics(args.out, args.numerics_only)
        (args.out / f"numerics-{args.numerics_only}.json").write_text(json.dumps(numerics))
        return

    builds = []
    for build in CPU_BUILDS:
        # A build the CPU lacks cannot run; torch then falls back, which the subprocess's assert reports.
        env = {**os.environ, "ATEN_CPU_CAPABILITY": build}
        command = [sys.executable, __file__, "--bundle", str(args.bundle), "--vocab", str(args.vocab),
                   "--out", str(args.out), "--numerics-only", build]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            builds.append(json.loads((args.out / f"numerics-{build}.json").read_text()))
        else:
            print(f"make_fixtures: torch build {build} unavailable here: {done.stderr.strip().splitlines()[-1]}")
    writer = Writer(args.out)
    index = {"bundle": str(args.bundle.resolve()), "tokens": dump_tokens(args.out, args.bundle, args.vocab, writer),
             "numerics": builds, "images": dump_images(args.bundle, writer)}
    (args.out / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1))
    print(f"make_fixtures: wrote {args.out} ({len(index['tokens']['prompts'])} prompts, "
          f"{len(builds)} torch CPU builds, {len(index['images'])} images)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the engine, when run from a checkout
    main()
