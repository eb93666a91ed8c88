"""The blocks that Würstchen's prior and decoder are built from.

Math follows diffusers' `modeling_wuerstchen_common.py` exactly; the layout differs in two ways that
make the denoising step cheaper without changing its result:
- an attention block projects q, k and v of the image tokens with one stacked Linear, and the keys and
  values of the text tokens are projected once per image (`AttnBlock.text_kv`), not once per step;
- norms, the GRN's sum of squares and the noise heads are computed in fp32, so that fp16 activations
  cannot overflow them, and exported graphs inherit those fp32 islands.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import WuerstchenError


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: torch.Tensor,
                   text_v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for q (B, heads, Nq, d) over the image's keys and values k, v (B, heads, Nq, d)
    followed by the text's (B, heads, 77, d), by PyTorch's flash or memory-efficient kernels."""
    return F.scaled_dot_product_attention(q, torch.cat([k, text_k], dim=2), torch.cat([v, text_v], dim=2))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: torch.Tensor,
                       text_v: torch.Tensor) -> torch.Tensor:
    """The same attention as two matmuls around a softmax taken in fp32: the form exported to ONNX,
    where a one-op attention's internal fp32 would otherwise be lost in fp16 graphs."""
    k, v = torch.cat([k, text_k], dim=2), torch.cat([v, text_v], dim=2)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1).to(v.dtype) @ v


ATTENTION = {"sdpa": sdpa_attention, "explicit": explicit_attention}


def attention_function(name: str) -> Callable[..., torch.Tensor]:
    """An attention implementation by name: "sdpa" (PyTorch's `scaled_dot_product_attention`, the default) or
    "explicit" (the exported form). This project's Triton kernel is the fast path's, which wraps these
    blocks in modules of its own."""
    if name not in ATTENTION:
        raise WuerstchenError(f"attention={name!r} is unknown: expected one of {', '.join(ATTENTION)}")
    return ATTENTION[name]


def use_attention(module: nn.Module, name: str) -> None:
    """Make every attention block inside `module` use the implementation `name` (see `attention_function`)."""
    function = attention_function(name)
    for block in module.modules():
        if isinstance(block, AttnBlock):
            block.attention = function


@contextlib.contextmanager
def attention_implementation(module: nn.Module, name: str):
    """`use_attention` for the duration of the block, then the implementations as they were."""
    previous = {block: block.attention for block in module.modules() if isinstance(block, AttnBlock)}
    use_attention(module, name)
    try:
        yield
    finally:
        for block, function in previous.items():
            block.attention = function


def timestep_embedding(r: torch.Tensor, width: int, dtype: torch.dtype | None = None,
                       max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B, width), in `dtype` (default r's), of the noise level r ∈ [0, 1], as diffusers'
    `gen_r_embedding`.

    r·10000 is taken in r's dtype, sin and cos in fp32. Given r in the model's dtype, fp16 and bf16 round it
    as the reference does (bf16 to multiples of 32–64); given r in fp32 (`Stages.fp32_timesteps`), nothing
    rounds it.
    """
    r = r * max_positions
    half = width // 2
    frequencies = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    angles = r[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if width % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding.to(dtype or r.dtype)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters, computed in fp32 and returned in x's
    dtype: explicitly, so that exported graphs keep it in fp32 too."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of an NCHW tensor, without affine parameters, in fp32."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x.permute(0, 2, 3, 1), self.eps).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on NHWC input: scale each channel by its spatial L2 norm over the channels' mean."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A sum of squares over a 128×128 map overflows fp16, so the norm is taken in fp32.
        norm = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=torch.float32)
        scale = (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.gamma * (x * scale) + self.beta + x


class TimestepBlock(nn.Module):
    """FiLM by the timestep embedding: x·(1 + a) + b with per-channel a, b."""

    def __init__(self, channels: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, 2 * channels)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, *self.modulation(r_embed))

    @staticmethod
    def modulate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x · (1 + a) + b for x (B, C, H, W) and a, b (B, C)."""
        return x * (1 + a[:, :, None, None]) + b[:, :, None, None]

    def modulation(self, r_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FiLM's scale a and shift b, (batch, channels) each."""
        a, b = self.mapper(r_embed).chunk(2, dim=1)
        return a, b


class ResBlock(nn.Module):
    """Depthwise conv → LayerNorm2d → [concat skip] → Linear ×4 → GELU → GRN → Linear, plus the input.

    With `c_skip = 0` this is the prior's ResBlock; with a skip it is the decoder's ResBlockStageB.
    """

    def __init__(self, channels: int, c_skip: int = 0, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = LayerNorm2d()
        self.fc1 = nn.Linear(channels + c_skip, 4 * channels)
        self.grn = GlobalResponseNorm(4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.fc2(self.grn(F.gelu(self.fc1(h.permute(0, 2, 3, 1)))))
        return x + h.permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """Self- and cross-attention in one: the queries are the image tokens, the keys and values are the
    image tokens followed by the text tokens. Added to the input, no other residual."""

    def __init__(self, channels: int, c_cond: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.attention = sdpa_attention  # (q, k, v, text k, text v) → softmax(q kᵀ / √d) v; see `use_attention`
        self.norm = LayerNorm2d()
        self.kv_mapper = nn.Linear(c_cond, channels)  # applied after a SiLU
        self.qkv = nn.Linear(channels, 3 * channels)  # diffusers' to_q, to_k, to_v, stacked
        self.out = nn.Linear(channels, channels)  # diffusers' to_out.0

    def text_kv(self, cond: torch.Tensor) -> torch.Tensor:
        """Keys and values (B, T, 2C) of the text tokens: the same for every denoising step."""
        channels = self.out.in_features
        kv = self.kv_mapper(F.silu(cond))
        return F.linear(kv, self.qkv.weight[channels:], self.qkv.bias[channels:])

    def forward(self, x: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        o = self.out(self._attend(self.norm(x).flatten(2).transpose(1, 2), text_kv))
        return x + o.transpose(1, 2).reshape(batch, channels, height, width)

    def _attend(self, tokens: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        """Attention over normed image tokens (B, N, C) and the text's keys and values, before the output
        projection."""
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        text_k, text_v = text_kv.chunk(2, dim=-1)
        heads = [t.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for t in (q, k, v, text_k, text_v)]
        return self.attention(*heads).transpose(1, 2).flatten(2)
