"""A fast inference engine for Würstchen v2 text-to-image.

    from engine import WuerstchenPipeline
    pipe = WuerstchenPipeline.from_pretrained(prior="wuerstchen-prior", decoder="wuerstchen", device="cuda")
    image = pipe("an astronaut riding a horse", height=1024, width=1024).images[0]
"""

__version__ = "0.1.0"

from engine.config import WuerstchenConfig, preset  # noqa: E402
from engine.errors import WuerstchenError  # noqa: E402
from engine.pipeline import WuerstchenOutput, WuerstchenPipeline  # noqa: E402
from engine.schedule import DEFAULT_PRIOR_TIMESTEPS  # noqa: E402

__all__ = [
    "DEFAULT_PRIOR_TIMESTEPS",
    "WuerstchenConfig",
    "WuerstchenError",
    "WuerstchenOutput",
    "WuerstchenPipeline",
    "preset",
]
