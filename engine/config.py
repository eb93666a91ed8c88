"""Frozen configs for each stage of Würstchen v2, read from diffusers' config.json files, and named presets.

Field names follow the diffusers classes (`WuerstchenPrior`, `WuerstchenDiffNeXt`, `PaellaVQModel`,
`DDPMWuerstchenScheduler`) so that a config.json maps onto a dataclass one key to one field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import WuerstchenError

# Keys that diffusers writes into config.json but that have no meaning for inference.
_IGNORED_KEYS = {"dropout"}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise WuerstchenError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ints(owner: str, names: tuple[str, ...], values) -> None:
    for name in names:
        value = getattr(values, name)
        _require(_is_int(value) and value > 0, f"{owner} {name}={value!r}: expected a positive integer")


def _number(owner: str, name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """`value` a finite number in [low, high) (or (low, high) when `low_open`), else a one-line error."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    in_range = number and (value > low if low_open else value >= low) and value < high
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g})"
    _require(in_range, f"{owner} {name}={value!r}: expected a finite number in {bounds}")


class _FromDict:
    """`from_dict`/`from_json` for the stage configs: every field required, no unknown keys."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in values.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
        missing = sorted(names - given.keys())
        unknown = sorted(given.keys() - names)
        _require(not missing, f"{source}: missing keys {missing}; a {cls.__name__} needs {sorted(names)}")
        _require(not unknown, f"{source}: unknown keys {unknown}; a {cls.__name__} has {sorted(names)}")
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        try:
            return cls(**tuples)
        except WuerstchenError as error:  # a value's check, with the file it is in
            if source == "config":
                raise
            raise WuerstchenError(f"{source}: {error}") from None

    @classmethod
    def from_json(cls, path: Path):
        path = Path(path)
        _require(path.is_file(), f"config file {path} does not exist")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise WuerstchenError(f"config file {path} is not valid JSON: {error}") from None
        _require(isinstance(values, dict), f"config file {path}: expected a JSON object")
        return cls.from_dict(values, source=str(path))


@dataclass(frozen=True)
class PriorConfig(_FromDict):
    """Stage C, `WuerstchenPrior`: a stack of `depth` (ResBlock, TimestepBlock, AttnBlock) layers at width `c`."""

    c_in: int = 16  # latent channels (the EfficientNet features the decoder is conditioned on)
    c: int = 1536  # hidden width
    c_cond: int = 1280  # width of the text states (CLIP-bigG)
    c_r: int = 64  # width of the timestep embedding
    depth: int = 32
    nhead: int = 24

    def __post_init__(self):
        _positive_ints("prior", ("c_in", "c", "c_cond", "c_r", "depth", "nhead"), self)
        _require(self.c % self.nhead == 0, f"prior c={self.c} must be divisible by nhead={self.nhead}")


@dataclass(frozen=True)
class DecoderConfig(_FromDict):
    """Stage B, `WuerstchenDiffNeXt`: a U-Net over `len(c_hidden)` levels after a patch-`patch_size` embedding.

    Each level repeats its `level_config` string `blocks[i]` times: C = ResBlock, T = TimestepBlock,
    A = AttnBlock. Levels with `inject_effnet` get the prior's image embedding, resized to the level,
    as an extra input of every ResBlock.
    """

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024  # width of the mapped text states and of the effnet injection
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16  # channels of the prior's image embedding
    clip_embd: int = 1024  # width of the text states (CLIP-H)
    kernel_size: int = 3

    def __post_init__(self):
        _positive_ints("decoder", ("c_in", "c_out", "c_r", "patch_size", "c_cond", "effnet_embd", "clip_embd",
                                   "kernel_size"), self)
        per_level = {"c_hidden": (lambda v: _is_int(v) and v > 0, "positive integers"),
                     "nhead": (_is_int, "integers (-1 where a level has no attention)"),
                     "blocks": (lambda v: _is_int(v) and v >= 0, "integers from 0"),
                     "level_config": (lambda v: isinstance(v, str), "strings"),
                     "inject_effnet": (lambda v: isinstance(v, bool), "true or false")}
        for name, (valid, what) in per_level.items():
            value = getattr(self, name)
            _require(isinstance(value, tuple) and value and all(valid(v) for v in value),
                     f"decoder {name}={value!r}: expected a list of {what}, one per level")
        levels = len(self.c_hidden)
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            value = getattr(self, name)
            _require(len(value) == levels, f"decoder {name}={value!r}: expected {levels} entries, one per level")
        for i, (width, heads, kinds) in enumerate(zip(self.c_hidden, self.nhead, self.level_config, strict=True)):
            _require(
                isinstance(kinds, str) and kinds[:1] == "C" and set(kinds) <= set("CTA"),
                f"decoder level_config[{i}]={kinds!r}: expected letters C, T, A starting with C",
            )
            if "A" in kinds:
                _require(
                    heads > 0 and width % heads == 0,
                    f"decoder nhead[{i}]={heads}: expected a positive divisor of c_hidden[{i}]={width}",
                )

    @property
    def downscale(self) -> int:
        """How much smaller the deepest level is than the latent: the latent must be a multiple of it."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


