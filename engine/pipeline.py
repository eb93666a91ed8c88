"""The text-to-image pipeline: prompts → CLIP states → prior loop → ×42 − 1 → decoder loop → VQGAN → images.

`WuerstchenPipeline` is a drop-in for diffusers' `WuerstchenCombinedPipeline` on its common arguments, and
its two stages for diffusers' `WuerstchenPriorPipeline` (`run_prior`: prompts → image embeddings) and
`WuerstchenDecoderPipeline` (`run_decoder`: image embeddings and prompts → images). With the same weights and
the same `torch.Generator` each makes the same output as its diffusers counterpart (fp32, CPU). It drives
the `Stages` that a backend loaded, and never knows which backend that was.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from engine import backends
from engine.backends import Backend, BackendOptions
from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.models.decoder import resize_image_embeddings
from engine.precision import Precision
from engine.runtime import ModelSource, Runtime, resolve
from engine.schedule import Generator, draw_denoising_noise, make_schedule, timestep_grid
from engine.shapes import Shapes, embedding_shapes, image_shapes
from engine.stages import Stages
from engine.text import TextEncoder

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EMBEDDING_OUTPUT_TYPES = ("pt", "np")


@dataclass
class WuerstchenOutput:
    """`images` as diffusers returns them for the output type: a list of PIL images ("pil"), an array
    (N, H, W, 3) in [0, 1] ("np"), a tensor (N, 3, H, W) in [0, 1] ("pt"), or the decoder's latents
    ("latent"). `timings` holds the wall-clock seconds of each stage that ran: text, prior, decoder, vqgan."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    timings: dict[str, float]


@dataclass
class WuerstchenPriorOutput:
    """`image_embeddings` as diffusers' `WuerstchenPriorPipeline` returns them: the prior's latents times 42
    minus 1, (N, 16, h, w), a tensor ("pt") or an array ("np"). `timings`: seconds of the text and prior stages."""

    image_embeddings: torch.Tensor | np.ndarray
    timings: dict[str, float]


@dataclass(frozen=True)
class PriorRequest:
    """A checked prior call: every prompt's text is encoded once and used by its `images_per_prompt` rows."""

    prompts: list[str]
    negative_prompts: list[str]
    images_per_prompt: int
    shapes: Shapes
    grid: torch.Tensor
    guidance: float


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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WuerstchenError(f"{name}={value!r}: expected a positive integer")
    return value


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WuerstchenError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _grid(name: str, steps_name: str, steps, timesteps: Sequence[float] | None) -> torch.Tensor:
    _positive_int(steps_name, steps)
    if timesteps is None:
        return timestep_grid(steps)
    expected = "expected a decreasing list of two or more noise levels in [0, 1], e.g. [1.0, 0.5, 0.0]"
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError):
        raise WuerstchenError(f"{name}={timesteps!r}: {expected}") from None
    decreasing = all(a > b for a, b in zip(values, values[1:], strict=False))
    if len(values) < 2 or not decreasing or any(not 0 <= t <= 1 for t in values):
        raise WuerstchenError(f"{name}={timesteps!r}: {expected}")
    return timestep_grid(len(values) - 1, values)


def _prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise WuerstchenError(f"prompt={prompt!r}: expected a string or a non-empty list of strings")
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    if isinstance(negative_prompt, str):
        return prompts, [negative_prompt] * len(prompts)
    if isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        if len(negative_prompt) == len(prompts):
            return prompts, list(negative_prompt)
        raise WuerstchenError(
            f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompts: expected one per "
            "prompt, or a single string"
        )
    raise WuerstchenError(f"negative_prompt={negative_prompt!r}: expected a string or a list of strings")


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


def _check_output_type(output_type: str, allowed: tuple[str, ...]) -> str:
    if output_type not in allowed:
        raise WuerstchenError(f"output_type={output_type!r}: expected one of {', '.join(allowed)}")
    return output_type


def check_prior_request(config: WuerstchenConfig, *, prompt, negative_prompt, height, width, num_inference_steps,
                        timesteps, guidance_scale, num_images_per_prompt,
                        steps_name: str = "num_inference_steps", timesteps_name: str = "timesteps",
                        guidance_name: str = "guidance_scale") -> PriorRequest:
    """Validate the prior's part of a call; a bad field is a one-line `WuerstchenError` naming it (by the
    name the caller used: the combined call prefixes the prior's fields with `prior_`)."""
    prompts, negatives = _prompts(prompt, negative_prompt)
    images_per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
    return PriorRequest(
        prompts=prompts, negative_prompts=negatives, images_per_prompt=images_per_prompt,
        shapes=image_shapes(config, height, width, len(prompts) * images_per_prompt),
        grid=_grid(timesteps_name, steps_name, num_inference_steps, timesteps),
        guidance=_finite(guidance_name, guidance_scale),
    )


