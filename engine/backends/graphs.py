"""The pipeline's stages over a bundle's graphs, whichever runtime runs them.

A graph runtime provides, for each graph name, a callable taking the graph's inputs in manifest order and
returning its outputs; these classes give those graphs the call signatures of the PyTorch stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.bundle import Bundle
from engine.text import TextEncoder

Graph = Callable[..., list[torch.Tensor]]


class GraphPrior:
    """The prior's conditioning and step graphs with `Prior`'s `condition` and call."""

    def __init__(self, condition: Graph, step: Graph):
        self._condition, self._step = condition, step

    def condition(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._condition(text))

    def __call__(self, x: torch.Tensor, r: torch.Tensor, text_kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._step(x, r, *text_kv)[0]


class GraphDecoder:
    """The decoder's conditioning and step graphs with `Decoder`'s `condition` and call."""

    def __init__(self, condition: Graph, step: Graph, num_text_kv: int):
        self._condition, self._step, self._num_text_kv = condition, step, num_text_kv

    def condition(self, pyramid: tuple[torch.Tensor, ...], text: torch.Tensor):
        outputs = self._condition(text, *pyramid)
        return tuple(outputs[: self._num_text_kv]), tuple(outputs[self._num_text_kv :])

    def __call__(self, x: torch.Tensor, r: torch.Tensor, text_kv: tuple[torch.Tensor, ...],
                 effnet: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._step(x, r, *text_kv, *effnet)[0]


def graph_stages(bundle: Bundle, graph: Callable[[str], Graph], device: torch.device) -> dict:
    """The five stages of `WuerstchenPipeline` over a bundle, `graph(name)` giving each graph's runner."""
    from transformers import AutoTokenizer

    def text(stage: str) -> TextEncoder:
        tokenizer = AutoTokenizer.from_pretrained(bundle.path(bundle.manifest["tokenizers"][stage]))
        transformer = graph(f"{stage}_text")
        return TextEncoder(tokenizer, lambda ids, mask: transformer(ids, mask)[0], device)

    num_text_kv = sum(o["name"].startswith("text_kv.") for o in bundle.graph("decoder_condition")["outputs"])
    vqgan = graph("vqgan_decode")
    return dict(
        prior_text=text("prior"),
        prior=GraphPrior(graph("prior_condition"), graph("prior_step")),
        decoder_text=text("decoder"),
        decoder=GraphDecoder(graph("decoder_condition"), graph("decoder_step"), num_text_kv),
        vqgan=lambda latents: vqgan(latents)[0],
    )
