"""A fast inference engine for Würstchen v2 text-to-image.

    from engine import WuerstchenPipeline
    pipe = WuerstchenPipeline.from_pretrained(prior="wuerstchen-prior", decoder="wuerstchen", device="cuda")
    image = pipe("an astronaut riding a horse", height=1024, width=1024).images[0]
"""

from engine.config import WuerstchenConfig, preset
from engine.errors import WuerstchenError
from engine.pipeline import WuerstchenOutput, WuerstchenPipeline
from engine.schedule import DEFAULT_PRIOR_TIMESTEPS

__all__ = [
    "DEFAULT_PRIOR_TIMESTEPS",
    "WuerstchenConfig",
    "WuerstchenError",
    "WuerstchenOutput",
    "WuerstchenPipeline",
    "preset",
]
