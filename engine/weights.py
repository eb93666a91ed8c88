"""Loading the stages from diffusers' folder layout.

A model is built on the meta device, its checkpoint read tensor by tensor (safetensors, sharded
safetensors with an index, or `.bin` through `torch.load(weights_only=True)`, optionally an fp16
variant), renamed from diffusers' names to ours here at the boundary, checked key by key and shape by
shape against the config, and assigned: loading costs the disk read.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import DecoderConfig, PriorConfig, ScheduleConfig, VQGANConfig, WuerstchenConfig
from engine.errors import WuerstchenError
from engine.files import inside
from engine.models import Decoder, Prior, VQGANDecoder
from engine.models.blocks import AttnBlock, TimestepBlock
from engine.models.decoder import resize_image_embeddings
from engine.models.vqgan import ENCODER_PREFIXES
from engine.recipe import Recipe
from engine.shapes import TEXT_TOKENS
from engine.text import text_encoder_config

WEIGHTS_NAME = "diffusion_pytorch_model"

# diffusers name → our name, applied in order. Attention projections to_q, to_k, to_v are stacked
# into one `qkv` tensor afterwards (see `_stack_qkv`).
_RESBLOCK_RENAMES = [
    (r"\.channelwise\.0\.", ".fc1."),
    (r"\.channelwise\.2\.", ".grn."),
    (r"\.channelwise\.4\.", ".fc2."),
]
_ATTENTION_RENAMES = [
    (r"\.kv_mapper\.1\.", ".kv_mapper."),
    (r"\.attention\.to_out\.0\.", ".out."),
]
_PRIOR_LAYER_PARTS = ("res", "time", "attn")
RENAMES: dict[str, list[tuple[str, str | Callable[[re.Match], str]]]] = {
    # diffusers keeps the prior's blocks in one flat list: ResBlock, TimestepBlock, AttnBlock, ResBlock, ...
    "prior": [
        (r"^blocks\.(\d+)\.", lambda m: f"layers.{int(m[1]) // 3}.{_PRIOR_LAYER_PARTS[int(m[1]) % 3]}."),
        *_RESBLOCK_RENAMES,
        *_ATTENTION_RENAMES,
    ],
    "decoder": [*_RESBLOCK_RENAMES, *_ATTENTION_RENAMES],
    "vqgan": [
        (r"\.depthwise\.1\.", ".depthwise."),
        (r"\.channelwise\.0\.", ".fc1."),
        (r"\.channelwise\.2\.", ".fc2."),
    ],
}
_QKV = re.compile(r"^(.*)\.attention\.to_([qkv])\.(weight|bias)$")


def translate_state_dict(stage: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict of `stage` ("prior", "decoder" or "vqgan") under our module names."""
    return _stack_qkv({_rename_key(stage, key): tensor for key, tensor in state.items()})


def _rename_key(stage: str, key: str) -> str:
    for pattern, replacement in RENAMES[stage]:
        key = re.sub(pattern, replacement, key)
    return key


def _stack_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each complete to_q, to_k, to_v triple by one `qkv` tensor; leave incomplete ones as they are
    so that the key check reports them."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in state:
        if match := _QKV.match(key):
            groups.setdefault((match[1], match[3]), {})[match[2]] = key
    for (prefix, kind), parts in groups.items():
        if len(parts) == 3:
            state[f"{prefix}.qkv.{kind}"] = torch.cat([state.pop(parts[p]) for p in "qkv"])
    return state


