"""What quantization costs in quality and saves in memory, measured: per scheme (or recipe), the layers it
quantizes, one step's error of each stage against the unquantized model from the same input, the images' PSNR
and SSIM against the unquantized pipeline's (and PSNR against fp32) over prompts × seeds, the prior's and
decoder's weight bytes and (on a GPU) the peak memory of a call. Beside them, the cost of bf16's rounded
timestep embedding: the same bf16 pipeline with the noise level rounded as diffusers rounds it, against the
engine's fp32 noise level. Everything runs on the `torch` backend (the fast ones equal it, tested).

    python -m benchmarks.quant_quality [--preset tiny | --prior DIR --decoder DIR] [--device auto]
        [--schemes fp8 int8] [--size 256] [--prompts 4] [--seeds 4] [--json FILE]
    wuerstchen bench --quantize fp8 int8 --quality [--sizes 1024] [--prompts 4] [--seeds 4] [--json FILE]

Random weights (the presets) measure the arithmetic, not how a picture looks, and the report says so: the
numbers for the published weights come from running this with --prior/--decoder on a machine that has them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable

import numpy as np
import torch

from engine.cli import model_flags, resolve_flags
from engine.errors import WuerstchenError
from engine.precision import Quantization
from engine.quantization import CALIBRATION_PROMPTS, STAGES, calibration_steps, relative_error
from engine.runtime import parse_quantize
from engine.shapes import check_image_size

PROMPTS = (*CALIBRATION_PROMPTS, "a bowl of ramen on a wooden table, steam rising", "a city street at night in the "
           "rain, neon signs", "a watercolour of mountains above a lake", "a portrait of an astronaut, studio light")


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; infinite for equal images."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Wang et al., 2004) of height × width × channels images in [0, 1], as their reference
    code and scikit-image compute it: local statistics under an 11-tap Gaussian window of σ 1.5, the constants
    (0.01, 0.03), averaged over the windows that lie inside the image and over the channels (torchmetrics also
    averages windows that hang over the border, padded by reflection)."""
    x, y = (torch.from_numpy(np.asarray(a, dtype=np.float64)).permute(2, 0, 1).unsqueeze(1) for a in (image, reference))
    taps = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5**2))
    taps /= taps.sum()
    window = torch.outer(taps, taps)[None, None]

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mean_x**2, local_mean(y * y) - mean_y**2
    covariance = local_mean(x * y) - mean_x * mean_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def images(pipe, prompts: list[str], seeds: list[int], height: int, width: int) -> list[np.ndarray]:
    """One image per (prompt, seed), the published recipe's steps."""
    from engine.recipe import Recipe

    call = Recipe(height=height, width=width).call()
    pipe.set_progress_bar_config(disable=True)
    return [pipe(prompt, **call, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            for prompt in prompts for seed in seeds]


def peak_memory(pipe, prompt: str, height: int, width: int) -> int | None:
    """Peak CUDA memory of one call, bytes; None off a GPU."""
    if pipe.device.type != "cuda":
        return None
    torch.cuda.synchronize(pipe.device)
    torch.cuda.reset_peak_memory_stats(pipe.device)
    images(pipe, [prompt], [0], height, width)
    return torch.cuda.max_memory_allocated(pipe.device)


def weight_bytes(pipe) -> int:
    from engine.models.quantized import weight_bytes as model_bytes

    return sum(model_bytes(getattr(pipe.stages, stage)) for stage in STAGES)


def step_errors(pipe, reference) -> dict[str, float]:
    """Per stage, one step's relative error of `pipe`'s model against `reference`'s (unquantized) from the same
    inputs: the scan's calibration steps (`engine.quantization.calibration_steps`)."""
    from engine.backends.pytorch import SCAN_SIZE

    plain = reference.stages
    steps = calibration_steps(reference.config, plain.prior_text, plain.prior, plain.decoder_text, plain.decoder,
                              SCAN_SIZE)
    with torch.no_grad():
        return {stage: relative_error(steps[stage](getattr(pipe.stages, stage)), steps[stage](getattr(plain, stage)))
                for stage in STAGES}


def compare(found: list[np.ndarray], references: dict[str, list[np.ndarray]], ssim_against: str | None = None) -> dict:
    """Against each list of reference images: PSNR's mean and worst, and against `ssim_against` SSIM's too."""
    out = {}
    for name, reference in references.items():
        pairs = list(zip(found, reference, strict=True))
        values = [psnr(a, b) for a, b in pairs]
        out[name] = {"psnr_db_mean": float(np.mean(values)), "psnr_db_worst": float(min(values))}
        if name == ssim_against:
            values = [ssim(a, b) for a, b in pairs]
            out[name] |= {"ssim_mean": float(np.mean(values)), "ssim_worst": float(min(values))}
    return out


def measure(runtime, schemes: list, height: int, width: int, prompts: list[str], seeds: list[int],
            progress: Callable[[str], None] = lambda _: None) -> dict:
    """The report: `runtime` (the torch backend, unquantized, in the precision the quantized models run in)
    against fp32 and against each of `schemes` (`Quantization`s, scanned on load, or `QuantRecipe`s)."""
    from benchmarks.bench import provenance
    from engine.pipeline import WuerstchenPipeline
    from engine.runtime import resolve

    base = runtime.precision.value
    progress(f"fp32 reference: {len(prompts) * len(seeds)} images at {height}x{width}")
    fp32 = WuerstchenPipeline.load(resolve(runtime.source, "torch", runtime.device, "fp32"))
    exact = images(fp32, prompts, seeds, height, width)
    fp32.close()
    plain = WuerstchenPipeline.load(runtime)
    progress(f"{base}: the same images")
    reference = images(plain, prompts, seeds, height, width)
    rows = [{"name": base, "quality": compare(reference, {"fp32": exact}),
             "weight_bytes": weight_bytes(plain), "peak_bytes": peak_memory(plain, prompts[0], height, width)}]
    if plain.stages.fp32_timesteps:  # bf16: the noise level as diffusers rounds it, for comparison
        rounded = plain.with_stages(dataclasses.replace(plain.stages, fp32_timesteps=False))
        rows.append({"name": f"{base}, r rounded", "quality": compare(
            images(rounded, prompts, seeds, height, width), {"fp32": exact, base: reference}, ssim_against=base)})
    try:
        for scheme in schemes:
            progress(f"{scheme.value if isinstance(scheme, Quantization) else scheme.describe()}: loading, images")
            pipe = WuerstchenPipeline.load(dataclasses.replace(runtime, quantization=scheme))
            try:
                rows.append({"name": pipe.quantization.describe(), "recipe": pipe.quantization.to_dict(),
                             "step_error": step_errors(pipe, plain),
                             "quality": compare(images(pipe, prompts, seeds, height, width),
                                                {"fp32": exact, base: reference}, ssim_against=base),
                             "weight_bytes": weight_bytes(pipe),
                             "peak_bytes": peak_memory(pipe, prompts[0], height, width)})
            finally:
                pipe.close()
    finally:
        plain.close()
    return {"provenance": provenance(runtime.device), "runtime": runtime.describe(),
            "random_weights": runtime.source.kind == "preset", "height": height, "width": width,
            "prompts": prompts, "seeds": seeds, "rows": rows}


def _mean_worst(values: dict | None, key: str, spec: str) -> str:
    if values is None or f"{key}_mean" not in values:
        return ""
    return f"{values[f'{key}_mean']:{spec}} ({values[f'{key}_worst']:{spec}})"


def table(report: dict) -> str:
    """The report as the terminal shows it: a header naming the machine, the model and the workload, a row per
    model."""
    origin, base = report["provenance"], report["rows"][0]["name"]
    unquantized_bytes = report["rows"][0]["weight_bytes"]
    lines = [f"{origin['device']} · torch {origin['versions']['torch']} · {report['runtime']} · "
             f"{report['height']}x{report['width']} · {len(report['prompts'])} prompts × {len(report['seeds'])} "
             f"seeds · published steps · {origin['date']}",
             f"{'':<44}{'step error':>16}{'PSNR vs fp32':>15}{'PSNR vs ' + base:>15}{'SSIM vs ' + base:>17}"
             f"{'weights':>9}{'peak':>10}"]
    for row in report["rows"]:
        errors, weights, peak = row.get("step_error"), row.get("weight_bytes"), row.get("peak_bytes")
        quality = row["quality"]
        lines.append(
            f"{row['name']:<44}{f'{errors[STAGES[0]]:.2%} / {errors[STAGES[1]]:.2%}' if errors else '—':>16}"
            f"{_mean_worst(quality.get('fp32'), 'psnr_db', '.1f'):>15}"
            f"{_mean_worst(quality.get(base), 'psnr_db', '.1f'):>15}{_mean_worst(quality.get(base), 'ssim', '.3f'):>17}"
            f"{'' if weights is None else format(weights / unquantized_bytes, '.0%'):>9}"
            f"{'' if peak is None else format(peak / 2**30, '.2f') + ' GiB':>10}")
    lines.append("step error: prior / decoder, one step against the unquantized model from the same inputs (the scan's "
                 "calibration steps); PSNR in dB and SSIM: mean (worst) over the images; weights: the prior's and "
                 "decoder's bytes against unquantized")
    if report["random_weights"]:
        lines.append("random weights: the numbers measure the arithmetic, not how a picture looks")
    return "\n".join(lines)


def workload(prompts: int, seeds: int) -> tuple[list[str], list[int]]:
    """The first `prompts` of `PROMPTS` and seeds 0 to `seeds` − 1, checked."""
    if not 1 <= prompts <= len(PROMPTS):
        raise WuerstchenError(f"--prompts {prompts}: expected 1 to {len(PROMPTS)}")
    if seeds < 1:
        raise WuerstchenError(f"--seeds {seeds}: expected a positive integer")
    return list(PROMPTS[:prompts]), list(range(seeds))


def write_report(report: dict, path: str) -> None:
    from engine.files import write_atomically

    write_atomically(path, (json.dumps(report, indent=1) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags(parser, default_preset="tiny", bundles=False, backends="none", default_dtype="bf16", quantize="none")
    parser.add_argument("--schemes", nargs="+", default=["fp8", "int8"],
                        help="schemes (fp8, int8) or recipe files to measure (default fp8 int8)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts, at most {len(PROMPTS)} (default 4)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    parser.add_argument("--json", metavar="FILE", help="also write the report, with provenance, as JSON")
    args = parser.parse_args(argv)
    try:
        try:
            schemes = [parse_quantize(scheme) for scheme in args.schemes]
        except WuerstchenError as error:
            raise WuerstchenError(f"--schemes: {error}") from None
        if None in schemes:
            raise WuerstchenError(f"--schemes {' '.join(args.schemes)}: expected fp8, int8 or recipe files, not none")
        prompts, seeds = workload(args.prompts, args.seeds)
        if args.json:
            from benchmarks.report import check_output

            check_output("--json", args.json)
        runtime = resolve_flags(args, backend="torch")
        check_image_size(runtime.source.read_config(), args.size, args.size)
    except WuerstchenError as error:
        print(f"quant_quality: error: {error}", file=sys.stderr)
        return 2
    report = measure(runtime, schemes, args.size, args.size, prompts, seeds,
                     progress=lambda line: print(line, file=sys.stderr))
    print(table(report))
    if args.json:
        write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
