"""What a request needs in memory, estimated before any work, against what the device has free.

The estimate counts what grows with the request: its noise (every step's draw, taken up front in a call's
order), the largest stage's activations (a denoising step's widest level with its MLP's 4× hidden width and
the tensors around it, the attention's fp32 scores, or the VQGAN's finest level), and the decoded images. It
is meant to refuse the requests that cannot fit (4096² images by the dozen, a million images in one call)
with a one-line error instead of minutes of work and an out-of-memory crash; it is not a tight bound.
"""

from __future__ import annotations

import math
import os

import torch

from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.shapes import TEXT_TOKENS, Shapes

LIVE_TENSORS = 4  # an activation, its MLP's hidden output, the residual and a normalised copy, alive at once


def request_bytes(config: WuerstchenConfig, shapes: Shapes, dtype: torch.dtype, prior: tuple[int, bool] | None,
                  decoder: tuple[int, bool] | None) -> int:
    """Bytes a request of `shapes` needs at its peak: its noise, its largest stage's activations and its images.
    `prior` and `decoder` are (steps, guided) of the stages it runs, None for a stage it does not run (the
    VQGAN decodes with the decoder)."""
    size = torch.empty((), dtype=dtype).element_size()
    rows = shapes.batch
    noise, peaks = 0, [0]
    if prior is not None:
        steps, guided = prior
        noise += (steps + 1) * math.prod(shapes.prior_latent) * size
        tokens = shapes.prior_latent[2] * shapes.prior_latent[3]
        width, heads = config.prior.c, config.prior.nhead
        peaks.append(rows * (2 if guided else 1) * (tokens * 4 * width * size * LIVE_TENSORS
                                                    + heads * tokens * (tokens + TEXT_TOKENS) * 4))
    images = 0
    if decoder is not None:
        steps, guided = decoder
        noise += (steps + 1) * math.prod(shapes.decoder_latent) * size
        peaks.append(rows * (2 if guided else 1) * LIVE_TENSORS * size * max(
            h * w * 4 * c for (h, w), c in zip(shapes.decoder_levels, config.decoder.c_hidden, strict=True)))
        vqgan = config.vqgan
        height, width = shapes.decoder_latent[2:]
        finest = vqgan.up_down_scale_factor ** (vqgan.levels - 1)
        peaks.append(rows * LIVE_TENSORS * size * height * width * finest**2 * 4 * (vqgan.embed_dim // finest))
        images = math.prod(shapes.image) * 4
    return noise + max(peaks) + images


def available_bytes(device: torch.device) -> int:
    """Memory free for a request: on a GPU what the driver reports free plus what torch holds unused; on the
    CPU what the kernel says is available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _host_available()


def _host_available() -> int:
    """The kernel's estimate of memory available without swapping (free pages plus the page cache it can drop);
    free pages alone where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(needed: int, device: torch.device) -> None:
    """A one-line refusal, with the estimate and the limit, of a request that cannot fit."""
    free = available_bytes(device)
    if needed > free:
        raise WuerstchenError(
            f"the request needs about {needed / 2**30:.1f} GiB on {device} (its noise, its largest stage's "
            f"activations and its images), more than the {free / 2**30:.1f} GiB free: make fewer or smaller images "
            "per call (on the command line, a smaller --batch-size)")
