"""The fast path as a transform: `fuse(model)` returns a new module that computes what a plain `Prior`,
`Decoder` or `VQGANDecoder` computes, with this project's Triton kernels (kernels/), on the plain model's
weights. The plain model files know nothing of it.

What runs fused (`Fusions` switches the groups that a GPU measurement may want off, `benchmarks.fusions`):
- always: activations in channels-last layout (the channel dim innermost, so that the (batch, pixels,
  channels) view of `pixels` that LayerNorms, Linears and the kernels read is a view, not a copy),
  attention in `kernels.attention`, every LayerNorm2d in `layer_norm_modulate`, and every ResBlock's GELU
  and GRN in `global_response_norm`;
- `chains`: each ResBlock → TimestepBlock [→ AttnBlock] as one chain (`FusedChain`), with every FiLM of a
  step from one GEMM (`StackedFiLM`), and the VQGAN's MixingResidualBlocks fused (`FusedMixingBlock`);
- `gemm_gelu`: in those, the first Linear and the GELU as one Triton GEMM (`kernels.matmul.linear_gelu`).

Each kernel declares its envelope beside it (`kernels.attention.unsupported`,
`kernels.norms.layer_norm_unsupported`, `kernels.norms.global_response_norm_unsupported`). `fuse` checks
every layer against them once, from the widths and dtype of its weights; a layer outside runs its reference
(the plain block's code, or SDPA for attention) instead, and each reason is logged once per call. A
checkpoint that runs on `torch` therefore runs on `torch-fast`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import WuerstchenError
from engine.models.blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding
from engine.models.decoder import Decoder
from engine.models.prior import Prior
from engine.models.quantized import QuantizedLinear
from engine.models.vqgan import MixingResidualBlock, VQGANDecoder

try:
    from kernels.attention import attention
    from kernels.attention import unsupported as attention_unsupported
    from kernels.matmul import linear_gelu
    from kernels.norms import (
        global_response_norm,
        global_response_norm_unsupported,
        layer_norm_modulate,
        layer_norm_modulate_pad,
        layer_norm_unsupported,
        residual_film,
        residual_norm,
    )
except ImportError as error:
    raise WuerstchenError(f"the fused fast path needs Triton ({error.name} is missing): pip install triton") \
        from None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fusions:
    """Which fusions `fuse` applies beyond the kernels themselves (channels-last, attention, the norms).

    chains: the glue between blocks fused (`FusedChain`, `StackedFiLM`) and the VQGAN's blocks fused
        (`FusedMixingBlock`); without it every block runs on its own, and the VQGAN's blocks plain.
    gemm_gelu: the VQGAN's first Linear and GELU as one Triton GEMM inside its fused blocks: off until a GPU
        shows it beating cuBLAS plus a separate GELU (`python -m benchmarks.fusions`). Its first call at each
        shape autotunes, which a CUDA-graph capture would not survive: warm up before capturing.
    """

    chains: bool = True
    gemm_gelu: bool = False

    def __post_init__(self):
        if self.gemm_gelu and not self.chains:
            raise WuerstchenError("Fusions(gemm_gelu=True, chains=False): expected chains=True with gemm_gelu, "
                                  "whose GEMM runs inside the VQGAN's fused blocks")


def fuse(model: nn.Module, fusions: Fusions = Fusions()) -> nn.Module:
    """The fast path of a plain `Prior`, `Decoder` or `VQGANDecoder` whose weights are loaded, on its device
    and in its dtype: a new module with the plain model's call interface (`condition(...)` and
    `(x, r, conditioning)`, or the VQGAN's `(latents)`), the same outputs up to rounding.

    It shares the plain model's weights (holding the plain model as `plain`, so its state_dict repeats them:
    save the plain model); what it derives from them (the stacked FiLM mappers, the VQGAN's folded branch
    scales) are buffers of its own, not saved. It takes ownership of the plain model: the shared
    convolution weights are converted to channels-last layout, which leaves the plain model's results equal
    up to rounding but may change its speed. Layers that a kernel's envelope does not cover run their
    reference code; `fallbacks` on the returned module counts them by reason, and each reason is logged
    once. The choice is made here, for the model's dtype now: convert the plain model before fusing it.
    """
    kinds: dict[type, tuple[type, str]] = {Prior: (FusedPrior, "prior"), Decoder: (FusedDecoder, "decoder"),
                                           VQGANDecoder: (FusedVQGAN, "VQGAN")}
    if type(model) not in kinds:
        raise WuerstchenError(f"fuse: model of type {type(model).__name__}: expected a Prior, Decoder or "
                              "VQGANDecoder")
    weight = next(model.parameters())
    if weight.is_meta:
        raise WuerstchenError("fuse: the model's weights are on the meta device: expected them loaded")
    fused_class, name = kinds[type(model)]
    plan = _Plan(name, weight.dtype, fusions)
    fused = fused_class(model, plan)
    fused.fallbacks = plan.fallbacks()
    plan.log()
    # Last, so that the folded copies turn channels-last with the weights they were taken from.
    return fused.to(memory_format=torch.channels_last)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor as (batch, pixels, channels): a view when it is channels-last, a copy otherwise."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def unpixels(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch, pixels, channels) back to an NCHW tensor of `like`'s size: channels-last, without a copy."""
    batch, _, height, width = like.shape
    return tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


