"""What the HTTP API accepts and answers, apart from HTTP itself: request bodies and their checks, the
engine's exceptions as HTTP errors in OpenAI's shape, and the PNGs.

A body is checked in three layers, each naming the field it refuses: its JSON types (pydantic, strict, no
unknown fields), this server's limits (prompt length, images per request, steps, the size's syntax), then the
pipeline's own checks at submit (the size grid, seeds, guidance, deadlines), whose one-line messages are
passed on with the pipeline's field names translated to the API's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import WuerstchenError
from engine.png import encode_png, png_settings
from engine.recipe import Recipe
from engine.scheduler import (
    DeadlineExceeded,
    DeadlineInfeasible,
    QueueFull,
    Refused,
    RequestFailed,
    SchedulerUnhealthy,
)
from engine.shapes import check_image_size


@dataclass(frozen=True)
class ServerOptions:
    """`recipe`: what a request gets for the fields it leaves out (the published recipe); the limits on one
    request (`max_images` for n, `max_prompt_chars` for the prompt and the negative prompt, `max_steps` for
    either stage, `max_body_bytes`); `api_key`: required as a bearer token on every endpoint but /health and
    /ready, when set; `warmup`: the recipe of the requests run before /ready answers 200 (on torch-fast, a
    request at each batch size, capturing the steps' CUDA graphs), None for none; `stall_seconds`: how long the
    scheduler may run no step while it holds requests before /health fails; `echo_request_id`: answer with an
    X-Request-Id header (off behind Ray's proxy, which adds its own)."""

    recipe: Recipe = field(default_factory=Recipe)
    max_images: int = 4
    max_prompt_chars: int = 2000
    max_steps: int = 200
    max_body_bytes: int = 2**20
    api_key: str | None = None
    warmup: Recipe | None = field(default_factory=lambda: Recipe(prior_steps=2, decoder_steps=2))
    stall_seconds: float = 60.0
    echo_request_id: bool = True


# --- errors ---------------------------------------------------------------------------------------------

# OpenAI's error types: invalid_request_error for the other 4xx, server_error for the other 5xx.
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 504: "timeout_error"}


class ApiError(Exception):
    """An answer other than success: its HTTP status, a one-line message, the body field it is about (OpenAI's
    `param`), a short machine-readable `code`, and for refusals worth retrying, when (seconds)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self, request_id: str | None) -> dict:
        """OpenAI's error body, with the request id beside the error's fields."""
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code,
                          "request_id": request_id}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


# The pipeline's names of request fields, as this API names them.
RENAMED = {"num_images_per_prompt": "n", "prior_num_inference_steps": "prior_steps", "prior_timesteps": "prior_steps",
           "num_inference_steps": "decoder_steps", "prior_guidance_scale": "prior_guidance",
           "decoder_guidance_scale": "decoder_guidance"}
PARAMS = RENAMED | {"height": "size", "width": "size"}


def invalid(error: WuerstchenError, status: int = 400) -> ApiError:
    """The pipeline's one-line refusal of a field, in the API's field names."""
    message = str(error)
    name = re.match(r"[a-z_]*", message)[0]
    if name in RENAMED:
        message = RENAMED[name] + message[len(name):]
    param = PARAMS.get(name, name if name in Body.model_fields else None)
    return ApiError(status, message, param=param, code="invalid_value")


def refusal(error: Refused) -> ApiError:
    """A request the scheduler would not take: a full queue is 429 (retry after the hint), an infeasible deadline
    504, a stopped scheduler 503 (retry on another process); the memory budget is this request's own size."""
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), code=error.reason, retry_after=error.retry_after)
    if isinstance(error, DeadlineInfeasible):
        return ApiError(504, str(error), param="deadline", code=error.reason)
    if isinstance(error, SchedulerUnhealthy):
        return ApiError(503, str(error), code=error.reason, retry_after=error.retry_after)
    return ApiError(400, str(error), code=error.reason)


def failure(error: BaseException) -> ApiError:
    """A request that was taken and then failed: a missed deadline is 504, a device failure 503 (retriable), a
    non-finite result 422 (the weights or the guidance), anything else 500."""
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, str(error), param="deadline", code=error.reason)
    if isinstance(error, RequestFailed):
        return ApiError(503, str(error), code=error.reason)
    if isinstance(error, WuerstchenError):
        return invalid(error, status=422)
    return ApiError(500, f"the request failed: {type(error).__name__}: {error}", code="internal_error")


# --- bodies ---------------------------------------------------------------------------------------------

