"""What quantization costs in quality and saves in memory, measured: per scheme, the recipe a scan picks,
one step's error of each stage against the unquantized model, the images' PSNR against the unquantized bf16
pipeline and against fp32 over prompts × seeds, the prior's and decoder's weight bytes and (on a GPU) the
peak memory of a call. Beside them, the cost of bf16's rounded timestep embedding: the same bf16 pipeline
with the noise level rounded as diffusers rounds it, against the engine's fp32 noise level.

    python -m benchmarks.quant_quality [--preset tiny | --prior DIR --decoder DIR] [--device auto]
        [--schemes fp8 int8] [--size 256] [--prompts 4] [--seeds 4] [--json FILE]

Random weights (the presets) measure the arithmetic, not how a picture looks: the numbers for the published
weights come from running this with --prior/--decoder on a machine that has them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import numpy as np
import torch

from engine.cli import model_flags, resolve_flags
from engine.errors import WuerstchenError
from engine.precision import Quantization
from engine.quantization import CALIBRATION_PROMPTS, STAGES

PROMPTS = (*CALIBRATION_PROMPTS, "a bowl of ramen on a wooden table, steam rising", "a city street at night in the "
           "rain, neon signs", "a watercolour of mountains above a lake", "a portrait of an astronaut, studio light")


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; infinite for equal images."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def images(pipe, prompts: list[str], seeds: list[int], size: int) -> list[np.ndarray]:
    """One image per (prompt, seed) at `size`², the published recipe's steps."""
    from engine.recipe import Recipe

    call = Recipe(height=size, width=size).call()
    pipe.set_progress_bar_config(disable=True)
    return [pipe(prompt, **call, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            for prompt in prompts for seed in seeds]


def peak_memory(pipe, prompt: str, size: int) -> int | None:
    """Peak CUDA memory of one call, bytes; None off a GPU."""
    if pipe.device.type != "cuda":
        return None
    torch.cuda.synchronize(pipe.device)
    torch.cuda.reset_peak_memory_stats(pipe.device)
    images(pipe, [prompt], [0], size)
    return torch.cuda.max_memory_allocated(pipe.device)


def weight_bytes(pipe) -> int:
    from engine.models.quantized import weight_bytes as model_bytes

    return sum(model_bytes(getattr(pipe.stages, stage)) for stage in STAGES)


def compare(found: list[np.ndarray], references: dict[str, list[np.ndarray]]) -> dict:
    """Mean and worst PSNR of `found` against each list of reference images."""
    out = {}
    for name, reference in references.items():
        values = [psnr(a, b) for a, b in zip(found, reference, strict=True)]
        out[name] = {"mean_db": float(np.mean(values)), "worst_db": float(min(values))}
    return out


def _shown(psnr_row: dict | None) -> str:
    return "" if psnr_row is None else f"{psnr_row['mean_db']:.1f} ({psnr_row['worst_db']:.1f})"


def main(argv: list[str] | None = None) -> int:
    from engine.pipeline import WuerstchenPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags(parser, default_preset="tiny", bundles=False, backends="none", default_dtype="bf16", quantize="none")
    parser.add_argument("--schemes", nargs="+", default=["fp8", "int8"], help="schemes to measure (default fp8 int8)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts, at most {len(PROMPTS)} (default 4)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    parser.add_argument("--json", metavar="FILE", help="also write the report, with provenance, as JSON")
    args = parser.parse_args(argv)
    try:
        schemes = [Quantization.parse(scheme, field="--schemes") for scheme in args.schemes]
        if None in schemes or not 1 <= args.prompts <= len(PROMPTS) or args.seeds < 1:
            raise WuerstchenError(f"--schemes {' '.join(args.schemes)} --prompts {args.prompts} --seeds {args.seeds}: "
                                  f"expected fp8 or int8, 1 to {len(PROMPTS)} prompts and at least one seed")
        if args.json:
            from benchmarks.report import check_output

            check_output("--json", args.json)
        runtime = resolve_flags(args, backend="torch")
    except WuerstchenError as error:
        print(f"quant_quality: error: {error}", file=sys.stderr)
        return 2
    from benchmarks.bench import provenance
    from engine.files import write_atomically
    from engine.runtime import resolve

    prompts, seeds = list(PROMPTS[:args.prompts]), list(range(args.seeds))
    origin = provenance(runtime.device)
    print(f"{origin['device']} · torch {origin['versions']['torch']} · {runtime.describe()} · {args.size}² · "
          f"{len(prompts)} prompts × {len(seeds)} seeds · published steps · {origin['date']}")

    fp32 = WuerstchenPipeline.load(resolve(runtime.source, "torch", runtime.device, "fp32"))
    exact = images(fp32, prompts, seeds, args.size)
    fp32.close()
    plain = WuerstchenPipeline.load(runtime)
    reference = images(plain, prompts, seeds, args.size)
    rows = [{"name": f"{runtime.precision.value}", "psnr": compare(reference, {"fp32": exact}),
             "weight_bytes": weight_bytes(plain), "peak_bytes": peak_memory(plain, prompts[0], args.size)}]
    if plain.stages.fp32_timesteps:  # bf16: the noise level as diffusers rounds it, for comparison
        rounded = plain.with_stages(dataclasses.replace(plain.stages, fp32_timesteps=False))
        rows.append({"name": f"{runtime.precision.value}, r rounded", "psnr": compare(
            images(rounded, prompts, seeds, args.size), {"fp32": exact, runtime.precision.value: reference})})
    unquantized_bytes = rows[0]["weight_bytes"]
    plain.close()
    for scheme in schemes:
        pipe = WuerstchenPipeline.load(dataclasses.replace(runtime, quantization=scheme))
        recipe = pipe.quantization
        found = images(pipe, prompts, seeds, args.size)
        rows.append({"name": recipe.describe(), "recipe": recipe.to_dict(),
                     "step_error": {stage: recipe.scan[stage]["step_error"] for stage in STAGES},
                     "psnr": compare(found, {"fp32": exact, runtime.precision.value: reference}),
                     "weight_bytes": weight_bytes(pipe), "peak_bytes": peak_memory(pipe, prompts[0], args.size)})
        pipe.close()

    print(f"{'':<44}{'step error':>20}{'PSNR dB vs fp32':>18}{'vs ' + runtime.precision.value:>14}{'weights':>14}"
          f"{'peak':>10}")
    for row in rows:
        errors, weights, peak = row.get("step_error"), row.get("weight_bytes"), row.get("peak_bytes")
        step = f"{errors['prior']:.2%} / {errors['decoder']:.2%}" if errors else "—"
        against = [_shown(row["psnr"].get(name)) for name in ("fp32", runtime.precision.value)]
        print(f"{row['name']:<44}{step:>20}{against[0]:>18}{against[1]:>14}"
              f"{'' if weights is None else format(weights / unquantized_bytes, '.0%'):>14}"
              f"{'' if peak is None else format(peak / 2**30, '.2f') + ' GiB':>10}")
    print("step error: prior / decoder, one step against the unquantized model on the scan's inputs; PSNR: mean "
          "(worst) over the images; weights: the prior's and decoder's bytes against unquantized")
    if args.json:
        report = {"provenance": origin, "runtime": runtime.describe(), "size": args.size, "prompts": prompts,
                  "seeds": seeds, "rows": rows}
        write_atomically(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
