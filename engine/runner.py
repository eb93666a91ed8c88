"""How the scheduler's work runs over a pipeline's `Stages`, whichever backend made them.

Each request on its own: the text stage (the prior's and the decoder's text states; the prior's
conditioning), the handoff (×42 − 1, the image embeddings' pyramid resized in fp32, the decoder's
conditioning), the VQGAN decode. Batched: the denoising steps of several requests as one batch (see
`engine.denoise.guided_step`), each row with its own noise level, sampler coefficients, noise and guidance
weight. A batch is padded to its size by repeating its first row: a real row, whose result is thrown away.
Where the stages capture steps (`Stages.graphs`, the fast backends), each (stage, shape, batch size) is one
CUDA graph, and the batch's conditioning is copied into it only when the batch's requests change.

A request's step callback (`engine.requests.StepCallback`) runs after each of its steps (`end_step`), on its
own rows: the latents the step wrote (a copy of the graph's output where steps are captured) and the text
states its conditioning came from. Latents it returns are the next step's input; text states it returns are
conditioned again, and batches and captured steps then reload that request's conditioning.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from engine.config import WuerstchenConfig
from engine.denoise import StepGraph, StepGraphs, guided_step
from engine.errors import WuerstchenError
from engine.models.decoder import resize_image_embeddings
from engine.policy import GroupKey, Stage
from engine.requests import RequestState
from engine.stages import Stages
from engine.text import TextEncoder

# The names diffusers takes back from the dict a step callback returns, by stage: the latents and the text states
# for the next steps, and one more tensor (the prior's negative states, the decoder's image embeddings) that only
# the later callbacks see.
RETURNED = {
    Stage.PRIOR: ("latents", "text_encoder_hidden_states", "negative_prompt_embeds"),
    Stage.DECODER: ("latents", "text_encoder_hidden_states", "image_embeddings"),
}


def text_states(encoder: TextEncoder, prompts: list[str] | torch.Tensor, negative_prompts: list[str] | torch.Tensor,
                rows_per_prompt: int, guided: bool) -> torch.Tensor:
    """`rows_per_prompt` rows of text states per prompt; with guidance, the negative prompts' rows follow. Each
    of `prompts` and `negative_prompts` is a list of prompts to encode, or their states, given (`prompt_embeds`)."""

    def encoded(texts: list[str] | torch.Tensor) -> torch.Tensor:
        states = texts.to(encoder.device) if isinstance(texts, torch.Tensor) else encoder(texts)
        return states.repeat_interleave(rows_per_prompt, dim=0)

    if not guided:
        return encoded(prompts)
    return torch.cat([encoded(prompts), encoded(negative_prompts)])


def callback_text(text: torch.Tensor, rows: int, guided: bool) -> dict[str, torch.Tensor | None]:
    """The text states a step callback sees, by diffusers' names: every row of the conditioning (with guidance,
    the negative prompts' rows follow the prompts'), and the negative rows alone (None without guidance)."""
    return {"text_encoder_hidden_states": text, "negative_prompt_embeds": text[rows:] if guided else None}


def _replacement(callback: str, name: str, value, current: torch.Tensor) -> torch.Tensor:
    """A tensor a step callback returned in place of `current`: the same shape, on its device, in its dtype."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != current.shape:
        shown = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"type {type(value).__name__}"
        raise WuerstchenError(f"{callback} returned {name} of {shown}: expected a float tensor of shape "
                              f"{tuple(current.shape)}, as it was given")
    return value.to(device=current.device, dtype=current.dtype)


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
            if state.prior_denoising.callback is not None:
                state.callback_tensors = callback_text(text, state.rows, prior.guidance > 1)
        if state.decoder is not None:
            decoder = state.decoder
            state.decoder_text = text_states(stages.decoder_text, decoder.prompts, decoder.negative_prompts,
                                             decoder.rows_per_prompt, decoder.guidance > 1)

    def handoff(self, state: RequestState) -> None:
        """The prior's latents to image embeddings (×42 − 1); for a decoder, their conditioning."""
        config = self.config
        state.callback_tensors = {}
        if state.kind != "decoder":
            state.image_embeddings = state.latents * config.latent_mean - config.latent_std
        if state.kind == "prior":
            state.output = state.image_embeddings
            return
        decoder = state.decoder
        state.conditioning = self._decoder_conditioning(state, state.image_embeddings, state.decoder_text)
        if state.decoder_denoising.callback is None:
            state.image_embeddings = None
        else:  # kept to condition on text states the callback returns
            state.callback_tensors = {**callback_text(state.decoder_text, state.rows, decoder.guidance > 1),
                                      "image_embeddings": state.image_embeddings}
        state.decoder_text = None
        state.latents = state.decoder_denoising.initial

    def _decoder_conditioning(self, state: RequestState, image_embeddings: torch.Tensor,
                              text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decoder's conditioning: the image embeddings' pyramid (one row per image; with guidance, a zero
        embedding for the negative half) and the text states."""
        decoder = state.decoder
        embeddings = image_embeddings.repeat_interleave(decoder.images_per_embedding, dim=0)
        if decoder.guidance > 1:
            embeddings = torch.cat([embeddings, torch.zeros_like(embeddings)])
        pyramid = resize_image_embeddings(embeddings, self.config.decoder, decoder.shapes.decoder_levels)
        return self.stages.decoder.condition(pyramid, text)

    def decode(self, state: RequestState) -> None:
        state.output = state.latents if state.output_type == "latent" else self.stages.vqgan(state.latents)
        state.latents = state.conditioning = state.image_embeddings = None
        state.callback_tensors = {}

    def end_step(self, state: RequestState) -> None:
        """Call the request's step callback after the step just run, with its own rows, and take what it
        returns: latents for the next step, or text states to condition the next steps on. The device finishes
        the step first, so the callback may read the tensors at once, from any stream."""
        callback = state.denoising.callback
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        tensors = {"latents": state.latents, **state.callback_tensors}
        returned = callback.function(callback.pipeline, state.step, callback.timesteps[state.step],
                                     {name: tensors[name] for name in callback.tensor_inputs})
        if not isinstance(returned, Mapping):
            raise WuerstchenError(f"{callback.name} returned {type(returned).__name__}: expected a dict of the "
                                  "tensors it replaces (its callback_kwargs, or {} for none)")
        for name in RETURNED[state.stage]:
            if name not in returned:
                continue
            if name == "latents":
                state.latents = _replacement(callback.name, name, returned[name], state.latents)
            elif name == "text_encoder_hidden_states":
                text = _replacement(callback.name, name, returned[name], tensors[name])
                state.callback_tensors[name] = text
                state.conditioning = self.stages.prior.condition(text) if state.stage is Stage.PRIOR else \
                    self._decoder_conditioning(state, state.image_embeddings, text)
                state.conditioning_version += 1
            else:  # what the later callbacks see, and nothing else does
                state.callback_tensors[name] = returned[name]

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
        members = (tuple((state.request_id, state.conditioning_version) for state in states), batch)
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
