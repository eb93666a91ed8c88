"""Flash attention, forward only, for Würstchen's attention blocks.

Every attention block of the prior and the decoder attends from the image tokens (Nq = h·w) to the image
tokens followed by the 77 text tokens (Nk = Nq + 77), with head dim 64. Neither length is a multiple of
a block, so the kernel masks both edges. Softmax is online (one pass over the keys) in fp32, with the
1/√d scale folded into a base-2 exponent. The image's keys come from the step's fused projection and the
text's from the projection made once per request; the kernel reads each where it is, one after the
other, so that no step concatenates them.

`attention` is registered as the PyTorch custom op `wuerstchen::attention`, opaque to `torch.compile`
(fullgraph) and `torch.export`. (`torch.library.triton_op` would let inductor see inside, but it does not
recognise kernels run by Triton's CPU interpreter, which is how the tests run this kernel.)
`attention_ref` is the same computation in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import DTYPES, check_device, dot_precision

HEAD_DIMS = (16, 32, 64, 128)  # Würstchen's is 64; the tiny test models' 16


def unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why `attention` cannot run heads of `head_dim` in `dtype`, in one line, or None when it can: the
    envelope that `engine.models.fused.fuse` checks per attention block, so that a block outside it runs its
    reference instead of raising here at its first step."""
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is outside the attention kernel's envelope {HEAD_DIMS}"
    if dtype not in DTYPES:
        return f"dtype {dtype} is outside the attention kernel's envelope {DTYPES}"
    return None


@triton.jit
def _attention_forward(
    Q, K, V, TextK, TextV, Out,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_tkb, stride_tkh, stride_tkn,
    stride_tvb, stride_tvh, stride_tvn,
    stride_ob, stride_oh, stride_on,
    heads, queries, keys, text_keys, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, TEXT: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head), over every key block of K, then of TextK.
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), batch_head % heads  # batch · stride may pass 2³¹
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                mask=rows[:, None] < queries, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, row_max, row_sum = _attend(
        acc, row_max, row_sum, q, K + batch * stride_kb + head * stride_kh, V + batch * stride_vb + head * stride_vh,
        stride_kn, stride_vn, keys, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, UPCAST)
    if TEXT:
        acc, row_max, row_sum = _attend(
            acc, row_max, row_sum, q, TextK + batch * stride_tkb + head * stride_tkh,
            TextV + batch * stride_tvb + head * stride_tvh, stride_tkn, stride_tvn, text_keys, scale_log2, HEAD_DIM,
            BLOCK_N, PRECISION, UPCAST)
    out = acc / row_sum[:, None]
    tl.store(Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_on + dims[None, :],
             out.to(Out.dtype.element_ty), mask=rows[:, None] < queries)


@triton.jit
def _attend(
    acc, row_max, row_sum, q, k_base, v_base, stride_kn, stride_vn, keys, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # The online softmax carried over one source of `keys` keys and values; returns the updated state.
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    for start in range(0, keys, BLOCK_N):
        key = start + cols
        k = tl.load(k_base + key[None, :] * stride_kn + dims[:, None], mask=key[None, :] < keys, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        scores = tl.where(key[None, :] < keys, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(v_base + key[:, None] * stride_vn + dims[None, :], mask=key[:, None] < keys, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: torch.Tensor | None,
           text_v: torch.Tensor | None) -> None:
    """The kernel's envelope: 4-D (B, heads, N, d) tensors, d in `HEAD_DIMS`, of one dtype of `DTYPES` on one
    device, with keys and values of one shape; the text's keys and values as k and v, or neither."""
    if (text_k is None) != (text_v is None):
        raise ValueError("attention: give both text_k and text_v, or neither")
    if text_k is not None:
        _check_pair(q, text_k, text_v)
    _check_pair(q, k, v)


def _check_pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected 4-D (batch, heads, tokens, head dim) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention: head dims {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]} are outside this "
                         f"kernel's envelope: expected one of {HEAD_DIMS} for all three")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"attention: dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of {DTYPES} for all three")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected the same "
                         "batch and heads, and keys and values of one shape")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: tensors on {q.device}, {k.device}, {v.device}: expected one device")
    check_device("attention", q.device)


@torch.library.custom_op("wuerstchen::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: torch.Tensor | None = None,
              text_v: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for q (B, heads, Nq, d) and k, v (B, heads, Nk, d): any Nq and Nk, d in 16, 32,
    64 (Würstchen's) or 128, in fp16, bf16 or fp32. With text_k and text_v (B, heads, Nt, d), the keys and
    values are k then text_k and v then text_v, read where they are instead of concatenated. Returns
    (B, heads, Nq, d) in q's dtype, a view of a token-major (B, Nq, heads, d) buffer; raises ValueError
    outside that envelope."""
    _check(q, k, v, text_k, text_v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    text = text_k is not None
    text_k, text_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (text_k, text_v)) if text else (k, v)
    batch, heads, queries, head_dim = q.shape
    out = _output_like(q)
    precision, upcast = dot_precision(q.dtype)
    block_m, block_n = (64, 64) if q.dtype != torch.float32 else (32, 32)
    grid = (triton.cdiv(queries, block_m), batch * heads)
    _attention_forward[grid](
        q, k, v, text_k, text_v, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *text_k.stride()[:3], *text_v.stride()[:3],
        *out.stride()[:3],
        heads, queries, k.shape[2], text_k.shape[2] if text else 0,
        head_dim**-0.5 * 1.4426950408889634,  # log2(e): exp(x) = exp2(x·log2 e)
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, UPCAST=upcast, TEXT=text,
    )
    return out


@attention.register_fake
def _(q, k, v, text_k=None, text_v=None):
    _check(q, k, v, text_k, text_v)
    return _output_like(q)


def _output_like(q: torch.Tensor) -> torch.Tensor:
    """An empty (B, heads, Nq, d) output laid out as (B, Nq, heads, d): merging the heads back into the
    token matrix (B, Nq, heads·d) that the output projection reads is then a view, not a copy."""
    batch, heads, queries, head_dim = q.shape
    return q.new_empty(batch, queries, heads, head_dim).transpose(1, 2)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_k: torch.Tensor | None = None,
                  text_v: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention in PyTorch: scores and softmax in fp32 (fp64 for fp64 inputs), output in q's dtype."""
    if text_k is not None:
        k, v = torch.cat([k, text_k], dim=2), torch.cat([v, text_v], dim=2)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)
