"""This engine's PyTorch pipeline against diffusers' WuerstchenCombinedPipeline, same weights, same process.

Both pipelines share one set of random full-size weights (random weights cost the same FLOPs as trained
ones) and run the published recipe: prior on the 29-evaluation schedule with guidance 4 (CFG batch 2),
12 decoder steps without guidance, VQGAN decode. Prints the machine, versions, workload, end-to-end
medians after warm-up, peak device memory and how far the two pipelines' images differ.

    python -m benchmarks.pipeline_vs_diffusers --device cuda --dtype fp16 --size 1024 --runs 5
    python -m benchmarks.pipeline_vs_diffusers --preset tiny --device cpu --runs 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from benchmarks.reference import diffusers_pipeline, engine_pipeline, random_reference
from engine import DEFAULT_PRIOR_TIMESTEPS, preset
from engine.device import DTYPE_NAMES, resolve_device, resolve_dtype
from engine.text import byte_level_tokenizer


def build_pair(name: str, device: torch.device, dtype: torch.dtype):
    """diffusers' combined pipeline and ours on one set of random weights (see `random_reference`)."""
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its deprecation and dtype-cast notices would bury the report
    config = preset(name)
    modules = random_reference(config, device=device, dtype=dtype)
    tokenizer = byte_level_tokenizer()
    return diffusers_pipeline(modules, tokenizer), engine_pipeline(modules, tokenizer, config, device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(pipe, call: dict, warmup: int, runs: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Median, min and max seconds of `runs` calls after `warmup` calls, the peak device memory, and the
    images (all calls use the same seed)."""
    for _ in range(warmup):
        images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        pipe(**call, generator=torch.Generator().manual_seed(0))
        _sync(device)
        seconds.append(time.perf_counter() - start)
    result = dict(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds), runs=seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_allocated_gb=peak / 1e9, peak_above_weights_gb=(peak - resident) / 1e9)
    return result, images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wuerstchen-v2", help="wuerstchen-v2 (default) or tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="fp16 on a GPU and fp32 on the CPU by default")
    parser.add_argument("--size", type=int, default=1024, help="height and width in pixels (default 1024)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2, at least 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    reference, engine = build_pair(args.preset, device, dtype)
    call = dict(prompt="a photo of a dog", height=args.size, width=args.size, prior_timesteps=DEFAULT_PRIOR_TIMESTEPS,
                prior_guidance_scale=4.0, num_inference_steps=12, decoder_guidance_scale=0.0,
                num_images_per_prompt=args.batch, output_type="pt")
    with torch.no_grad():
        ours, our_images = measure(engine, call, max(args.warmup, 1), args.runs, device)
        theirs, their_images = measure(reference, call, max(args.warmup, 1), args.runs, device)

    import diffusers
    import transformers

    report = dict(
        machine=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                      cuda=torch.version.cuda),
        workload=dict(preset=args.preset, height=args.size, width=args.size, batch=args.batch,
                      dtype=DTYPE_NAMES[dtype], prior="29 evaluations, guidance 4 (CFG batch 2)",
                      decoder="12 steps, guidance 0", warmup=max(args.warmup, 1), runs=args.runs),
        engine=ours,
        diffusers=theirs,
        speedup=theirs["median_s"] / ours["median_s"],
        max_image_difference=(our_images.float() - their_images.float()).abs().max().item(),
    )
    print(f"{report['machine']} · torch {torch.__version__} · diffusers {diffusers.__version__}")
    print(f"{args.preset} {args.size}² batch {args.batch} {DTYPE_NAMES[dtype]}, {report['workload']['prior']}, "
          f"{report['workload']['decoder']}, median of {args.runs} after {report['workload']['warmup']} warm-up")
    for label, result in (("engine", ours), ("diffusers", theirs)):
        memory = f" · peak {result['peak_allocated_gb']:.2f} GB" if "peak_allocated_gb" in result else ""
        spread = f"min {result['min_s']:.3f}, max {result['max_s']:.3f}"
        print(f"  {label:<10} {result['median_s']:.3f} s ({spread}){memory}")
    print(f"  speedup {report['speedup']:.2f}× · max image difference {report['max_image_difference']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
