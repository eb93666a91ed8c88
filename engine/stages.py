"""The stage objects that every backend provides and the pipeline drives, whichever backend made them.

A backend loads a model source into `Stages`: the two text encoders, the prior and the decoder as
`Denoiser`s (their conditioning computed once per request, then one call per step), the VQGAN decode, and,
on the fast backends, the cache of denoising steps captured as CUDA graphs (`graphs`; without it every step
runs eagerly). On the PyTorch backends the stages are the models themselves; on the others, graphs behind
the same calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.denoise import StepGraphs
from engine.quantization import QuantRecipe
from engine.text import TextEncoder


class Denoiser(Protocol):
    """The prior or the decoder. `condition` turns the request's inputs (the prior: text states; the decoder:
    the image-embedding pyramid and text states) into the step-invariant conditioning, a flat tuple of
    tensors; a call predicts the noise (float32) of latents x at noise levels r (one per row)."""

    def condition(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def __call__(self, x: torch.Tensor, r: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Stages:
    """Everything a pipeline runs, on one device in one precision."""

    prior_text: TextEncoder
    prior: Denoiser
    decoder_text: TextEncoder
    decoder: Denoiser
    vqgan: Callable[[torch.Tensor], torch.Tensor]  # decoder latents → images in [0, 1]
    graphs: StepGraphs | None = None  # denoising steps captured as CUDA graphs, per shape and batch size
    # Whether the denoisers take noise levels in fp32 rather than their dtype, so that the timestep embedding
    # is not rounded (bf16 rounds r·10000 to multiples of 32–64): the PyTorch stages in bf16 or quantized.
    # fp32 and fp16 keep diffusers' rounding, and exported graphs take r in their dtype.
    fp32_timesteps: bool = False
    quantization: QuantRecipe | None = None  # the recipe the prior's and decoder's Linears were quantized by
