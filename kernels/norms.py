"""Fused norms for Würstchen's blocks, on channels-last activations seen as (batch, pixels, channels).

- `layer_norm_modulate`: LayerNorm over the channels of every pixel, then an optional modulation
  `· (1 + scale) + shift` (the VQGAN's learned gammas, or a timestep FiLM), in one pass with fp32
  statistics. Unfused, PyTorch reads and writes the activations five times (cast up, normalise, cast
  down, multiply, add).
- `layer_norm_modulate_pad`: the same for an image, written with the one-pixel replicate padding that the
  VQGAN's depthwise conv reads, so that padding costs no pass of its own.
- `residual_film` and `residual_norm`: the glue between two blocks. A block's residual add, the timestep
  FiLM after it, and (`residual_norm`) the next block's input LayerNorm, with its modulation, in one pass
  that also adds the next block's output bias to the residual it writes, so that the next block's last
  Linear accumulates into that residual in its GEMM epilogue. One kernel runs these four ops.
- `global_response_norm`: ConvNeXt-V2's GRN in two passes. The first applies GELU to the MLP's hidden
  activations (the op before every GRN here), writes them, and sums their squares over the pixels in
  fp32, per batch and channel; one small launch turns the sums into each channel's norm over the
  channels' mean, n; the second pass then writes `γ · (y · n) + β + y`, in place.

All are PyTorch custom ops (`wuerstchen::…`), opaque to torch.compile and torch.export, each beside its
PyTorch reference (`…_ref`) with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import DTYPES, check_device

MAX_CHANNELS = 8192  # one row of channels per program for the LayerNorm
IMAGE = "(batch, height, width, channels)"


def layer_norm_unsupported(channels: int, dtype: torch.dtype) -> str | None:
    """Why the LayerNorm kernels (`layer_norm_modulate`, `layer_norm_modulate_pad`, `residual_film`,
    `residual_norm`) cannot run `channels` channels in `dtype`, in one line, or None when they can: the
    envelope that `engine.models.fused.fuse` checks per layer."""
    if channels > MAX_CHANNELS:
        return f"width {channels} is outside the LayerNorm kernels' envelope (at most {MAX_CHANNELS} channels)"
    if dtype not in DTYPES:
        return f"dtype {dtype} is outside the LayerNorm kernels' envelope {DTYPES}"
    return None


def global_response_norm_unsupported(dtype: torch.dtype) -> str | None:
    """Why `global_response_norm` cannot run in `dtype`, in one line, or None when it can (it takes any number
    of channels and pixels): the envelope that `engine.models.fused.fuse` checks per ResBlock."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is outside the GRN kernel's envelope {DTYPES}"
    return None


def _check(x: torch.Tensor, name: str, layout: str = "(batch, pixels, channels)") -> None:
    if x.dim() != layout.count(",") + 1:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype}: expected one of {DTYPES}")
    check_device(name, x.device)


@triton.jit
def _modulate(y, Scale, Shift, batch, cols, mask, stride_scale_batch, stride_scale_channel, stride_shift_batch,
              stride_shift_channel):
    # y · (1 + scale) + shift in fp32, scale and shift read for each element's image and channel.
    scale = tl.load(Scale + batch * stride_scale_batch + cols[None, :] * stride_scale_channel, mask=mask, other=0.0)
    shift = tl.load(Shift + batch * stride_shift_batch + cols[None, :] * stride_shift_channel, mask=mask, other=0.0)
    return y * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)


