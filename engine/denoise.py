"""One denoising step of a batch, run eagerly or replayed as a CUDA graph.

A step is everything between two noise levels: the model on [x, x] against [text, negative text] when
guidance is on (on x otherwise), ATen's lerp of the two predictions, and the sampler's update. Every row
carries its own noise level, sampler coefficients and guidance weight, so that requests at different steps
of different schedules share one batch (see `engine.scheduler`). Eagerly a step is some 1,200 (prior) to
1,700 (decoder) kernel launches, and the GPU idles while the CPU issues them; captured in a CUDA graph it is
one launch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from engine.schedule import sampler_step

# (x, r, conditioning) → predicted noise; conditioning is the stage's once-per-request tensors.
Model = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def guided_step(
    model: Model, conditioning: tuple[torch.Tensor, ...], x: torch.Tensor, r: torch.Tensor,
    coefficients: torch.Tensor, noise: torch.Tensor, guidance: torch.Tensor | None,
) -> torch.Tensor:
    """x (B, C, H, W) at the next noise level. `r` (B,) are the rows' noise levels, `coefficients` (B, 4) their
    sampler coefficients (`engine.schedule.DenoisingSchedule`), `noise` their draws for this step. With
    `guidance`, (B,) float32 scales, the model runs on [x, x] against the conditioning's [text, negative]
    halves and each row's noise is lerp(negative, text, its scale)."""
    if guidance is None:
        eps = model(x, r, conditioning)
    else:
        eps_text, eps_uncond = model(torch.cat([x, x]), torch.cat([r, r]), conditioning).chunk(2)
        eps = torch.lerp(eps_uncond, eps_text, guidance.view(-1, *[1] * (x.dim() - 1)))
    return sampler_step(coefficients, x, eps, noise)


class StepGraph:
    """One step captured for fixed shapes: static input buffers, the graph, and its static output.

    On a GPU the step is captured once (after warm-up on a side stream) and `replay` copies the step's
    inputs into the static buffers and launches the graph. On a CPU there is nothing to capture, and
    `replay` runs the step eagerly on the same static buffers.
    """

    WARMUP = 2  # eager runs before capture: lazy initialisation (cuBLAS handles, kernel caches) must not be captured

    def __init__(self, step: Callable[..., torch.Tensor], conditioning: tuple[torch.Tensor, ...],
                 inputs: tuple[torch.Tensor, ...], pool=None):
        self.step = step
        self.conditioning = tuple(c.clone() for c in conditioning)
        self.inputs = tuple(t.clone() for t in inputs)
        self.members: object = None  # whose conditioning the static buffers hold (see `load_conditioning`)
        self.graph = None
        device = self.inputs[0].device
        if device.type == "cuda":
            with torch.cuda.device(device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.WARMUP):
                        self.step(self.conditioning, *self.inputs)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.output = self.step(self.conditioning, *self.inputs)

    def load_conditioning(self, conditioning: tuple[torch.Tensor, ...], members: object) -> None:
        """Copy the batch's conditioning into the static buffers, unless they hold `members`' already: the
        conditioning changes only when the batch's requests do, not at every step."""
        if members is not None and members == self.members:
            return
        for static, tensor in zip(self.conditioning, conditioning, strict=True):
            static.copy_(tensor)
        self.members = members

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The step's output. On a GPU it lives in the graph's output buffer until the next replay."""
        for static, tensor in zip(self.inputs, inputs, strict=True):
            static.copy_(tensor)
        if self.graph is None:
            return self.step(self.conditioning, *self.inputs)
        self.graph.replay()
        return self.output


class StepGraphs:
    """Captured steps by key (stage, latent shape, batch size, guidance on or off, dtypes and shapes of the
    conditioning, device), at most `capacity` of them: the least recently used is dropped when a new key needs
    room. All graphs share one memory pool."""

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
    def key(stage: str, guided: bool, x: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> tuple:
        return (stage, guided, tuple(x.shape), x.dtype, x.device,
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

    def memory_pool(self, device: torch.device):
        """The pool every graph of this cache captures into (None on a CPU)."""
        if self._pool is None and device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool
