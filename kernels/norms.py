"""Fused norms for Würstchen's blocks, on channels-last activations seen as (batch, pixels, channels).

- `layer_norm_modulate`: LayerNorm over the channels of every pixel, then an optional modulation
  `· (1 + scale) + shift` (the VQGAN's learned gammas, or a timestep FiLM), in one pass with fp32
  statistics. Unfused, PyTorch reads and writes the activations five times (cast up, normalise, cast
  down, multiply, add).
- `global_response_norm`: ConvNeXt-V2's GRN in two passes. The first applies GELU to the MLP's hidden
  activations (the op before every GRN here), writes them, and sums their squares over the pixels in
  fp32, per batch and channel; the second scales each channel by its norm over the channels' mean,
  then `γ · (y · n) + β + y`, in place.

Both are PyTorch custom ops (`wuerstchen::…`), opaque to torch.compile and torch.export, each beside its
PyTorch reference (`…_ref`) with the same signature.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 8192  # one row of channels per program for the LayerNorm


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected (batch, pixels, channels), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype}: expected one of {DTYPES}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: tensors on {x.device}: the kernel runs on a CUDA GPU, or on the CPU in Triton's "
                         "interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _layer_norm_modulate(
    X, Out, Scale, Shift, rows, pixels, channels, eps,
    stride_scale_batch, stride_scale_channel, stride_shift_batch, stride_shift_channel,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MODULATE: tl.constexpr,
):
    # One program: BLOCK_R pixels (rows, `pixels` per image) with all their channels.
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (cols[None, :] < channels)
    pointers = row[:, None] * channels + cols[None, :]
    x = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / channels
    centred = tl.where(mask, x - mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / channels
    y = centred * tl.math.rsqrt(variance + eps)[:, None]
    if MODULATE:
        batch = row // pixels
        scale = tl.load(Scale + batch[:, None] * stride_scale_batch + cols[None, :] * stride_scale_channel,
                        mask=mask, other=0.0)
        shift = tl.load(Shift + batch[:, None] * stride_shift_batch + cols[None, :] * stride_shift_channel,
                        mask=mask, other=0.0)
        y = y * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(Out + pointers, y.to(Out.dtype.element_ty), mask=mask)


def _per_batch_channel(t: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """A scale or shift as a (batch, channels) view: from a scalar, (channels,) or (batch, channels)."""
    return t.reshape(t.shape[0] if t.dim() == 2 else 1, -1).expand(batch, channels)


@torch.library.custom_op("wuerstchen::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                        eps: float) -> torch.Tensor:
    """LayerNorm(x) over the last dim, without affine parameters, then `· (1 + scale) + shift` when both are
    given; x (batch, pixels, channels) in fp16, bf16 or fp32, scale and shift scalars, (channels,) or
    (batch, channels). Statistics and modulation in fp32; returns x's shape and dtype, contiguous."""
    _check(x, "layer_norm_modulate")
    batch, pixels, channels = x.shape
    if channels > MAX_CHANNELS:
        raise ValueError(f"layer_norm_modulate: {channels} channels: expected at most {MAX_CHANNELS}")
    if (scale is None) != (shift is None):
        raise ValueError("layer_norm_modulate: give both scale and shift, or neither")
    x = x.contiguous()
    out = torch.empty_like(x)
    modulate = scale is not None
    if modulate:
        scale, shift = (_per_batch_channel(t, batch, channels) for t in (scale, shift))
    else:
        scale = shift = x  # unused
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 4096 // block_c)  # tiles of about 4,096 values: several pixels per program when narrow
    _layer_norm_modulate[(triton.cdiv(batch * pixels, block_r),)](
        x, out, scale, shift, batch * pixels, pixels, channels, eps,
        scale.stride(0), scale.stride(1), shift.stride(0), shift.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, MODULATE=modulate, num_warps=8 if block_c > 1024 else 4,
    )
    return out


