"""Linear attention over feature-mapped queries and keys, and the feature maps that feed it.

With phi_q, phi_k [B, H, N, F] (non-negative features) and v [B, H, N, dv]:

    y_i = phi_q_i^T (sum_j phi_k_j v_j^T) / (phi_q_i^T sum_j phi_k_j + eps)

over all j (non-causal) or j <= i (causal). The normalizer rides along as an extra all-ones column of v,
so one product yields numerator and denominator together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftc.kernels.dispatch import use_reference
from graftc.kernels.flops import formula

__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_continue", "linear_attention_state",
           "elu_plus_one", "relu", "HedgehogFeatureMap"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; float64 stays float64 (tests use it as the truth)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check(phi_q: Tensor, phi_k: Tensor, v: Tensor) -> None:
    if phi_q.dim() != 4 or phi_q.shape != phi_k.shape:
        raise ValueError(f"linear_attention: phi_q {tuple(phi_q.shape)} and phi_k {tuple(phi_k.shape)} "
                         "must both be [B, H, N, F]")
    if v.dim() != 4 or v.shape[:3] != phi_k.shape[:3]:
        raise ValueError(f"linear_attention: v {tuple(v.shape)} must be [B, H, N, dv] "
                         f"matching phi_k {tuple(phi_k.shape)}")
    if v.shape[2] < 1:
        raise ValueError("linear_attention: the sequence is empty")


def _with_ones(v: Tensor, dtype: torch.dtype) -> Tensor:
    """v with an extra all-ones column: attention applied to it sums the weights (the normalizer)."""
    return torch.cat([v.to(dtype), v.new_ones(*v.shape[:-1], 1, dtype=dtype)], dim=-1)


def _normalize(out: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return (out[..., :-1] / (out[..., -1:] + eps)).to(dtype)


def linear_attention_reference(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool,
                               eps: float = 1e-6) -> Tensor:
    """The quadratic form: the full [N, N] weight matrix, masked, normalized. Slow, obviously right."""
    _check(phi_q, phi_k, v)
    dtype = _compute_dtype(v)
    weights = phi_q.to(dtype) @ phi_k.to(dtype).transpose(-1, -2)  # [B, H, N, N]
    if causal:
        n = weights.shape[-1]
        weights = weights.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=v.device).tril(), 0.0)
    numerator = weights @ v.to(dtype)
    denominator = weights.sum(-1, keepdim=True) + eps
    return (numerator / denominator).to(v.dtype)


def linear_attention_chunked(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6,
                             chunk: int = 64) -> Tensor:
    """Linear time in N. Non-causal: two matmuls through the [F, dv] summary. Causal: chunks of `chunk`
    tokens; a masked product inside each chunk, plus the running summary of all earlier chunks."""
    _check(phi_q, phi_k, v)
    if chunk < 1:
        raise ValueError(f"linear_attention: chunk must be positive, got {chunk}")
    dtype = _compute_dtype(v)
    if not causal:
        # The [F, dv + 1] summary: phi_k^T v, and the key sum as its last column (the normalizer), formed
        # without appending a ones column to v (a copy of all of v).
        k = phi_k.to(dtype)
        summary = torch.cat([k.transpose(-1, -2) @ v.to(dtype), k.sum(-2).unsqueeze(-1)], dim=-1)
        return _normalize(phi_q.to(dtype) @ summary, eps, v.dtype)
    q, k, v1 = phi_q.to(dtype), phi_k.to(dtype), _with_ones(v, dtype)

    batch, heads, n, features = q.shape
    size = min(chunk, n)  # a sequence shorter than one chunk is one chunk, unpadded
    n_chunks = -(-n // size)
    pad = n_chunks * size - n
    # Zero padding at the end: padded keys carry no weight, padded queries are cut off below.
    q, k, v1 = (F.pad(t, (0, 0, 0, pad)).reshape(batch, heads, n_chunks, size, -1) for t in (q, k, v1))

    causal_mask = torch.ones(size, size, dtype=torch.bool, device=v.device).tril()
    within = (q @ k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0) @ v1
    summaries = k.transpose(-1, -2) @ v1  # [B, H, c, F, dv + 1], one per chunk
    # Summary of all chunks strictly before each chunk: an inclusive cumsum shifted by one chunk
    # (not cumsum minus self, which would cancel in floating point).
    before = F.pad(summaries.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    out = (within + q @ before).reshape(batch, heads, n_chunks * size, -1)[:, :, :n]
    return _normalize(out, eps, v.dtype).contiguous()


@torch.library.custom_op("graftc::linear_attention", mutates_args=())
def _linear_attention_op(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float,
                         chunk: int) -> Tensor:
    return _run(phi_q, phi_k, v, causal, eps, chunk).contiguous()


def _run(phi_q, phi_k, v, causal, eps, chunk):
    """The implementation the current GRAFTC_KERNELS mode selects."""
    if use_reference():
        return linear_attention_reference(phi_q, phi_k, v, causal, eps)
    # No Triton kernel here yet: CUDA tensors and GRAFTC_KERNELS=triton take the chunked path too.
    return linear_attention_chunked(phi_q, phi_k, v, causal, eps, chunk)


@_linear_attention_op.register_fake
def _(phi_q, phi_k, v, causal, eps, chunk):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@formula(torch.ops.graftc.linear_attention)
def _linear_attention_flops(phi_q, phi_k, v, causal, eps, chunk, **kwargs) -> int:
    """Non-causal: phi_k^T [v, 1] then phi_q times it. Causal adds the masked product within each chunk."""
    batch, heads, tokens, features = phi_q
    values = v[-1] + 1  # the normalizer rides along as one more value column
    flops = 4 * batch * heads * tokens * features * values
    if causal:
        flops += 2 * batch * heads * tokens * min(chunk, tokens) * (features + values)
    return flops


def _setup_context(ctx, inputs, output):
    phi_q, phi_k, v, causal, eps, chunk = inputs
    ctx.save_for_backward(phi_q, phi_k, v)
    ctx.options = (causal, eps, chunk)


def _backward(ctx, grad):
    """Recompute the forward under torch.func.vjp: nothing chunk-sized is kept between forward and
    backward (like activation checkpointing), at the price of one extra forward."""
    _, vjp = torch.func.vjp(lambda q, k, v: _run(q, k, v, *ctx.options), *ctx.saved_tensors)
    return (*vjp(grad), None, None, None)


_linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6,
                     chunk: int = 64) -> Tensor:
    """Linear attention as one op (torch.ops.graftc.linear_attention): the chunked path, or the
    quadratic reference under GRAFTC_KERNELS=reference. Returns [B, H, N, dv] in v's dtype."""
    _check(phi_q, phi_k, v)
    return torch.ops.graftc.linear_attention(phi_q, phi_k, v, causal, eps, chunk)


