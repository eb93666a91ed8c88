"""Quantized Linears as a transform: `quantize(model, scheme, layers)` swaps chosen Linears of a plain `Prior`
or `Decoder` for `QuantizedLinear`s that hold their weights in 8 bits. The plain model files know nothing of
it, and `fuse` (the fast path) takes a quantized model as it takes a plain one.

Only the Linears of the blocks are candidates (`candidates`): each ResBlock's fc1 and fc2, each AttnBlock's
qkv and out, where nearly all of a step's FLOPs and weights are. What stays in 16 bits whatever a recipe
says: the text and timestep mappers, the input and output projections (the noise heads), the down- and
up-samplers, the embeddings and the norms. Which candidates a model quantizes is a recipe's choice
(`engine.quantization`): all of them, or those a sensitivity scan lets through.

Schemes (`engine.precision.Quantization`):
- fp8: weights float8_e4m3fn with a scale per output channel, activations quantized per row (token) as they
  arrive, fp8 × fp8 products summed in fp32 (`kernels.quant.fp8_linear`, or cuBLASLt's where measured
  faster); needs an sm_89+ GPU (Ada, Hopper).
- int8: weight-only, int8 weights with a scale per output channel widened inside the GEMM, 16-bit
  activations (`kernels.quant.int8_weight_only_linear`); any CUDA GPU.
Both take fp16 or bf16 activations. Off a GPU (and outside Triton's interpreter) the same quantized math runs
in PyTorch (`kernels.quant`'s references, in fp64): correct and slow, for tests and checks only.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from engine.errors import WuerstchenError
from engine.models.blocks import AttnBlock, ResBlock
from engine.precision import Quantization

try:
    from kernels import interpreted
    from kernels.quant import (
        FP8_GEMMS,
        fp8_gemm_for,
        fp8_linear_ref,
        int8_weight_only_linear,
        int8_weight_only_linear_ref,
        quantize_fp8_rows,
        quantize_fp8_rows_ref,
        quantize_weight,
    )
except ImportError as error:
    raise WuerstchenError(f"quantization needs Triton ({error.name} is missing): pip install triton") from None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
# The candidate Linears: (block type, the names of its Linears that may be quantized).
CANDIDATES = ((ResBlock, ("fc1", "fc2")), (AttnBlock, ("qkv", "out")))


class QuantizedLinear(nn.Module):
    """A Linear whose weight (N, K) is 8-bit with a scale per output channel (`scheme`), its bias kept in the
    activations' dtype. Called on x (..., K) fp16/bf16, and optionally a residual (..., N) that its GEMM adds
    in the epilogue: x Wᵀ + b (+ residual), in x's dtype."""

    def __init__(self, linear: nn.Linear, scheme: Quantization):
        super().__init__()
        dtype = linear.weight.dtype
        if dtype not in ACTIVATION_DTYPES:
            raise WuerstchenError(f"quantize={scheme.value!r} with weights in {dtype}: expected a model in fp16 or "
                                  "bf16 (dtype='bf16')")
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        quantized = quantize_weight(linear.weight.detach().float(), scheme.weight_dtype)
        self.register_buffer("w_q", quantized.data)
        self.register_buffer("w_scale", quantized.scale)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        self.dtype = dtype  # of the activations it was made for, and of `weight`

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, 16-bit: for the few uses outside a step (the text keys and values of an
        attention block are projected once per request), made anew on every access."""
        return (self.w_q.float() * self.w_scale).to(self.bias.dtype if self.bias is not None else self.dtype)

    def _apply(self, fn, recurse=True):
        """Moves follow the model; casts (`model.half()`, `.to(torch.bfloat16)`) reach the bias only, never the
        8-bit weight or its fp32 scales."""
        fixed = {id(self.w_q), id(self.w_scale)}

        def apply(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return tensor.to(moved.device) if id(tensor) in fixed and moved.dtype != tensor.dtype else moved

        return super()._apply(apply, recurse)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, add_bias: bool = True) -> torch.Tensor:
        """x Wᵀ (+ b where `add_bias`) (+ residual) for x (..., K); see the class."""
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, k)
        added = None if residual is None else residual.reshape(-1, self.out_features)
        bias = None if self.bias is None or not add_bias else self.bias.to(x.dtype)
        kernels = x.device.type == "cuda" or interpreted()
        if self.scheme is Quantization.FP8:
            if kernels:
                q, scale = quantize_fp8_rows(rows)
                gemm = FP8_GEMMS[fp8_gemm_for(self.out_features, k, x.dtype, x.device)]
                out = gemm(q, scale, self.w_q, self.w_scale, bias, added, out_dtype=x.dtype)
            else:
                q, scale = quantize_fp8_rows_ref(rows)
                out = fp8_linear_ref(q, scale, self.w_q, self.w_scale, bias, added, out_dtype=x.dtype)
        else:
            gemm = int8_weight_only_linear if kernels else int8_weight_only_linear_ref
            out = gemm(rows, self.w_q, self.w_scale, bias, added)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.value}"


def candidates(model: nn.Module) -> list[str]:
    """The qualified names (as in `named_modules`) of the Linears that `quantize` may swap, in model order."""
    names = []
    for prefix, block in model.named_modules():
        for kind, linears in CANDIDATES:
            if isinstance(block, kind):
                names += [f"{prefix}.{name}" if prefix else name for name in linears
                          if isinstance(getattr(block, name), nn.Linear)]
    return names


def quantize(model: nn.Module, scheme: Quantization, layers: Collection[str] | None = None) -> nn.Module:
    """Swap, in place, the candidate Linears named in `layers` (every candidate when None) for
    `QuantizedLinear`s of `scheme`, freeing their 16-bit weights; return the model. A name that is not a
    candidate of this model is a one-line error naming it."""
    allowed = candidates(model)
    chosen = allowed if layers is None else list(layers)
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise WuerstchenError(f"quantize: layers {unknown[:4]}{' …' if len(unknown) > 4 else ''} are not "
                              f"quantizable Linears of this {type(model).__name__}: expected names such as "
                              f"{allowed[:2]}")
    for name in chosen:
        swap(model, name, QuantizedLinear(model.get_submodule(name), scheme))
    return model


def swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where the submodule `name` is; return the one it replaces."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    previous = getattr(parent, attribute)
    setattr(parent, attribute, module)
    return previous


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (the copies a fast path stacks included): its weights in
    memory."""
    tensors = [*model.parameters(), *(buffer for buffer in model.buffers() if buffer is not None)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
