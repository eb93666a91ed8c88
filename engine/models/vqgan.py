"""Stage A, the decoder half of Paella's VQGAN (`PaellaVQModel.decode`): latent (B, 4, H, W) → image (B, 3, 4H, 4W).

The pipeline never quantizes (diffusers decodes with `force_not_quantize=True`), so the codebook and the
encoder are not built; the loader skips their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import VQGANConfig
from engine.models.blocks import layer_norm

# Parameters of the encoder half and the codebook: present in checkpoints, never used to decode.
ENCODER_PREFIXES = ("in_block.", "down_blocks.", "vquantizer.")


class MixingResidualBlock(nn.Module):
    """A depthwise 3×3 conv (replicate padding) and a channel MLP, each after a LayerNorm modulated by
    the six learned scalars `gammas` and added to the input scaled by one of them."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, groups=channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = (layer_norm(x.permute(0, 2, 3, 1)) * (1 + g[0]) + g[1]).permute(0, 3, 1, 2)
        x = x + self.depthwise(F.pad(h, (1, 1, 1, 1), mode="replicate")) * g[2]
        h = layer_norm(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2) * g[5]


class VQGANDecoder(nn.Module):
    """Scales the latent by `scale_factor`, decodes it and clamps the image to [0, 1].

    Module names follow diffusers: `up_blocks` is the 1×1 input conv, the residual blocks and the
    transposed-conv up-samplers in order; `out_block` is the output conv and pixel shuffle.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        widths = [config.embed_dim // 2**i for i in reversed(range(config.levels))]  # finest level first
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(config.latent_channels, widths[-1], kernel_size=1))]
        for i in range(config.levels):
            width = widths[config.levels - 1 - i]
            blocks.extend(MixingResidualBlock(width, 4 * width)
                          for _ in range(config.bottleneck_blocks if i == 0 else 1))
            if i < config.levels - 1:
                blocks.append(nn.ConvTranspose2d(width, widths[config.levels - 2 - i], kernel_size=4, stride=2,
                                                 padding=1))
        self.up_blocks = nn.Sequential(*blocks)
        self.out_block = nn.Sequential(
            nn.Conv2d(widths[0], config.out_channels * config.up_down_scale_factor**2, kernel_size=1),
            nn.PixelShuffle(config.up_down_scale_factor),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 4H, 4W) in [0, 1] from latents (B, 4, H, W)."""
        images = self.out_block(self.up_blocks(self.config.scale_factor * latents))
        return images.clamp(0, 1)
