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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.harness import cuda_median_ms
from benchmarks.report import json_file
from engine.config import WuerstchenConfig
from engine.files import write_atomically
from engine.shapes import image_shapes

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


@dataclass(frozen=True)
class StageInputs:
    """Random inputs of the three stages for one `size`² image, always drawn in the same order: the prior's
    latent with its guidance batch of 2, the decoder's latent, two noise levels, CLIP-bigG and CLIP-H
    states, and the prior's image embedding."""

    prior_latent: torch.Tensor
    decoder_latent: torch.Tensor
    r: torch.Tensor
    prior_text: torch.Tensor
    decoder_text: torch.Tensor
    embedding: torch.Tensor
    decoder_levels: tuple[tuple[int, int], ...]

    @classmethod
    def draw(cls, config: WuerstchenConfig, size: int, device: torch.device, dtype: torch.dtype) -> StageInputs:
        shapes = image_shapes(config, size, size, batch=1)
        generator = torch.Generator().manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(shape, generator=generator) * scale).to(device, dtype)

        return cls(
            prior_latent=randn(2, *shapes.prior_latent[1:]), decoder_latent=randn(*shapes.decoder_latent),
            r=randn(2).abs().clamp(max=1), prior_text=randn(2, 77, config.prior.c_cond),
            decoder_text=randn(1, 77, config.decoder.clip_embd), embedding=randn(*shapes.prior_latent, scale=30),
            decoder_levels=shapes.decoder_levels,
        )


def random_stages(config: WuerstchenConfig, device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The plain prior, decoder and VQGAN of `config` with the seeded random weights of the preset pipeline
    (`WuerstchenPipeline.from_preset(..., seed=seed)`)."""
    from engine.models import Decoder, Prior, VQGANDecoder
    from engine.weights import random_stage

    # The noise heads are shrunk, as the preset pipeline shrinks them: random heads bring the denominators
    # of the noise parametrisations near zero.
    return (random_stage(Prior, config.prior, seed + 1, device, dtype, shrink=("out.1.",)),
            random_stage(Decoder, config.decoder, seed + 3, device, dtype, shrink=("clf.1.",)),
            random_stage(VQGANDecoder, config.vqgan, seed + 4, device, dtype))


def stage_steps(prior, decoder, vqgan, inputs: StageInputs) -> dict[str, Callable[[], torch.Tensor]]:
    """The prior step, decoder step and VQGAN decode on `inputs`, eagerly, of these three stages (the plain
    models, what `engine.models.fused.fuse` makes of them, or any objects with their calls); each stage's
    conditioning is computed once, here."""
    from engine.models.decoder import resize_image_embeddings

    x, xd, r = inputs.prior_latent, inputs.decoder_latent, inputs.r
    kv = prior.condition(inputs.prior_text)
    pyramid = resize_image_embeddings(inputs.embedding, decoder.config, inputs.decoder_levels)
    conditioning = decoder.condition(pyramid, inputs.decoder_text)
    return {"prior_step": lambda: prior(x, r, kv),
            "decoder_step": lambda: decoder(xd, r[:1], conditioning),
            "vqgan_decode": lambda: vqgan(xd)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--json", metavar="FILE", type=json_file, help="also write the rows, with provenance, as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernel_profile profiles GPU kernels: no CUDA GPU is available here")

    from benchmarks.bench import provenance
    from benchmarks.reference import random_reference
    from engine import preset
    from engine.models.fused import fuse
    from engine.precision import Precision

    device, dtype = torch.device("cuda"), Precision.parse(args.dtype, "--dtype").torch_dtype
    config = preset("wuerstchen-v2")
    inputs = StageInputs.draw(config, args.size, device, dtype)
    rows, origin = {}, provenance(device)
    with torch.inference_mode():
        models = random_stages(config, device, dtype)
        rows["torch"] = {stage: profile(step) for stage, step in stage_steps(*models, inputs).items()}
        # torch-fast's stages, eagerly: the fused models take over the plain ones, which have been measured.
        fused = [fuse(model) for model in models]
        rows["torch-fast"] = {stage: profile(step) for stage, step in stage_steps(*fused, inputs).items()}
        del models, fused
        modules = random_reference(config, device=device, dtype=dtype)
        x, xd, r = inputs.prior_latent, inputs.decoder_latent, inputs.r
        rows["diffusers"] = {
            "prior_step": profile(lambda: modules["prior"](x, r=r, c=inputs.prior_text)),
            "decoder_step": profile(lambda: modules["decoder"](xd, r=r[:1], effnet=inputs.embedding,
                                                               clip=inputs.decoder_text)),
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
        record = {"provenance": origin, "size": args.size, "dtype": args.dtype, "rows": rows}
        write_atomically(args.json, (json.dumps(record, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
