"""The exported graphs: one wrapper module and one spec per graph, every shape from `engine.shapes`.

Seven graphs make the pipeline: the two text encoders, the prior's and the decoder's once-per-request
conditioning, their denoising steps, and the VQGAN decode. The antialiased resize of the image
embedding between prior and decoder stays outside (see `engine.models.decoder.resize_image_embeddings`).

Dimensions are symbolic: `batch`, the prior latent `ph`×`pw`, and `dh`×`dw`, the decoder latent over
the decoder's downscale, so that every decoder level, the latent and the image are multiples of it
(`16*dh` is the decoder latent height of v2).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from engine.bundle import GRAPHS
from engine.config import WuerstchenConfig
from engine.models import Decoder, Prior
from engine.models.decoder import injected_levels
from engine.pipeline import WuerstchenPipeline
from engine.shapes import TEXT_TOKENS, Shapes, resolve_dims, symbol_values

Dims = tuple[int | str, ...]


class PriorCondition(nn.Module):
    """CLIP-bigG states → the text keys and values of every prior layer."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.prior = prior

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.prior.condition(text)


class PriorStep(nn.Module):
    """One prior evaluation: latents, noise level and the conditioning → predicted noise (fp32)."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.prior = prior

    def forward(self, x: torch.Tensor, r: torch.Tensor, *text_kv: torch.Tensor) -> torch.Tensor:
        return self.prior(x, r, text_kv)


class DecoderCondition(nn.Module):
    """CLIP-H states and the resized image embedding → per-block text keys and values, then the mapped
    embedding skips, as one flat tuple."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, text: torch.Tensor, *pyramid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decoder.condition(pyramid, text)


