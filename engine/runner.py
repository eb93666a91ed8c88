"""How the scheduler's work runs over a pipeline's `Stages`, whichever backend made them.

Each request on its own: the text stage (the prior's and the decoder's text states; the prior's
conditioning), the handoff (×42 − 1, the image embeddings' pyramid resized in fp32, the decoder's
conditioning), the VQGAN decode. Batched: the denoising steps of several requests as one batch (see
`engine.denoise.guided_step`), each row with its own noise level, sampler coefficients, noise and guidance
weight. A batch is padded to its size by repeating its first row: a real row, whose result is thrown away.
Where the stages capture steps (`Stages.graphs`, the fast backends), each (stage, shape, batch size) is one
CUDA graph, and the batch's conditioning is copied into it only when the batch's requests change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from engine.config import WuerstchenConfig
from engine.denoise import StepGraph, StepGraphs, guided_step
from engine.models.decoder import resize_image_embeddings
from engine.policy import GroupKey, Stage
from engine.requests import RequestState
from engine.stages import Stages
from engine.text import TextEncoder


def text_states(encoder: TextEncoder, prompts: list[str], negative_prompts: list[str], rows_per_prompt: int,
                guided: bool) -> torch.Tensor:
    """`rows_per_prompt` rows of text states per prompt; with guidance, the negative prompts' rows follow."""
    states = encoder(prompts).repeat_interleave(rows_per_prompt, dim=0)
    if not guided:
        return states
    return torch.cat([states, encoder(negative_prompts).repeat_interleave(rows_per_prompt, dim=0)])


class Runner:
    """Runs each stage of `engine.policy.Stage` for requests (`engine.requests.RequestState`), writing the
    results into them."""

    BATCHES_KEPT = 8  # batched conditionings kept for reuse, one per recent group

    def __init__(self, config: WuerstchenConfig, stages: Stages, device: torch.device,
                 capture_sizes: frozenset[int] = frozenset({1, 2, 4, 8})):
        """`capture_sizes`: the batch sizes replayed as CUDA graphs where the stages capture steps; a batch of
        another size (a request larger than every bucket) runs eagerly."""
        self.config, self.stages, self.device, self.capture_sizes = config, stages, device, capture_sizes
        self._batched: OrderedDict[GroupKey, tuple[tuple, tuple[torch.Tensor, ...]]] = OrderedDict()

    @property
    def captures(self) -> bool:
        """Whether steps replay as CUDA graphs, one per batch size: then batch sizes come from buckets."""
        return self.stages.graphs is not None

    def text(self, state: RequestState) -> None:
        stages = self.stages
        if state.prior is not None:
            prior = state.prior
            text = text_states(stages.prior_text, prior.prompts, prior.negative_prompts, prior.images_per_prompt,
                               prior.guidance > 1)
            state.conditioning = stages.prior.condition(text)
            state.latents = state.prior_denoising.initial
        if state.decoder is not None:
            decoder = state.decoder
            state.decoder_text = text_states(stages.decoder_text, decoder.prompts, decoder.negative_prompts,
                                             decoder.rows_per_prompt, decoder.guidance > 1)

    def handoff(self, state: RequestState) -> None:
        """The prior's latents to image embeddings (×42 − 1); for a decoder, their pyramid and its conditioning,
        the unguided half seeing a zero embedding."""
        config = self.config
        if state.kind != "decoder":
            state.image_embeddings = state.latents * config.latent_mean - config.latent_std
        if state.kind == "prior":
            state.output = state.image_embeddings
            return
        decoder = state.decoder
        embeddings = state.image_embeddings.repeat_interleave(decoder.images_per_embedding, dim=0)
        if decoder.guidance > 1:
            embeddings = torch.cat([embeddings, torch.zeros_like(embeddings)])
        pyramid = resize_image_embeddings(embeddings, config.decoder, decoder.shapes.decoder_levels)
        state.conditioning = self.stages.decoder.condition(pyramid, state.decoder_text)
        state.decoder_text = state.image_embeddings = None
        state.latents = state.decoder_denoising.initial

    def decode(self, state: RequestState) -> None:
        state.output = state.latents if state.output_type == "latent" else self.stages.vqgan(state.latents)
        state.latents = state.conditioning = None

    def step(self, key: GroupKey, states: Sequence[RequestState], batch: int) -> None:
        """One denoising step of every request in `states`, as one batch of `batch` rows (≥ theirs)."""
        rows = sum(state.rows for state in states)
        pad = batch - rows
        denoisings = [state.denoising for state in states]
        inputs = [
            torch.cat([state.latents for state in states]),
            torch.cat([d.schedule.ratios[s.step].expand(s.rows) for s, d in zip(states, denoisings, strict=True)]),
            torch.cat([d.schedule.coefficients[s.step].expand(s.rows, 4)
                       for s, d in zip(states, denoisings, strict=True)]),
            torch.cat([d.noise[s.step] for s, d in zip(states, denoisings, strict=True)]),
        ]
        if key.guided:
            inputs.append(torch.cat([torch.full((s.rows,), d.guidance, dtype=torch.float32, device=self.device)
                                     for s, d in zip(states, denoisings, strict=True)]))
        if pad:
            inputs = [torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in inputs]
        members = (tuple(state.request_id for state in states), batch)
        conditioning = self._conditioning(key, states, pad, members)
        model = self.stages.prior if key.stage is Stage.PRIOR else self.stages.decoder

        def run(conditioning, x, r, coefficients, noise, *guidance):
            return guided_step(model, conditioning, x, r, coefficients, noise, guidance[0] if guidance else None)

        graphs = self.stages.graphs
        if graphs is None or batch not in self.capture_sizes:
            latents = run(conditioning, *inputs)
        else:
            graph_key = StepGraphs.key(key.stage.name.lower(), key.guided, inputs[0], conditioning)
            graph = graphs.get(graph_key, lambda: StepGraph(run, conditioning, tuple(inputs),
                                                            pool=graphs.memory_pool(self.device)))
            graph.load_conditioning(conditioning, members)
            latents = graph.replay(*inputs)[:rows].clone()  # the graph's output buffer is the next replay's
        finite = torch.isfinite(latents[:rows].flatten(1)).all(dim=1)
        for state, part, flags in zip(states, latents[:rows].split([s.rows for s in states]),
                                      finite.split([s.rows for s in states]), strict=True):
            state.latents, state.finite = part, flags

    def _conditioning(self, key: GroupKey, states: Sequence[RequestState], pad: int,
                      members: tuple) -> tuple[torch.Tensor, ...]:
        """The batch's conditioning, tensor by tensor: the requests' rows one after the other (with guidance,
        every request's text rows, then every request's negative rows, as the step's [x, x] batch has them),
        each padded like the batch. Kept while the batch's requests stay the same."""
        if len(states) == 1 and not pad:
            return states[0].conditioning
        cached = self._batched.get(key)
        if cached is not None and cached[0] == members:
            self._batched.move_to_end(key)
            return cached[1]
        halves = 2 if key.guided else 1
        batched = []
        for tensors in zip(*(state.conditioning for state in states), strict=True):
            parts = []
            for half in range(halves):
                rows = [t[half * s.rows:(half + 1) * s.rows] for t, s in zip(tensors, states, strict=True)]
                parts += rows + ([rows[0][:1].expand(pad, *rows[0].shape[1:])] if pad else [])
            batched.append(torch.cat(parts))
        self._batched[key] = (members, tuple(batched))
        while len(self._batched) > self.BATCHES_KEPT:
            self._batched.popitem(last=False)
        return tuple(batched)
