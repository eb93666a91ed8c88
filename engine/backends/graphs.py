"""The pipeline's stages over a bundle's graphs, whichever runtime runs them.

A graph runtime provides, for each graph name, a callable taking the graph's inputs in manifest order and
returning its outputs; these classes give those graphs the calls of `engine.stages.Denoiser`, as the
PyTorch models have them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.bundle import Bundle
from engine.stages import Stages
from engine.text import TextEncoder

Graph = Callable[..., list[torch.Tensor]]


class GraphPrior:
    """The prior's conditioning and step graphs as a `Denoiser`, with `Prior`'s calls."""

    def __init__(self, condition: Graph, step: Graph):
        self._condition, self._step = condition, step

    def condition(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._condition(text))

    def __call__(self, x: torch.Tensor, r: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._step(x, r, *conditioning)[0]


class GraphDecoder:
    """The decoder's conditioning and step graphs as a `Denoiser`, with `Decoder`'s calls: the conditioning is
    the graph's outputs, the text keys and values then the image-embedding skips, in one flat tuple."""

    def __init__(self, condition: Graph, step: Graph):
        self._condition, self._step = condition, step

    def condition(self, pyramid: tuple[torch.Tensor, ...], text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._condition(text, *pyramid))

    def __call__(self, x: torch.Tensor, r: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._step(x, r, *conditioning)[0]


def graph_stages(bundle: Bundle, graph: Callable[[str], Graph], device: torch.device) -> Stages:
    """The pipeline's stages over a bundle, `graph(name)` giving each graph's runner."""
    from transformers import AutoTokenizer

    def text(stage: str) -> TextEncoder:
        tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer(stage))
        transformer = graph(f"{stage}_text")
        return TextEncoder(tokenizer, lambda ids, mask: transformer(ids, mask)[0], device)

    vqgan = graph("vqgan_decode")
    return Stages(
        prior_text=text("prior"),
        prior=GraphPrior(graph("prior_condition"), graph("prior_step")),
        decoder_text=text("decoder"),
        decoder=GraphDecoder(graph("decoder_condition"), graph("decoder_step")),
        vqgan=lambda latents: vqgan(latents)[0],
    )
