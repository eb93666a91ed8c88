"""The GPU suite's comparison steps alone: this engine, eager and fast, against diffusers in the same process
at 1024², batch 1 and 4, fp16; the attention kernel against SDPA; each step's kernel time by kind. Kept as
a name for `python -m benchmarks.gpu_suite --only e2e,attention,kernels`, which it runs (the install too).

    python -m benchmarks.gpu_comparison [--compile] [--out DIR] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import gpu_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also measure diffusers + torch.compile")
    parser.add_argument("--out", help="folder for the results, the summary and the log (as the suite's --out)")
    parser.add_argument("--budget", default=str(int(gpu_suite.DEFAULT_BUDGET_S)), metavar="SECONDS",
                        help=f"seconds for the whole run (default {gpu_suite.DEFAULT_BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    steps = "e2e,attention,kernels" + (",e2e-compile" if args.compile else "")
    return gpu_suite.main(["--only", steps, "--budget", args.budget, *(["--out", args.out] if args.out else [])])


if __name__ == "__main__":
    sys.exit(main())
