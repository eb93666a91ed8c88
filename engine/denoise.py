"""The denoising loop, run eagerly or as one replayed CUDA graph per step.

A step is everything between two noise levels: the model on [x, x] against [text, negative text] when
guidance is on (on x otherwise), ATen's lerp of the two predictions, and the sampler's update. Eagerly
that is some 1,200 (prior) to 1,700 (decoder) kernel launches, and the GPU idles while the CPU issues
them. Captured in a CUDA graph it is one launch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from engine.schedule import DenoisingSchedule, sampler_step

# (x, r, conditioning) → predicted noise; conditioning is the stage's once-per-request tensors.
Model = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def guided_step(
    model: Model, conditioning: tuple[torch.Tensor, ...], x: torch.Tensor, r: torch.Tensor,
    coefficients: torch.Tensor, noise: torch.Tensor, guidance_scale: float,
) -> torch.Tensor:
    """One step: x at the next noise level. Guidance is on when the scale exceeds 1."""
    if guidance_scale > 1:
        eps_text, eps_uncond = model(torch.cat([x, x]), torch.cat([r, r]), conditioning).chunk(2)
        eps = torch.lerp(eps_uncond, eps_text, guidance_scale)
    else:
        eps = model(x, r, conditioning)
    return sampler_step(coefficients, x, eps, noise)


def denoise(
    model: Model, conditioning: tuple[torch.Tensor, ...], schedule: DenoisingSchedule, initial: torch.Tensor,
    noise: Sequence[torch.Tensor], guidance_scale: float, progress=None,
) -> torch.Tensor:
    """The loop, eagerly: one `guided_step` per step of the schedule."""
    x = initial
    for i in range(schedule.num_steps):
        x = guided_step(model, conditioning, x, schedule.ratios[i].expand(x.shape[0]), schedule.coefficients[i],
                        noise[i], guidance_scale)
        if progress is not None:
            progress.update()
    return x


class Loop(Protocol):
    """How a stage's denoising loop runs: `EagerLoop`, or `StepGraphs` on the fast backends."""

    def denoise(
        self, stage: str, model: Model, conditioning: tuple[torch.Tensor, ...], schedule: DenoisingSchedule,
        initial: torch.Tensor, noise: Sequence[torch.Tensor], guidance_scale: float, progress=None,
    ) -> torch.Tensor: ...


class EagerLoop:
    """The loop as plain calls (`denoise`); what every backend but the fast ones runs."""

    def denoise(
        self, stage: str, model: Model, conditioning: tuple[torch.Tensor, ...], schedule: DenoisingSchedule,
        initial: torch.Tensor, noise: Sequence[torch.Tensor], guidance_scale: float, progress=None,
    ) -> torch.Tensor:
        return denoise(model, conditioning, schedule, initial, noise, guidance_scale, progress)


class StepGraph:
    """One step captured for fixed shapes: static input buffers, the graph, and its static output.

    On a GPU the step is captured once (after warm-up on a side stream) and `replay` copies the step's
    inputs into the static buffers and launches the graph. On a CPU there is nothing to capture, and
    `replay` runs the step eagerly on the same static buffers.
    """

    WARMUP = 2  # eager runs before capture: lazy initialisation (cuBLAS handles, kernel caches) must not be captured

    def __init__(self, step: Callable[..., torch.Tensor], conditioning: tuple[torch.Tensor, ...], x: torch.Tensor,
                 r: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor, pool=None):
        self.step = step
        self.conditioning = tuple(c.clone() for c in conditioning)
        self.inputs = (x.clone(), r.clone(), coefficients.clone(), noise.clone())
        self.graph = None
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.WARMUP):
                        self.step(self.conditioning, *self.inputs)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.output = self.step(self.conditioning, *self.inputs)

    def load_conditioning(self, conditioning: tuple[torch.Tensor, ...]) -> None:
        """Copy a request's conditioning into the static buffers (once per request, not per step)."""
        for static, tensor in zip(self.conditioning, conditioning, strict=True):
            static.copy_(tensor)

    def replay(self, x: torch.Tensor, r: torch.Tensor, coefficients: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """The next x. On a GPU it lives in the graph's output buffer until the next replay."""
        for static, tensor in zip(self.inputs, (x, r, coefficients, noise), strict=True):
            static.copy_(tensor)
        if self.graph is None:
            return self.step(self.conditioning, *self.inputs)
        self.graph.replay()
        return self.output


class StepGraphs:
    """Captured steps by key (stage, guidance scale, shapes and dtypes of the latents and the conditioning,
    device), at most `capacity` of them: the least recently used is dropped when a new key needs room.
    All graphs share one memory pool."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: expected at least 1")
        self.capacity = capacity
        self._graphs: OrderedDict[tuple, StepGraph] = OrderedDict()
        self._pool = None

    def keys(self) -> list[tuple]:
        """The cached keys, least recently used first."""
        return list(self._graphs)

    @staticmethod
    def key(stage: str, guidance_scale: float, x: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> tuple:
        return (stage, guidance_scale, tuple(x.shape), x.dtype, x.device,
                tuple((tuple(c.shape), c.dtype) for c in conditioning))

    def get(self, key: tuple, build: Callable[[], StepGraph]) -> StepGraph:
        """The graph for `key`, built with `build()` on a miss."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= self.capacity:
            self._graphs.popitem(last=False)
        self._graphs[key] = graph = build()
        return graph

    def _memory_pool(self, device: torch.device):
        if self._pool is None and device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def denoise(
        self, stage: str, model: Model, conditioning: tuple[torch.Tensor, ...], schedule: DenoisingSchedule,
        initial: torch.Tensor, noise: Sequence[torch.Tensor], guidance_scale: float, progress=None,
    ) -> torch.Tensor:
        """The loop of `denoise`, one graph replay per step; the same numbers as the eager loop."""
        def step(conditioning, x, r, coefficients, step_noise):
            return guided_step(model, conditioning, x, r, coefficients, step_noise, guidance_scale)

        batch = initial.shape[0]
        first = (initial, schedule.ratios[0].expand(batch), schedule.coefficients[0], noise[0])
        graph = self.get(self.key(stage, guidance_scale, initial, conditioning),
                         lambda: StepGraph(step, conditioning, *first, pool=self._memory_pool(initial.device)))
        graph.load_conditioning(conditioning)
        x = initial
        for i in range(schedule.num_steps):
            x = graph.replay(x, schedule.ratios[i].expand(batch), schedule.coefficients[i], noise[i])
            if progress is not None:
                progress.update()
        return x.clone()  # the graph's output buffer is reused by the next request
