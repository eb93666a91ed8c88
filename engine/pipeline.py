"""The text-to-image pipeline: prompts → CLIP states → prior loop → ×42 − 1 → decoder loop → VQGAN → images.

`WuerstchenPipeline` is a drop-in for diffusers' `WuerstchenCombinedPipeline` on its common arguments, and
its two stages for diffusers' `WuerstchenPriorPipeline` (`run_prior`: prompts → image embeddings) and
`WuerstchenDecoderPipeline` (`run_decoder`: image embeddings and prompts → images). With the same weights and
the same `torch.Generator` each makes the same output as its diffusers counterpart (fp32, CPU). It drives
the `Stages` that a backend loaded, and never knows which backend that was.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from engine import backends
from engine.backends import Backend, BackendOptions
from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.memory import check_fits, request_bytes
from engine.precision import Precision
from engine.quantization import QuantRecipe
from engine.requests import (
    DECODER_CALLBACK_TENSORS,
    PRIOR_CALLBACK_TENSORS,
    Denoising,
    RequestFuture,
    RequestState,
    StepCallback,
)
from engine.runner import Runner
from engine.runtime import ModelSource, Runtime, resolve
from engine.schedule import Generator, draw_denoising_noise, draw_noise, make_schedule, timestep_grid
from engine.scheduler import Scheduler, SchedulerOptions
from engine.shapes import TEXT_TOKENS, Shapes, embedding_shapes, image_shapes
from engine.stages import Stages

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EMBEDDING_OUTPUT_TYPES = ("pt", "np")

# diffusers' `callback_on_step_end`: (pipeline, step index, timestep, callback_kwargs) → the tensors it replaces.
StepCallbackFunction = Callable[[object, int, torch.Tensor, dict], dict]


@dataclass
class WuerstchenOutput:
    """`images` as diffusers returns them for the output type: a list of PIL images ("pil"), an array
    (N, H, W, 3) in [0, 1] ("np"), a tensor (N, 3, H, W) in [0, 1] ("pt"), or the decoder's latents
    ("latent"). `timings`: the seconds each stage that ran took, text, prior, decoder, vqgan, from its start
    to its end on the host's clock (with other requests in flight, their ticks in between count too).
    `compute_s`: the request's share of the device's time, from the measured times of the ticks it ran in;
    the rest of its latency was queueing."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    timings: dict[str, float]
    compute_s: float = 0.0


@dataclass
class WuerstchenPriorOutput:
    """`image_embeddings` as diffusers' `WuerstchenPriorPipeline` returns them: the prior's latents times 42
    minus 1, (N, 16, h, w), a tensor ("pt") or an array ("np"). `timings` and `compute_s` as in
    `WuerstchenOutput`, for the text and prior stages."""

    image_embeddings: torch.Tensor | np.ndarray
    timings: dict[str, float]
    compute_s: float = 0.0


@dataclass(frozen=True)
class PriorRequest:
    """A checked prior call: every prompt's text is encoded once and used by its `images_per_prompt` rows.
    Prompts (and negative prompts) are strings, or their CLIP states given as `prompt_embeds` (prompts, 77,
    width), on the CPU in the pipeline's dtype, as are the initial `latents` when given."""

    prompts: list[str] | torch.Tensor
    negative_prompts: list[str] | torch.Tensor
    images_per_prompt: int
    shapes: Shapes
    grid: torch.Tensor
    guidance: float
    latents: torch.Tensor | None = None


@dataclass(frozen=True)
class DecoderRequest:
    """A checked decoder call. Its latents are `shapes.batch` rows; prompt i's text serves `rows_per_prompt`
    consecutive rows, and each image embedding `images_per_embedding` consecutive rows."""

    prompts: list[str]
    negative_prompts: list[str]
    rows_per_prompt: int
    images_per_embedding: int
    shapes: Shapes
    grid: torch.Tensor
    guidance: float
    latents: torch.Tensor | None = None  # the initial latents, given (on the CPU, in the pipeline's dtype)


# Beyond this many steps, neighbouring noise levels are closer than fp16 tells apart (its spacing near 1 is
# about 5e-4), and a request would only draw noise, not detail.
MAX_STEPS = 1000