@layer_norm_modulate.register_fake
def _(x, scale, shift, eps):
    _check(x, "layer_norm_modulate")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layer_norm_modulate_ref(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                            eps: float) -> torch.Tensor:
    """The same in PyTorch: in fp32, or fp64 for fp64 inputs."""
    compute = _compute_dtype(x)
    y = torch.nn.functional.layer_norm(x.to(compute), x.shape[-1:], eps=eps)
    if scale is not None:
        batch, _, channels = x.shape
        scale, shift = (_per_batch_channel(t, batch, channels).to(compute)[:, None] for t in (scale, shift))
        y = y * (1 + scale) + shift
    return y.to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@triton.jit
def _grn_sum_squares(
    X, Y, Partial, pixels, channels, pixels_per_split, splits,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GELU: tl.constexpr,
):
    # One program: BLOCK_C channels of one image over one slice of its pixels.
    batch, channel_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], tl.float32)
    start = split * pixels_per_split
    for offset in range(0, pixels_per_split, BLOCK_N):
        rows = start + offset + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < tl.minimum(start + pixels_per_split, pixels)) & (cols[None, :] < channels)
        pointers = (batch * pixels + rows[:, None]) * channels + cols[None, :]
        x = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # exact (erf) GELU, as nn.GELU(); the norm reads its output rounded to the dtype, as in PyTorch
            x = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(Y.dtype.element_ty)
            tl.store(Y + pointers, x, mask=mask)
            x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    tl.store(Partial + (batch * splits + split) * channels + cols, acc, mask=cols < channels)


@triton.jit
def _grn_apply(Y, Scale, Gamma, Beta, pixels, channels, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    batch, row_block, channel_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < pixels) & (cols[None, :] < channels)
    pointers = (batch * pixels + rows[:, None]) * channels + cols[None, :]
    y = tl.load(Y + pointers, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + batch * channels + cols, mask=cols < channels, other=0.0)
    gamma = tl.load(Gamma + cols, mask=cols < channels, other=0.0).to(tl.float32)
    beta = tl.load(Beta + cols, mask=cols < channels, other=0.0).to(tl.float32)
    out = gamma[None, :] * (y * scale[None, :]) + beta[None, :] + y
    tl.store(Y + pointers, out.to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("wuerstchen::global_response_norm", mutates_args=())
def global_response_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, gelu: bool) -> torch.Tensor:
    """GRN of x (batch, pixels, channels), after an exact GELU when `gelu`: y = gelu(x) or x; per image and
    channel n = ‖y‖₂ over the pixels / (mean of ‖y‖₂ over the channels + 1e-6), summed in fp32; returns
    γ · (y · n) + β + y in x's dtype. γ and β have `channels` elements."""
    _check(x, "global_response_norm")
    batch, pixels, channels = x.shape
    x = x.contiguous()
    y = torch.empty_like(x) if gelu else x.clone()
    block_c, block_n = 64, 64
    # Slices of 1,024 pixels per program keep a GPU busy at every level; their partial sums are then added
    # in a fixed order, so the result does not depend on scheduling.
    per_split = 16 * block_n
    splits = triton.cdiv(pixels, per_split)
    partial = torch.empty(batch, splits, channels, device=x.device, dtype=torch.float32)
    _grn_sum_squares[(batch, triton.cdiv(channels, block_c), splits)](
        x, y, partial, pixels, channels, per_split, splits, BLOCK_N=block_n, BLOCK_C=block_c, GELU=gelu)
    norm = partial.sum(dim=1).sqrt()
    scale = (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)).contiguous()
    _grn_apply[(batch, triton.cdiv(pixels, block_n), triton.cdiv(channels, block_c))](
        y, scale, gamma.reshape(-1), beta.reshape(-1), pixels, channels, BLOCK_N=block_n, BLOCK_C=block_c)
    return y


@global_response_norm.register_fake
def _(x, gamma, beta, gelu):
    _check(x, "global_response_norm")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def global_response_norm_ref(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, gelu: bool) -> torch.Tensor:
    """The same in PyTorch, as `engine.models.blocks.GlobalResponseNorm` computes it after `F.gelu`."""
    y = torch.nn.functional.gelu(x) if gelu else x
    norm = torch.linalg.vector_norm(y, dim=1, keepdim=True, dtype=_compute_dtype(x))
    scale = (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)).to(y.dtype)
    return gamma.reshape(1, 1, -1) * (y * scale) + beta.reshape(1, 1, -1) + y