@dataclass(frozen=True)
class VQGANConfig(_FromDict):
    """Stage A, `PaellaVQModel`. Only the decoder half runs; the encoder's weights are skipped when loading."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    def __post_init__(self):
        _positive_ints("vqgan", ("in_channels", "out_channels", "up_down_scale_factor", "levels", "bottleneck_blocks",
                                 "embed_dim", "latent_channels", "num_vq_embeddings"), self)
        _number("vqgan", "scale_factor", self.scale_factor, 0, low_open=True)
        _require(
            self.embed_dim % 2 ** (self.levels - 1) == 0,
            f"vqgan embed_dim={self.embed_dim} must be divisible by 2**(levels-1)={2 ** (self.levels - 1)}",
        )

    @property
    def upscale(self) -> int:
        """Image pixels per latent pixel (4 for v2's f4 VQGAN)."""
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


@dataclass(frozen=True)
class ScheduleConfig(_FromDict):
    """`DDPMWuerstchenScheduler`: the cosine schedule with offset `s`, optionally warped by `scaler`."""

    scaler: float = 1.0
    s: float = 0.008

    def __post_init__(self):
        _number("scheduler", "scaler", self.scaler, 0, low_open=True)
        _number("scheduler", "s", self.s, 0, 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP text transformer of one stage; only the presets need it (real folders carry their own)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 49408
    max_position_embeddings: int = 77

    def __post_init__(self):
        _positive_ints("text encoder", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "vocab_size", "max_position_embeddings"), self)

    def to_transformers(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
        )


@dataclass(frozen=True)
class SizeGrid:
    """The image sizes the model can make exactly: multiples of `step` pixels between `min` and `max`.

    For v2, 128 px = 3 prior latents = 32 decoder latents, the smallest step for which the decoder
    latent, `int(ceil(size / 42.67) * 10.67)`, divides by the decoder's 16× downscale.
    """

    step: int = 128
    min: int = 128
    max: int = 4096

    def __post_init__(self):
        _positive_ints("sizes", ("step", "min", "max"), self)
        _require(self.min <= self.max and not self.min % self.step and not self.max % self.step,
                 f"sizes min={self.min}, max={self.max}: expected multiples of step={self.step}, min ≤ max")

    def describe(self) -> str:
        return f"a multiple of {self.step} from {self.min} to {self.max}"


@dataclass(frozen=True)
class WuerstchenConfig:
    """Everything needed to build a Würstchen v2 pipeline: the stages, their text encoders and the coupling."""

    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    prior_text: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                                  intermediate_size=5120)
    )
    decoder_text: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                  intermediate_size=4096)
    )
    prior_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    decoder_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # From the two model_index.json files: prior latents are (effnet + latent_std) / latent_mean.
    latent_mean: float = 42.0
    latent_std: float = 1.0
    resolution_multiple: float = 42.67  # image pixels per prior latent pixel
    latent_dim_scale: float = 10.67  # decoder latent pixels per prior latent pixel
    sizes: SizeGrid = field(default_factory=SizeGrid)

    def __post_init__(self):
        parts = {"prior": PriorConfig, "decoder": DecoderConfig, "vqgan": VQGANConfig, "sizes": SizeGrid,
                 "prior_schedule": ScheduleConfig, "decoder_schedule": ScheduleConfig,
                 "prior_text": TextEncoderConfig, "decoder_text": TextEncoderConfig}
        for name, expected in parts.items():
            _require(isinstance(getattr(self, name), expected), f"{name}: expected a {expected.__name__}")
        _number("pipeline", "latent_mean", self.latent_mean, 0, low_open=True)
        _number("pipeline", "latent_std", self.latent_std, -math.inf)
        _number("pipeline", "resolution_multiple", self.resolution_multiple, 1)
        _number("pipeline", "latent_dim_scale", self.latent_dim_scale, 1)
        # The decoder reads the prior's output only where it injects it; a decoder that injects nothing
        # takes embeddings of any width (diffusers loads and runs that combination too).
        _require(
            self.prior.c_in == self.decoder.effnet_embd or not any(self.decoder.inject_effnet),
            f"prior c_in={self.prior.c_in} must equal decoder effnet_embd={self.decoder.effnet_embd}, the width of "
            "the image embeddings the decoder injects",
        )
        _require(
            self.decoder.c_in == self.vqgan.latent_channels,
            f"decoder c_in={self.decoder.c_in} must equal vqgan latent_channels={self.vqgan.latent_channels}",
        )
        _require(
            self.prior.c_cond == self.prior_text.hidden_size,
            f"prior c_cond={self.prior.c_cond} must equal the prior text encoder's width {self.prior_text.hidden_size}",
        )
        _require(
            self.decoder.clip_embd == self.decoder_text.hidden_size,
            f"decoder clip_embd={self.decoder.clip_embd} must equal the decoder text encoder's width "
            f"{self.decoder_text.hidden_size}",
        )

    def to_dict(self) -> dict:
        """Plain JSON-ready values: what a bundle's manifest stores."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> WuerstchenConfig:
        """The inverse of `to_dict`."""
        nested = {
            "prior": PriorConfig.from_dict, "decoder": DecoderConfig.from_dict, "vqgan": VQGANConfig.from_dict,
            "prior_schedule": ScheduleConfig.from_dict, "decoder_schedule": ScheduleConfig.from_dict,
            "prior_text": lambda v: TextEncoderConfig(**v), "decoder_text": lambda v: TextEncoderConfig(**v),
            "sizes": lambda v: SizeGrid(**v),
        }
        return cls(**{key: nested[key](value) if key in nested else value for key, value in values.items()})


def _tiny() -> WuerstchenConfig:
    """Every code path of the full model (all block kinds, effnet injection, CFG) at a size a CPU runs in seconds."""
    return WuerstchenConfig(
        prior=PriorConfig(c_in=16, c=32, c_cond=32, c_r=8, depth=2, nhead=2),
        decoder=DecoderConfig(
            c_r=8,
            c_cond=32,
            c_hidden=(16, 32, 32, 32),
            nhead=(-1, 2, 2, 2),
            blocks=(1, 1, 1, 1),
            clip_embd=24,
        ),
        vqgan=VQGANConfig(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=8),
        prior_text=TextEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, vocab_size=1000),
        decoder_text=TextEncoderConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=37, vocab_size=1000),
    )


PRESETS = {
    "wuerstchen-v2": WuerstchenConfig,
    "tiny": _tiny,
}


def preset(name: str) -> WuerstchenConfig:
    """The config of a named preset: `wuerstchen-v2` (the published full-size model) or `tiny`."""
    if name not in PRESETS:
        raise WuerstchenError(f"preset={name!r} is unknown: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