class Body(BaseModel):
    """What both generation endpoints take: the prompt and this engine's fields (every one optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    size: str | None = None  # "WIDTHxHEIGHT", OpenAI's order
    seed: int | None = None
    prior_steps: int | None = None  # None: the published schedule
    decoder_steps: int | None = None
    prior_guidance: float | None = None
    decoder_guidance: float | None = None
    deadline: float | None = None  # seconds from arrival
    priority: str = "interactive"
    deterministic: bool = False


class ImagesRequest(Body):
    """OpenAI's `POST /v1/images/generations` body. `model`, `user`, `quality` and `style` are accepted so that
    existing clients work unchanged, and ignored: one model is served, one way."""

    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    model: str | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None


class GenerateRequest(Body):
    """`POST /generate`: one PNG, or with `stream` its progress as server-sent events, then the image."""

    stream: bool = False


def parse_body(model: type[Body], body: bytes) -> Body:
    """A JSON object as `model`, or a 400 naming the field that is missing, unknown or of the wrong type."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body is a JSON {type(data).__name__}: expected an object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            message = f"{param} is missing: it is required"
        elif first["type"] == "extra_forbidden":
            message = f"{param} is not a field of this endpoint: expected {', '.join(model.model_fields)}"
        else:
            shown = repr(first["input"])
            message = f"{param}={shown if len(shown) <= 60 else shown[:57] + '...'}: {first['msg'].lower()}"
        raise ApiError(400, message, param=param.split(".")[0], code=first["type"]) from None


@dataclass(frozen=True)
class Job:
    """A checked request: the arguments of `WuerstchenPipeline.submit`, and what its PNGs record. Image i has
    the seed `seed + i`, as `wuerstchen generate --seed` numbers them: each can be made again alone."""

    prompt: str
    negative_prompt: str | None
    recipe: Recipe
    images: int
    seed: int
    deadline: float | None
    priority: str
    deterministic: bool

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % 2**64 for i in range(self.images)]

    @property
    def steps(self) -> int:
        return self.recipe.prior_evaluations + self.recipe.decoder_steps

    def submit_args(self) -> dict:
        generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, **self.recipe.call(self.images),
                    output_type="pil", generator=generators, deadline=self.deadline, priority=self.priority,
                    deterministic=self.deterministic)


def check(body: Body, images: int, seed: int, options: ServerOptions, config) -> Job:
    """This server's limits on a body, and its recipe: the published one where a field is left out."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > options.max_prompt_chars:
            raise ApiError(400, f"{name} has {len(text)} characters: expected at most {options.max_prompt_chars} "
                                "(the text encoder reads its first 77 tokens)", param=name,
                           code="string_above_max_length")
    if not 0 <= seed < 2**64:
        raise ApiError(400, f"seed={seed}: expected an integer from 0 to 2**64 - 1", param="seed", code="invalid_value")
    if not 1 <= images <= options.max_images:
        raise ApiError(400, f"n={images}: expected an integer from 1 to {options.max_images}", param="n",
                       code="invalid_value")
    for name in ("prior_steps", "decoder_steps"):
        steps = getattr(body, name)
        if steps is not None and not 1 <= steps <= options.max_steps:
            raise ApiError(400, f"{name}={steps}: expected an integer from 1 to {options.max_steps}", param=name,
                           code="invalid_value")
    defaults = options.recipe
    width, height = _size(body.size, defaults, config)

    def given(name: str, default):
        value = getattr(body, name)
        return default if value is None else value

    recipe = Recipe(height, width, given("prior_steps", defaults.prior_steps),
                    given("prior_guidance", defaults.prior_guidance), given("decoder_steps", defaults.decoder_steps),
                    given("decoder_guidance", defaults.decoder_guidance))
    return Job(body.prompt, body.negative_prompt, recipe, images, seed, body.deadline, body.priority,
               body.deterministic)


def _size(size: str | None, defaults: Recipe, config) -> tuple[int, int]:
    """(width, height) of OpenAI's "WIDTHxHEIGHT" (or "auto": the recipe's), on the model's size grid."""
    if size is None or size == "auto":
        return defaults.width, defaults.height
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise ApiError(400, f"size={size!r}: expected WIDTHxHEIGHT in pixels, such as 1024x1024, or auto",
                       param="size", code="invalid_value")
    width, height = int(match[1]), int(match[2])
    try:
        check_image_size(config, height, width)
    except WuerstchenError as error:
        raise ApiError(400, f"size={size!r}: {error}", param="size", code="invalid_value") from None
    return width, height


# --- images ---------------------------------------------------------------------------------------------

def png_files(images: list, job: Job, runtime) -> list[bytes]:
    """Each image as a PNG file with the prompt, negative prompt, its seed, its index and the settings in its
    text chunks, in `wuerstchen generate`'s order (nothing time-dependent: the same request, the same bytes)."""
    settings = png_settings(job.recipe, runtime)
    return [encode_png(image, {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": str(seed),
                               "image_index": str(index), "settings": settings})
            for index, (image, seed) in enumerate(zip(images, job.seeds, strict=True))]


def server_timing(output) -> str:
    """A `Server-Timing` header: the request's share of the device's time (`compute`) and each stage's span, ms."""
    spans = {"compute": output.compute_s, **output.timings}
    return ", ".join(f"{name};dur={1e3 * seconds:.1f}" for name, seconds in spans.items())

