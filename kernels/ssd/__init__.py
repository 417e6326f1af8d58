"""Mamba-2's scalar-decay state space (SSD) as one op, `graftc::ssd`. The maths is in naive.py; chunked.py is the
path every device runs and the one gradients come from, rank_one.py the faster forward for CPU tensors (no Triton
kernel yet)."""
from __future__ import annotations

import torch
from torch import Tensor

from graftc.kernels.family import Family, recompute
from graftc.kernels.ssd.chunked import ssd_chunked
from graftc.kernels.ssd.naive import check, compute_dtype, ssd_reference
from graftc.kernels.ssd.rank_one import ssd_fast

__all__ = ["ssd", "ssd_reference"]


def _fake(x, dt, A, B, C, D, chunk, initial_state):
    batch, _, heads, head_dim = x.shape
    state = x.new_empty(batch, heads, B.shape[3], head_dim, dtype=compute_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), state


def _flops(x, dt, A, B, C, D, chunk, initial_state, **kwargs) -> int:
    """Chunked SSD: C.B^T within a chunk (per group), its product with x (per head), state in and out."""
    batch, length, heads, head_dim = x
    groups, state = B[2], B[3]
    q = min(chunk, length)
    return 2 * batch * length * (groups * q * state + heads * q * head_dim + 2 * heads * state * head_dim)


def _chunked(fn):
    """A chunked implementation called with the op's arguments, returning (y, final state)."""
    return lambda x, dt, A, B, C, D, chunk, initial_state: fn(x, dt, A, B, C, D, chunk, initial_state, True)


ssd_op = Family(
    "ssd", "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, int chunk, Tensor? initial_state) "
           "-> (Tensor, Tensor)",
    reference=lambda x, dt, A, B, C, D, chunk, initial_state: ssd_reference(x, dt, A, B, C, D, initial_state, True),
    torch=_chunked(ssd_chunked), cpu=_chunked(ssd_fast), fake=_fake, flops=_flops, backward=recompute)


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
        initial_state: Tensor | None = None, return_final_state: bool = False):
    """Mamba-2 SSD as one op (torch.ops.graftc.ssd): the chunked path (its rank-one form for CPU inference),
    or the sequential reference under GRAFTC_KERNELS=reference. Returns y [Bt, L, H, P], and the final state
    [Bt, H, N, P] (fp32 or wider) if return_final_state."""
    check(x, dt, A, B, C, D, initial_state)
    y, state = ssd_op(x, dt, A, B, C, D, chunk, initial_state)
    return (y, state) if return_final_state else y