def _checkpoint_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight files of one component folder, for a variant or, failing plain files, the fp16 variant."""
    if not folder.is_dir():
        raise WuerstchenError(f"folder {folder} does not exist")
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        tag = f".{v}" if v else ""
        for single, index in (
            (f"{WEIGHTS_NAME}{tag}.safetensors", f"{WEIGHTS_NAME}.safetensors.index{tag}.json"),
            (f"{WEIGHTS_NAME}{tag}.bin", f"{WEIGHTS_NAME}.bin.index{tag}.json"),
        ):
            if (folder / single).is_file():
                return [folder / single]
            if (folder / index).is_file():
                return _shards(folder / index)
    wanted = f"{WEIGHTS_NAME}{'.' + variant if variant else ''}.safetensors"
    raise WuerstchenError(
        f"no weights in {folder}: expected {wanted}, a sharded .safetensors index or a .bin file"
    )


def _shards(index: Path) -> list[Path]:
    """The shard files an index names, each a file inside the index's own folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise WuerstchenError(f"shard index {index} is not valid: expected JSON with a weight_map ({error})") from None
    names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    if not names or not all(isinstance(name, str) for name in names):
        raise WuerstchenError(f"shard index {index}: weight_map is not an object of tensor names to shard files")
    shards = [inside(index.parent, name, f"shard index {index}: a shard") for name in sorted(names)]
    for shard in shards:
        if not shard.is_file():
            raise WuerstchenError(f"shard {shard} listed in {index.name} does not exist")
    return shards


def _read_tensors(
    path: Path, wanted: Callable[[str], bool], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one file whose key passes `wanted`; a truncated or corrupt file is a one-line error."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if wanted(key):
                        yield key, f.get_tensor(key)
        else:
            state = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(state, dict):
                raise WuerstchenError(f"weight file {path} holds a {type(state).__name__}, expected a state dict")
            yield from ((k, v) for k, v in state.items() if wanted(k))
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WuerstchenError(f"weight file {path} is truncated or corrupt: {reason}") from None


def _describe_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', … {len(keys) - limit} more' if len(keys) > limit else ''}]"


def load_stage(
    stage: str,
    model_class: Callable[..., nn.Module],
    config,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    variant: str | None = None,
) -> nn.Module:
    """Build `model_class(config)` with the weights in `folder` (a diffusers component folder).

    `stage` is "prior", "decoder" or "vqgan" and selects the name translation. Raises a one-line
    `WuerstchenError` naming the file or the mismatching keys when the weights do not fit the config.
    """
    folder = Path(folder)
    files = _checkpoint_files(folder, variant)

    def wanted(key: str) -> bool:
        return not (stage == "vqgan" and key.startswith(ENCODER_PREFIXES))

    checkpoint = {key: tensor.to(dtype) for path in files for key, tensor in _read_tensors(path, wanted, device)}
    return build_with_weights(model_class, config, translate_state_dict(stage, checkpoint),
                              source=f"weights in {folder} do not match {folder / 'config.json'}")


def build_with_weights(
    model_class: Callable[..., nn.Module], config, state: dict[str, torch.Tensor], source: str = "weights"
) -> nn.Module:
    """`model_class(config)` built on the meta device and given `state` (our names) without a copy.

    Every key and shape is checked first; `source` begins the one-line error that lists what differs.
    """
    with torch.device("meta"):
        model = model_class(config)
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise WuerstchenError(
            f"{source}: missing keys {_describe_keys(missing)}, unexpected keys {_describe_keys(unexpected)}"
        )
    wrong = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(s)} by the config"
             for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise WuerstchenError(f"{source}: {_describe_keys(wrong, 3)}")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def random_stage(
    model_class: Callable[..., nn.Module], config, seed: int, device: torch.device, dtype: torch.dtype,
    shrink: tuple[str, ...] = (),
) -> nn.Module:
    """`model_class(config)` with seeded random weights, the same on every device: drawn on the CPU in fp32
    from one generator, tensor by tensor, `calibrate`d there, then moved to `device` and `dtype`.

    Each weight matrix is N(0, 1/fan_in) and every other parameter N(0, 0.02²), so that every layer acts on
    its input (the models' training init leaves some at zero). Some are drawn otherwise, because plain draws
    would leave a picture nothing to show:
    - those whose names start with a prefix in `shrink`, and the timestep blocks' mappers, are scaled by 0.1
      (a random timestep mapping makes every denoising step a different network);
    - the attention blocks' text mappers (`kv_mapper`) are scaled by `TEXT_GAIN`: the random text encoders
      give different prompts nearly the same states (most of the 77 are padding), and the stages must still
      tell them apart for the prompt to change the picture;
    - an up-sampler's taps share one draw: a transposed conv is one channel mix times a nearest (kernel =
      stride) or linear (kernel = 2·stride) interpolation kernel, and a conv before a pixel shuffle gives
      every sub-pixel of a channel the same weights (random taps tile the image with the up-sampler's period).
    """
    with torch.device("meta"):
        skeleton = model_class(config)
    scales = {prefix: 0.1 for prefix in shrink}
    for name, module in skeleton.named_modules():
        if isinstance(module, TimestepBlock):
            scales[f"{name}.mapper."] = 0.1
        elif isinstance(module, AttnBlock):
            scales[f"{name}.kv_mapper.weight"] = TEXT_GAIN
    shared_taps = _shared_tap_draws(skeleton)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in skeleton.state_dict().items():
        shape = tensor.shape
        fan_in = shape[1:].numel() if len(shape) > 1 else 0
        std = (fan_in**-0.5 if fan_in > 1 else 0.02) * math.prod(
            scale for prefix, scale in scales.items() if key.startswith(prefix))
        state[key] = shared_taps.get(key, _plain_draw)(shape, std, generator)
    model = build_with_weights(model_class, config, state)
    calibrate(model, generator)
    return model.to(device=device, dtype=dtype)


