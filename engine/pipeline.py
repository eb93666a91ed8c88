"""The text-to-image pipeline: prompts → CLIP states → prior loop → ×42 − 1 → decoder loop → VQGAN → images.

`WuerstchenPipeline` is a drop-in for diffusers' `WuerstchenCombinedPipeline` on its common arguments:
with the same weights and the same `torch.Generator` it makes the same images (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from engine.backends import Backend
from engine.bundle import open_bundle
from engine.config import (
    DecoderConfig,
    PriorConfig,
    ScheduleConfig,
    VQGANConfig,
    WuerstchenConfig,
    preset,
)
from engine.denoise import Model, StepGraphs, denoise
from engine.device import resolve_device, resolve_dtype
from engine.errors import WuerstchenError
from engine.models import Decoder, Prior, VQGANDecoder
from engine.models.blocks import use_attention, use_channels_last, use_fused_kernels
from engine.models.decoder import resize_image_embeddings
from engine.schedule import DenoisingSchedule, Generator, draw_denoising_noise, make_schedule, timestep_grid
from engine.shapes import Shapes, image_shapes
from engine.text import TextEncoder, load_text_encoder, random_text_encoder, text_encoder_config
from engine.weights import (
    DECODER_LAYOUT,
    PRIOR_LAYOUT,
    check_layout,
    load_stage,
    random_stage,
    read_model_index,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class WuerstchenOutput:
    """`images` as diffusers returns them for the output type: a list of PIL images ("pil"), an array
    (N, H, W, 3) in [0, 1] ("np"), a tensor (N, 3, H, W) in [0, 1] ("pt"), or the decoder's latents
    ("latent"). `timings` holds the wall-clock seconds of each stage: text, prior, decoder, vqgan."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    timings: dict[str, float]


@dataclass(frozen=True)
class Request:
    """A checked call: everything the pipeline needs, validated before any work starts."""

    prompts: list[str]
    negative_prompts: list[str]
    images_per_prompt: int
    shapes: Shapes
    prior_grid: torch.Tensor
    decoder_grid: torch.Tensor
    prior_guidance: float
    decoder_guidance: float
    generator: Generator
    output_type: str


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


def check_request(
    config: WuerstchenConfig, device: torch.device, *, prompt, negative_prompt, height, width,
    prior_num_inference_steps, prior_timesteps, prior_guidance_scale, num_inference_steps, decoder_timesteps,
    decoder_guidance_scale, num_images_per_prompt, generator, output_type,
) -> Request:
    """Validate a pipeline call; a bad field is a one-line `WuerstchenError` naming it, before any work."""
    prompts, negatives = _prompts(prompt, negative_prompt)
    images_per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
    if output_type not in OUTPUT_TYPES:
        raise WuerstchenError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    batch = len(prompts) * images_per_prompt
    return Request(
        prompts=prompts,
        negative_prompts=negatives,
        images_per_prompt=images_per_prompt,
        shapes=image_shapes(config, height, width, batch),
        prior_grid=_grid("prior_timesteps", "prior_num_inference_steps", prior_num_inference_steps, prior_timesteps),
        decoder_grid=_grid("decoder_timesteps", "num_inference_steps", num_inference_steps, decoder_timesteps),
        prior_guidance=_finite("prior_guidance_scale", prior_guidance_scale),
        decoder_guidance=_finite("decoder_guidance_scale", decoder_guidance_scale),
        generator=_check_generator(generator, batch, device),
        output_type=output_type,
    )


