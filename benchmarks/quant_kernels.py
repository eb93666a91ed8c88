"""The quantized GEMMs of `kernels.quant` against cuBLAS in bf16, at the Linears of Würstchen v2's prior and
decoder steps for one image, on one GPU.

Each shape (M, N, K) is a Linear of a denoising step: the prior's at its guidance batch of 2 (M = 2 · 24²
tokens at 1024²), the decoder's at every level (M = the level's pixels). Per shape, with a bf16 bias and no
residual, the median of CUDA-event timings after warm-up of:
- `bf16`: cuBLAS, `F.linear` on bf16 operands;
- `cublas fp8`: `torch._scaled_mm` with row-wise scales (`fp8_linear_scaled_mm`), where it can run;
- `triton fp8`: the Triton kernel `fp8_linear`;
- `quantize`: `quantize_fp8_rows` of the activations, which an fp8 Linear pays unless the op before it
  writes fp8; the speedups are shown without it (×) and with it (×q);
- `int8 w/o`: `int8_weight_only_linear`, bf16 activations and int8 weights.
TFLOP/s = 2·M·N·K / time; `error` is the relative Frobenius error of each output against the fp32 Linear of
the unquantized operands. The run ends with the entries of `kernels.quant.FP8_GEMM_MEASURED` that the
timings support: per weight shape (N, K), the faster fp8 GEMM over the step's layers of that shape.

    python -m benchmarks.quant_kernels [--size 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_median_ms
from engine.config import WuerstchenConfig, preset
from engine.files import write_atomically
from engine.shapes import image_shapes


def linear_shapes(config: WuerstchenConfig, size: int) -> Counter[tuple[str, int, int, int]]:
    """(stage, M, N, K) of every Linear of one prior step (guidance batch 2) and one decoder step at a
    `size`² image, with how many layers of each a step runs. The 1×1 convs at the models' ends (K or N of
    16 or 32) and the 2×2 ones between decoder levels are left out."""
    shapes = image_shapes(config, size, size, batch=1)
    found: Counter[tuple[str, int, int, int]] = Counter()
    prior = config.prior
    height, width = shapes.prior_latent[2:]
    tokens, c = 2 * height * width, prior.c
    for n, k in ((3 * c, c), (c, c), (4 * c, c), (c, 4 * c)):  # qkv, out, fc1, fc2
        found["prior", tokens, n, k] += prior.depth
    decoder = config.decoder
    levels = len(decoder.c_hidden)
    for level, ((lh, lw), c, kinds, repeats, inject) in enumerate(zip(
            shapes.decoder_levels, decoder.c_hidden, decoder.level_config, decoder.blocks, decoder.inject_effnet,
            strict=True)):
        tokens, skip = lh * lw, decoder.c_cond if inject else 0
        resblocks, attention = 2 * repeats * kinds.count("C"), 2 * repeats * kinds.count("A")  # down and up
        first_up = level < levels - 1  # whose fc1 also reads the down path's output
        found["decoder", tokens, 4 * c, c + skip] += resblocks - int(first_up)
        found["decoder", tokens, c, 4 * c] += resblocks
        if first_up:
            found["decoder", tokens, 4 * c, 2 * c + skip] += 1
        if attention:
            found["decoder", tokens, 3 * c, c] += attention
            found["decoder", tokens, c, c] += attention
    return found


def measure(m: int, n: int, k: int, fp8: bool) -> dict:
    """One shape's timings (ms) and errors, on random operands."""
    from kernels.quant import (
        FP8,
        fp8_linear,
        fp8_linear_scaled_mm,
        int8_weight_only_linear,
        quantize_fp8_rows,
        quantize_weight,
        scaled_mm_unsupported,
    )

    device = torch.device("cuda")
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device) * k**-0.5
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    exact = F.linear(x.float(), w, bias.float())
    w16 = w.to(torch.bfloat16)
    int8 = quantize_weight(w, torch.int8)
    runs = {"bf16": lambda: F.linear(x, w16, bias),
            "int8": lambda: int8_weight_only_linear(x, int8.data, int8.scale, bias)}
    if fp8:
        x_q, x_scale = quantize_fp8_rows(x)
        weight = quantize_weight(w, FP8)
        runs["quantize"] = lambda: quantize_fp8_rows(x)
        runs["triton_fp8"] = lambda: fp8_linear(x_q, x_scale, weight.data, weight.scale, bias)
        if not scaled_mm_unsupported(n, k, torch.bfloat16, device):
            runs["cublas_fp8"] = lambda: fp8_linear_scaled_mm(x_q, x_scale, weight.data, weight.scale, bias)
    row = {"ms": {}, "error": {}}
    for name, run in runs.items():
        row["ms"][name] = cuda_median_ms(run)
        if name != "quantize":
            row["error"][name] = ((run().float() - exact).norm() / exact.norm()).item()
    return row


