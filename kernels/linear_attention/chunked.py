"""Linear attention in linear time: the chunked path, and the recurrent form a causal decode carries.

The normalizer rides along as an extra all-ones column of v, so one product yields numerator and denominator
together."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.linear_attention.naive import check, compute_dtype


def _with_ones(v: Tensor, dtype: torch.dtype) -> Tensor:
    """v with an extra all-ones column: attention applied to it sums the weights (the normalizer)."""
    return torch.cat([v.to(dtype), v.new_ones(*v.shape[:-1], 1, dtype=dtype)], dim=-1)


def _normalize(out: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return (out[..., :-1] / (out[..., -1:] + eps)).to(dtype)


def linear_attention_chunked(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6,
                             chunk: int = 64) -> Tensor:
    """Linear time in N. Non-causal: two matmuls through the [F, dv] summary. Causal: chunks of `chunk`
    tokens; a masked product inside each chunk, plus the running summary of all earlier chunks."""
    check(phi_q, phi_k, v)
    if chunk < 1:
        raise ValueError(f"linear_attention: chunk must be positive, got {chunk}")
    dtype = compute_dtype(v)
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


def linear_attention_state(phi_k: Tensor, v: Tensor) -> Tensor:
    """The running sums a causal decode carries: phi_k^T [v, 1] over all tokens, [B, H, F, dv + 1] in fp32 or wider."""
    dtype = compute_dtype(v)
    return phi_k.to(dtype).transpose(-1, -2) @ _with_ones(v, dtype)


def linear_attention_continue(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor | None,
                              eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Causal linear attention of Nq new tokens after the tokens summed in `state` (None: none before):
    (out [B, H, Nq, dv], the new state). The recurrent form of the same maths: within the new tokens a masked
    product (a decode step has one), plus phi_q times the carried sums."""
    check(phi_q, phi_k, v)
    dtype = compute_dtype(v)
    q, k, v1 = phi_q.to(dtype), phi_k.to(dtype), _with_ones(v, dtype)
    n = q.shape[-2]
    causal_mask = torch.ones(n, n, dtype=torch.bool, device=v.device).tril()
    out = (q @ k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0) @ v1
    step = k.transpose(-1, -2) @ v1
    if state is not None:
        out = out + q @ state.to(dtype)
        step = step + state.to(dtype)
    return _normalize(out, eps, v.dtype), step