class FusedLayerNorm2d(nn.Module):
    """LayerNorm2d as one Triton kernel (`layer_norm_modulate`) on channels-last activations."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpixels(layer_norm_modulate(pixels(x), None, None, self.eps), x)


class FusedResBlock(nn.Module):
    """A ResBlock with its GELU and GRN in Triton (`global_response_norm`: two passes over the activations)
    and its LayerNorm `norm` (the kernel, or the reference where the kernel does not cover it)."""

    def __init__(self, block: ResBlock, norm: nn.Module):
        super().__init__()
        self.depthwise, self.norm, self.fc1, self.grn, self.fc2 = block.depthwise, norm, block.fc1, block.grn, block.fc2

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return x + unpixels(self.branch(x, skip), x)

    def branch(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP branch, before the residual add, as (batch, pixels, channels) tokens."""
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        return self.fc2(global_response_norm(self.fc1(pixels(h)), self.grn.gamma, self.grn.beta, gelu=True))


class FusedAttnBlock(nn.Module):
    """An AttnBlock with its LayerNorm `norm` and its `attention` function (the kernels, or the references
    where the kernels do not cover the block)."""

    def __init__(self, block: AttnBlock, norm: nn.Module, attention: Callable[..., torch.Tensor]):
        super().__init__()
        self.nhead, self.norm, self.qkv, self.out = block.nhead, norm, block.qkv, block.out
        self.attention = attention  # (q, k, v, text k, text v) → softmax(q kᵀ / √d) v, heads merged by a view

    def forward(self, x: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        o = self.out(self._attend(self.norm(x).flatten(2).transpose(1, 2), text_kv))
        return x + o.transpose(1, 2).reshape(batch, channels, height, width)

    def attend(self, residual: torch.Tensor, normed: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        """The block in a chain, on (batch, pixels, channels) tokens: `normed` is LayerNorm(x) and `residual`
        is x plus the output projection's bias. The projection accumulates into `residual`, in place, in its
        GEMM's epilogue, and returns it."""
        o = self._attend(normed, text_kv)
        if isinstance(self.out, QuantizedLinear):  # its own GEMM adds the residual in its epilogue
            return self.out(o, residual=residual, add_bias=False)  # the bias is in the residual already
        channels = o.shape[-1]
        residual.view(-1, channels).addmm_(o.reshape(-1, channels), self.out.weight.t())
        return residual

    def _attend(self, tokens: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        """Attention over normed image tokens (B, N, C) and the text's keys and values (B, 77, 2C), before the
        output projection: (B, N, C)."""
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        text_k, text_v = text_kv.chunk(2, dim=-1)
        heads = [t.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for t in (q, k, v, text_k, text_v)]
        return self.attention(*heads).transpose(1, 2).flatten(2)


class FusedChain(nn.Module):
    """ResBlock → TimestepBlock [→ AttnBlock] with the glue between them fused. The ResBlock's residual add,
    the FiLM and the attention's LayerNorm are one pass over the activations (`residual_norm`, or
    `residual_film` without attention), and the attention's output projection adds its residual and bias in
    its GEMM. Unfused (two adds, the FiLM's multiply and add, the LayerNorm), this glue reads or writes the
    activations twelve times; here five: four in the kernel, one in the GEMM's epilogue."""

    def __init__(self, res: FusedResBlock, attn: FusedAttnBlock | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor], skip: torch.Tensor | None = None,
                text_kv: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) channels-last; `film` the TimestepBlock's (a, b) for this step (`StackedFiLM`), `skip`
        the ResBlock's, `text_kv` the AttnBlock's."""
        a, b = film
        branch = self.res.branch(x, skip)
        if self.attn is None:
            return unpixels(residual_film(pixels(x), branch, a, b), x)
        residual, normed = residual_norm(pixels(x), branch, a, b, self.attn.out.bias, None, None, self.attn.norm.eps)
        return unpixels(self.attn.attend(residual, normed, text_kv), x)


class StackedFiLM(nn.Module):
    """The FiLMs of many TimestepBlocks from one GEMM: their mappers stacked into one weight of this module's
    own, so that a step makes one launch where it made one per block. Called with a step's r_embed, it
    yields each block's (a, b), (batch, channels) each, in the order of `blocks`."""

    def __init__(self, blocks: Sequence[TimestepBlock]):
        super().__init__()
        self.sizes = [block.mapper.out_features for block in blocks]
        weight, bias = (torch.cat([getattr(block.mapper, name).detach() for block in blocks]) for name in
                        ("weight", "bias"))
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, r_embed: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        films = F.linear(r_embed, self.weight, self.bias).split(self.sizes, dim=1)
        return iter([tuple(film.chunk(2, dim=1)) for film in films])


class FusedMixingBlock(nn.Module):
    """The VQGAN's MixingResidualBlock with its modulated LayerNorms in Triton: the first writing the conv's
    replicate padding too (`layer_norm_modulate_pad`), the second in one pass with the residual add before it
    (`residual_norm`). The branch scales g₂ and g₅ are folded into copies of the depthwise conv's and the
    second Linear's weights, this module's own buffers, so that the second Linear's GEMM adds its residual
    in its epilogue. With `gemm_gelu`, the first Linear and the GELU are one Triton GEMM (`linear_gelu`)."""

    def __init__(self, block: MixingResidualBlock, gemm_gelu: bool):
        super().__init__()
        self.gammas, self.fc1, self.groups, self.gemm_gelu = block.gammas, block.fc1, block.depthwise.groups, gemm_gelu
        # The gammas are constants once the weights are loaded. Buffers follow this module's device and dtype.
        with torch.no_grad():
            g = block.gammas
            self.register_buffer("depthwise_weight", block.depthwise.weight * g[2], persistent=False)
            self.register_buffer("depthwise_bias", block.depthwise.bias * g[2], persistent=False)
            self.register_buffer("fc2_weight", block.fc2.weight * g[5], persistent=False)
            self.register_buffer("fc2_bias", block.fc2.bias * g[5], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        padded = layer_norm_modulate_pad(x.permute(0, 2, 3, 1), g[0], g[1], 1e-6).permute(0, 3, 1, 2)
        branch = F.conv2d(padded, self.depthwise_weight, self.depthwise_bias, groups=self.groups)
        residual, h = residual_norm(pixels(x), pixels(branch), None, None, self.fc2_bias, g[3], g[4], 1e-6)
        hidden = linear_gelu(h, self.fc1.weight, self.fc1.bias) if self.gemm_gelu else F.gelu(self.fc1(h))
        residual.view(-1, residual.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), self.fc2_weight.t())
        return unpixels(residual, x)


class FusedPrior(nn.Module):
    """`Prior`'s fast path (`fuse`): `condition(text)` and `(x, r, text_kv)` as the plain prior's."""

    def __init__(self, prior: Prior, plan: _Plan):
        super().__init__()
        self.plain, self.config = prior, prior.config  # the plain model's conditioning and input projection
        blocks = [block for layer in prior.layers for block in (layer.res, layer.time, layer.attn)]
        self.units = nn.ModuleList(plan.units(blocks))
        self.films = StackedFiLM([layer.time for layer in prior.layers]) if plan.fusions.chains else None
        self.out = plan.norm_first(prior.out)

    def condition(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """As `Prior.condition`: per-layer text keys and values (B, 77, 2c) from CLIP states (B, 77, c_cond)."""
        return self.plain.condition(text)

    def forward(self, x: torch.Tensor, r: torch.Tensor, text_kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """As `Prior.forward`: predicted noise (B, c_in, h, w), fp32, for latents x (B, c_in, h, w) at noise
        levels r (B,)."""
        x = x.contiguous(memory_format=torch.channels_last)
        x_in = x
        r_embed = timestep_embedding(r, self.config.c_r, x.dtype)
        films = self.films(r_embed) if self.films is not None else None
        kv_iter = iter(text_kv)
        x = self.plain.projection(x)
        for unit in self.units:
            x = _run_unit(unit, x, r_embed, films, kv_iter, None)
        return Prior.predicted_noise(x_in, self.out(x))


class FusedDecoder(nn.Module):
    """`Decoder`'s fast path (`fuse`): `condition(pyramid, text)` and `(x, r, conditioning)` as the plain
    decoder's, and its `num_text_kv`."""

    def __init__(self, decoder: Decoder, plan: _Plan):
        super().__init__()
        self.plain, self.config = decoder, decoder.config  # the plain model's conditioning
        self.down_levels = nn.ModuleList(nn.ModuleList(plan.units(level)) for level in decoder.down_blocks)
        self.up_levels = nn.ModuleList(nn.ModuleList(plan.units(level)) for level in decoder.up_blocks)
        levels = (*decoder.down_blocks, *decoder.up_blocks)
        films = [block for level in levels for block in level if isinstance(block, TimestepBlock)]
        self.films = StackedFiLM(films) if plan.fusions.chains else None  # in the order the forward runs them
        unshuffle, projection, norm = decoder.embedding
        self.embedding = nn.Sequential(unshuffle, projection, plan.layer_norm(norm, projection.out_channels))
        self.clf = plan.norm_first(decoder.clf)

    @property
    def num_text_kv(self) -> int:
        """As `Decoder.num_text_kv`: how many of the conditioning's tensors are text keys and values."""
        return self.plain.num_text_kv

    def condition(self, pyramid: tuple[torch.Tensor, ...], text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """As `Decoder.condition`: every attention block's text keys and values, then the mapped skips."""
        return self.plain.condition(pyramid, text)

    def forward(self, x: torch.Tensor, r: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """As `Decoder.forward`: predicted noise (B, 4, H, W), fp32, for latents x (B, 4, H, W) at noise levels
        r (B,)."""
        inject = self.config.inject_effnet
        x = x.contiguous(memory_format=torch.channels_last)
        r_embed = timestep_embedding(r, self.config.c_r, x.dtype)
        films = self.films(r_embed) if self.films is not None else None
        kv_iter = iter(conditioning[:self.num_text_kv])
        effnet_iter = iter(conditioning[self.num_text_kv:])

        x_in = x
        x = self.embedding(x)
        level_outputs = []
        for i, level in enumerate(self.down_levels):
            skip = next(effnet_iter) if inject[i] else None
            for unit in level:
                x = _run_unit(unit, x, r_embed, films, kv_iter, skip)
            level_outputs.insert(0, x)

        for i, level in enumerate(self.up_levels):
            effnet_skip = next(effnet_iter) if inject[len(inject) - 1 - i] else None
            for j, unit in enumerate(level):
                skip = effnet_skip
                if j == 0 and i > 0:  # the level's first ResBlock (or chain) also takes the down path's output
                    parts = [level_outputs[i]] + ([effnet_skip] if effnet_skip is not None else [])
                    skip = torch.cat(parts, dim=1)
                x = _run_unit(unit, x, r_embed, films, kv_iter, skip)
        return Decoder.predicted_noise(x_in, self.clf(x))


class FusedVQGAN(nn.Module):
    """`VQGANDecoder`'s fast path (`fuse`): `(latents)` as the plain VQGAN's, on channels-last activations,
    with its MixingResidualBlocks fused where `Fusions.chains` asks for it."""

    def __init__(self, vqgan: VQGANDecoder, plan: _Plan):
        super().__init__()
        self.plain, self.config = vqgan, vqgan.config  # the plain model's output block
        self.up_blocks = nn.Sequential(*(plan.mixing_block(block) if isinstance(block, MixingResidualBlock) else block
                                         for block in vqgan.up_blocks))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """As `VQGANDecoder.forward`: images (B, 3, 4H, 4W) in [0, 1] from latents (B, 4, H, W)."""
        latents = latents.contiguous(memory_format=torch.channels_last)
        images = self.plain.out_block(self.up_blocks(self.config.scale_factor * latents))
        return images.clamp(0, 1)


def fusable_chains(blocks: Sequence[nn.Module]) -> list[tuple[nn.Module, ...]]:
    """`blocks` grouped as the fused path runs them: a ResBlock followed by a TimestepBlock, and by the
    AttnBlock after that if there is one, is one chain (`FusedChain`); any other block is alone."""
    chains, i = [], 0
    while i < len(blocks):
        length = 1
        if isinstance(blocks[i], ResBlock) and i + 1 < len(blocks) and isinstance(blocks[i + 1], TimestepBlock):
            length = 3 if i + 2 < len(blocks) and isinstance(blocks[i + 2], AttnBlock) else 2
        chains.append(tuple(blocks[i:i + length]))
        i += length
    return chains


def _run_unit(
    unit: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, films: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
    text_kv: Iterator[torch.Tensor], skip: torch.Tensor | None,
) -> torch.Tensor:
    """One chain or block of the fused forward; `skip` goes to its ResBlock. With `Fusions.chains`, `films`
    yields each TimestepBlock's (a, b) in turn, from `StackedFiLM`; without, each block maps its own."""
    if isinstance(unit, FusedChain):
        return unit(x, next(films), skip, next(text_kv) if unit.attn is not None else None)
    if isinstance(unit, (ResBlock, FusedResBlock)):
        return unit(x, skip)
    if isinstance(unit, TimestepBlock):
        return unit(x, r_embed) if films is None else unit.modulate(x, *next(films))
    if isinstance(unit, (AttnBlock, FusedAttnBlock)):
        return unit(x, next(text_kv))
    return unit(x)  # a down- or up-sampler


class _Plan:
    """One `fuse` call's decisions: for each layer of the model, its fused form or, where a kernel's envelope
    does not cover it (at the model's `dtype`), its reference; and the layers that fell back, by reason."""

    def __init__(self, model: str, dtype: torch.dtype, fusions: Fusions):
        self.model, self.dtype, self.fusions = model, dtype, fusions
        self._fallbacks: dict[str, collections.Counter[str]] = {}

    def covered(self, reason: str | None, layer: str) -> bool:
        """Whether a kernel covers a `layer` (a name such as "attention block"): `reason` is None. If not, the
        layer is counted under its reason."""
        if reason is not None:
            self._fallbacks.setdefault(reason, collections.Counter())[layer] += 1
        return reason is None

    def layer_norm(self, norm: LayerNorm2d, channels: int) -> nn.Module:
        if self.covered(layer_norm_unsupported(channels, self.dtype), "LayerNorm"):
            return FusedLayerNorm2d(norm.eps)
        return norm

    def norm_first(self, modules: nn.Sequential) -> nn.Sequential:
        """A LayerNorm2d and the conv after it, and what follows: the norm fused where it can be."""
        norm, conv, *rest = modules
        return nn.Sequential(self.layer_norm(norm, conv.in_channels), conv, *rest)

    def res_block(self, block: ResBlock) -> nn.Module:
        norm = self.layer_norm(block.norm, block.depthwise.out_channels)
        if self.covered(global_response_norm_unsupported(self.dtype), "ResBlock"):
            return FusedResBlock(block, norm)
        return block

    def attn_block(self, block: AttnBlock) -> nn.Module:
        channels = block.out.in_features
        norm = self.layer_norm(block.norm, channels)
        kernel = self.covered(attention_unsupported(channels // block.nhead, self.dtype), "attention block")
        if kernel or isinstance(norm, FusedLayerNorm2d):
            return FusedAttnBlock(block, norm, attention if kernel else block.attention)
        return block

    def block(self, block: nn.Module) -> nn.Module:
        if isinstance(block, ResBlock):
            return self.res_block(block)
        if isinstance(block, AttnBlock):
            return self.attn_block(block)
        if isinstance(block, nn.Sequential) and isinstance(block[0], LayerNorm2d):
            return self.norm_first(block)  # a down- or up-sampler
        return block

    def units(self, blocks: Sequence[nn.Module]) -> list[nn.Module]:
        """`blocks` as the fused forward runs them: with `Fusions.chains`, each chain (`fusable_chains`) as a
        `FusedChain` where the LayerNorm kernels cover its width, else block by block."""
        groups = fusable_chains(blocks) if self.fusions.chains else [(block,) for block in blocks]
        units = []
        for group in groups:
            fused = [self.block(block) for block in group]
            if len(group) > 1:
                channels = group[0].depthwise.out_channels
                # The chain's kernels are LayerNorm kernels: where they cover its width, the ResBlock's GRN kernel
                # (any width) and the AttnBlock's LayerNorm kernel cover it too, though its attention may be SDPA.
                if self.covered(layer_norm_unsupported(channels, self.dtype), "block chain"):
                    units.append(FusedChain(fused[0], fused[2] if len(fused) == 3 else None))
                    continue
            units.extend(fused)
        return units

    def mixing_block(self, block: MixingResidualBlock) -> nn.Module:
        # linear_gelu takes any width in the dtypes of the LayerNorm kernels, so their envelope is the block's.
        channels = block.depthwise.out_channels
        if self.fusions.chains and self.covered(layer_norm_unsupported(channels, self.dtype), "MixingResidualBlock"):
            return FusedMixingBlock(block, self.fusions.gemm_gelu)
        return block

    def fallbacks(self) -> dict[str, int]:
        """How many layers fell back, by reason."""
        return {reason: sum(layers.values()) for reason, layers in self._fallbacks.items()}

    def log(self) -> None:
        """One warning per reason, saying how many layers of which kinds fell back."""
        for reason, layers in self._fallbacks.items():
            counts = [f"{count} {layer}{'s' if count > 1 else ''}" for layer, count in layers.items()]
            which = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} and {counts[-1]}"
            verb = "runs" if sum(layers.values()) == 1 else "run"
            logger.warning("torch-fast: %s of the %s %s on the reference path: %s", which, self.model, verb, reason)
