"""The Triton attention kernel against PyTorch's SDPA at Würstchen v2's attention shapes, on one GPU.

The shapes are those of a 1024² image: the prior's 24² latent with its guidance batch of 2, and the
decoder's three attention levels (64², 32², 16²); keys are the image tokens plus 77 text tokens.
TFLOP/s = 4 · batch · heads · Nq · Nk · 64 / time (QKᵀ and PV), median of CUDA-event timings. SDPA gets
the keys and values joined; the kernel reads the image's and the text's from two tensors, as in the blocks.

    python -m benchmarks.attention [--dtype fp16|bf16] [--size 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.harness import cuda_median_ms
from benchmarks.report import json_file
from engine import preset
from engine.files import write_atomically
from engine.precision import Precision
from engine.shapes import TEXT_TOKENS, image_shapes

HEAD_DIM = 64


def attention_shapes(size: int) -> dict[str, tuple[int, int, int, int]]:
    """(batch, heads, Nq, Nk) of every attention of Würstchen v2 at a `size`² image."""
    config = preset("wuerstchen-v2")
    shapes = image_shapes(config, size, size, batch=1)
    h, w = shapes.prior_latent[2:]
    found = {f"prior {h}×{w}, guidance batch": (2, config.prior.nhead, h * w, h * w + TEXT_TOKENS)}
    for level, ((lh, lw), heads, kinds) in enumerate(zip(shapes.decoder_levels, config.decoder.nhead,
                                                          config.decoder.level_config, strict=True)):
        if "A" in kinds:
            found[f"decoder level {level}, {lh}×{lw}"] = (1, heads, lh * lw, lh * lw + TEXT_TOKENS)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp16", help="fp16 (default) or bf16")
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--json", metavar="FILE", type=json_file,
                        help="also write the rows, with provenance, as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention times GPU kernels: no CUDA GPU is available here")
    from benchmarks.bench import provenance
    from kernels.attention import attention

    dtype, device = Precision.parse(args.dtype).torch_dtype, torch.device("cuda")
    origin = provenance(device)
    print(f"{origin['device']} · torch {origin['versions']['torch']} · triton {origin['versions']['triton']} · "
          f"{args.dtype} · {origin['date']}")
    print(f"{'shape':<34}{'(B, heads, Nq, Nk)':>24}{'SDPA µs':>10}{'TFLOP/s':>9}{'Triton µs':>11}{'TFLOP/s':>9}"
          f"{'max diff':>10}")
    rows = []
    for name, (batch, heads, queries, keys) in attention_shapes(args.size).items():
        q = torch.randn(batch, heads, queries, HEAD_DIM, device=device, dtype=dtype)
        k, v = (torch.randn(batch, heads, keys, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
        flops = 4 * batch * heads * queries * keys * HEAD_DIM
        inputs = (q, k, v)
        # As the blocks call it: the image's keys and values, then the text's, from two tensors each.
        split = (q, k[:, :, :queries], v[:, :, :queries], k[:, :, queries:], v[:, :, queries:])
        sdpa_ms = cuda_median_ms(lambda inputs=inputs: torch.nn.functional.scaled_dot_product_attention(*inputs))
        triton_ms = cuda_median_ms(lambda split=split: attention(*split))
        difference = (attention(*split).float() - torch.nn.functional.scaled_dot_product_attention(*inputs).float()
                      ).abs().max().item()
        row = {"shape": name, "batch": batch, "heads": heads, "queries": queries, "keys": keys, "dtype": args.dtype,
               "sdpa_us": sdpa_ms * 1e3, "sdpa_tflops": flops / sdpa_ms / 1e9, "triton_us": triton_ms * 1e3,
               "triton_tflops": flops / triton_ms / 1e9, "max_difference": difference}
        rows.append(row)
        print(f"{name:<34}{str((batch, heads, queries, keys)):>24}{row['sdpa_us']:>10.1f}{row['sdpa_tflops']:>9.1f}"
              f"{row['triton_us']:>11.1f}{row['triton_tflops']:>9.1f}{difference:>10.2e}")
    if args.json:
        write_atomically(args.json, (json.dumps({"provenance": origin, "rows": rows}, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
