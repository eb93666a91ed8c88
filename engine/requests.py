"""One request as the scheduler holds it: what was asked (checked), its own noise, and where it stands.

A request is made in the caller's thread (`engine.pipeline.WuerstchenPipeline.submit`): its fields checked,
and every draw of its noise taken from its own generator in exactly the order a pipeline call takes them
(the prior's initial latents and one draw per prior step, then the decoder's), so that its image does not
depend on what else is in flight. The scheduler's thread then moves it through the stages of
`engine.policy.Stage`; the runner (`engine.runner`) computes each stage and writes the results back here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from engine.errors import WuerstchenError
from engine.policy import Candidate, GroupKey, Stage
from engine.schedule import DenoisingSchedule

KINDS = ("images", "prior", "decoder")  # the whole pipeline, the prior alone (run_prior), the decoder alone

# The tensors a step callback may ask for, by stage: diffusers' `_callback_tensor_inputs` of its prior and
# decoder pipelines.
PRIOR_CALLBACK_TENSORS = ("latents", "text_encoder_hidden_states", "negative_prompt_embeds")
DECODER_CALLBACK_TENSORS = (*PRIOR_CALLBACK_TENSORS, "image_embeddings")

# On a scheduler's worker thread, `WORKER.scheduler` is the scheduler it runs (see `RequestFuture._check_waiter`).
WORKER = threading.local()


class RequestFuture(Future):
    """A submitted request's result: what the matching pipeline call returns, or its exception. `cancel()`
    works until the request finishes: the scheduler frees its slot at the next tick. `progress` is (stage,
    step, steps) of the work last done; `add_progress_callback` calls a function with each piece of work done
    so far, in order, then with each one as it is done, so a function added after `submit` misses none."""

    def __init__(self, request_id: int):
        super().__init__()
        self.request_id = request_id
        self.progress: tuple[str, int, int] = ("queued", 0, 0)
        self.scheduler: object | None = None  # the scheduler that runs it, once submitted
        self._progress_callbacks: list[Callable[[str, int, int], None]] = []
        self._reported: list[tuple[str, int, int]] = []  # every piece of work done, for callbacks added late
        self._progress_lock = threading.Lock()

    def result(self, timeout: float | None = None):
        self._check_waiter()
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        self._check_waiter()
        return super().exception(timeout)

    def _check_waiter(self) -> None:
        """A one-line error, not a hang, when the thread about to wait is the scheduler's own (a step or progress
        callback waiting for its pipeline): the request would wait for it. The request is cancelled."""
        if not self.done() and self.scheduler is not None and getattr(WORKER, "scheduler", None) is self.scheduler:
            self.cancel()
            raise WuerstchenError("a callback waited for a request of its own pipeline: callbacks run on the "
                                  "pipeline's scheduler thread, which would have to run the request, so it would "
                                  "wait forever; use pipeline.submit() there and wait for the result elsewhere")

    def add_progress_callback(self, callback: Callable[[str, int, int], None]) -> None:
        with self._progress_lock:  # held while catching up, so that the next report comes after it
            for progress in self._reported:
                callback(*progress)
            self._progress_callbacks.append(callback)

    def report(self, stage: str, step: int, steps: int) -> None:
        """Called by the scheduler's thread after each piece of the request's work."""
        self.progress = (stage, step, steps)
        with self._progress_lock:
            self._reported.append(self.progress)
            callbacks = list(self._progress_callbacks)
        for callback in callbacks:
            callback(stage, step, steps)


@dataclass(frozen=True)
class StepCallback:
    """A caller's `callback_on_step_end` for one denoising stage of its request, called as diffusers calls it:
    after each step, `function(pipeline, step, timestep, callback_kwargs)` with the step's index, its noise level
    `timesteps[step]` (a 0-dim fp32 tensor) and the tensors named in `tensor_inputs`, the request's rows alone.
    `name` is the argument it came in, for errors."""

    function: Callable
    tensor_inputs: tuple[str, ...]
    pipeline: object
    timesteps: torch.Tensor
    name: str

    def to(self, device: torch.device) -> StepCallback:
        return replace(self, timesteps=self.timesteps.to(device))


@dataclass
class Denoising:
    """One denoising stage of a request: its schedule, its noise (the initial latents, given or drawn, then one
    draw per step), its guidance scale, its step callback if it has one, and its latents and conditioning once
    it runs."""

    schedule: DenoisingSchedule
    initial: torch.Tensor
    noise: tuple[torch.Tensor, ...]
    guidance: float
    shape: tuple[int, int]  # the latent's (height, width)
    callback: StepCallback | None = None

    @property
    def steps(self) -> int:
        return self.schedule.num_steps

    @property
    def guided(self) -> bool:
        return self.guidance > 1

    def to(self, device: torch.device) -> Denoising:
        """The same stage with its tensors on `device`."""
        return Denoising(
            DenoisingSchedule(self.schedule.ratios.to(device), self.schedule.coefficients.to(device)),
            self.initial.to(device), tuple(n.to(device) for n in self.noise), self.guidance, self.shape,
            self.callback and self.callback.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.initial, *self.noise))


@dataclass(eq=False)
class RequestState:
    """A request in the scheduler: what it asks for, and its state from stage to stage."""

    request_id: int
    kind: str  # one of KINDS
    rows: int  # images in flight: latent rows of its batches
    future: RequestFuture
    output_type: str
    prior: object = None  # engine.pipeline.PriorRequest, for kinds "images" and "prior"
    decoder: object = None  # engine.pipeline.DecoderRequest, for kinds "images" and "decoder"
    prior_denoising: Denoising | None = None
    decoder_denoising: Denoising | None = None
    # The decoder's input: given ("decoder") or the prior's output; kept through the decoder's steps where a step
    # callback may return text states to condition again.
    image_embeddings: torch.Tensor | None = None
    timeout: float | None = None  # seconds from submission to the deadline
    deadline: float = math.inf  # on the scheduler's clock, set at submission
    interactive: bool = True
    deterministic: bool = False
    return_dict: bool = True  # False: the result as diffusers returns it then (see the pipeline's `_finish`)
    runtime: object = None  # the engine.runtime.Runtime it was made for: its noise is in that precision
    submitted: float = 0.0
    # Where it stands.
    stage: Stage = Stage.TEXT
    step: int = 0
    ready_tick: int = 0
    latents: torch.Tensor | None = None
    conditioning: tuple[torch.Tensor, ...] = ()
    conditioning_version: int = 0  # counts the callbacks' replacements of the text states it was made from
    decoder_text: torch.Tensor | None = None
    # What the stage's step callback may ask for besides the latents (see `engine.runner.callback_text`).
    callback_tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    finite: torch.Tensor | None = None  # per row, from the last step; read one tick later
    output: torch.Tensor | None = None  # the image embeddings, the latents or the images, once done
    ticks: list[tuple[GroupKey, int]] = field(default_factory=list)  # (group, batch size) of every tick it ran in
    compute_seconds: float = 0.0  # its ticks' measured time, once finished
    timings: dict[str, float] = field(default_factory=dict)
    stage_started: float = 0.0

    @property
    def denoising(self) -> Denoising | None:
        """The denoising stage the request is in, if it is in one."""
        return {Stage.PRIOR: self.prior_denoising, Stage.DECODER: self.decoder_denoising}.get(self.stage)

    @property
    def key(self) -> GroupKey:
        return self.key_for(self.stage)

    def key_for(self, stage: Stage) -> GroupKey:
        """The group the request's work of `stage` belongs to."""
        denoising = {Stage.PRIOR: self.prior_denoising, Stage.DECODER: self.decoder_denoising}.get(stage)
        if denoising is None:
            return GroupKey(stage)
        return GroupKey(stage, denoising.shape, denoising.guided, self.deterministic)

    def __post_init__(self):
        # What the request holds on the device while in flight, roughly: its noise (its latents are the size of
        # one draw) and its decoded images in fp32. Fixed at creation: the scheduler keeps a running sum.
        noise = sum(d.nbytes for d in (self.prior_denoising, self.decoder_denoising) if d is not None)
        images = math.prod(self.decoder.shapes.image) if self.decoder is not None else 0
        self.nbytes = noise + 4 * images

    def candidate(self, remaining_s: float) -> Candidate:
        return Candidate(self.request_id, self.key, self.rows, self.ready_tick, self.deadline, remaining_s,
                         self.interactive)

    def steps_left(self) -> dict[Stage, int]:
        """The work still to do, by stage: steps for the denoising stages, one for each other stage."""
        order = [Stage.TEXT, Stage.PRIOR, Stage.HANDOFF, Stage.DECODER, Stage.DECODE]
        plan = {
            "images": order, "prior": order[:3], "decoder": [Stage.TEXT, Stage.HANDOFF, Stage.DECODER, Stage.DECODE],
        }[self.kind]
        left = {}
        for stage in plan:
            if stage < self.stage:
                continue
            if stage.batched:
                denoising = self.prior_denoising if stage is Stage.PRIOR else self.decoder_denoising
                left[stage] = denoising.steps - (self.step if stage is self.stage else 0)
            else:
                left[stage] = 1
        return left

    def advance(self, tick: int, now: float) -> bool:
        """Move past the work just done; True when the request is finished."""
        if self.stage.batched and self.step + 1 < self.denoising.steps:
            self.step += 1
            self.ready_tick = tick
            return False
        self.step = 0
        self.ready_tick = tick
        # The handoff (×42 − 1, the pyramid, the decoder's conditioning) counts as the stage it serves.
        stage_name = {Stage.TEXT: "text", Stage.PRIOR: "prior", Stage.HANDOFF: "prior" if self.kind == "prior" else
                      "decoder", Stage.DECODER: "decoder", Stage.DECODE: "vqgan"}[self.stage]
        self.timings[stage_name] = self.timings.get(stage_name, 0.0) + now - self.stage_started
        self.stage_started = now
        if self.stage is Stage.TEXT:
            self.stage = Stage.PRIOR if self.kind != "decoder" else Stage.HANDOFF
        elif self.stage is Stage.PRIOR:
            self.stage = Stage.HANDOFF
        elif self.stage is Stage.HANDOFF:
            if self.kind == "prior":
                return True
            self.stage = Stage.DECODER
        elif self.stage is Stage.DECODER:
            self.stage = Stage.DECODE
        else:
            return True
        return False
