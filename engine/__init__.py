"""A fast inference engine for Würstchen v2 text-to-image.

    from engine import WuerstchenPipeline
    pipe = WuerstchenPipeline.from_pretrained(prior="wuerstchen-prior", decoder="wuerstchen", device="cuda")
    image = pipe("an astronaut riding a horse", height=1024, width=1024).images[0]

The names below are imported when first used (PEP 562), so that `import engine.errors` or the command
line's `--help` does not import torch.
"""

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "Backend": "engine.backends",
    "FastOptions": "engine.backends",
    "OnnxRuntimeOptions": "engine.backends",
    "TensorRTOptions": "engine.backends",
    "TorchOptions": "engine.backends",
    "WuerstchenConfig": "engine.config",
    "preset": "engine.config",
    "WuerstchenError": "engine.errors",
    "WuerstchenOutput": "engine.pipeline",
    "WuerstchenPipeline": "engine.pipeline",
    "WuerstchenPriorOutput": "engine.pipeline",
    "Precision": "engine.precision",
    "Recipe": "engine.recipe",
    "ModelSource": "engine.runtime",
    "Runtime": "engine.runtime",
    "resolve": "engine.runtime",
    "DEFAULT_PRIOR_TIMESTEPS": "engine.recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
