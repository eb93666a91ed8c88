"""Where a denoising step's GPU time goes, by kind of kernel, for this engine's backends and for diffusers.

For the prior step (guidance batch 2), the decoder step and the VQGAN decode of a 1024² image (fp16,
random full-size weights): the wall time (median of CUDA events after warm-up), the kernel time and the
number of kernels, split into GEMM, attention, conv, norm, copy/permute and elementwise, read from
torch.profiler. Steps are profiled eagerly: a CUDA-graph replay launches the same kernels.

    python -m benchmarks.kernel_profile [--size 1024] [--dtype fp16] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from benchmarks.harness import cuda_median_ms

# Kernel-name fragments by kind, first match wins (cuBLAS, CUTLASS, cuDNN, PyTorch and this project's Triton).
KINDS = [
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("copy/permute", ("copy", "cat", "transpose", "permute", "contiguous", "nchwtonhwc", "nhwctonchw")),
    ("conv", ("conv", "implicit", "winograd", "depthwise", "cudnn")),
    ("norm", ("norm", "welford", "reduce", "grn", "layer_norm")),
]


def kind(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, fragments in KINDS if any(f in name for f in fragments)), "elementwise/other")


def profile(function, warmup: int = 10, runs: int = 20) -> dict:
    """Median wall milliseconds of `function` and its kernel time by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    wall_ms = cuda_median_ms(function, warmup, runs)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as trace:
        function()
        torch.cuda.synchronize()
    by_kind, kernels = collections.Counter(), 0
    for event in trace.key_averages():
        total = getattr(event, "device_time_total", 0)
        if total and event.device_type.name == "CUDA":
            by_kind[kind(event.key)] += total / 1e3
            kernels += event.count
    return {"wall_ms": wall_ms, "kernel_ms": sum(by_kind.values()), "kernels": kernels,
            "by_kind_ms": dict(by_kind.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_profile needs a CUDA GPU", file=sys.stderr)
        return 2

    from benchmarks.bench import provenance
    from benchmarks.reference import random_reference
    from engine import WuerstchenPipeline, preset
    from engine.device import DTYPES
    from engine.models.decoder import resize_image_embeddings
    from engine.shapes import image_shapes

    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    config = preset("wuerstchen-v2")
    shapes = image_shapes(config, args.size, args.size, batch=1)
    generator = torch.Generator().manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=generator) * scale).to(device, dtype)

    x, xd = randn(2, *shapes.prior_latent[1:]), randn(*shapes.decoder_latent)
    r, text, clip = randn(2).abs().clamp(max=1), randn(2, 77, 1280), randn(1, 77, 1024)
    embedding = randn(*shapes.prior_latent, scale=30)
    rows, origin = {}, provenance(device)
    with torch.inference_mode():
        for backend in ("torch", "torch-fast"):
            pipe = WuerstchenPipeline.from_preset("wuerstchen-v2", device, dtype, backend=backend)
            kv = pipe.prior.condition(text)
            decoder_kv, effnet = pipe.decoder.condition(
                resize_image_embeddings(embedding, config.decoder, shapes.decoder_levels), clip)
            rows[backend] = {
                "prior_step": profile(lambda pipe=pipe, kv=kv: pipe.prior(x, r, kv)),
                "decoder_step": profile(lambda pipe=pipe, kv=decoder_kv, e=effnet: pipe.decoder(xd, r[:1], kv, e)),
                "vqgan_decode": profile(lambda pipe=pipe: pipe.vqgan(xd)),
            }
            del pipe
        modules = random_reference(config, device=device, dtype=dtype)
        rows["diffusers"] = {
            "prior_step": profile(lambda: modules["prior"](x, r=r, c=text)),
            "decoder_step": profile(lambda: modules["decoder"](xd, r=r[:1], effnet=embedding, clip=clip)),
            "vqgan_decode": profile(lambda: modules["vqgan"].decode(xd * config.vqgan.scale_factor)),
        }
    print(f"{origin['device']} · torch {origin['versions']['torch']} · {args.dtype} · {args.size}² · {origin['date']}")
    kinds = [k for k, _ in KINDS] + ["elementwise/other"]
    header = f"{'target':<12}{'stage':<14}{'wall ms':>9}{'kernel ms':>11}{'kernels':>9}"
    print(header + "".join(f"{k:>15}" for k in kinds))
    for target, stages in rows.items():
        for stage, row in stages.items():
            print(f"{target:<12}{stage:<14}{row['wall_ms']:>9.2f}{row['kernel_ms']:>11.2f}{row['kernels']:>9}"
                  + "".join(f"{row['by_kind_ms'].get(k, 0.0):>15.2f}" for k in kinds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"provenance": origin, "size": args.size, "dtype": args.dtype, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
