"""Mamba-2's scalar-decay state space (SSD), the definition: the recurrence step by step.

Per head h with head dim P and state size N, heads sharing B and C within a group:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * B_t x_t^T        state: [N, P]
    y_t     = C_t^T state_t + D_h * x_t

Shapes: x [Bt, L, H, P]; dt [Bt, L, H] (positive, already softplus'ed); A [H] (negative);
B, C [Bt, L, G, N] with H % G == 0 (head h reads group h // (H // G)); D [H]; state [Bt, H, N, P].
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; float64 stays float64 (tests use it as the truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, initial_state) -> None:
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    expected = {
        "dt": (dt, (batch, length, heads)),
        "A": (A, (heads,)),
        "B": (B, (batch, length, groups, state_size)),
        "C": (C, (batch, length, groups, state_size)),
        "D": (D, (heads,)),
    }
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, heads, state_size, head_dim))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"ssd: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if heads % groups:
        raise ValueError(f"ssd: {heads} heads do not split into {groups} groups")
    if length < 1:
        raise ValueError("ssd: the sequence is empty")


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                  initial_state: Tensor | None = None, return_final_state: bool = False):
    """The recurrence step by step: slow, obviously right. Returns y (and the final state if asked)."""
    check(x, dt, A, B, C, D, initial_state)
    dtype = compute_dtype(x)
    batch, length, heads, head_dim = x.shape
    heads_per_group = heads // B.shape[2]
    xs, dts, As, Ds = x.to(dtype), dt.to(dtype), A.to(dtype), D.to(dtype)
    Bs = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # [Bt, L, H, N]
    Cs = C.to(dtype).repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        state = xs.new_zeros(batch, heads, B.shape[3], head_dim)
    else:
        state = initial_state.to(dtype)
    ys = []
    for t in range(length):
        decay = torch.exp(dts[:, t] * As)[..., None, None]  # [Bt, H, 1, 1]
        inflow = (dts[:, t, :, None] * Bs[:, t])[..., None] * xs[:, t, :, None, :]  # [Bt, H, N, P]
        state = decay * state + inflow
        ys.append(torch.einsum("bhn,bhnp->bhp", Cs[:, t], state))
    y = (torch.stack(ys, dim=1) + Ds[:, None] * xs).to(x.dtype)
    return (y, state) if return_final_state else y
