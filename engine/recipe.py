"""The recipe: image size, steps and guidance of a request. Its defaults are the published ones, and every
command, benchmark and bundle manifest takes its defaults from here.

The Python API keeps diffusers' own call defaults (512², 60 evenly spaced prior steps) so that it stays a
drop-in for `WuerstchenCombinedPipeline`; `Recipe().call()` gives the published recipe as that call's
keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy's `linspace(start, stop, num)`, bit for bit, without importing numpy (the command line's help
    reads the recipe)."""
    step = (stop - start) / (num - 1)
    return [*(start + i * step for i in range(num - 1)), stop]


# diffusers' DEFAULT_STAGE_C_TIMESTEPS: 19 steps of 1/57 down to 2/3, then 10 steps of 1/15 (29 evaluations).
DEFAULT_PRIOR_TIMESTEPS: tuple[float, ...] = (*_linspace(1.0, 2 / 3, 20), *_linspace(2 / 3, 0.0, 11)[1:])


@dataclass(frozen=True)
class Recipe:
    """1024², the published 29-evaluation prior schedule with guidance 4, 12 decoder steps without guidance."""

    height: int = 1024
    width: int = 1024
    prior_steps: int | None = None  # None: the published schedule, DEFAULT_PRIOR_TIMESTEPS; N: N evenly spaced
    prior_guidance: float = 4.0
    decoder_steps: int = 12
    decoder_guidance: float = 0.0  # guidance is on above 1

    @property
    def published_prior(self) -> bool:
        return self.prior_steps is None

    @property
    def prior_timesteps(self) -> list[float] | None:
        """The prior's noise levels, or None for evenly spaced steps."""
        return list(DEFAULT_PRIOR_TIMESTEPS) if self.published_prior else None

    @property
    def prior_evaluations(self) -> int:
        return len(DEFAULT_PRIOR_TIMESTEPS) - 1 if self.published_prior else self.prior_steps

    def call(self, images_per_prompt: int = 1) -> dict:
        """Keyword arguments of `WuerstchenPipeline.__call__` (and of diffusers' combined pipeline) for this
        recipe; add the prompt, the generator and the output type."""
        return dict(
            height=self.height, width=self.width,
            prior_num_inference_steps=self.prior_evaluations, prior_timesteps=self.prior_timesteps,
            prior_guidance_scale=self.prior_guidance, num_inference_steps=self.decoder_steps,
            decoder_guidance_scale=self.decoder_guidance, num_images_per_prompt=images_per_prompt,
        )

    def describe(self) -> str:
        prior = "the published prior schedule" if self.published_prior else f"{self.prior_steps} prior steps"
        return (f"{self.height}×{self.width}, {prior} ({self.prior_evaluations} evaluations, guidance "
                f"{self.prior_guidance:g}), {self.decoder_steps} decoder steps (guidance {self.decoder_guidance:g})")