class DecoderStep(nn.Module):
    """One decoder evaluation: latents, noise level, text keys and values, embedding skips → noise (fp32)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: torch.Tensor, r: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, r, conditioning)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: Dims
    dtype: torch.dtype


@dataclass(frozen=True)
class GraphSpec:
    """A graph's module, inputs and outputs. The module takes the inputs positionally, in order (those
    past its named parameters through `*varargs`), and returns one tensor or a tuple in output order."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def args(self, feeds: dict[str, torch.Tensor]) -> tuple:
        """The module's positional arguments from tensors keyed by input name."""
        return tuple(feeds[spec.name] for spec in self.inputs)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            result = self.module(*self.args(feeds))
        result = result if isinstance(result, tuple) else (result,)
        return {spec.name: tensor for spec, tensor in zip(self.outputs, result, strict=True)}

    def dynamic_shapes(self, max_sizes: dict[str, int]) -> tuple:
        """torch.export's description of the symbolic dims, with derived dims for `k*symbol`."""
        symbols = {name: torch.export.Dim(name, min=1, max=size) for name, size in max_sizes.items()}

        def dims(spec: TensorSpec) -> dict:
            result = {}
            for axis, dim in enumerate(spec.dims):
                if isinstance(dim, str):
                    factor, _, symbol = dim.rpartition("*")
                    result[axis] = symbols[symbol] * int(factor) if factor else symbols[symbol]
            return result

        # torch.export wants the structure of the signature: the varargs' dims as one tuple.
        flat = [dims(spec) for spec in self.inputs]
        parameters = inspect.signature(self.module.forward).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters):
            return tuple(flat)
        named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
        return (*flat[:named], tuple(flat[named:]))

    def sample(self, config: WuerstchenConfig, shapes: Shapes, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random inputs for the request shapes: noise levels in [0, 1], token ids in the vocabulary
        with a mask over a prefix, image embeddings at the scale the prior produces (±100)."""
        values = symbol_values(config, shapes)
        feeds = {}
        for spec in self.inputs:
            size = resolve_dims(spec.dims, values)
            if spec.name == "input_ids":
                vocab = (config.prior_text if self.name == "prior_text" else config.decoder_text).vocab_size
                feeds[spec.name] = torch.randint(0, vocab, size, generator=generator)
            elif spec.name == "attention_mask":
                lengths = torch.randint(1, TEXT_TOKENS + 1, (size[0], 1), generator=generator)
                feeds[spec.name] = (torch.arange(TEXT_TOKENS)[None] < lengths).long()
            elif spec.name == "r":
                feeds[spec.name] = torch.rand(size, generator=generator).to(spec.dtype)
            else:
                scale = 30.0 if spec.name.startswith("effnet_pyramid") else 1.0
                feeds[spec.name] = (torch.randn(size, generator=generator) * scale).to(spec.dtype)
        return feeds


def _tensors(prefix: str, dims: list[Dims], dtype: torch.dtype) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(f"{prefix}.{i}", d, dtype) for i, d in enumerate(dims))


def graph_specs(pipe: WuerstchenPipeline, names: tuple[str, ...] = GRAPHS) -> dict[str, GraphSpec]:
    """The graphs of a pipeline on the `torch` backend, in the pipeline's dtype: all seven in pipeline order,
    or those named (the pipeline then needs only the stages they wrap)."""
    config, dtype, stages = pipe.config, pipe.dtype, pipe.stages
    prior, decoder = config.prior, config.decoder
    levels = len(decoder.c_hidden)
    scale = [2 ** (levels - 1 - level) for level in range(levels)]  # level size over (dh, dw)

    def level_dims(channels: int, level: int) -> Dims:
        factor = "" if scale[level] == 1 else f"{scale[level]}*"
        return ("batch", channels, f"{factor}dh", f"{factor}dw")

    def text_graph(name: str, width: int, encoder) -> GraphSpec:
        return GraphSpec(
            name, encoder.transformer,
            inputs=(TensorSpec("input_ids", ("batch", TEXT_TOKENS), torch.int64),
                    TensorSpec("attention_mask", ("batch", TEXT_TOKENS), torch.int64)),
            outputs=(TensorSpec("text_states", ("batch", TEXT_TOKENS, width), dtype),),
        )

    prior_kv = _tensors("text_kv", [("batch", TEXT_TOKENS, 2 * prior.c)] * prior.depth, dtype)
    # The decoder's attention blocks run down the U-Net, then up it: their levels in that order.
    attention_levels = [level for level in range(levels)
                        for _ in range(decoder.blocks[level] * decoder.level_config[level].count("A"))]
    decoder_kv = _tensors("text_kv", [("batch", TEXT_TOKENS, 2 * decoder.c_hidden[level])
                                      for level in attention_levels + attention_levels[::-1]], dtype)
    injected = injected_levels(decoder)
    pyramid = _tensors("effnet_pyramid", [level_dims(decoder.effnet_embd, level) for level in injected], dtype)
    effnet = _tensors("effnet", [level_dims(decoder.c_cond, level) for level in injected + injected[::-1]], dtype)
    latents = TensorSpec("latents", ("batch", decoder.c_in, f"{decoder.downscale}*dh", f"{decoder.downscale}*dw"),
                         dtype)
    noise_level = TensorSpec("r", ("batch",), dtype)
    upscale = decoder.downscale * config.vqgan.upscale

    builders = {
        "prior_text": lambda: text_graph("prior_text", config.prior_text.hidden_size, stages.prior_text),
        "prior_condition": lambda: GraphSpec(
            "prior_condition", PriorCondition(stages.prior),
            inputs=(TensorSpec("text", ("batch", TEXT_TOKENS, prior.c_cond), dtype),), outputs=prior_kv),
        "prior_step": lambda: GraphSpec(
            "prior_step", PriorStep(stages.prior),
            inputs=(TensorSpec("x", ("batch", prior.c_in, "ph", "pw"), dtype), noise_level, *prior_kv),
            outputs=(TensorSpec("eps", ("batch", prior.c_in, "ph", "pw"), torch.float32),)),
        "decoder_text": lambda: text_graph("decoder_text", config.decoder_text.hidden_size, stages.decoder_text),
        "decoder_condition": lambda: GraphSpec(
            "decoder_condition", DecoderCondition(stages.decoder),
            inputs=(TensorSpec("text", ("batch", TEXT_TOKENS, decoder.clip_embd), dtype), *pyramid),
            outputs=(*decoder_kv, *effnet)),
        "decoder_step": lambda: GraphSpec(
            "decoder_step", DecoderStep(stages.decoder),
            inputs=(TensorSpec("x", latents.dims, dtype), noise_level, *decoder_kv, *effnet),
            outputs=(TensorSpec("eps", latents.dims, torch.float32),)),
        "vqgan_decode": lambda: GraphSpec(
            "vqgan_decode", stages.vqgan, inputs=(latents,),
            outputs=(TensorSpec("images", ("batch", config.vqgan.out_channels, f"{upscale}*dh", f"{upscale}*dw"),
                                dtype),)),
    }
    return {name: builders[name]() for name in names}

