"""`wuerstchen bench`'s flags, registered as an entry point of `wuerstchen.commands` (setup.py). Every
`wuerstchen` invocation builds its parser from here, so this module imports nothing heavy: the benchmark
(`benchmarks.bench`, torch and all) is imported when the command runs."""

from __future__ import annotations

from engine.cli import model_flags
from engine.recipe import Recipe


def add_parser(commands) -> None:
    """The parser of `wuerstchen bench`."""
    published = Recipe()
    bench = commands.add_parser(
        "bench", help="measure latency, throughput and efficiency, optionally against diffusers",
        description="Measure end-to-end latency, per-stage times, throughput, peak memory, cold start and "
                    "achieved TFLOP/s. Without a source, the full-size architecture with random weights.")
    model_flags(bench, default_preset="wuerstchen-v2", backends="many", quantize="many")
    bench.add_argument("--sizes", nargs="+", default=[str(published.height)], metavar="SIZE",
                       help=f"image sizes: {published.height} or HEIGHTxWIDTH (default {published.height})")
    bench.add_argument("--batch", nargs="+", type=int, default=[1], metavar="N", help="images per call (default 1)")
    bench.add_argument("--prior-steps", type=int, metavar="N", help="evenly spaced prior steps (default: the "
                                                                   "published 29-evaluation schedule)")
    bench.add_argument("--decoder-steps", type=int, default=published.decoder_steps, metavar="N",
                       help=f"decoder steps (default {published.decoder_steps})")
    bench.add_argument("--prior-guidance", type=float, default=published.prior_guidance,
                       help=f"prior guidance (default {published.prior_guidance:g})")
    bench.add_argument("--decoder-guidance", type=float, default=published.decoder_guidance,
                       help=f"decoder guidance (default {published.decoder_guidance:g}: off)")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed runs first, at least 1 (default 2)")
    bench.add_argument("--baseline", nargs="+", default=[], metavar="NAME",
                       help="also measure, same process and weights: diffusers, diffusers-compile")
    bench.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start runs")
    bench.add_argument("--json", metavar="FILE", help="write every record, with provenance, as JSON")
    bench.add_argument("--csv", metavar="FILE", help="append one row per record (to a file of the same columns)")
    bench.add_argument("--plot", metavar="FILE.png", help="draw where one image's time goes, per stage and target, "
                                                          "at each size and batch (matplotlib; .png, .svg or .pdf)")
    load = bench.add_argument_group("load (--load): the scheduler under many requests, against one at a time")
    load.add_argument("--load", action="store_true", help="measure throughput and latency under load instead")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                      help="closed-loop clients to sweep (default 1 2 4 8)")
    load.add_argument("--requests", type=int, default=16, metavar="N", help="requests per measurement (default 16)")
    load.add_argument("--rate", type=float, metavar="REQ/S",
                      help="Poisson arrival rate (default: 80%% of the saturation the sweep measured)")
    load.add_argument("--mix", metavar="FILE.json", help="a list of workloads (height, width, prior_steps, "
                                                         "decoder_steps, prior_guidance, decoder_guidance, images, "
                                                         "weight); default: the recipe at every --sizes entry")
    load.add_argument("--url", metavar="URL", help="send the mix over HTTP to a `wuerstchen serve` on this machine "
                                                   "(http://127.0.0.1:PORT) instead of running the model here")
    quality = bench.add_argument_group("quality (--quality): what --quantize costs, against the unquantized model")
    quality.add_argument("--quality", action="store_true",
                         help="measure quality instead (on the torch backend, at the one --sizes entry): one step's "
                              "error per stage, the images' PSNR and SSIM, the weights' and peak memory")
    quality.add_argument("--prompts", type=int, default=4, metavar="N", help="prompts (default 4)")
    quality.add_argument("--seeds", type=int, default=4, metavar="N", help="seeds per prompt (default 4)")
    bench.set_defaults(run=_command)


def _command(args) -> int:
    from benchmarks.bench import command

    return command(args)
