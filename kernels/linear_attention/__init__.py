"""Linear attention over feature-mapped queries and keys (the op `graftc::linear_attention`), its decode state
and the feature maps that feed it. The maths is in naive.py; chunked.py is the path every device runs (no Triton
kernel yet)."""
from __future__ import annotations

import torch
from torch import Tensor

from graftc.kernels.family import Family, recompute
from graftc.kernels.linear_attention.chunked import (linear_attention_chunked, linear_attention_continue,
                                                     linear_attention_state)
from graftc.kernels.linear_attention.feature_maps import HedgehogFeatureMap, elu_plus_one, relu
from graftc.kernels.linear_attention.naive import check, linear_attention_reference

__all__ = ["linear_attention", "linear_attention_continue", "linear_attention_state", "elu_plus_one", "relu",
           "HedgehogFeatureMap"]


def _flops(phi_q, phi_k, v, causal, eps, chunk, **kwargs) -> int:
    """Non-causal: phi_k^T [v, 1] then phi_q times it. Causal adds the masked product within each chunk."""
    batch, heads, tokens, features = phi_q
    values = v[-1] + 1  # the normalizer rides along as one more value column
    flops = 4 * batch * heads * tokens * features * values
    if causal:
        flops += 2 * batch * heads * tokens * min(chunk, tokens) * (features + values)
    return flops


linear_attention_op = Family(
    "linear_attention", "(Tensor phi_q, Tensor phi_k, Tensor v, bool causal, float eps, int chunk) -> Tensor",
    reference=lambda phi_q, phi_k, v, causal, eps, chunk: linear_attention_reference(phi_q, phi_k, v, causal, eps),
    torch=linear_attention_chunked,
    fake=lambda phi_q, phi_k, v, causal, eps, chunk: torch.empty_like(v, memory_format=torch.contiguous_format),
    flops=_flops, backward=recompute)


def linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6,
                     chunk: int = 64) -> Tensor:
    """Linear attention as one op (torch.ops.graftc.linear_attention): the chunked path, or the
    quadratic reference under GRAFTC_KERNELS=reference. Returns [B, H, N, dv] in v's dtype."""
    check(phi_q, phi_k, v)
    return linear_attention_op(phi_q, phi_k, v, causal, eps, chunk)
