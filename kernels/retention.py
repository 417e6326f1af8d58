"""Retention (RetNet, Sun et al. 2023): causal linear attention whose past decays by a fixed factor per head.

With q, k [B, H, N, dk], v [B, H, N, dv] and per head h a decay gamma_h in (0, 1), given as log_decay [H]:

    y_i = sum_{j <= i} gamma^(i - j) (q_i . k_j) v_j

Three forms of the same sum: the parallel form (the [N, N] matrix, `retention_reference`), the chunkwise form (the
parallel form inside chunks of `chunk` tokens, plus a [dk, dv] state carried from chunk to chunk: linear in N), and
the recurrent form a decode step runs (S <- gamma S + k v^T, y = q S). The op `graftc::retention` runs the chunkwise
form, or the parallel one under GRAFTC_KERNELS=reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.family import Family, recompute

__all__ = ["retention", "retention_reference", "retention_chunked", "retention_state", "retention_continue",
           "retnet_log_decay"]


def retnet_log_decay(heads: int, device=None) -> Tensor:
    """log gamma_h for gamma_h = 1 - 2^(-5-h), h = 0..heads-1 (RetNet's multi-scale decays: memories of about 32
    to 2^(4+heads) tokens), in float32; computed in float64 since gamma is within 2^-20 of 1 for the slowest heads."""
    exponents = -5.0 - torch.arange(heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(exponents)).float()


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; float64 stays float64 (tests use it as the truth)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"retention: q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B, H, N, dk]")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"retention: v {tuple(v.shape)} must be [B, H, N, dv] matching k {tuple(k.shape)}")
    if log_decay.shape != (q.shape[1],):
        raise ValueError(f"retention: log_decay {tuple(log_decay.shape)} must hold one value per head ({q.shape[1]})")
    if v.shape[2] < 1:
        raise ValueError("retention: the sequence is empty")


def _powers(log_decay: Tensor, exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """gamma_h ^ e for every head h and exponent e: [H, *exponents.shape]."""
    return torch.exp(log_decay.to(dtype).view(-1, *([1] * exponents.dim())) * exponents.to(dtype))


def _decay_matrix(log_decay: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """[H, n, n]: gamma^(i - j) where j <= i, else 0."""
    steps = torch.arange(n, device=log_decay.device)
    distance = steps[:, None] - steps[None, :]
    return _powers(log_decay, distance.clamp(min=0), dtype) * (distance >= 0)


def retention_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """The parallel form: (q k^T * D) v with the [N, N] decay mask D. Slow, obviously right."""
    _check(q, k, v, log_decay)
    dtype = _compute_dtype(v)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * _decay_matrix(log_decay, q.shape[-2], dtype)
    return (scores @ v.to(dtype)).to(v.dtype)


def retention_chunked(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk: int = 64,
                      state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunkwise form, after the tokens summarized in `state` ([B, H, dk, dv], None: none before):
    (y [B, H, N, dv] in v's dtype, the state after the last token in fp32 or wider)."""
    _check(q, k, v, log_decay)
    if chunk < 1:
        raise ValueError(f"retention: chunk must be positive, got {chunk}")
    dtype = _compute_dtype(v)
    batch, heads, n, dk = q.shape
    size = min(chunk, n)  # a sequence shorter than one chunk is one chunk, unpadded
    n_chunks = -(-n // size)
    # Zero padding at the end: padded keys add nothing, padded queries are cut off below.
    q, k, v = (F.pad(t.to(dtype), (0, 0, 0, n_chunks * size - n)).reshape(batch, heads, n_chunks, size, -1)
               for t in (q, k, v))
    steps = torch.arange(size, device=q.device)
    within = ((q @ k.transpose(-1, -2)) * _decay_matrix(log_decay, size, dtype)[:, None]) @ v
    # Chunk c's own contribution to the state after it: its keys decayed to its last token.
    to_end = _powers(log_decay, size - 1 - steps, dtype)[None, :, None, :, None]  # [1, H, 1, size, 1]
    summaries = (k * to_end).transpose(-1, -2) @ v  # [B, H, c, dk, dv]
    whole = _powers(log_decay, torch.tensor(size, device=q.device), dtype).view(1, heads, 1, 1)
    before = []  # the state entering each chunk: S <- gamma^size S + summary (c steps of [dk, dv] each)
    carried = q.new_zeros(batch, heads, dk, v.shape[-1]) if state is None else state.to(dtype)
    for c in range(n_chunks):
        before.append(carried)
        carried = whole * carried + summaries[:, :, c]
    # A query i steps into its chunk sees the entering state decayed i + 1 times.
    from_start = _powers(log_decay, steps + 1, dtype)[None, :, None, :, None]
    y = within + (q * from_start) @ torch.stack(before, 2)
    y = y.reshape(batch, heads, n_chunks * size, -1)[:, :, :n]
    last = n - (n_chunks - 1) * size  # real tokens in the last chunk: the state after them, not after its padding
    if last < size:
        decayed = _powers(log_decay, torch.tensor(last, device=q.device), dtype).view(1, heads, 1, 1) * before[-1]
        to_last = _powers(log_decay, last - 1 - steps[:last], dtype)[None, :, :, None]
        carried = decayed + (k[:, :, -1, :last] * to_last).transpose(-1, -2) @ v[:, :, -1, :last]
    return y.to(v.dtype).contiguous(), carried


def _flops(q, k, v, log_decay, chunk, **kwargs) -> int:
    """Within chunks: q k^T and its product with v over size x size pairs; across chunks: each chunk's keys into
    its summary, and each query against the state entering its chunk ([dk, dv] each)."""
    batch, heads, tokens, dk = q
    size = min(chunk, tokens)
    return 2 * batch * heads * tokens * (size * (dk + v[-1]) + 2 * dk * v[-1])


retention_op = Family(
    "retention", "(Tensor q, Tensor k, Tensor v, Tensor log_decay, int chunk) -> Tensor",
    reference=lambda q, k, v, log_decay, chunk: retention_reference(q, k, v, log_decay),
    torch=lambda q, k, v, log_decay, chunk: retention_chunked(q, k, v, log_decay, chunk)[0],
    fake=lambda q, k, v, log_decay, chunk: torch.empty_like(v, memory_format=torch.contiguous_format),
    flops=_flops, backward=recompute)


def retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk: int = 64) -> Tensor:
    """Causal retention as one op (torch.ops.graftc.retention): [B, H, N, dv] in v's dtype."""
    _check(q, k, v, log_decay)
    return retention_op(q, k, v, log_decay, chunk)


def retention_state(k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """The state a decode carries after N tokens: sum_j gamma^(N-1-j) k_j v_j^T, [B, H, dk, dv] in fp32 or wider."""
    dtype = _compute_dtype(v)
    n = k.shape[-2]
    to_end = _powers(log_decay, torch.arange(n - 1, -1, -1, device=k.device), dtype)[None, :, :, None]
    return (k.to(dtype) * to_end).transpose(-1, -2) @ v.to(dtype)


def retention_continue(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None,
                       chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Retention of new tokens after those summarized in `state`: (y, the new state). One token (a decode step) is
    the recurrent form: S <- gamma S + k v^T, y = q S."""
    _check(q, k, v, log_decay)
    if q.shape[-2] > 1:
        return retention_chunked(q, k, v, log_decay, chunk, state)
    dtype = _compute_dtype(v)
    gamma = torch.exp(log_decay.to(dtype)).view(1, -1, 1, 1)
    step = k.to(dtype).transpose(-1, -2) @ v.to(dtype)
    state = step if state is None else gamma * state.to(dtype) + step
    return (q.to(dtype) @ state).to(v.dtype), state
