"""Stage B, the decoder (`WuerstchenDiffNeXt`): denoises the VQGAN latent, conditioned on the prior's
image embedding and on CLIP-H text states."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DecoderConfig
from engine.models.blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, layer_norm, timestep_embedding


class Decoder(nn.Module):
    """A U-Net of `len(c_hidden)` levels. Call `condition` once per request, then `forward` once per step,
    as the prior: `forward(x, r, condition(pyramid, text))`.

    Module names follow diffusers: `down_blocks[i]` and `up_blocks[i]` hold the level's blocks, with the
    down-sampler first and the up-sampler last; `effnet_mappers` has one entry per level on the way
    down and one per level on the way up (deepest first), `None` where the level takes no embedding.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        levels = len(config.c_hidden)
        self.clip_mapper = nn.Linear(config.clip_embd, config.c_cond)
        injected = config.inject_effnet + tuple(reversed(config.inject_effnet))
        self.effnet_mappers = nn.ModuleList(
            nn.Conv2d(config.effnet_embd, config.c_cond, kernel_size=1) if inject else None for inject in injected
        )
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(config.patch_size),
            nn.Conv2d(config.c_in * config.patch_size**2, config.c_hidden[0], kernel_size=1),
            LayerNorm2d(),
        )

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(
                    LayerNorm2d(), nn.Conv2d(config.c_hidden[i - 1], config.c_hidden[i], kernel_size=2, stride=2)
                ))
            effnet_skip = config.c_cond if config.inject_effnet[i] else 0
            for _ in range(config.blocks[i]):
                level.extend(self._block(kind, i, effnet_skip) for kind in config.level_config[i])
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            effnet_skip = config.c_cond if config.inject_effnet[i] else 0
            for repeat in range(config.blocks[i]):
                for k, kind in enumerate(config.level_config[i]):
                    # The level's first block also takes the down path's output of this level.
                    level_skip = config.c_hidden[i] if i < levels - 1 and repeat == k == 0 else 0
                    level.append(self._block(kind, i, level_skip + effnet_skip))
            if i > 0:
                level.append(nn.Sequential(
                    LayerNorm2d(),
                    nn.ConvTranspose2d(config.c_hidden[i], config.c_hidden[i - 1], kernel_size=2, stride=2),
                ))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(),
            nn.Conv2d(config.c_hidden[0], 2 * config.c_out * config.patch_size**2, kernel_size=1),
            nn.PixelShuffle(config.patch_size),
        )

    def _block(self, kind: str, level: int, c_skip: int) -> nn.Module:
        config = self.config
        channels = config.c_hidden[level]
        if kind == "C":
            return ResBlock(channels, c_skip, kernel_size=config.kernel_size)
        if kind == "T":
            return TimestepBlock(channels, config.c_r)
        return AttnBlock(channels, config.c_cond, config.nhead[level])

    def _blocks(self, kind: type) -> list[nn.Module]:
        """The blocks of one kind in the order `forward` runs them."""
        return [block for level in (*self.down_blocks, *self.up_blocks) for block in level if isinstance(block, kind)]

    @property
    def num_text_kv(self) -> int:
        """How many attention blocks there are: the first `num_text_kv` tensors of the conditioning are
        their text keys and values."""
        per_level = zip(self.config.blocks, self.config.level_config, strict=True)
        return 2 * sum(repeats * kinds.count("A") for repeats, kinds in per_level)  # once down, once up

    def condition(self, pyramid: tuple[torch.Tensor, ...], text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step-invariant input of `forward`, one flat tuple: the text keys and values (B, 77, 2·c_hidden[i])
        of every attention block, then the image embedding's mapped skips (B, c_cond, h_i, w_i) of every level
        that takes them, each in the order `forward` uses them (`num_text_kv` of the first kind).

        `pyramid` is the image embedding resized to each injected level (`resize_image_embeddings`); `text`
        the CLIP-H states (B, 77, clip_embd).
        """
        clip = self.clip_mapper(text)
        clip = layer_norm(clip)
        text_kv = tuple(block.text_kv(clip) for block in self._blocks(AttnBlock))
        levels = len(self.config.c_hidden)
        injected = injected_levels(self.config)
        effnet = tuple(
            mapper(pyramid[injected.index(index if index < levels else 2 * levels - 1 - index)])
            for index, mapper in enumerate(self.effnet_mappers) if mapper is not None
        )
        return (*text_kv, *effnet)

    def forward(self, x: torch.Tensor, r: torch.Tensor, conditioning: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Predicted noise (B, 4, H, W), fp32, for latents x (B, 4, H, W) at noise levels r (B,), given
        `condition`'s output."""
        inject = self.config.inject_effnet
        r_embed = timestep_embedding(r, self.config.c_r, x.dtype)
        kv_iter = iter(conditioning[:self.num_text_kv])
        effnet_iter = iter(conditioning[self.num_text_kv:])

        x_in = x
        x = self.embedding(x)
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            skip = next(effnet_iter) if inject[i] else None
            for block in level:
                x = _run_block(block, x, r_embed, kv_iter, skip)
            level_outputs.insert(0, x)

        for i, level in enumerate(self.up_blocks):
            effnet_skip = next(effnet_iter) if inject[len(inject) - 1 - i] else None
            for j, block in enumerate(level):
                skip = effnet_skip
                if j == 0 and i > 0:  # the level's first ResBlock also takes the down path's output
                    parts = [level_outputs[i]] + ([effnet_skip] if effnet_skip is not None else [])
                    skip = torch.cat(parts, dim=1)
                x = _run_block(block, x, r_embed, kv_iter, skip)
        return self.predicted_noise(x_in, self.clf(x))

    @staticmethod
    def predicted_noise(x_in: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """The noise predicted for latents x_in (B, 4, H, W) from the output head's (B, 8, H, W)."""
        # The head divides by as little as 1e-3: it runs in fp32 and returns fp32 noise in every precision.
        a, b = head.float().chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2e-3) + 1e-3
        return (x_in.float() - a) / b


def injected_levels(config: DecoderConfig) -> list[int]:
    """The levels that take the prior's image embedding, finest first."""
    return [level for level, inject in enumerate(config.inject_effnet) if inject]


def resize_image_embeddings(
    image_embeddings: torch.Tensor, config: DecoderConfig, level_sizes: tuple[tuple[int, int], ...]
) -> tuple[torch.Tensor, ...]:
    """The image embedding resized to each injected level: antialiased bicubic (Keys a = −0.5, corners
    aligned) in fp32, as the reference does, then cast back. It stays out of the exported graphs, whose
    Resize would round differently (and TensorRT refuses antialiasing).

    `level_sizes` are the (h, w) of every level (`engine.shapes.Shapes.decoder_levels`).
    """
    return tuple(
        F.interpolate(image_embeddings.float(), size=level_sizes[level], mode="bicubic", antialias=True,
                      align_corners=True).to(image_embeddings.dtype)
        for level in injected_levels(config)
    )


def _run_block(block: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, text_kv: Iterator[torch.Tensor],
               skip: torch.Tensor | None) -> torch.Tensor:
    """One block of a level; `skip` goes to a ResBlock, `text_kv` yields each AttnBlock's keys and values."""
    if isinstance(block, ResBlock):
        return block(x, skip)
    if isinstance(block, TimestepBlock):
        return block(x, r_embed)
    if isinstance(block, AttnBlock):
        return block(x, next(text_kv))
    return block(x)  # a down- or up-sampler