@triton.jit
def _residual_norm(
    X, Branch, FilmScale, FilmShift, Bias, Scale, Shift, Residual, Normed,
    rows, pixels, width, channels, eps,
    stride_film_scale_batch, stride_film_scale_channel, stride_film_shift_batch, stride_film_shift_channel,
    stride_scale_batch, stride_scale_channel, stride_shift_batch, stride_shift_channel,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ADD: tl.constexpr, FILM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
    MODULATE: tl.constexpr, PAD: tl.constexpr,
):
    # One program: BLOCK_R pixels (rows, `pixels` per image) with all their channels, in fp32 throughout.
    # y = (x [+ branch]) [· (1 + film_scale) + film_shift]; writes y [+ bias] when RESIDUAL, and
    # LayerNorm(y) [· (1 + scale) + shift] when NORM, into a replicate-padded image when PAD.
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # rows · channels may pass 2³¹
    cols = tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (cols[None, :] < channels)
    pointers = row[:, None] * channels + cols[None, :]
    batch = row[:, None] // pixels
    y = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        y += tl.load(Branch + pointers, mask=mask, other=0.0).to(tl.float32)
    if FILM:
        y = _modulate(y, FilmScale, FilmShift, batch, cols, mask, stride_film_scale_batch, stride_film_scale_channel,
                      stride_film_shift_batch, stride_film_shift_channel)
    if RESIDUAL:
        residual = y
        if BIAS:
            residual += tl.load(Bias + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
        tl.store(Residual + pointers, residual.to(Residual.dtype.element_ty), mask=mask)
    if NORM:
        mean = tl.sum(y, axis=1) / channels
        centred = tl.where(mask, y - mean[:, None], 0.0)
        variance = tl.sum(centred * centred, axis=1) / channels
        normed = centred * tl.math.rsqrt(variance + eps)[:, None]
        if MODULATE:
            normed = _modulate(normed, Scale, Shift, batch, cols, mask, stride_scale_batch, stride_scale_channel,
                               stride_shift_batch, stride_shift_channel)
        normed = normed.to(Normed.dtype.element_ty)
        if PAD:  # into (batch, height + 2, width + 2, channels), every edge pixel also written outwards
            height = pixels // width
            image, i, j = row // pixels, row % pixels // width, row % width
            for di in tl.static_range(3):
                for dj in tl.static_range(3):
                    # Pixel (i, j) fills padded (i + di, j + dj) when it is the image pixel nearest to it.
                    nearest_i = tl.minimum(tl.maximum(i + di - 1, 0), height - 1)
                    nearest_j = tl.minimum(tl.maximum(j + dj - 1, 0), width - 1)
                    target = ((image * (height + 2) + i + di) * (width + 2) + j + dj) * channels
                    keep = (nearest_i == i) & (nearest_j == j)
                    tl.store(Normed + target[:, None] + cols[None, :], normed, mask=mask & keep[:, None])
        else:
            tl.store(Normed + pointers, normed, mask=mask)


def _per_batch_channel(t: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """A scale or shift as a (batch, channels) view: from a scalar, (channels,) or (batch, channels)."""
    return t.reshape(t.shape[0] if t.dim() == 2 else 1, -1).expand(batch, channels)


def _launch_residual_norm(
    name: str, x: torch.Tensor, branch: torch.Tensor | None, film: tuple[torch.Tensor, torch.Tensor] | None,
    bias: torch.Tensor | None, modulation: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
    residual: bool, norm: bool, pad_width: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Runs `_residual_norm` over x (batch, pixels, channels); returns (residual or None, normed or None).
    With `pad_width`, the pixels are an image of that width, and normed is written replicate-padded."""
    batch, pixels, channels = x.shape
    if channels > MAX_CHANNELS:
        raise ValueError(f"{name}: {channels} channels: expected at most {MAX_CHANNELS}")
    if branch is not None and (branch.shape != x.shape or branch.dtype != x.dtype):
        raise ValueError(f"{name}: branch {tuple(branch.shape)} {branch.dtype}: expected x's shape and dtype, "
                         f"{tuple(x.shape)} {x.dtype}")
    add = branch is not None
    x = x.contiguous()
    branch = branch.contiguous() if add else x  # x stands in for pointers the kernel does not read
    film_scale, film_shift = (_per_batch_channel(t, batch, channels) for t in film) if film else (x[0], x[0])
    scale, shift = (_per_batch_channel(t, batch, channels) for t in modulation) if modulation else (x[0], x[0])
    residual_out = torch.empty_like(x) if residual else None
    if not norm:
        normed_out = None
    elif pad_width is None:
        normed_out = torch.empty_like(x)
    else:
        normed_out = x.new_empty(batch, pixels // pad_width + 2, pad_width + 2, channels)
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 4096 // block_c)  # tiles of about 4,096 values: several pixels per program when narrow
    _residual_norm[(triton.cdiv(batch * pixels, block_r),)](
        x, branch, film_scale, film_shift, x if bias is None else bias.reshape(-1).contiguous(), scale, shift,
        x if residual_out is None else residual_out, x if normed_out is None else normed_out,
        batch * pixels, pixels, pad_width or 1, channels, eps,
        film_scale.stride(0), film_scale.stride(1), film_shift.stride(0), film_shift.stride(1),
        scale.stride(0), scale.stride(1), shift.stride(0), shift.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, ADD=add, FILM=film is not None, BIAS=bias is not None,
        RESIDUAL=residual, NORM=norm, MODULATE=modulation is not None, PAD=pad_width is not None,
        num_warps=8 if block_c > 1024 else 4,
    )
    return residual_out, normed_out


def _pair(name: str, scale: torch.Tensor | None,
          shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if (scale is None) != (shift is None):
        raise ValueError(f"{name}: give both scale and shift, or neither")
    return None if scale is None else (scale, shift)


@torch.library.custom_op("wuerstchen::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                        eps: float) -> torch.Tensor:
    """LayerNorm(x) over the last dim, without affine parameters, then `· (1 + scale) + shift` when both are
    given; x (batch, pixels, channels) in fp16, bf16 or fp32, scale and shift scalars, (channels,) or
    (batch, channels). Statistics and modulation in fp32; returns x's shape and dtype, contiguous."""
    _check(x, "layer_norm_modulate")
    modulation = _pair("layer_norm_modulate", scale, shift)
    return _launch_residual_norm("layer_norm_modulate", x, None, None, None, modulation, eps, residual=False,
                                 norm=True)[1]


@layer_norm_modulate.register_fake
def _(x, scale, shift, eps):
    _check(x, "layer_norm_modulate")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layer_norm_modulate_ref(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                            eps: float) -> torch.Tensor:
    """The same in PyTorch: in fp32, or fp64 for fp64 inputs."""
    return _modulated_norm_ref(x.to(_compute_dtype(x)), scale, shift, eps).to(x.dtype)


def _modulated_norm_ref(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                        eps: float) -> torch.Tensor:
    normed = torch.nn.functional.layer_norm(y, y.shape[-1:], eps=eps)
    if scale is None:
        return normed
    batch, _, channels = y.shape
    scale, shift = (_per_batch_channel(t, batch, channels).to(y.dtype)[:, None] for t in (scale, shift))
    return normed * (1 + scale) + shift


@torch.library.custom_op("wuerstchen::layer_norm_modulate_pad", mutates_args=())
def layer_norm_modulate_pad(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """`layer_norm_modulate` of an image x (batch, height, width, channels), written with a one-pixel
    replicate padding around it: (batch, height + 2, width + 2, channels), the input of a 3×3 conv that
    pads by replication, without a separate padding pass over the activations."""
    _check(x, "layer_norm_modulate_pad", IMAGE)
    pixels = x.reshape(x.shape[0], -1, x.shape[-1])
    return _launch_residual_norm("layer_norm_modulate_pad", pixels, None, None, None, (scale, shift), eps,
                                 residual=False, norm=True, pad_width=x.shape[2])[1]


@layer_norm_modulate_pad.register_fake
def _(x, scale, shift, eps):
    _check(x, "layer_norm_modulate_pad", IMAGE)
    batch, height, width, channels = x.shape
    return x.new_empty(batch, height + 2, width + 2, channels)


def layer_norm_modulate_pad_ref(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                eps: float) -> torch.Tensor:
    """The same in PyTorch: `layer_norm_modulate_ref`, then `F.pad(mode="replicate")`."""
    normed = layer_norm_modulate_ref(x.flatten(1, 2), scale, shift, eps).reshape(x.shape)
    return torch.nn.functional.pad(normed.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)


@torch.library.custom_op("wuerstchen::residual_film", mutates_args=())
def residual_film(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(x + branch) · (1 + scale) + shift: a block's residual add followed by the timestep FiLM, one pass in
    fp32. x and branch (batch, pixels, channels) in fp16, bf16 or fp32; scale and shift (batch, channels)."""
    _check(x, "residual_film")
    return _launch_residual_norm("residual_film", x, branch, (scale, shift), None, None, 0.0, residual=True,
                                 norm=False)[0]


@residual_film.register_fake
def _(x, branch, scale, shift):
    _check(x, "residual_film")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def residual_film_ref(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch: in fp32, or fp64 for fp64 inputs."""
    compute = _compute_dtype(x)
    y = x.to(compute) + branch.to(compute)
    return (y * (1 + scale.to(compute)[:, None]) + shift.to(compute)[:, None]).to(x.dtype)


@torch.library.custom_op("wuerstchen::residual_norm", mutates_args=())
def residual_norm(
    x: torch.Tensor, branch: torch.Tensor, film_scale: torch.Tensor | None, film_shift: torch.Tensor | None,
    bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The glue between two blocks in one pass: y = x + branch, then the timestep FiLM
    `y · (1 + film_scale) + film_shift` when given ((batch, channels) each). Returns the next block's
    residual, y + bias (its output Linear's bias, so that the Linear can accumulate into it without one),
    and its input, LayerNorm(y) over the last dim, modulated `· (1 + scale) + shift` when given (scalars,
    (channels,) or (batch, channels)). x and branch (batch, pixels, channels) in fp16, bf16 or fp32;
    everything is computed in fp32 and both outputs are contiguous, in x's dtype."""
    _check(x, "residual_norm")
    film = _pair("residual_norm", film_scale, film_shift)
    modulation = _pair("residual_norm", scale, shift)
    return _launch_residual_norm("residual_norm", x, branch, film, bias, modulation, eps, residual=True, norm=True)


@residual_norm.register_fake
def _(x, branch, film_scale, film_shift, bias, scale, shift, eps):
    _check(x, "residual_norm")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def residual_norm_ref(
    x: torch.Tensor, branch: torch.Tensor, film_scale: torch.Tensor | None, film_shift: torch.Tensor | None,
    bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch: in fp32, or fp64 for fp64 inputs."""
    compute = _compute_dtype(x)
    y = x.to(compute) + branch.to(compute)
    if film_scale is not None:
        y = y * (1 + film_scale.to(compute)[:, None]) + film_shift.to(compute)[:, None]
    residual = y if bias is None else y + bias.to(compute)
    return residual.to(x.dtype), _modulated_norm_ref(y, scale, shift, eps).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@triton.jit
def _grn_sum_squares(
    X, Y, Partial, pixels, channels, pixels_per_split, splits,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GELU: tl.constexpr,
):
    # One program: BLOCK_C channels of one image over one slice of its pixels.
    batch, channel_block, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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
def _grn_scale(Partial, Scale, splits, channels, BLOCK_C: tl.constexpr):
    # One program per image: n / (mean n + 1e-6) for its channels' norms n, one launch where PyTorch needs
    # five small ones. The norms are taken twice from the (small) partial sums, so nothing written is read.
    batch = tl.program_id(0)
    total = 0.0
    for start in range(0, channels, BLOCK_C):
        total += tl.sum(_grn_norm(Partial, batch, start, splits, channels, BLOCK_C))
    mean = total / channels
    for start in range(0, channels, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        norm = _grn_norm(Partial, batch, start, splits, channels, BLOCK_C)
        tl.store(Scale + batch * channels + cols, norm / (mean + 1e-6), mask=cols < channels)


@triton.jit
def _grn_norm(Partial, batch, start, splits, channels, BLOCK_C: tl.constexpr):
    # The L2 norms of BLOCK_C channels from `start`: their partial sums of squares added in split order.
    cols = start + tl.arange(0, BLOCK_C)
    sum_squares = tl.zeros([BLOCK_C], tl.float32)
    for split in range(splits):
        sum_squares += tl.load(Partial + (batch * splits + split) * channels + cols, mask=cols < channels, other=0.0)
    return tl.sqrt(sum_squares)


@triton.jit
def _grn_apply(Y, Scale, Gamma, Beta, pixels, channels, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    batch, row_block, channel_block = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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
    scale = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
    _grn_scale[(batch,)](partial, scale, splits, channels, BLOCK_C=1024)
    _grn_apply[(batch, triton.cdiv(pixels, block_n), triton.cdiv(channels, block_c))](
        y, scale, gamma.reshape(-1).contiguous(), beta.reshape(-1).contiguous(), pixels, channels,
        BLOCK_N=block_n, BLOCK_C=block_c)
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