def fp8_choice(rows: list[dict]) -> dict[tuple[int, int], str]:
    """Per weight shape (N, K), the fp8 GEMM with the smaller total time over the step's layers of that shape."""
    totals: dict[tuple[int, int], Counter] = {}
    for row in rows:
        if "triton_fp8" in row["ms"]:
            total = totals.setdefault((row["n"], row["k"]), Counter())
            for gemm in ("triton_fp8", "cublas_fp8"):
                total[gemm] += row["layers"] * row["ms"].get(gemm, math.inf)
    return {shape: "cublas" if total["cublas_fp8"] < total["triton_fp8"] else "triton"
            for shape, total in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows, with provenance, as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.quant_kernels times GPU kernels: no CUDA GPU is available here")
    from benchmarks.bench import provenance

    device = torch.device("cuda")
    origin = provenance(device)
    major, minor = torch.cuda.get_device_capability(device)
    fp8 = (major, minor) >= (8, 9)
    print(f"{origin['device']} (sm_{major}{minor}) · torch {origin['versions']['torch']} · "
          f"triton {origin['versions']['triton']} · CUDA {origin['cuda']} · bf16 · {origin['date']}"
          + ("" if fp8 else " · no fp8 before sm_89: int8 only"))
    # (title, key, whether the speedup with quantizing the activations, ×q, differs from ×)
    columns = (("cublas fp8", "cublas_fp8", True), ("triton fp8", "triton_fp8", True), ("int8 w/o", "int8", False))
    print(f"{'stage':<8}{'layers':>7}{'(M, N, K)':>22}{'bf16 µs':>10}{'TF/s':>6}"
          + "".join(f"{title + ' µs':>16}{'TF/s':>6}{'×':>6}{'×q' if q else '':>6}" for title, _, q in columns)
          + f"{'quantize µs':>13}")
    rows = []
    for (stage, m, n, k), layers in linear_shapes(preset("wuerstchen-v2"), args.size).items():
        row = {"stage": stage, "layers": layers, "m": m, "n": n, "k": k, **measure(m, n, k, fp8)}
        times, flops = row["ms"], 2 * m * n * k
        row["tflops"] = {key: flops / ms / 1e9 for key, ms in times.items() if key != "quantize"}
        rows.append(row)
        line = f"{stage:<8}{layers:>7}{str((m, n, k)):>22}{times['bf16'] * 1e3:>10.1f}{row['tflops']['bf16']:>6.0f}"
        for _, key, quantizes in columns:
            if key not in times:
                line += f"{'–':>16}{'':>18}"
                continue
            line += f"{times[key] * 1e3:>16.1f}{row['tflops'][key]:>6.0f}{times['bf16'] / times[key]:>6.2f}"
            line += f"{times['bf16'] / (times[key] + times['quantize']):>6.2f}" if quantizes else f"{'':>6}"
        print(line + (f"{times['quantize'] * 1e3:>13.1f}" if "quantize" in times else f"{'–':>13}"))
    print("errors against the fp32 Linear of the unquantized operands: " + ", ".join(
        f"{key} ≤ {max(row['error'][key] for row in rows if key in row['error']):.1e}"
        for key in ("bf16", *(key for _, key, _ in columns)) if any(key in row["error"] for row in rows)))
    choice = fp8_choice(rows)
    if choice:
        print("\nkernels.quant.FP8_GEMM_MEASURED, from these timings:\n{")
        for (n, k), gemm in sorted(choice.items()):
            print(f"    ({n}, {k}): Fp8Gemm.{gemm.upper()},")
        print("}")
    if args.json:
        record = {"provenance": origin, "size": args.size, "dtype": "bf16", "rows": rows,
                  "fp8_gemm_measured": [{"n": n, "k": k, "gemm": gemm} for (n, k), gemm in sorted(choice.items())]}
        write_atomically(args.json, json.dumps(record, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