def linear_attention_state(phi_k: Tensor, v: Tensor) -> Tensor:
    """The running sums a causal decode carries: phi_k^T [v, 1] over all tokens, [B, H, F, dv + 1] in fp32 or wider."""
    dtype = _compute_dtype(v)
    return phi_k.to(dtype).transpose(-1, -2) @ _with_ones(v, dtype)


def linear_attention_continue(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor | None,
                              eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Causal linear attention of Nq new tokens after the tokens summed in `state` (None: none before):
    (out [B, H, Nq, dv], the new state). The recurrent form of the same maths: within the new tokens a masked
    product (a decode step has one), plus phi_q times the carried sums."""
    _check(phi_q, phi_k, v)
    dtype = _compute_dtype(v)
    q, k, v1 = phi_q.to(dtype), phi_k.to(dtype), _with_ones(v, dtype)
    n = q.shape[-2]
    causal_mask = torch.ones(n, n, dtype=torch.bool, device=v.device).tril()
    out = (q @ k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0) @ v1
    step = k.transpose(-1, -2) @ v1
    if state is not None:
        out = out + q @ state.to(dtype)
        step = step + state.to(dtype)
    return _normalize(out, eps, v.dtype), step


def elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1: positive, and linear (not saturating) for x > 0 (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


def relu(x: Tensor) -> Tensor:
    """max(x, 0): non-negative and sparse; an all-negative query gets all-zero weights (output 0)."""
    return F.relu(x)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learnable feature map (Zhang et al. 2024), trained to make linear attention mimic softmax.

    Per head h, with W_h [d, d] (identity at init) and b_h [d] (zero at init), a token x in R^d maps to

        z = x W_h + b_h,    phi(x) = softmax([z, -z])   in R^{2d}

    i.e. phi(x)_i is proportional to exp(z_i) for i < d and to exp(-z_{i-d}) after. Then phi(q) . phi(k)
    is a sum of exp(+-(z_q,i + z_k,i)): positive and spiky like softmax attention's exp(q . k), which a
    fixed map such as elu + 1 cannot be. The softmax is the numerically safe way to take those
    exponentials: its per-token normalizer cancels for queries (linear attention divides by the
    query's total weight) and acts as a learned per-key weight for keys.

    Input [B, H, N, d] -> features [B, H, N, 2d], all positive.
    """

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))  # [H, d, d]
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor, scale: float | None = None) -> Tensor:
        """phi(x * scale) (scale folded into the [d, d] weights, not applied to x). [z, -z] comes out of one
        GEMM against [W, -W] with bias [b, -b]: twice the FLOPs of x W (counted as such), but no negation and
        concatenation passes over the [.., N, 2d] activations."""
        weight = self.weight if scale is None else self.weight * scale
        weight = torch.cat([weight, -weight], dim=-1)  # [H, d, 2d]
        bias = torch.cat([self.bias, -self.bias], dim=-1)[:, None, :]  # [H, 1, 2d]
        if x.dim() == 4 and x.shape[0] == 1 and x.shape[1] == weight.shape[0]:
            # [1, H, N, d]: one batched GEMM over the heads, reading x where it lies: BLAS takes a strided view
            # of the qkv projection (row stride 3 H d) as it is, where flattening it below would copy it.
            return torch.softmax(torch.baddbmm(bias, x[0], weight), dim=-1)[None]
        if x.dim() == 4 and x.shape[1] == weight.shape[0]:  # [B, H, N, d]: one batched GEMM with the bias fused
            batch, heads, tokens, dim = x.shape
            z = torch.baddbmm(bias.expand(batch, -1, -1, -1).reshape(batch * heads, 1, -1),
                              x.reshape(batch * heads, tokens, dim),
                              weight.expand(batch, -1, -1, -1).reshape(batch * heads, dim, -1))
            z = z.view(batch, heads, tokens, -1)
        else:
            z = x @ weight + bias
        return torch.softmax(z, dim=-1)

    def extra_repr(self) -> str:
        heads, head_dim, _ = self.weight.shape
        return f"head_dim={head_dim}, heads={heads}"
