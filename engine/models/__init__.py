"""The three stages of Würstchen v2 as plain PyTorch modules."""

from engine.models.decoder import Decoder
from engine.models.prior import Prior
from engine.models.vqgan import VQGANDecoder

__all__ = ["Decoder", "Prior", "VQGANDecoder"]
