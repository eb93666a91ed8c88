"""Stage C, the prior: denoises the 16-channel image embedding conditioned on CLIP-bigG text states."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import PriorConfig
from engine.models.blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding


class PriorLayer(nn.Module):
    """One of the prior's `depth` layers: ResBlock, then timestep FiLM, then attention."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.res = ResBlock(config.c)
        self.time = TimestepBlock(config.c, config.c_r)
        self.attn = AttnBlock(config.c, config.c, config.nhead)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor, text_kv: torch.Tensor) -> torch.Tensor:
        return self.attn(self.time(self.res(x), r_embed), text_kv)


class Prior(nn.Module):
    """`WuerstchenPrior`. Call `condition` once per request, then `forward` once per step."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.projection = nn.Conv2d(config.c_in, config.c, kernel_size=1)
        self.cond_mapper = nn.Sequential(
            nn.Linear(config.c_cond, config.c), nn.LeakyReLU(0.2), nn.Linear(config.c, config.c)
        )
        self.layers = nn.ModuleList(PriorLayer(config) for _ in range(config.depth))
        self.out = nn.Sequential(LayerNorm2d(), nn.Conv2d(config.c, 2 * config.c_in, kernel_size=1))

    def condition(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step-invariant input of `forward`: per-layer text keys and values (B, 77, 2c) from CLIP states
        (B, 77, c_cond)."""
        cond = self.cond_mapper(text)
        return tuple(layer.attn.text_kv(cond) for layer in self.layers)

    def forward(self, x: torch.Tensor, r: torch.Tensor, text_kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Predicted noise (B, c_in, h, w), fp32, for latents x (B, c_in, h, w) at noise levels r (B,), given
        `condition`'s output."""
        x_in = x
        r_embed = timestep_embedding(r, self.config.c_r, x.dtype)
        x = self.projection(x)
        for layer, kv in zip(self.layers, text_kv, strict=True):
            x = layer(x, r_embed, kv)
        return self.predicted_noise(x_in, self.out(x))

    @staticmethod
    def predicted_noise(x_in: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """The noise predicted for latents x_in (B, c_in, h, w) from the output head's (B, 2·c_in, h, w)."""
        # The head divides by as little as 1e-5: it runs in fp32 and returns fp32 noise in every precision.
        a, b = head.float().chunk(2, dim=1)
        return (x_in.float() - a) / ((1 - b).abs() + 1e-5)
