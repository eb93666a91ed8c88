"""The full comparison on one GPU, inside ten minutes: this engine, eager and fast, against diffusers in
the same process on the same random full-size weights, at 1024², batch 1 and 4, with the published
recipe; then the attention kernel against SDPA at Würstchen's shapes, and each step's kernel time by kind
for torch, torch-fast and diffusers.

    python -m benchmarks.gpu_comparison                  # torch, torch-fast, diffusers eager; fp16
    python -m benchmarks.gpu_comparison --compile        # also diffusers + torch.compile (~2 min more)

Prints the tables and writes bench.json, bench.csv (appended), bench.png, attention.json and kernels.json
into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.attention import main as attention_benchmark
from benchmarks.kernel_profile import main as kernel_profile
from engine.cli import main as wuerstchen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results", help="folder for the outputs (default bench-results)")
    parser.add_argument("--compile", action="store_true", help="also measure diffusers + torch.compile")
    parser.add_argument("--dtype", default="fp16", help="fp16 (default, as the baseline) or bf16")
    parser.add_argument("--runs", default="5", help="timed runs per measurement (default 5)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baselines = ["diffusers", "diffusers-compile"] if args.compile else ["diffusers"]
    status = wuerstchen([
        "bench", "--preset", "wuerstchen-v2", "--device", "cuda", "--dtype", args.dtype, "--sizes", "1024",
        "--batch", "1", "4", "--runs", args.runs, "--backend", "torch", "torch-fast", "--baseline", *baselines,
        "--json", str(out / "bench.json"), "--csv", str(out / "bench.csv"), "--plot", str(out / "bench.png"),
    ])
    return (status or attention_benchmark(["--dtype", args.dtype, "--json", str(out / "attention.json")])
            or kernel_profile(["--dtype", args.dtype, "--json", str(out / "kernels.json")]))


if __name__ == "__main__":
    sys.exit(main())