TEXT_GAIN = 16.0  # the attention blocks' text mappers, against a plain draw (see `random_stage`)


Draw = Callable[[torch.Size, float, torch.Generator], torch.Tensor]


def _plain_draw(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def _shared_tap_draws(model: nn.Module) -> dict[str, Draw]:
    """How to draw the parameters of each up-sampler in `model` (see `random_stage`), by state-dict key."""
    draws = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ConvTranspose2d) and module.groups == 1:
            kernel = _interpolation_kernel(module.kernel_size, module.stride)
            if kernel is not None:
                draws[f"{name}.weight"] = _transposed_draw(kernel)
        if isinstance(module, nn.Sequential):
            for index, (conv, shuffle) in enumerate(itertools.pairwise(module)):
                if isinstance(conv, nn.Conv2d) and isinstance(shuffle, nn.PixelShuffle):
                    for parameter in ("weight", "bias"):
                        draws[f"{name}.{index}.{parameter}"] = _sub_pixel_draw(shuffle.upscale_factor)
    return draws


def _interpolation_kernel(kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor | None:
    """The 2-D taps of nearest (kernel = stride) or linear (kernel = 2·stride) interpolation, which sum to 1 at
    every output pixel; None for any other transposed conv."""
    sides = []
    for k, s in zip(kernel, stride, strict=True):
        if k not in (s, 2 * s):
            return None
        sides.append(torch.ones(k) if k == s else 1 - (torch.arange(k) - (k - 1) / 2).abs() / s)
    return sides[0][:, None] * sides[1][None, :]


def _transposed_draw(kernel: torch.Tensor) -> Draw:
    def draw(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
        in_channels, out_channels = shape[:2]
        mix = torch.randn(in_channels, out_channels, 1, 1, generator=generator) * in_channels**-0.5
        return mix * kernel
    return draw


def _sub_pixel_draw(factor: int) -> Draw:
    def draw(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
        channels = shape[0] // factor**2
        one = torch.randn(channels, 1, *shape[1:], generator=generator) * std
        return one.expand(channels, factor**2, *shape[1:]).reshape(shape)
    return draw


# What `calibrate` aims the random stages at, and what it runs them on.
HEAD_STD = {Prior: 0.25, Decoder: 1.0}  # spread of the denoisers' clean-latent half of the head
EMBEDDING_STD = 20.0  # about the spread of the calibrated prior's image embeddings (latents × 42 − 1)
LATENT_STD = 1.0  # the spread of the latents the VQGAN is calibrated on
IMAGE_MEAN, IMAGE_STD = 0.5, 0.2  # each colour of the VQGAN's image, before clamping to [0, 1]
NOISE_LEVELS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75)  # one calibration input at each


@torch.no_grad()
def calibrate(model: nn.Module, generator: torch.Generator) -> None:
    """Rescale the output head of a random-weight Prior, Decoder or VQGANDecoder (other models are left as they
    are) so that its output has a spread the next stage can use and a picture shows, measured on calibration
    inputs drawn from `generator`: deterministic, the same seed gives the same weights. Without it the
    denoisers' heads are too weak to steer sampling (the sample is the sampler's own noise) and the VQGAN's
    image is nearly black; with it the random-weight demo shows shapes and colours that follow the seed and
    the prompt. It gives the weights no meaning: the pictures are still not of anything.

    Each calibration input holds, per noise level in `NOISE_LEVELS`: standard normal latents; text states that
    are one standard normal vector repeated at all 77 tokens (as the random text encoders' states nearly are);
    for the decoder, a smooth image embedding of spread `EMBEDDING_STD`. The first half of a denoiser's head
    (what its noise prediction subtracts from the latents) is scaled and shifted to mean 0 and spread
    `HEAD_STD`, the prior's as guided by the published recipe (guidance 4, against a second text). The VQGAN
    decodes smooth latents of spread `LATENT_STD`; each colour is scaled and shifted to mean `IMAGE_MEAN`
    and spread `IMAGE_STD`.
    """
    count = len(NOISE_LEVELS)
    noise_levels = torch.tensor(NOISE_LEVELS)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def text(width: int) -> torch.Tensor:
        return randn(count, 1, width)

    def at_every_token(conditioning: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Conditioning computed from one token's states, as from 77 tokens of the same state: it is computed
        token by token, so the text's keys and values are only repeated (the rest, image maps, is kept)."""
        return tuple(c.expand(-1, TEXT_TOKENS, -1) if c.dim() == 3 else c for c in conditioning)

    def smooth(channels: int, side: int) -> torch.Tensor:
        """A per-channel offset plus a pattern interpolated from a 4×4 grid, each of spread 1/√2: a colour
        and shapes, as latents and image embeddings have them."""
        pattern = F.interpolate(randn(count, channels, 4, 4), size=(side, side), mode="bicubic")
        return (randn(count, channels, 1, 1) + pattern / pattern.std()) / math.sqrt(2)

    if isinstance(model, Prior):
        config, guidance = model.config, Recipe().prior_guidance
        latents = randn(count, config.c_in, 4, 4)
        conditioning = at_every_token(model.condition(torch.cat([text(config.c_cond), text(config.c_cond)])))
        heads = _head_outputs(model.out[1], lambda: model(latents.repeat(2, 1, 1, 1), noise_levels.repeat(2),
                                                          conditioning))
        prompted, negative = heads.chunk(2)
        _standardize(model.out[1], torch.lerp(negative, prompted, guidance), config.c_in, 1, 0.0, HEAD_STD[Prior])
    elif isinstance(model, Decoder):
        config = model.config
        side = config.downscale
        levels = tuple((side // (config.patch_size * 2**i),) * 2 for i in range(len(config.c_hidden)))
        pyramid = resize_image_embeddings(smooth(config.effnet_embd, 8) * EMBEDDING_STD, config, levels)
        conditioning = at_every_token(model.condition(pyramid, text(config.clip_embd)))
        heads = _head_outputs(model.clf[1], lambda: model(randn(count, config.c_in, side, side), noise_levels,
                                                          conditioning))
        rows = config.c_out * config.patch_size**2
        _standardize(model.clf[1], heads, rows, config.patch_size**2, 0.0, HEAD_STD[Decoder])
    elif isinstance(model, VQGANDecoder):
        config = model.config
        latents = smooth(config.latent_channels, 16) * LATENT_STD
        heads = _head_outputs(model.out_block[0], lambda: model(latents))
        factor = config.up_down_scale_factor
        _standardize(model.out_block[0], heads, config.out_channels * factor**2, factor**2, IMAGE_MEAN, IMAGE_STD)


def _head_outputs(head: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """Every output of `head` while `run()` runs, concatenated along the batch."""
    outputs = []
    hook = head.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        run()
    finally:
        hook.remove()
    return torch.cat(outputs)


def _standardize(head: nn.Conv2d, outputs: torch.Tensor, rows: int, group: int, mean: float, std: float) -> None:
    """Scale and shift the first `rows` output channels of `head` so that each group of `group` consecutive
    channels (one channel after a pixel shuffle) would have had mean `mean` and spread `std` in `outputs`."""
    values = outputs[:, :rows].transpose(0, 1).reshape(rows // group, -1)
    scale = (std / values.std(dim=1)).repeat_interleave(group)
    shift = mean - values.mean(dim=1).repeat_interleave(group) * scale
    head.weight[:rows] *= scale.view(-1, *[1] * (head.weight.dim() - 1))
    head.bias[:rows] = head.bias[:rows] * scale + shift


# The pipelines' constants in model_index.json: the prior's three, then the decoder's.
CONSTANTS = ("latent_mean", "latent_std", "resolution_multiple", "latent_dim_scale")
PRIOR_LAYOUT = ("prior", "text_encoder", "tokenizer", "scheduler")  # warp-ai/wuerstchen-prior
DECODER_LAYOUT = ("decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")  # warp-ai/wuerstchen


def check_layout(root: Path, field: str, subfolders: tuple[str, ...], repository: str) -> Path:
    """`root` as a diffusers pipeline folder with `model_index.json` and the given component folders."""
    root = Path(root)
    if not root.is_dir():
        raise WuerstchenError(f"{field}={str(root)!r}: folder does not exist")
    for name in ("model_index.json", *subfolders):
        if not (root / name).exists():
            raise WuerstchenError(
                f"{field}={str(root)!r}: {root / name} does not exist; expected the layout of {repository} "
                f"(model_index.json, {', '.join(f'{s}/' for s in subfolders)})"
            )
    return root


def read_model_index(root: Path) -> dict:
    path = Path(root) / "model_index.json"
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WuerstchenError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise WuerstchenError(f"{path}: expected a JSON object")
    return values


def read_config(prior: str | Path, decoder: str | Path) -> WuerstchenConfig:
    """The configs in two diffusers folders (warp-ai/wuerstchen-prior and warp-ai/wuerstchen layouts),
    checked against each other; reads no weights."""
    prior_root = check_layout(prior, "prior", PRIOR_LAYOUT, "warp-ai/wuerstchen-prior")
    decoder_root = check_layout(decoder, "decoder", DECODER_LAYOUT, "warp-ai/wuerstchen")
    prior_index, decoder_index = read_model_index(prior_root), read_model_index(decoder_root)
    defaults = WuerstchenConfig.__dataclass_fields__
    for root, index, keys in ((prior_root, prior_index, CONSTANTS[:3]), (decoder_root, decoder_index, CONSTANTS[3:])):
        for key in keys:
            value = index.get(key, defaults[key].default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise WuerstchenError(f"{root / 'model_index.json'}: {key}={value!r}: expected a positive number")
    return WuerstchenConfig(
        prior=PriorConfig.from_json(prior_root / "prior" / "config.json"),
        decoder=DecoderConfig.from_json(decoder_root / "decoder" / "config.json"),
        vqgan=VQGANConfig.from_json(decoder_root / "vqgan" / "config.json"),
        prior_text=text_encoder_config(prior_root / "text_encoder"),
        decoder_text=text_encoder_config(decoder_root / "text_encoder"),
        prior_schedule=ScheduleConfig.from_json(prior_root / "scheduler" / "scheduler_config.json"),
        decoder_schedule=ScheduleConfig.from_json(decoder_root / "scheduler" / "scheduler_config.json"),
        # The pipelines' own constants, as diffusers' WuerstchenPriorPipeline and DecoderPipeline store them.
        **{key: index.get(key, defaults[key].default) for index, keys in (
            (prior_index, CONSTANTS[:3]), (decoder_index, CONSTANTS[3:])) for key in keys},
    )
