"""The child process of a cold-start measurement: build one target from nothing, make one image, say so.

    python -m benchmarks.cold_start '<json spec>'   # written by benchmarks.bench.cold_start_seconds
"""

from __future__ import annotations

import contextlib
import json
import sys


def main(spec: dict) -> None:
    import torch

    from benchmarks.bench import Options, Source, build_engine, compiled
    from benchmarks.harness import Recipe
    from engine.backends import Backend
    from engine.device import DTYPES

    options = Options(source=Source(**spec["source"]), backends=(), device=torch.device(spec["device"]),
                      dtype=DTYPES[spec["dtype"]], sizes=(), batches=(), recipe=Recipe(**spec["recipe"]), warmup=0,
                      runs=0)
    if spec["target"] in {backend.value for backend in Backend}:
        pipe = build_engine(options, Backend(spec["target"]))
    else:
        from benchmarks.reference import diffusers_pipeline, load_diffusers, random_reference
        from engine import preset
        from engine.text import byte_level_tokenizer

        source = options.source
        if source.prior:
            pipe = load_diffusers(source.prior, source.decoder, options.device, options.dtype)
        else:
            modules = random_reference(preset(source.preset), device=options.device, dtype=options.dtype)
            pipe = diffusers_pipeline(modules, byte_level_tokenizer())
    setup = compiled(pipe) if spec["target"] == "diffusers-compile" else contextlib.nullcontext()
    with setup, torch.no_grad():
        pipe(**options.recipe.call(spec["height"], spec["width"], spec["batch"]),
             generator=torch.Generator().manual_seed(0))
    if options.device.type == "cuda":
        torch.cuda.synchronize(options.device)
    print("first image", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
