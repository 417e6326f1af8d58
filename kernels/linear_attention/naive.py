"""Linear attention, the definition: the full [N, N] weight matrix, masked and normalized.

With phi_q, phi_k [B, H, N, F] (non-negative features) and v [B, H, N, dv]:

    y_i = phi_q_i^T (sum_j phi_k_j v_j^T) / (phi_q_i^T sum_j phi_k_j + eps)

over all j (non-causal) or j <= i (causal).
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; float64 stays float64 (tests use it as the truth)."""
    return torch.promote_types(t.dtype, torch.float32)


def check(phi_q: Tensor, phi_k: Tensor, v: Tensor) -> None:
    if phi_q.dim() != 4 or phi_q.shape != phi_k.shape:
        raise ValueError(f"linear_attention: phi_q {tuple(phi_q.shape)} and phi_k {tuple(phi_k.shape)} "
                         "must both be [B, H, N, F]")
    if v.dim() != 4 or v.shape[:3] != phi_k.shape[:3]:
        raise ValueError(f"linear_attention: v {tuple(v.shape)} must be [B, H, N, dv] "
                         f"matching phi_k {tuple(phi_k.shape)}")
    if v.shape[2] < 1:
        raise ValueError("linear_attention: the sequence is empty")


def linear_attention_reference(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool,
                               eps: float = 1e-6) -> Tensor:
    """The quadratic form: the full [N, N] weight matrix, masked, normalized. Slow, obviously right."""
    check(phi_q, phi_k, v)
    dtype = compute_dtype(v)
    weights = phi_q.to(dtype) @ phi_k.to(dtype).transpose(-1, -2)  # [B, H, N, N]
    if causal:
        n = weights.shape[-1]
        weights = weights.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=v.device).tril(), 0.0)
    numerator = weights @ v.to(dtype)
    denominator = weights.sum(-1, keepdim=True) + eps
    return (numerator / denominator).to(v.dtype)
