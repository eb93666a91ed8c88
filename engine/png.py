"""PNG files that carry how they were made: the command line and the server write their images with this
module, and Python callers can write the pipeline's images the same way (`write_png`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from engine.errors import WuerstchenError
from engine.files import write_atomically


def png_settings(recipe, runtime) -> dict:
    """The settings an image's PNG records, for an `engine.recipe.Recipe` run by an `engine.runtime.Runtime`:
    the same request gives the same file from `wuerstchen generate` and from `wuerstchen serve`."""
    return {"prior_num_inference_steps": recipe.prior_evaluations,
            "prior_timesteps": "published" if recipe.published_prior else "linspace",
            "prior_guidance_scale": recipe.prior_guidance, "height": recipe.height, "width": recipe.width,
            "num_inference_steps": recipe.decoder_steps, "decoder_guidance_scale": recipe.decoder_guidance,
            "model": runtime.describe(), "dtype": runtime.precision.value, "device": runtime.device.type}


def encode_png(image, text: dict[str, object]) -> bytes:
    """`image` (a PIL image) as a PNG file with one text chunk per item of `text`, in order: a string as it is,
    anything else as JSON (`{"seed": 7}` is stored as "7"). Nothing time-dependent is added, so the same image
    and text give the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 79 or not key.isprintable() or not key.isascii():
            raise WuerstchenError(f"text key {key!r}: expected 1 to 79 printable ASCII characters (a PNG keyword)")
        try:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
        except (TypeError, ValueError):
            raise WuerstchenError(f"text[{key!r}]={value!r}: expected a string or a JSON value") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(path: str | Path, image, text: dict[str, object]) -> None:
    """`encode_png(image, text)` written to `path` whole or not at all (`engine.files.write_atomically`)."""
    write_atomically(path, encode_png(image, text))
