"""Which fusions ship: each fused kernel against the unfused ops it replaces, and each stage with the fast
path's fusions switched on one group at a time, on one GPU at the shapes of a 1024² image.

Kernels (median of CUDA events; GB/s from the bytes the fused kernel must move, TFLOP/s for GEMMs):
- `linear_gelu` against cuBLAS's Linear and PyTorch's GELU at the VQGAN's two MLP shapes: the one
  fusion that trades a cuBLAS GEMM for a Triton one, so its switch (`Fusions.gemm_gelu`) is to be turned
  on only if it wins here;
- `layer_norm_modulate_pad` against the LayerNorm kernel and F.pad;
- `residual_norm` and `residual_film` against the adds, FiLM and LayerNorm kernel they replace.

Stages (prior step with its guidance batch, decoder step, VQGAN decode; random full-size weights),
wall and kernel milliseconds, eager, kernel time by kind, and the relative difference of the output
from `torch`'s, for each variant of `VARIANTS`, made by `engine.models.fused.fuse`:
`torch` (the plain models), `kernels` (channels-last, and the attention and norm kernels with every
block on its own; the VQGAN channels-last only), `torch-fast` (plus the fused chains of blocks and the
VQGAN's fused blocks) and `torch-fast + linear_gelu`. (The prior's noise head divides by as little
as 1e-5, so its difference can be large where its inputs agree; tests/test_fused.py compares those.)

    python -m benchmarks.fusions [--dtype fp16] [--size 1024] [--preset wuerstchen-v2] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_median_ms
from benchmarks.kernel_profile import KINDS, StageInputs, profile, random_stages, stage_steps
from benchmarks.report import json_file
from engine.config import WuerstchenConfig, preset
from engine.files import write_atomically
from engine.models.fused import Fusions, fuse
from engine.precision import Precision
from engine.shapes import image_shapes


def kernel_rows(config: WuerstchenConfig, size: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each fused kernel against its unfused ops, at the shapes of a `size`² image."""
    from kernels.matmul import linear_gelu
    from kernels.norms import layer_norm_modulate, layer_norm_modulate_pad, residual_film, residual_norm

    shapes = image_shapes(config, size, size, batch=1)
    element = torch.finfo(dtype).bits // 8

    def randn(*shape, scale=1.0):
        return torch.randn(shape, device=device, dtype=dtype) * scale

    def film_glue(x, h, a, b):  # what `residual_norm` replaces: the add, the FiLM, the LayerNorm kernel
        y = (x + h) * (1 + a[:, None]) + b[:, None]
        return y, layer_norm_modulate(y, None, None, 1e-6)

    rows = []
    height, width = shapes.decoder_latent[2:]
    embed = config.vqgan.embed_dim
    for scale, channels in ((1, embed), (2, embed // 2)):  # the VQGAN's bottleneck level, then its 2× level
        pixels, hidden = height * width * scale**2, 4 * channels
        x, w, b = randn(pixels, channels), randn(hidden, channels, scale=channels**-0.5), randn(hidden)
        rows.append(_compare(
            f"linear + GELU, VQGAN {height * scale}×{width * scale}", (pixels, channels, hidden),
            lambda x=x, w=w, b=b: F.gelu(F.linear(x, w, b)), lambda x=x, w=w, b=b: linear_gelu(x, w, b),
            bytes_moved=element * (pixels * (channels + hidden) + channels * hidden),
            flops=2 * pixels * channels * hidden))
    image, g = randn(1, height, width, embed), randn(2)
    rows.append(_compare(
        f"LayerNorm + modulation + replicate pad, VQGAN {height}×{width}", tuple(image.shape),
        lambda: F.pad(layer_norm_modulate(image.flatten(1, 2), g[0], g[1], 1e-6).reshape(image.shape)
                      .permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate"),
        lambda: layer_norm_modulate_pad(image, g[0], g[1], 1e-6).permute(0, 3, 1, 2),
        bytes_moved=element * embed * (height * width + (height + 2) * (width + 2))))

    ph, pw = shapes.prior_latent[2:]
    glue = {f"prior {ph}×{pw}, guidance batch": (2, ph * pw, config.prior.c, True)}
    for (lh, lw), channels, kinds in zip(shapes.decoder_levels, config.decoder.c_hidden,
                                         config.decoder.level_config, strict=True):
        glue[f"decoder {lh}×{lw}"] = (1, lh * lw, channels, "A" in kinds)
    for name, (batch, pixels, channels, attention) in glue.items():
        x, h, bias = randn(batch, pixels, channels), randn(batch, pixels, channels), randn(channels)
        a, b = randn(batch, channels, scale=0.1), randn(batch, channels, scale=0.1)
        if attention:
            rows.append(_compare(
                f"residual + FiLM + LayerNorm, {name}", (batch, pixels, channels),
                lambda x=x, h=h, a=a, b=b: film_glue(x, h, a, b),
                lambda x=x, h=h, a=a, b=b, bias=bias: residual_norm(x, h, a, b, bias, None, None, 1e-6),
                bytes_moved=4 * element * x.numel()))
        else:
            rows.append(_compare(
                f"residual + FiLM, {name}", (batch, pixels, channels),
                lambda x=x, h=h, a=a, b=b: (x + h) * (1 + a[:, None]) + b[:, None],
                lambda x=x, h=h, a=a, b=b: residual_film(x, h, a, b), bytes_moved=3 * element * x.numel()))
    return rows


def _compare(name: str, shape: tuple, unfused, fused, bytes_moved: int, flops: int | None = None) -> dict:
    expected, actual = unfused(), fused()
    if isinstance(expected, tuple):  # `residual_norm`'s residual includes the bias that the GEMM adds unfused
        expected, actual = expected[-1], actual[-1]
    row = {"kernel": name, "shape": list(shape), "unfused_ms": cuda_median_ms(unfused),
           "fused_ms": cuda_median_ms(fused), "max_diff": (actual.float() - expected.float()).abs().max().item()}
    row["speedup"] = row["unfused_ms"] / row["fused_ms"]
    row["fused_gb_per_s"] = bytes_moved / row["fused_ms"] / 1e6
    if flops:
        row["fused_tflop_per_s"] = flops / row["fused_ms"] / 1e9
        row["unfused_tflop_per_s"] = flops / row["unfused_ms"] / 1e9
    return row


# variant: None for the plain models, else what `fuse` applies to them
VARIANTS: dict[str, Fusions | None] = {
    "torch": None,
    "kernels": Fusions(chains=False),
    "torch-fast": Fusions(),
    "torch-fast + linear_gelu": Fusions(gemm_gelu=True),
}


def stage_rows(preset_name: str, size: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each stage's step (eager) in every variant of `VARIANTS`, on the preset's random weights."""
    config = preset(preset_name)
    plain = random_stages(config, device, dtype)
    inputs = StageInputs.draw(config, size, device, dtype)
    rows, references = [], {}  # the torch variant's output of each stage
    with torch.inference_mode():
        for variant, fusions in VARIANTS.items():
            # `fuse` takes ownership of what it fuses (channels-last weights): copies leave the plain models be.
            models = plain if fusions is None else [fuse(copy.deepcopy(model), fusions) for model in plain]
            for stage, step in stage_steps(*models, inputs).items():
                if fusions is not None and fusions.gemm_gelu and stage != "vqgan_decode":  # it changes the VQGAN only
                    continue
                output = step().float()
                reference = references.setdefault(stage, output)
                difference = ((output - reference).norm() / reference.norm()).item()
                rows.append({"stage": stage, "variant": variant, "relative_difference": difference, **profile(step)})
            del models
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp16", help="fp16 (default) or bf16")
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--preset", default="wuerstchen-v2", help="architecture (default wuerstchen-v2)")
    parser.add_argument("--json", metavar="FILE", type=json_file,
                        help="also write the rows, with provenance, as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fusions times GPU kernels: no CUDA GPU is available here")
    from benchmarks.bench import provenance

    device, dtype = torch.device("cuda"), Precision.parse(args.dtype, "--dtype").torch_dtype
    origin = provenance(device)
    print(f"{origin['device']} · torch {origin['versions']['torch']} · triton {origin['versions']['triton']} · "
          f"{args.dtype} · {origin['date']}")
    kernels = kernel_rows(preset(args.preset), args.size, device, dtype)
    print(f"\n{'kernel':<52}{'unfused µs':>11}{'fused µs':>10}{'speedup':>9}{'GB/s':>7}{'TFLOP/s':>9}{'max diff':>10}")
    for row in kernels:
        tflops = f"{row['fused_tflop_per_s']:>9.0f}" if "fused_tflop_per_s" in row else f"{'':>9}"
        print(f"{row['kernel']:<52}{row['unfused_ms'] * 1e3:>11.1f}{row['fused_ms'] * 1e3:>10.1f}"
              f"{row['speedup']:>8.2f}×{row['fused_gb_per_s']:>7.0f}{tflops}{row['max_diff']:>10.1e}")
    gemm = [row for row in kernels if row["kernel"].startswith("linear + GELU")]
    verdict = "wins" if all(row["speedup"] > 1 for row in gemm) else "does not win"
    print(f"linear_gelu {verdict} against cuBLAS + GELU at both VQGAN shapes: "
          f"{'ship' if verdict == 'wins' else 'keep off'} Fusions.gemm_gelu")

    stages = stage_rows(args.preset, args.size, device, dtype)
    kinds = [kind for kind, _ in KINDS] + ["elementwise/other"]
    print(f"\n{'stage':<15}{'variant':<27}{'wall ms':>9}{'kernel ms':>11}{'kernels':>9}{'vs torch':>10}"
          + "".join(f"{kind:>14}" for kind in kinds))
    for row in stages:
        print(f"{row['stage']:<15}{row['variant']:<27}{row['wall_ms']:>9.2f}{row['kernel_ms']:>11.2f}"
              f"{row['kernels']:>9}{row['relative_difference']:>10.1e}"
              + "".join(f"{row['by_kind_ms'].get(kind, 0.0):>14.2f}" for kind in kinds))
    if args.json:
        record = {"provenance": origin, "preset": args.preset, "dtype": args.dtype, "size": args.size,
                  "kernels": kernels, "stages": stages}
        write_atomically(args.json, (json.dumps(record, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
