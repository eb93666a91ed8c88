"""A fast inference engine for Würstchen v2 text-to-image.

    from engine import WuerstchenPipeline
    pipe = WuerstchenPipeline.from_pretrained(prior="wuerstchen-prior", decoder="wuerstchen", device="cuda")
    image = pipe("an astronaut riding a horse", height=1024, width=1024).images[0]
"""

__version__ = "0.1.0"

from engine.backends import Backend, FastOptions, OnnxRuntimeOptions, TensorRTOptions, TorchOptions  # noqa: E402
from engine.config import WuerstchenConfig, preset  # noqa: E402
from engine.errors import WuerstchenError  # noqa: E402
from engine.pipeline import WuerstchenOutput, WuerstchenPipeline, WuerstchenPriorOutput  # noqa: E402
from engine.precision import Precision  # noqa: E402
from engine.recipe import Recipe  # noqa: E402
from engine.runtime import ModelSource, Runtime, resolve  # noqa: E402
from engine.schedule import DEFAULT_PRIOR_TIMESTEPS  # noqa: E402

__all__ = [
    "DEFAULT_PRIOR_TIMESTEPS",
    "Backend",
    "FastOptions",
    "ModelSource",
    "OnnxRuntimeOptions",
    "Precision",
    "Recipe",
    "Runtime",
    "TensorRTOptions",
    "TorchOptions",
    "WuerstchenConfig",
    "WuerstchenError",
    "WuerstchenOutput",
    "WuerstchenPipeline",
    "WuerstchenPriorOutput",
    "preset",
    "resolve",
]
