"""Prompts to CLIP text states, through transformers' tokenizer and `CLIPTextModel`.

Both stages use `last_hidden_state` of all 77 positions, with the tokenizer's padding and the attention
mask passed to the model, exactly as diffusers' Würstchen pipelines do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn

from engine.config import TextEncoderConfig
from engine.errors import WuerstchenError
from engine.shapes import TEXT_TOKENS


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than CLIP's 77 tokens and was cut."""


class ClipStates(nn.Module):
    """A `CLIPTextModel` as tensors in, tensor out: (input_ids, attention_mask) → last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask).last_hidden_state


class TextEncoder:
    """A tokenizer and a text transformer: a list of prompts → CLIP states (B, 77, width).

    `transformer(input_ids, attention_mask)` returns the states: a `ClipStates` module on the PyTorch
    backend, a graph session on others. Token ids and masks are made on the CPU and moved to `device`.
    """

    def __init__(self, tokenizer, transformer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device):
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.device = device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, 77), int64: padded, truncated with a warning."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
        )
        for prompt in prompts:
            ids = self.tokenizer(prompt).input_ids
            if len(ids) > TEXT_TOKENS:
                kept = self.tokenizer.decode(ids[1:TEXT_TOKENS - 1])
                warnings.warn(
                    f"prompt is longer than CLIP's {TEXT_TOKENS} tokens: its last {len(ids) - TEXT_TOKENS} tokens were "
                    f"cut, after {_ellipsis(kept[-40:])!r}",
                    PromptTruncatedWarning,
                    stacklevel=4,
                )
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        input_ids, attention_mask = self.tokenize(prompts)
        return self.transformer(input_ids.to(self.device), attention_mask.to(self.device))


def _ellipsis(text: str) -> str:
    return text if len(text) < 40 else "…" + text[1:]


def text_encoder_config(folder: Path) -> TextEncoderConfig:
    """The widths of the CLIP text model in `folder` (its config.json), for checking against the stages."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WuerstchenError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text())
        return TextEncoderConfig(**{k: values[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise WuerstchenError(f"config file {path} is not a CLIP text config: {error!r}") from None
    except WuerstchenError as error:
        raise WuerstchenError(f"config file {path}: {error}") from None


def _checkpoint_variant(folder: Path, variant: str | None) -> str | None:
    """transformers loads only the variant it is told; fall back to fp16 files when those are all there is."""
    if variant is not None:
        return variant
    plain = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in plain) and any(folder.glob("*.fp16.*")):
        return "fp16"
    return None


def load_text_encoder(root: Path, device: torch.device, dtype: torch.dtype, variant: str | None = None) -> TextEncoder:
    """The tokenizer and text encoder of a diffusers pipeline folder (`root/tokenizer`, `root/text_encoder`)."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer_folder, model_folder = Path(root) / "tokenizer", Path(root) / "text_encoder"
    for folder in (tokenizer_folder, model_folder):
        if not folder.is_dir():
            raise WuerstchenError(f"folder {folder} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except (OSError, ValueError, TypeError) as error:
        raise WuerstchenError(f"tokenizer in {tokenizer_folder} could not be loaded: {_first_line(error)}") from None
    try:
        with _without_load_reports():  # a mismatch is named below, in one line
            model, info = CLIPTextModel.from_pretrained(
                model_folder, dtype=dtype, variant=_checkpoint_variant(model_folder, variant), output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except Exception as error:  # transformers raises many types for a bad file; all mean the same here
        raise WuerstchenError(
            f"text encoder in {model_folder} could not be loaded (truncated or corrupt file?): {_first_line(error)}"
        ) from None
    if info["missing_keys"] or info["mismatched_keys"]:
        mismatched = [f"{key} {tuple(found)} (expected {tuple(expected)})" for key, found, expected
                      in info["mismatched_keys"]]
        raise WuerstchenError(f"weights in {model_folder} do not match its config.json: missing keys "
                              f"{sorted(info['missing_keys'])[:8]}, mismatched {mismatched[:4]}")
    return TextEncoder(tokenizer, ClipStates(model.to(device)), device)


@contextlib.contextmanager
def _without_load_reports():
    """transformers (5+) logs a multi-line table, the LOAD REPORT, when a checkpoint's keys or shapes differ
    from its config's; here the loader names them in one line instead. Only this thread's reports are held."""
    thread = threading.get_ident()

    def other_than_this_threads_report(record: logging.LogRecord) -> bool:
        return record.thread != thread or "LOAD REPORT" not in record.getMessage()

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(other_than_this_threads_report)
    try:
        yield
    finally:
        logger.removeFilter(other_than_this_threads_report)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def byte_level_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols, with and without CLIP's end-of-word
    mark, and no merges: every character is a token. It stands in for the real 49,408-entry vocabulary
    in the random-weight presets, where no tokenizer files exist."""
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


def random_text_encoder(config: TextEncoderConfig, seed: int, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    """A CLIP text encoder of the given shape with seeded random weights and the byte-level tokenizer."""
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config.to_transformers())
    return TextEncoder(byte_level_tokenizer(), ClipStates(model.to(device=device, dtype=dtype)), device)