def _positive_int(name: str, value, most: int | None = None) -> int:
    """An integer (NumPy's too) from 1 to `most`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (most and value > most):
        raise WuerstchenError(f"{name}={value!r}: expected a positive integer{f' up to {most}' if most else ''}")
    return int(value)


def _finite(name: str, value) -> float:
    """A finite real number (NumPy's too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise WuerstchenError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _grid(name: str, steps_name: str, steps, timesteps: Sequence[float] | None) -> torch.Tensor:
    steps = _positive_int(steps_name, steps, MAX_STEPS)
    if timesteps is None:
        return timestep_grid(steps)
    expected = "expected a decreasing list of two or more noise levels in [0, 1], e.g. [1.0, 0.5, 0.0]"
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError):
        raise WuerstchenError(f"{name}={timesteps!r}: {expected}") from None
    decreasing = all(a > b for a, b in zip(values, values[1:], strict=False))
    if not 2 <= len(values) <= MAX_STEPS + 1 or not decreasing or any(not 0 <= t <= 1 for t in values):
        raise WuerstchenError(f"{name}={_shown(timesteps)}: {expected}, at most {MAX_STEPS + 1}")
    return timestep_grid(len(values) - 1, values)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _text(name: str, value: str) -> str:
    """A prompt that a tokenizer can read: valid UTF-8 (a command line's undecodable bytes arrive as lone
    surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise WuerstchenError(f"{name} holds bytes that are not UTF-8 (at character {error.start}): expected "
                              "UTF-8 text") from None
    return value


def _prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise WuerstchenError(f"prompt={_shown(prompt)}: expected a string or a non-empty list of strings")
    prompts = [_text("prompt", p) for p in prompts]
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    if isinstance(negative_prompt, str):
        return prompts, [_text("negative_prompt", negative_prompt)] * len(prompts)
    if isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        if len(negative_prompt) == len(prompts):
            return prompts, [_text("negative_prompt", p) for p in negative_prompt]
        raise WuerstchenError(
            f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompts: expected one per "
            "prompt, or a single string"
        )
    raise WuerstchenError(f"negative_prompt={negative_prompt!r}: expected a string or a list of strings")


def _prior_texts(config: WuerstchenConfig, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                 dtype: torch.dtype) -> tuple[list[str] | torch.Tensor, list[str] | torch.Tensor]:
    """The prior's prompts and negative prompts, each as strings or as the CLIP states given in their place."""
    if prompt_embeds is None:
        if prompt is None:
            raise WuerstchenError("prompt=None: expected a string or a non-empty list of strings, or prompt_embeds")
        prompts, negatives = _prompts(prompt, negative_prompt)
    else:
        if prompt is not None:
            raise WuerstchenError(f"prompt={_shown(prompt)} given with prompt_embeds: pass one")
        prompts = _text_embeddings(config, "prompt_embeds", prompt_embeds, None, dtype)
        negatives = _prompts([""] * len(prompts), negative_prompt)[1]
    if negative_prompt_embeds is not None:
        if negative_prompt is not None:
            raise WuerstchenError(f"negative_prompt={_shown(negative_prompt)} given with negative_prompt_embeds: pass "
                                  "one")
        negatives = _text_embeddings(config, "negative_prompt_embeds", negative_prompt_embeds, len(prompts), dtype)
    return prompts, negatives


def _text_embeddings(config: WuerstchenConfig, name: str, value, rows: int | None, dtype: torch.dtype) -> torch.Tensor:
    """CLIP states given in place of prompts, as diffusers' prior computes them (the text encoder's last hidden
    states, (prompts, 77, width)): a copy on the CPU in the pipeline's dtype."""
    expected = f"({rows or 'prompts'}, {TEXT_TOKENS}, {config.prior_text.hidden_size})"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        shown = f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else f"type {type(value).__name__}"
        raise WuerstchenError(f"{name} of {shown}: expected a float tensor {expected}, the prior text encoder's last "
                              "hidden states")
    shape = tuple(value.shape)
    if len(shape) != 3 or shape[1:] != (TEXT_TOKENS, config.prior_text.hidden_size) or shape[0] < 1 or \
            rows not in (None, shape[0]):
        raise WuerstchenError(f"{name} has shape {shape}: expected {expected}, the prior text encoder's last hidden "
                              "states" + (", one row per prompt" if rows else ""))
    return value.detach().to(device="cpu", dtype=dtype, copy=True)