def check_decoder_request(config: WuerstchenConfig, embeddings: torch.Size | tuple[int, ...], *, prompt,
                          negative_prompt, num_inference_steps, timesteps, guidance_scale,
                          num_images_per_prompt, steps_name: str = "num_inference_steps",
                          timesteps_name: str = "timesteps", guidance_name: str = "guidance_scale",
                          rows_per_prompt: int | None = None) -> DecoderRequest:
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
    return DecoderRequest(
        prompts=prompts, negative_prompts=negatives, rows_per_prompt=rows_per_prompt,
        images_per_embedding=images_per_embedding,
        shapes=embedding_shapes(config, tuple(embeddings[2:]), count * images_per_embedding),
        grid=_grid(timesteps_name, steps_name, num_inference_steps, timesteps),
        guidance=_finite(guidance_name, guidance_scale),
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


class _StageClock:
    """Wall-clock seconds per stage, added up over its calls; on a GPU, synchronises at stage boundaries only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _to_output(images: torch.Tensor, output_type: str):
    if output_type in ("pt", "latent"):
        return images
    array = images.permute(0, 2, 3, 1).cpu().float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


class WuerstchenPipeline:
    """Würstchen v2 text-to-image on any backend: build with `from_pretrained` (diffusers folders),
    `from_preset` (random weights), `from_bundle` (an exported bundle) or `load` (a resolved `Runtime`), then
    call with diffusers' combined-pipeline arguments, or run one stage with `run_prior` and `run_decoder`."""

    def __init__(self, config: WuerstchenConfig, stages: Stages, runtime: Runtime):
        self.config = config
        self.stages = stages
        self.runtime = runtime
        self._progress_bar_config: dict = {}

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

    @classmethod
    def load(cls, runtime: Runtime) -> WuerstchenPipeline:
        """The pipeline that `runtime` (see `engine.runtime.resolve`) describes, loaded by its backend."""
        config, stages = backends.load(runtime)
        return cls(config, stages, runtime)

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
    ) -> WuerstchenPipeline:
        """Load the two published diffusers folders: `prior` as warp-ai/wuerstchen-prior, `decoder` as
        warp-ai/wuerstchen, each a path or a Hub repo id (the local cache first, a download only when online;
        `HF_HUB_OFFLINE=1` keeps to the cache). One argument alone is diffusers' combined repo, as
        `WuerstchenCombinedPipeline.from_pretrained("warp-ai/wuerstchen")` takes it: the decoder, whose model
        card names the prior. `device` defaults to the GPU when there is one, `dtype` to fp16 on a GPU and
        fp32 on the CPU; `variant="fp16"` reads the `*.fp16.*` weight files. `backend` is "torch" (eager),
        "torch-fast" (Triton kernels, CUDA-graph steps) or "torch-compile" (also torch.compile); `options`
        is `engine.backends.FastOptions` for the last two."""
        source = ModelSource.from_folders(prior, decoder, variant) if decoder is not None else \
            ModelSource.from_folders(None, prior, variant)
        return cls.load(resolve(source, backend, device, dtype, options))

    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        backend: str | Backend = "torch",
        options: BackendOptions | None = None,
    ) -> WuerstchenPipeline:
        """A pipeline of a named architecture (`wuerstchen-v2` or `tiny`) with seeded random weights and a
        byte-level tokenizer: its images are noise, its cost is the real model's. The other arguments as
        for `from_pretrained`."""
        return cls.load(resolve(ModelSource.from_preset(name, seed), backend, device, dtype, options))

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
        """The same pipeline over other stage objects (wrapped ones, to time or trace them)."""
        pipe = WuerstchenPipeline(self.config, stages, self.runtime)
        pipe._progress_bar_config = dict(self._progress_bar_config)
        return pipe

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bars over the prior and decoder steps, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def _progress(self, total: int):
        return tqdm(total=total, **{"desc": "denoising", **self._progress_bar_config})

    @staticmethod
    def _text_states(encoder: TextEncoder, prompts: list[str], negative_prompts: list[str], rows_per_prompt: int,
                     guided: bool) -> torch.Tensor:
        """`rows_per_prompt` rows of text states per prompt; with guidance, the negative prompts' rows follow."""
        states = encoder(prompts).repeat_interleave(rows_per_prompt, dim=0)
        if not guided:
            return states
        return torch.cat([states, encoder(negative_prompts).repeat_interleave(rows_per_prompt, dim=0)])

    def _prior(self, request: PriorRequest, generator: Generator, clock: _StageClock, progress) -> torch.Tensor:
        """The image embeddings of a checked prior request: the denoised prior latents × 42 − 1."""
        config, device, dtype, stages = self.config, self.device, self.dtype, self.stages
        guided = request.guidance > 1
        schedule = make_schedule(request.grid, config.prior_schedule, dtype, device)
        with clock("text"):
            text = self._text_states(stages.prior_text, request.prompts, request.negative_prompts,
                                     request.images_per_prompt, guided)
        with clock("prior"):
            initial, noise = draw_denoising_noise(request.shapes.prior_latent, schedule.num_steps, generator, device,
                                                  dtype)
            conditioning = stages.prior.condition(text)
            latents = stages.loop.denoise("prior", stages.prior, conditioning, schedule, initial, noise,
                                          request.guidance, progress)
            return latents * config.latent_mean - config.latent_std

    def _decoder(self, request: DecoderRequest, image_embeddings: torch.Tensor, generator: Generator,
                 clock: _StageClock, progress) -> torch.Tensor:
        """The VQGAN latents of a checked decoder request; the unguided branch sees a zero image embedding."""
        config, device, dtype, stages = self.config, self.device, self.dtype, self.stages
        guided = request.guidance > 1
        schedule = make_schedule(request.grid, config.decoder_schedule, dtype, device)
        with clock("text"):
            text = self._text_states(stages.decoder_text, request.prompts, request.negative_prompts,
                                     request.rows_per_prompt, guided)
        with clock("decoder"):
            initial, noise = draw_denoising_noise(request.shapes.decoder_latent, schedule.num_steps, generator,
                                                  device, dtype)
            embeddings = image_embeddings.repeat_interleave(request.images_per_embedding, dim=0)
            if guided:
                embeddings = torch.cat([embeddings, torch.zeros_like(embeddings)])
            pyramid = resize_image_embeddings(embeddings, config.decoder, request.shapes.decoder_levels)
            conditioning = stages.decoder.condition(pyramid, text)
            return stages.loop.denoise("decoder", stages.decoder, conditioning, schedule, initial, noise,
                                       request.guidance, progress)

    def _decode(self, latents: torch.Tensor, output_type: str, clock: _StageClock):
        if output_type == "latent":
            return latents
        with clock("vqgan"):
            images = self.stages.vqgan(latents)
        return _to_output(images, output_type)

    @torch.no_grad()
    def run_prior(
        self,
        prompt: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 60,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
    ) -> WuerstchenPriorOutput:
        """Stage C alone, as diffusers' `WuerstchenPriorPipeline` with its arguments and defaults: the image
        embeddings of `num_images_per_prompt` images per prompt, to decode now or later with `run_decoder`."""
        request = check_prior_request(
            self.config, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, timesteps=timesteps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt)
        generator = _check_generator(generator, request.shapes.batch, self.device)
        _check_output_type(output_type, EMBEDDING_OUTPUT_TYPES)
        clock = _StageClock(self.device)
        with self._progress(len(request.grid) - 1) as progress:
            embeddings = self._prior(request, generator, clock, progress)
        if output_type == "np":
            embeddings = embeddings.cpu().float().numpy()
        return WuerstchenPriorOutput(image_embeddings=embeddings, timings=clock.seconds)

    @torch.no_grad()
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
    ) -> WuerstchenOutput:
        """Stages B and A, as diffusers' `WuerstchenDecoderPipeline` with its arguments and defaults: images
        from image embeddings (B, 16, h, w) (`run_prior`'s, or read from a file), the size following from
        theirs. `prompt` is one string for every embedding or a list of one per embedding; each embedding
        makes `num_images_per_prompt` images, one after the other."""
        embeddings = check_image_embeddings(self.config, image_embeddings, self.device, self.dtype)
        request = check_decoder_request(
            self.config, embeddings.shape, prompt=prompt, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, timesteps=timesteps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt)
        generator = _check_generator(generator, request.shapes.batch, self.device)
        _check_output_type(output_type, OUTPUT_TYPES)
        clock = _StageClock(self.device)
        with self._progress(len(request.grid) - 1) as progress:
            latents = self._decoder(request, embeddings, generator, clock, progress)
        return WuerstchenOutput(images=self._decode(latents, output_type, clock), timings=clock.seconds)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
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
    ) -> WuerstchenOutput:
        """Make `num_images_per_prompt` images per prompt: `run_prior`, then `run_decoder` on its embeddings
        with each image's own prompt, every argument checked before either starts. Defaults are diffusers'
        (512², 60 prior steps); the published recipe is `engine.recipe.Recipe().call()`."""
        prior = check_prior_request(
            self.config, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale, num_images_per_prompt=num_images_per_prompt,
            steps_name="prior_num_inference_steps", timesteps_name="prior_timesteps",
            guidance_name="prior_guidance_scale")
        decoder = check_decoder_request(
            self.config, prior.shapes.prior_latent, prompt=prompt, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, num_images_per_prompt=1, timesteps_name="decoder_timesteps",
            guidance_name="decoder_guidance_scale", rows_per_prompt=prior.images_per_prompt)
        generator = _check_generator(generator, prior.shapes.batch, self.device)
        _check_output_type(output_type, OUTPUT_TYPES)
        clock = _StageClock(self.device)
        with self._progress(len(prior.grid) + len(decoder.grid) - 2) as progress:
            image_embeddings = self._prior(prior, generator, clock, progress)
            latents = self._decoder(decoder, image_embeddings, generator, clock, progress)
        return WuerstchenOutput(images=self._decode(latents, output_type, clock), timings=clock.seconds)

