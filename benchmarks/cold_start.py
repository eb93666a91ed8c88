"""The child process of a cold-start measurement: build one target from nothing, make one image, say so.

    python -m benchmarks.cold_start '<json spec>'   # written by benchmarks.bench.cold_start_seconds
"""

from __future__ import annotations

import contextlib
import json
import sys


def main(spec: dict) -> None:
    import torch

    from benchmarks.bench import _call, build_engine, compiled
    from benchmarks.report import BASELINES
    from engine.quantization import QuantRecipe
    from engine.recipe import Recipe
    from engine.runtime import ModelSource, resolve

    source = ModelSource(**spec["source"])
    recipe = Recipe(**spec["recipe"])
    if spec["target"] not in BASELINES:
        quantize = spec.get("quantize")
        if isinstance(quantize, dict):
            quantize = QuantRecipe.from_dict(quantize)
        pipe = build_engine(resolve(source, spec["target"], spec["device"], spec["dtype"], quantize=quantize))
    else:
        from benchmarks.reference import diffusers_pipeline, load_diffusers, random_reference
        from engine.text import byte_level_tokenizer

        device, dtype = torch.device(spec["device"]), resolve(source, None, spec["device"], spec["dtype"]).dtype
        if source.kind == "folders":
            pipe = load_diffusers(source.prior, source.decoder, device, dtype)
        else:
            modules = random_reference(source.read_config(), device=device, dtype=dtype)
            pipe = diffusers_pipeline(modules, byte_level_tokenizer())
    setup = compiled(pipe) if spec["target"] == "diffusers-compile" else contextlib.nullcontext()
    with setup, torch.no_grad():
        pipe(**_call(recipe, spec["height"], spec["width"], spec["batch"]), generator=torch.Generator().manual_seed(0))
    if torch.device(spec["device"]).type == "cuda":
        torch.cuda.synchronize(spec["device"])
    print("first image", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