class _StageClock:
    """Wall-clock seconds per stage; on a GPU, synchronises at stage boundaries only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] = time.perf_counter() - start


def _to_output(images: torch.Tensor, output_type: str):
    if output_type in ("pt", "latent"):
        return images
    array = images.permute(0, 2, 3, 1).cpu().float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


def read_config(prior: str | Path, decoder: str | Path) -> WuerstchenConfig:
    """The configs in two diffusers folders (warp-ai/wuerstchen-prior and warp-ai/wuerstchen layouts),
    checked against each other; reads no weights."""
    prior_root = check_layout(prior, "prior", PRIOR_LAYOUT, "warp-ai/wuerstchen-prior")
    decoder_root = check_layout(decoder, "decoder", DECODER_LAYOUT, "warp-ai/wuerstchen")
    prior_index, decoder_index = read_model_index(prior_root), read_model_index(decoder_root)
    defaults = WuerstchenConfig.__dataclass_fields__
    return WuerstchenConfig(
        prior=PriorConfig.from_json(prior_root / "prior" / "config.json"),
        decoder=DecoderConfig.from_json(decoder_root / "decoder" / "config.json"),
        vqgan=VQGANConfig.from_json(decoder_root / "vqgan" / "config.json"),
        prior_text=text_encoder_config(prior_root / "text_encoder"),
        decoder_text=text_encoder_config(decoder_root / "text_encoder"),
        prior_schedule=ScheduleConfig.from_json(prior_root / "scheduler" / "scheduler_config.json"),
        decoder_schedule=ScheduleConfig.from_json(decoder_root / "scheduler" / "scheduler_config.json"),
        # The pipelines' own constants, as diffusers' WuerstchenPriorPipeline and DecoderPipeline store them.
        **{key: index.get(key, defaults[key].default) for index, keys in (
            (prior_index, ("latent_mean", "latent_std", "resolution_multiple")),
            (decoder_index, ("latent_dim_scale",)),
        ) for key in keys},
    )


class WuerstchenPipeline:
    """Würstchen v2 text-to-image: build with `from_pretrained` (diffusers folders) or `from_preset`
    (random weights), then call with diffusers' combined-pipeline arguments."""

    def __init__(
        self,
        *,
        config: WuerstchenConfig,
        prior_text: TextEncoder,
        prior: Prior,
        decoder_text: TextEncoder,
        decoder: Decoder,
        vqgan: VQGANDecoder,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.config = config
        self.prior_text, self.prior = prior_text, prior
        self.decoder_text, self.decoder = decoder_text, decoder
        self.vqgan = vqgan
        self.device, self.dtype = device, dtype
        self.backend = Backend.TORCH
        self.step_graphs: StepGraphs | None = None  # captured denoising steps, on the fast backends
        self._progress_bar_config: dict = {}

    def _use_backend(self, backend: str | Backend) -> WuerstchenPipeline:
        """Switch the PyTorch stages to a faster backend: `torch-fast` runs attention and the norms in this
        project's Triton kernels on channels-last activations, and every denoising step as one CUDA graph;
        `torch-compile` also compiles the prior and the decoder with torch.compile."""
        backend = Backend.parse(backend)
        if backend.runs_bundles:
            raise WuerstchenError(f"backend={backend.value!r} runs a bundle: use WuerstchenPipeline.from_bundle")
        if backend is Backend.TORCH:
            return self
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise WuerstchenError(f"backend={backend.value!r} runs Triton kernels on a CUDA GPU (on a CPU only "
                                  "in Triton's interpreter, TRITON_INTERPRET=1, for tests): use backend='torch'")
        for model in (self.prior, self.decoder, self.vqgan):
            use_attention(model, "triton")
            use_fused_kernels(model)
            use_channels_last(model)
        self.step_graphs = StepGraphs()
        if backend is Backend.TORCH_COMPILE:
            self.prior = torch.compile(self.prior, fullgraph=True, dynamic=False)
            self.decoder = torch.compile(self.decoder, fullgraph=True, dynamic=False)
        self.backend = backend
        return self

    @classmethod
    def from_pretrained(
        cls,
        prior: str | Path,
        decoder: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        variant: str | None = None,
        backend: str = "torch",
    ) -> WuerstchenPipeline:
        """Load the two published diffusers folders: `prior` as warp-ai/wuerstchen-prior, `decoder` as
        warp-ai/wuerstchen. `device` defaults to the GPU when there is one, `dtype` to fp16 on a GPU and
        fp32 on the CPU; `variant="fp16"` reads the `*.fp16.*` weight files. `backend` is "torch" (eager),
        "torch-fast" (Triton attention, CUDA-graph steps) or "torch-compile" (also torch.compile)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = read_config(prior, decoder)
        prior_root, decoder_root = Path(prior), Path(decoder)
        return cls(
            config=config,
            prior_text=load_text_encoder(prior_root, device, dtype, variant),
            prior=load_stage("prior", Prior, config.prior, prior_root / "prior", device, dtype, variant),
            decoder_text=load_text_encoder(decoder_root, device, dtype, variant),
            decoder=load_stage("decoder", Decoder, config.decoder, decoder_root / "decoder", device, dtype, variant),
            vqgan=load_stage("vqgan", VQGANDecoder, config.vqgan, decoder_root / "vqgan", device, dtype, variant),
            device=device,
            dtype=dtype,
        )._use_backend(backend)

    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        backend: str = "torch",
    ) -> WuerstchenPipeline:
        """A pipeline of a named architecture (`wuerstchen-v2` or `tiny`) with seeded random weights and a
        byte-level tokenizer: its images are noise, its cost is the real model's. `backend` as for
        `from_pretrained`."""
        config = preset(name)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        # The noise heads are shrunk: the prior divides by |1 − b| and the decoder by sigmoid(b), and
        # random heads bring those near zero, where the latents blow up within a few steps.
        return cls(
            config=config,
            prior_text=random_text_encoder(config.prior_text, seed, device, dtype),
            prior=random_stage(Prior, config.prior, seed + 1, device, dtype, shrink=("out.1.",)),
            decoder_text=random_text_encoder(config.decoder_text, seed + 2, device, dtype),
            decoder=random_stage(Decoder, config.decoder, seed + 3, device, dtype, shrink=("clf.1.",)),
            vqgan=random_stage(VQGANDecoder, config.vqgan, seed + 4, device, dtype),
            device=device,
            dtype=dtype,
        )._use_backend(backend)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        check_hashes: bool = True,
        precision: str = "bf16",
        engines: str | Path | None = None,
        cuda_graphs: bool = False,
    ) -> WuerstchenPipeline:
        """Run an exported bundle (`wuerstchen export`) on ONNX Runtime or TensorRT.

        The manifest is checked first: format version, every file present and, unless `check_hashes` is
        off, unaltered; requests outside the bundle's size range are refused. ONNX Runtime: `providers` are
        its execution providers (default: CUDA when present, else the CPU). TensorRT: engines of
        `precision` ("bf16", "fp16" or "fp32") come from the cache folder `engines` (default BUNDLE/engines),
        built there first when missing; `cuda_graphs` replays each engine call as a CUDA graph."""
        backend = Backend.parse(backend)
        if not backend.runs_bundles:
            raise WuerstchenError(f"backend={backend.value!r} cannot run a bundle: expected onnxruntime or tensorrt "
                                  "(the torch backends load diffusers folders with from_pretrained)")
        opened = open_bundle(bundle, check_hashes=check_hashes)
        if backend is Backend.ONNXRUNTIME:
            from engine.backends.onnxruntime import load_stages

            stages, device = load_stages(opened, providers)
            dtype = opened.dtype
        else:
            from engine.backends.tensorrt import load_stages

            stages, device, dtype = load_stages(opened, precision, engines, cuda_graphs)
        pipe = cls(config=opened.config, **stages, device=device, dtype=dtype)
        pipe.backend = backend
        return pipe

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bars over the prior and decoder steps, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def _denoise(self, stage: str, model: Model, conditioning: tuple[torch.Tensor, ...],
                 schedule: DenoisingSchedule, initial: torch.Tensor, noise, guidance_scale: float, progress):
        if self.step_graphs is not None:
            return self.step_graphs.denoise(stage, model, conditioning, schedule, initial, noise, guidance_scale,
                                            progress)
        return denoise(model, conditioning, schedule, initial, noise, guidance_scale, progress)

    def _text_states(self, encoder: TextEncoder, request: Request, guided: bool) -> torch.Tensor:
        """One row of text states per image; with guidance, the negative prompts' rows follow."""
        states = encoder(request.prompts).repeat_interleave(request.images_per_prompt, dim=0)
        if not guided:
            return states
        negative = encoder(request.negative_prompts).repeat_interleave(request.images_per_prompt, dim=0)
        return torch.cat([states, negative])

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
        """Make `num_images_per_prompt` images per prompt. Defaults are diffusers' (512², 60 prior steps);
        the published recipe is 1024², `prior_timesteps=DEFAULT_PRIOR_TIMESTEPS`, 12 decoder steps."""
        request = check_request(
            self.config, self.device, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            prior_num_inference_steps=prior_num_inference_steps, prior_timesteps=prior_timesteps,
            prior_guidance_scale=prior_guidance_scale, num_inference_steps=num_inference_steps,
            decoder_timesteps=decoder_timesteps, decoder_guidance_scale=decoder_guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, output_type=output_type,
        )
        device, dtype, shapes, config = self.device, self.dtype, request.shapes, self.config
        prior_guided, decoder_guided = request.prior_guidance > 1, request.decoder_guidance > 1
        prior_schedule = make_schedule(request.prior_grid, config.prior_schedule, dtype, device)
        decoder_schedule = make_schedule(request.decoder_grid, config.decoder_schedule, dtype, device)
        clock = _StageClock(device)
        total_steps = prior_schedule.num_steps + decoder_schedule.num_steps
        with tqdm(total=total_steps, **{"desc": "denoising", **self._progress_bar_config}) as progress:
            # 1. Text states of both stages, computed once per request.
            with clock("text"):
                prior_text = self._text_states(self.prior_text, request, prior_guided)
                decoder_text = self._text_states(self.decoder_text, request, decoder_guided)

            # 2. Prior: denoise the image embedding, then undo its training-time scaling (×42 − 1).
            with clock("prior"):
                initial, noise = draw_denoising_noise(
                    shapes.prior_latent, prior_schedule.num_steps, request.generator, device, dtype)
                text_kv = self.prior.condition(prior_text)
                latents = self._denoise("prior", lambda x, r, kv: self.prior(x, r, kv), text_kv, prior_schedule,
                                        initial, noise, request.prior_guidance, progress)
                image_embeddings = latents * config.latent_mean - config.latent_std

            # 3. Decoder: denoise the VQGAN latent; the unguided branch sees a zero image embedding.
            with clock("decoder"):
                initial, noise = draw_denoising_noise(
                    shapes.decoder_latent, decoder_schedule.num_steps, request.generator, device, dtype)
                if decoder_guided:
                    image_embeddings = torch.cat([image_embeddings, torch.zeros_like(image_embeddings)])
                pyramid = resize_image_embeddings(image_embeddings, config.decoder, shapes.decoder_levels)
                text_kv, effnet = self.decoder.condition(pyramid, decoder_text)
                split = len(text_kv)
                latents = self._denoise(
                    "decoder", lambda x, r, c: self.decoder(x, r, c[:split], c[split:]), (*text_kv, *effnet),
                    decoder_schedule, initial, noise, request.decoder_guidance, progress)

        if request.output_type == "latent":
            return WuerstchenOutput(images=latents, timings=clock.seconds)
        # 4. VQGAN: latents to pixels in [0, 1].
        with clock("vqgan"):
            images = self.vqgan(latents)
        return WuerstchenOutput(images=_to_output(images, request.output_type), timings=clock.seconds)