def _initial_latents(name: str, value, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Initial latents given in place of the first draw: a copy on the CPU in the pipeline's dtype."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != tuple(shape):
        shown = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"type {type(value).__name__}"
        raise WuerstchenError(f"{name} of {shown}: expected a float tensor of shape {tuple(shape)}, for this call's "
                              "size and images")
    return value.detach().to(device="cpu", dtype=dtype, copy=True)


def _check_generator(generator, batch: int, device: torch.device) -> Generator:
    if generator is None:
        return None
    generators = generator if isinstance(generator, list) else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise WuerstchenError(f"generator={generator!r}: expected a torch.Generator or a list of them")
    if isinstance(generator, list) and len(generator) not in (1, batch):
        raise WuerstchenError(f"generator is a list of {len(generator)}: expected one per image, {batch}")
    for g in generators:
        if g.device.type not in ("cpu", device.type):
            raise WuerstchenError(f"generator is on {g.device} but the pipeline runs on {device}: use a CPU generator")
    return generator


def _decoder_prompts(prompt, count: int):
    """The decoder's prompts in a combined call whose prior takes `prompt_embeds` of `count` prompts: `prompt`,
    or "" without one as in diffusers, for every row, or a list of one per row."""
    if prompt is None or isinstance(prompt, str):
        return [prompt or ""] * count
    if isinstance(prompt, (list, tuple)) and len(prompt) != count:
        raise WuerstchenError(f"prompt has {len(prompt)} entries for {count} rows of prompt_embeds: expected one per "
                              "row, or a single string")
    return prompt


def _step_callback(name: str, function, tensor_inputs, allowed: tuple[str, ...], pipeline,
                   grid: torch.Tensor) -> StepCallback | None:
    """A checked `callback_on_step_end` (None without one) and its `..._tensor_inputs`, which are checked even
    without a callback, as diffusers checks them."""
    inputs_name = f"{name}_tensor_inputs"
    names = () if tensor_inputs is None else tensor_inputs
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise WuerstchenError(f"{inputs_name}={_shown(tensor_inputs)}: expected a list of names from "
                              f"{', '.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise WuerstchenError(f"{inputs_name}={_shown(list(names))} names {', '.join(map(repr, unknown))}: expected "
                              f"names from {', '.join(allowed)}")
    if function is None:
        return None
    if not callable(function):
        raise WuerstchenError(f"{name}={_shown(function)}: expected a function (pipeline, step, timestep, "
                              "callback_kwargs) returning a dict")
    return StepCallback(function, tuple(names), pipeline, grid, name)


def _check_output_type(output_type: str, allowed: tuple[str, ...]) -> str:
    if output_type not in allowed:
        raise WuerstchenError(f"output_type={output_type!r}: expected one of {', '.join(allowed)}")
    return output_type


def check_prior_request(config: WuerstchenConfig, *, prompt, negative_prompt, height, width, num_inference_steps,
                        timesteps, guidance_scale, num_images_per_prompt, prompt_embeds=None,
                        negative_prompt_embeds=None, latents=None, dtype: torch.dtype = torch.float32,
                        steps_name: str = "num_inference_steps", timesteps_name: str = "timesteps",
                        guidance_name: str = "guidance_scale") -> PriorRequest:
    """Validate the prior's part of a call; a bad field is a one-line `WuerstchenError` naming it (by the
    name the caller used: the combined call prefixes the prior's fields with `prior_`). Given tensors are
    copied to the CPU in `dtype`, the pipeline's."""
    prompts, negatives = _prior_texts(config, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, dtype)
    images_per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
    shapes = image_shapes(config, height, width, len(prompts) * images_per_prompt)
    return PriorRequest(
        prompts=prompts, negative_prompts=negatives, images_per_prompt=images_per_prompt, shapes=shapes,
        grid=_grid(timesteps_name, steps_name, num_inference_steps, timesteps),
        guidance=_finite(guidance_name, guidance_scale),
        latents=_initial_latents("latents", latents, shapes.prior_latent, dtype),
    )


def check_decoder_request(config: WuerstchenConfig, embeddings: torch.Size | tuple[int, ...], *, prompt,
                          negative_prompt, num_inference_steps, timesteps, guidance_scale,
                          num_images_per_prompt, latents=None, dtype: torch.dtype = torch.float32,
                          steps_name: str = "num_inference_steps", timesteps_name: str = "timesteps",
                          guidance_name: str = "guidance_scale", rows_per_prompt: int | None = None) -> DecoderRequest:
    """Validate the decoder's part of a call for image embeddings of shape `embeddings` (B, C, h, w): one
    prompt for all of them, or one per embedding. The combined call passes `rows_per_prompt` instead, its
    prompts' images per prompt."""
    prompts, negatives = _prompts(prompt, negative_prompt)
    images_per_embedding = _positive_int("num_images_per_prompt", num_images_per_prompt)
    count = embeddings[0]
    if rows_per_prompt is None:
        if len(prompts) not in (1, count):
            raise WuerstchenError(f"prompt has {len(prompts)} entries for {count} image embeddings: expected one per "
                                  "embedding, or a single string")
        rows_per_prompt = count // len(prompts) * images_per_embedding
    shapes = embedding_shapes(config, tuple(embeddings[2:]), count * images_per_embedding)
    return DecoderRequest(
        prompts=prompts, negative_prompts=negatives, rows_per_prompt=rows_per_prompt,
        images_per_embedding=images_per_embedding, shapes=shapes,
        grid=_grid(timesteps_name, steps_name, num_inference_steps, timesteps),
        guidance=_finite(guidance_name, guidance_scale),
        latents=_initial_latents("latents", latents, shapes.decoder_latent, dtype),
    )


def check_image_embeddings(config: WuerstchenConfig, image_embeddings, device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
    """The decoder's input as diffusers' decoder pipeline takes it (a tensor, a list of tensors joined along
    the batch, or a NumPy array), as a (B, C, h, w) tensor on the pipeline's device and in its dtype. C is the
    width the decoder injects (`effnet_embd`); a decoder that injects nothing takes any width."""
    if isinstance(image_embeddings, (list, tuple)) and image_embeddings and \
            all(isinstance(e, torch.Tensor) for e in image_embeddings):
        image_embeddings = torch.cat(list(image_embeddings))
    if isinstance(image_embeddings, np.ndarray):
        image_embeddings = torch.from_numpy(image_embeddings)
    if not isinstance(image_embeddings, torch.Tensor) or not image_embeddings.is_floating_point():
        raise WuerstchenError(f"image_embeddings of type {type(image_embeddings).__name__}: expected a float tensor "
                              "(batch, channels, h, w), a list of them, or a NumPy array")
    decoder = config.decoder
    shape = tuple(image_embeddings.shape)
    channels_ok = len(shape) == 4 and (shape[1] == decoder.effnet_embd or not any(decoder.inject_effnet))
    if not channels_ok or shape[0] < 1:
        raise WuerstchenError(f"image_embeddings has shape {shape}: expected (batch, {decoder.effnet_embd}, h, w), "
                              "as the prior makes them")
    return image_embeddings.to(device=device, dtype=dtype)


def _to_output(images: torch.Tensor, output_type: str):
    if output_type in ("pt", "latent"):
        return images
    array = images.permute(0, 2, 3, 1).cpu().float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


def _load(runtime: Runtime) -> tuple[WuerstchenConfig, Stages, Runtime]:
    """The config and stages `runtime` loads, and the runtime itself, naming the recipe where a scheme's scan
    chose one (`quantize="fp8"`)."""
    config, stages = backends.load(runtime)
    if stages.quantization is not None:
        runtime = replace(runtime, quantization=stages.quantization)
    return config, stages, runtime


class WuerstchenPipeline:
    """Würstchen v2 text-to-image on any backend: build with `from_pretrained` (diffusers folders),
    `from_preset` (random weights), `from_bundle` (an exported bundle) or `load` (a resolved `Runtime`), then
    call with diffusers' combined-pipeline arguments, or run one stage with `run_prior` and `run_decoder`."""

    def __init__(self, config: WuerstchenConfig, stages: Stages, runtime: Runtime):
        self.config = config
        self.stages = stages
        self.runtime = runtime
        self._progress_bar_config: dict = {}
        self._scheduler_options = SchedulerOptions()
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> Precision:
        return self.runtime.precision

    @property
    def dtype(self) -> torch.dtype:
        return self.runtime.dtype

    @property
    def backend(self) -> Backend:
        return self.runtime.backend

    @property
    def quantization(self) -> QuantRecipe | None:
        """The recipe the prior's and decoder's Linears are quantized by (`quantize=`), or None; `.save(path)`
        keeps a scanned one for the next load."""
        return self.stages.quantization

    @classmethod
    def load(cls, runtime: Runtime) -> WuerstchenPipeline:
        """The pipeline that `runtime` (see `engine.runtime.resolve`) describes, loaded by its backend."""
        return cls(*_load(runtime))

    @classmethod
    def from_pretrained(
        cls,
        prior: str | Path,
        decoder: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        variant: str | None = None,
        backend: str | Backend = "torch",
        options: BackendOptions | None = None,
        quantize: str | Path | QuantRecipe | None = None,
    ) -> WuerstchenPipeline:
        """Load the two published diffusers folders: `prior` as warp-ai/wuerstchen-prior, `decoder` as
        warp-ai/wuerstchen, each a path or a Hub repo id (the local cache first, a download only when online;
        `HF_HUB_OFFLINE=1` keeps to the cache). One argument alone is diffusers' combined repo, as
        `WuerstchenCombinedPipeline.from_pretrained("warp-ai/wuerstchen")` takes it: the decoder, whose model
        card names the prior. `device` defaults to the GPU when there is one, `dtype` to fp16 on a GPU and
        fp32 on the CPU; `variant="fp16"` reads the `*.fp16.*` weight files. `backend` is "torch" (eager),
        "torch-fast" (Triton kernels, CUDA-graph steps) or "torch-compile" (also torch.compile); `options`
        is `engine.backends.FastOptions` for the last two.

        `quantize` holds the prior's and the decoder's block Linears in 8 bits: "fp8" (weights and activations;
        sm_89+ GPUs) or "int8" (weights only) with the layers a sensitivity scan picks on load (the most
        sensitive stay in 16 bits until one step is within 2 % (fp8) or 1 % (int8) of the unquantized step),
        or a `QuantRecipe` or recipe file that names them; the recipe used is `pipe.quantization`. Quantized
        models run in fp16 (GPU) or bf16 (CPU) unless `dtype` says which."""
        source = ModelSource.from_folders(prior, decoder, variant) if decoder is not None else \
            ModelSource.from_folders(None, prior, variant)
        return cls.load(resolve(source, backend, device, dtype, options, quantize))

    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        backend: str | Backend = "torch",
        options: BackendOptions | None = None,
        quantize: str | Path | QuantRecipe | None = None,
    ) -> WuerstchenPipeline:
        """A pipeline of a named architecture (`wuerstchen-v2` or `tiny`) with seeded random weights and a
        byte-level tokenizer: its images show no picture (the tiny demo's shapes and colours follow the prompt
        and the seed), its cost is the real model's. The other arguments as for `from_pretrained`."""
        return cls.load(resolve(ModelSource.from_preset(name, seed), backend, device, dtype, options, quantize))

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        backend: str | Backend = "onnxruntime",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        options: BackendOptions | None = None,
        check_hashes: bool = True,
    ) -> WuerstchenPipeline:
        """Run an exported bundle (`wuerstchen export`) on ONNX Runtime or TensorRT.

        The manifest is checked first: format version, every file present and, unless `check_hashes` is
        off, unaltered; requests outside the bundle's size range are refused. ONNX Runtime runs the bundle in
        its own precision, on the GPU when its build has CUDA and there is one (`OnnxRuntimeOptions` chooses
        the providers); TensorRT runs engines of `dtype` (default bf16) from the engine cache
        (`TensorRTOptions`), which `wuerstchen build` fills."""
        source = ModelSource.from_bundle(bundle, check_hashes)
        return cls.load(resolve(source, backend, device, dtype, options))

    def with_stages(self, stages: Stages) -> WuerstchenPipeline:
        """The same pipeline over other stage objects (wrapped ones, to time or trace them), with a scheduler
        of its own. Stages it keeps from this one, the captured steps among them, are shared: run one of the
        two pipelines at a time."""
        pipe = WuerstchenPipeline(self.config, stages, self.runtime)
        pipe._progress_bar_config = dict(self._progress_bar_config)
        pipe._scheduler_options = self._scheduler_options
        return pipe

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bars over the prior and decoder steps, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def set_scheduler_options(self, options: SchedulerOptions) -> None:
        """How the scheduler queues, admits and batches requests (see `engine.scheduler.SchedulerOptions`);
        takes effect before the first request, or after `close()`."""
        if not isinstance(options, SchedulerOptions):
            raise WuerstchenError(f"options={options!r}: expected an engine.scheduler.SchedulerOptions")
        self._scheduler_options = options

    @property
    def scheduler(self) -> Scheduler:
        """The step scheduler every call and `submit` goes through, made on first use."""
        with self._scheduler_lock:
            return self._current_scheduler()

    def _current_scheduler(self) -> Scheduler:
        """The scheduler, made now if there is none; under `_scheduler_lock`."""
        if self._scheduler is None:
            policy = self._scheduler_options.policy
            runner = Runner(self.config, self.stages, self.device,
                            frozenset(policy.buckets) | {policy.deterministic_batch})
            self._scheduler = Scheduler(runner, self._finish, self._scheduler_options)
        return self._scheduler

    def stats(self) -> dict:
        """The scheduler's queue length, requests in flight, batch occupancy, padding waste, measured tick
        times and counters (see `engine.scheduler.Scheduler.stats`)."""
        return self.scheduler.stats()

    def close(self) -> None:
        """Finish what is in flight and let the scheduler's thread end; a later call starts a new one."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    def to(self, *args, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None) -> WuerstchenPipeline:
        """Every stage on another device or in another precision, as diffusers' `DiffusionPipeline.to`:
        `to(device)`, `to(dtype)`, `to(device, dtype)` or by keyword; returns the pipeline itself.

        The stages are loaded again from the pipeline's source on the new device in the new precision, with
        the same backend and options (`engine.runtime.resolve`, then the backend), and replace the old ones
        once loaded: for that moment both are in memory, and stages swapped in with `with_stages` are not
        kept. A bundle's backends (onnxruntime, tensorrt) cannot move: load the bundle again. `to` refuses
        while requests are queued or in flight (wait for their results first); a call made while it runs
        fails with a one-line error rather than run on stages its noise was not drawn for."""
        device, dtype = _to_arguments(args, device, dtype)
        if self.backend.runs_bundles:
            raise WuerstchenError(f"to(): the {self.backend.value} backend runs a bundle's graphs as they were loaded "
                                  "and cannot move or cast them: load the bundle again with "
                                  "WuerstchenPipeline.from_bundle(..., device=..., dtype=...)")
        current = self.runtime
        runtime = resolve(current.source, current.backend, current.device if device is None else device,
                          current.precision if dtype is None else dtype, current.options,
                          self.stages.quantization)  # a scanned recipe is applied again, not scanned again
        with self._scheduler_lock:
            if (runtime.device, runtime.precision) == (current.device, current.precision):
                return self
            if self._scheduler is not None:
                stats = self._scheduler.stats()
                if stats["queued"] or stats["in_flight"]:
                    raise WuerstchenError(f"to() while {stats['queued'] + stats['in_flight']} requests are queued or "
                                          "in flight: wait for their results first")
            self.config, self.stages, runtime = _load(runtime)
            # An idle scheduler's worker ends by itself, and with it the last hold on the old stages.
            self.runtime, self._scheduler = runtime, None
        return self

    # --- requests --------------------------------------------------------------------------------------

    def _state(self, kind: str, rows: int, output_type: str, generator: Generator, *, prior: PriorRequest | None,
               decoder: DecoderRequest | None, image_embeddings: torch.Tensor | None, deadline, priority: str,
               deterministic: bool, return_dict: bool = True, prior_callback: StepCallback | None = None,
               decoder_callback: StepCallback | None = None) -> RequestState:
        """A checked request as the scheduler takes it, its noise drawn now from its generator in a pipeline
        call's order: the prior's initial latents (unless given) and steps, then the decoder's. Drawn on the
        generator's device, kept on the CPU until the scheduler admits it."""
        runtime = self.runtime  # read once: `to` may replace it meanwhile, and `_submit` then refuses the request
        timeout = _deadline(deadline)
        if priority not in PRIORITIES:
            raise WuerstchenError(f"priority={priority!r}: expected one of {', '.join(PRIORITIES)}")
        if not isinstance(deterministic, bool):
            raise WuerstchenError(f"deterministic={deterministic!r}: expected True or False")
        if not isinstance(return_dict, bool):
            raise WuerstchenError(f"return_dict={return_dict!r}: expected True or False")
        generator = _check_generator(generator, rows, runtime.device)
        config, dtype, cpu = self.config, runtime.dtype, torch.device("cpu")

        def denoising(request, schedule_config, latent_shape, callback) -> Denoising:
            schedule = make_schedule(request.grid, schedule_config, dtype, runtime.device,
                                     self.stages.fp32_timesteps)
            if request.latents is None:
                initial, noise = draw_denoising_noise(latent_shape, schedule.num_steps, generator, cpu, dtype)
            else:  # as in diffusers, given latents take the first draw's place: the steps' draws move up
                initial = request.latents
                noise = tuple(draw_noise(latent_shape, generator, cpu, dtype) for _ in range(schedule.num_steps))
            return Denoising(schedule, initial, noise, request.guidance, tuple(latent_shape[2:]), callback)

        shapes = (prior or decoder).shapes
        check_fits(request_bytes(config, shapes, dtype, prior and (len(prior.grid) - 1, prior.guidance > 1),
                                 decoder and (len(decoder.grid) - 1, decoder.guidance > 1)), runtime.device)
        # The prior's draws first, then the decoder's: the order of a call.
        prior_denoising = denoising(prior, config.prior_schedule, prior.shapes.prior_latent, prior_callback) \
            if prior else None
        decoder_denoising = denoising(decoder, config.decoder_schedule, decoder.shapes.decoder_latent,
                                      decoder_callback) if decoder else None
        request_id = Scheduler.new_id()
        return RequestState(
            request_id=request_id, kind=kind, rows=rows, future=RequestFuture(request_id), output_type=output_type,
            prior=prior, decoder=decoder, prior_denoising=prior_denoising, decoder_denoising=decoder_denoising,
            image_embeddings=image_embeddings, timeout=timeout, interactive=priority == "interactive",
            deterministic=deterministic, return_dict=return_dict, runtime=runtime,
        )

    def _submit(self, state: RequestState) -> RequestFuture:
        """Queue a request, unless `to` replaced the stages since its noise was drawn."""
        with self._scheduler_lock:
            if state.runtime is not self.runtime:
                raise WuerstchenError(f"the pipeline moved to {self.device}, {self.precision.value} (to()) while this "
                                      "request was being made: make it again")
            return self._current_scheduler().submit(state)

    def _finish(self, state: RequestState):
        """A finished request's result, as the matching pipeline call returns it (on the scheduler's thread)."""
        if state.kind == "prior":
            embeddings = state.output
            if state.output_type == "np":
                embeddings = embeddings.cpu().float().numpy()
            output = WuerstchenPriorOutput(image_embeddings=embeddings, timings=state.timings,
                                           compute_s=state.compute_seconds)
            return output if state.return_dict else (output.image_embeddings,)
        images = state.output
        if state.output_type != "latent" and not bool(torch.isfinite(images).all()):
            raise WuerstchenError("the VQGAN produced non-finite values for this request: check the weights")
        output = WuerstchenOutput(images=_to_output(images, state.output_type), timings=state.timings,
                                  compute_s=state.compute_seconds)
        # diffusers' decoder pipeline, and so its combined one, returns the images themselves, in no tuple.
        return output if state.return_dict else output.images

    def _run(self, state: RequestState, steps: int) -> object:
        """Submit one request and wait for it, with a progress bar over its denoising steps."""
        with self._progress(steps) as progress:
            state.future.add_progress_callback(lambda stage, step, total: progress.update())
            return self._submit(state).result()

    def _progress(self, total: int):
        return tqdm(total=total, **{"desc": "denoising", **self._progress_bar_config})

    def _images_state(self, *, prompt, negative_prompt, height, width, prior_num_inference_steps, prior_timesteps,
                      prior_guidance_scale, num_inference_steps, decoder_timesteps, decoder_guidance_scale,
                      num_images_per_prompt, generator, output_type, return_dict, latents, prompt_embeds,
                      negative_prompt_embeds, prior_callback_on_step_end, prior_callback_on_step_end_tensor_inputs,
                      callback_on_step_end, callback_on_step_end_tensor_inputs, **scheduling) -> RequestState:
        """The combined call's request, every argument checked before anything is drawn. As in diffusers, text
        states given replace the prior's prompts, and the decoder reads `prompt` (or "" without one) and
        `negative_prompt` all the same."""
        prior = check_prior_request(
            self.config, prompt=prompt if prompt_embeds is None else None,
            negative_prompt=negative_prompt if negative_prompt_embeds is None else None, height=height, width=width,
            num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale, num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, latents=latents,
            dtype=self.dtype, steps_name="prior_num_inference_steps", timesteps_name="prior_timesteps",
            guidance_name="prior_guidance_scale")
        decoder = check_decoder_request(
            self.config, prior.shapes.prior_latent,
            prompt=prompt if prompt_embeds is None else _decoder_prompts(prompt, len(prior.prompts)),
            negative_prompt=negative_prompt, num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, num_images_per_prompt=1, timesteps_name="decoder_timesteps",
            guidance_name="decoder_guidance_scale", rows_per_prompt=prior.images_per_prompt)
        _check_output_type(output_type, OUTPUT_TYPES)
        prior_callback = _step_callback("prior_callback_on_step_end", prior_callback_on_step_end,
                                        prior_callback_on_step_end_tensor_inputs, PRIOR_CALLBACK_TENSORS, self,
                                        prior.grid)
        decoder_callback = _step_callback("callback_on_step_end", callback_on_step_end,
                                          callback_on_step_end_tensor_inputs, DECODER_CALLBACK_TENSORS, self,
                                          decoder.grid)
        return self._state("images", prior.shapes.batch, output_type, generator, prior=prior, decoder=decoder,
                           image_embeddings=None, return_dict=return_dict, prior_callback=prior_callback,
                           decoder_callback=decoder_callback, **scheduling)

    def submit(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int = 60,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        *,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prior_callback_on_step_end: StepCallbackFunction | None = None,
        prior_callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_step_end: StepCallbackFunction | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        seed: int | None = None,
        deadline: float | None = None,
        priority: str = "interactive",
        deterministic: bool = False,
    ) -> RequestFuture:
        """Queue a request with the call's arguments and return at once: a `concurrent.futures.Future`
        (`engine.requests.RequestFuture`) of what the call returns. Thread-safe; requests from any number of
        threads are batched step by step. `seed` stands for `generator=torch.Generator().manual_seed(seed)`;
        the image is the one that call makes, whatever else is in flight (within the rounding of batched
        GEMMs; with `deterministic=True` every step of the request runs at one pinned batch size, so the same
        request gives the same bits under any load). `deadline`: seconds from now; a request that cannot meet
        it is refused at once (`engine.scheduler.DeadlineInfeasible`), one that misses it fails
        (`DeadlineExceeded`). `priority`: "interactive", or "batch" to use only what interactive requests
        leave. A full queue refuses at once with `engine.scheduler.QueueFull`. A step callback that raises
        fails this request's future with its exception, and no other request."""
        state = self._images_state(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            prior_num_inference_steps=prior_num_inference_steps, prior_timesteps=prior_timesteps,
            prior_guidance_scale=prior_guidance_scale, num_inference_steps=num_inference_steps,
            decoder_timesteps=decoder_timesteps, decoder_guidance_scale=decoder_guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=_seeded(seed, generator), output_type=output_type,
            return_dict=return_dict, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prior_callback_on_step_end=prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            deadline=deadline, priority=priority, deterministic=deterministic)
        return self._submit(state)

    async def asubmit(self, *args, **kwargs):
        """`submit`, awaited: the call's output. Cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def cancel(self, request_id: int) -> bool:
        """Cancel a submitted request by its `RequestFuture.request_id`; False when it has finished."""
        return self.scheduler.cancel(request_id)

    def run_prior(
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 60,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        *,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end: StepCallbackFunction | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> WuerstchenPriorOutput | tuple[torch.Tensor | np.ndarray]:
        """Stage C alone, as diffusers' `WuerstchenPriorPipeline` with its arguments and defaults: the image
        embeddings of `num_images_per_prompt` images per prompt, to decode now or later with `run_decoder`.
        `prompt_embeds` replaces `prompt` (one or the other), `negative_prompt_embeds` `negative_prompt`;
        `latents`, the callback and `return_dict` (then a tuple of the embeddings) as in `__call__`."""
        request = check_prior_request(
            self.config, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, timesteps=timesteps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, latents=latents, dtype=self.dtype)
        _check_output_type(output_type, EMBEDDING_OUTPUT_TYPES)
        callback = _step_callback("callback_on_step_end", callback_on_step_end, callback_on_step_end_tensor_inputs,
                                  PRIOR_CALLBACK_TENSORS, self, request.grid)
        state = self._state("prior", request.shapes.batch, output_type, generator, prior=request, decoder=None,
                            image_embeddings=None, deadline=None, priority="interactive", deterministic=False,
                            return_dict=return_dict, prior_callback=callback)
        return self._run(state, len(request.grid) - 1)

    def run_decoder(
        self,
        image_embeddings: torch.Tensor | list[torch.Tensor] | np.ndarray,
        prompt: str | list[str] = "",
        num_inference_steps: int = 12,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        *,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepCallbackFunction | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> WuerstchenOutput | list[Image.Image] | np.ndarray | torch.Tensor:
        """Stages B and A, as diffusers' `WuerstchenDecoderPipeline` with its arguments and defaults: images
        from image embeddings (B, 16, h, w) (`run_prior`'s, or read from a file), the size following from
        theirs. `prompt` is one string for every embedding or a list of one per embedding; each embedding
        makes `num_images_per_prompt` images, one after the other. `latents`: the decoder's initial latents
        (B · num_images_per_prompt, 4, H, W); they, the callback and `return_dict` as in `__call__`."""
        embeddings = check_image_embeddings(self.config, image_embeddings, torch.device("cpu"), self.dtype)
        request = check_decoder_request(
            self.config, embeddings.shape, prompt=prompt, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, timesteps=timesteps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, latents=latents, dtype=self.dtype)
        _check_output_type(output_type, OUTPUT_TYPES)
        callback = _step_callback("callback_on_step_end", callback_on_step_end, callback_on_step_end_tensor_inputs,
                                  DECODER_CALLBACK_TENSORS, self, request.grid)
        state = self._state("decoder", request.shapes.batch, output_type, generator, prior=None, decoder=request,
                            image_embeddings=embeddings, deadline=None, priority="interactive", deterministic=False,
                            return_dict=return_dict, decoder_callback=callback)
        return self._run(state, len(request.grid) - 1)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int = 60,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        *,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prior_callback_on_step_end: StepCallbackFunction | None = None,
        prior_callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_step_end: StepCallbackFunction | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> WuerstchenOutput | list[Image.Image] | np.ndarray | torch.Tensor:
        """Make `num_images_per_prompt` images per prompt: the prior, then the decoder on its embeddings with
        each image's own prompt, every argument checked before either starts. One request through the
        scheduler (`submit`), as every call is: a pipeline may be called from any number of threads, and each
        call returns the images it would return alone. Defaults are diffusers' (512², 60 prior steps); the
        published recipe is `engine.recipe.Recipe().call()`.

        The rest as in diffusers' `WuerstchenCombinedPipeline`:
        - `latents`: the prior's initial latents (N, 16, h, w), in place of its first draw from `generator`;
          the draws that follow move up one, as in diffusers, so the same generator gives diffusers' image.
        - `prompt_embeds`, `negative_prompt_embeds`: the prior text encoder's last hidden states (prompts, 77,
          width) in place of `prompt` and `negative_prompt` for the prior, whose text encoder then does not run;
          the decoder still reads `prompt` (or "" without one) and `negative_prompt`.
        - `prior_callback_on_step_end`, `callback_on_step_end`: called after each prior or decoder step as
          `f(pipeline, step, timestep, callback_kwargs)`, `callback_kwargs` holding the tensors their
          `..._tensor_inputs` name (`engine.requests.PRIOR_CALLBACK_TENSORS`, `DECODER_CALLBACK_TENSORS`), this
          request's rows alone. The dict returned may replace `latents` and `text_encoder_hidden_states` (return
          them: the conditioning is computed from the text states once, so changing them in place does nothing). A
          callback runs on the scheduler's thread once the device has finished the step: a host sync per step
          of this request, and the other requests in flight wait while it runs (it may `submit` to the
          pipeline; waiting there for a result of the same pipeline raises rather than hang). On torch-fast
          it sees a copy of the CUDA graph's output: the tensors it sees are those of an eager step. As in
          diffusers, a callback stops the run by raising: the call raises that exception, and no other
          request is touched.
        - `return_dict=False`: what diffusers returns then, the images themselves (a list, an array or a
          tensor), not a tuple."""
        state = self._images_state(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            prior_num_inference_steps=prior_num_inference_steps, prior_timesteps=prior_timesteps,
            prior_guidance_scale=prior_guidance_scale, num_inference_steps=num_inference_steps,
            decoder_timesteps=decoder_timesteps, decoder_guidance_scale=decoder_guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, output_type=output_type,
            return_dict=return_dict, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prior_callback_on_step_end=prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            deadline=None, priority="interactive", deterministic=False)
        return self._run(state, state.prior_denoising.steps + state.decoder_denoising.steps)


PRIORITIES = ("interactive", "batch")


def _seeded(seed, generator) -> Generator:
    """The generator of a submitted request: `generator`, or a CPU generator seeded with `seed`."""
    if seed is None:
        return generator
    if generator is not None:
        raise WuerstchenError("seed and generator both given: pass one")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise WuerstchenError(f"seed={seed!r}: expected an integer from 0 to 2**64 - 1")
    return torch.Generator().manual_seed(seed)


def _to_arguments(args: tuple, device, dtype) -> tuple:
    """`to`'s device and dtype, read as diffusers' `DiffusionPipeline.to` reads them: one positional argument is
    the dtype when it is a `torch.dtype` and the device otherwise; two are the device, then the dtype."""
    if len(args) > 2:
        raise WuerstchenError(f"to() got {len(args)} positional arguments: expected a device, a dtype, or both")
    if len(args) == 2 and isinstance(args[0], torch.dtype):
        raise WuerstchenError(f"to({args[0]}, {args[1]!r}): expected the device first, then the dtype")
    if len(args) == 1 and isinstance(args[0], torch.dtype):
        args = (None, args[0])
    given_device, given_dtype = (*args, None, None)[:2]
    for name, given, keyword in (("device", given_device, device), ("dtype", given_dtype, dtype)):
        if given is not None and keyword is not None:
            raise WuerstchenError(f"to() got {name} twice, {given!r} and {name}={keyword!r}: pass one")
    return given_device if device is None else device, given_dtype if dtype is None else dtype


def _deadline(deadline) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < math.inf:
        raise WuerstchenError(f"deadline={deadline!r}: expected a positive number of seconds, or None")
    return float(deadline)
