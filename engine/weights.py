"""Loading the stages from diffusers' folder layout.

A model is built on the meta device, its checkpoint read tensor by tensor (safetensors, sharded
safetensors with an index, or `.bin` through `torch.load(weights_only=True)`, optionally an fp16
variant), renamed from diffusers' names to ours here at the boundary, checked key by key and shape by
shape against the config, and assigned: loading costs the disk read.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import DecoderConfig, PriorConfig, ScheduleConfig, VQGANConfig, WuerstchenConfig
from engine.errors import WuerstchenError
from engine.files import inside
from engine.models.vqgan import ENCODER_PREFIXES
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
    """`model_class(config)` with seeded random weights, the same on every device: each weight matrix
    N(0, 1/fan_in), every other parameter N(0, 0.02²), drawn on the CPU one tensor at a time, and the
    parameters whose names start with a prefix in `shrink` scaled by 0.1.

    None stays zero, unlike the models' training init, so that every layer acts on its input.
    """
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in model_class(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        fan_in = shape[1:].numel() if len(shape) > 1 else 0
        std = (fan_in**-0.5 if fan_in > 1 else 0.02) * (0.1 if key.startswith(shrink) else 1.0)
        state[key] = (torch.randn(shape, generator=generator) * std).to(device=device, dtype=dtype)
    return build_with_weights(model_class, config, state)


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
