"""The chunked SSD algorithm (see naive.py for the maths).

The chunked form splits L into chunks of Q steps. Inside a chunk the recurrence unrolls into a masked
attention-like product (C_i . B_j) * exp(a_j+1 + ... + a_i) with a = dt * A, computed as batched matmuls;
across chunks only the [N, P] state is carried, by a scan over L / Q steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.ssd.naive import check, compute_dtype


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
                initial_state: Tensor | None = None, return_final_state: bool = False):
    """The chunked SSD algorithm; same contract as ssd_reference, differentiable by autograd."""
    check(x, dt, A, B, C, D, initial_state)
    if chunk < 1:
        raise ValueError(f"ssd: chunk must be positive, got {chunk}")
    dtype = compute_dtype(x)
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    size = min(chunk, length)  # a sequence shorter than one chunk is one chunk, unpadded
    n_chunks = -(-length // size)
    pad = n_chunks * size - length

    def chunks(t: Tensor) -> Tensor:
        """[Bt, L, ...] -> [Bt, n_chunks, size, ...]. Padded steps get dt = 0: no decay and no
        input, so the state passes through them unchanged and the final state stays exact."""
        t = F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, n_chunks, size, *t.shape[2:])

    # Letters below: b batch, c chunk, i/j step in chunk (output/input), g group, r head in group,
    # n state, p head dim. B and C stay per group; einsum broadcasts them over the group's heads.
    xc = chunks(x).reshape(batch, n_chunks, size, groups, per_group, head_dim)  # [b, c, j, g, r, p]
    dtc = chunks(dt).reshape(batch, n_chunks, size, groups, per_group)  # [b, c, j, g, r]
    Bc, Cc = chunks(B), chunks(C)  # [b, c, j, g, n]
    x_dt = xc * dtc[..., None]
    log_decay = (dtc * A.to(dtype).reshape(groups, per_group)).permute(0, 1, 3, 4, 2)  # [b, c, g, r, j], <= 0
    cum = log_decay.cumsum(-1)  # cum_i = a_0 + ... + a_i

    # Within a chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j.
    # The segment sums come from a cumsum down each column of the masked a_i, not from cum_i - cum_j:
    # that difference of two large sums loses the small segments that matter most, and with them the gradient
    # of A (benches/RESULTS.md). The -inf mask goes in before exp, so nothing overflows to inf.
    causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
    segment = log_decay[..., :, None].expand(*log_decay.shape, size).masked_fill(~causal.tril(-1), 0.0)
    segment = segment.cumsum(-2).masked_fill(~causal, float("-inf"))  # [b, c, g, r, i, j]
    scores = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)[:, :, :, None] * torch.exp(segment)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, x_dt)

    # What each chunk adds to the state by its end, and how much a state passing through it decays.
    to_end = torch.exp(segment[..., -1, :]).permute(0, 1, 4, 2, 3)  # [b, c, j, g, r]
    chunk_states = torch.einsum("bcjgn,bcjgrp->bcgrnp", Bc, x_dt * to_end[..., None])
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # [b, c, g, r, 1, 1]

    # Across chunks: a scan of n_chunks steps carries the state to each chunk's start.
    if initial_state is None:
        state = x_dt.new_zeros(batch, groups, per_group, state_size, head_dim)
    else:
        state = initial_state.to(dtype).reshape(batch, groups, per_group, state_size, head_dim)
    entering = []
    # unbind, not [:, k]: indexing's backward would write a full-size zero gradient for every step.
    for decay, added in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        entering.append(state)
        state = decay * state + added
    entering = torch.stack(entering, dim=1)  # [b, c, g, r, n, p]

    # The carried state reaches step i of its chunk decayed by exp(cum_i).
    carried = torch.einsum("bcign,bcgrnp->bcigrp", Cc, entering)
    y = y + torch.exp(cum).permute(0, 1, 4, 2, 3)[..., None] * carried
    y = y.reshape(batch, n_chunks * size, heads, head_dim)[:, :length]
    y = (y + D.to(dtype)[:, None] * x.to(dtype)).to(x.dtype).contiguous()
    if return_final_state:
        return y, state.reshape(batch, heads, state_size, head_dim)
    return y
