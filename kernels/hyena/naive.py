"""Hyena's gated short convolution, the definition (see __init__.py), written for clarity with F.conv1d."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def check(u: Tensor, feat_weight, feat_bias, inner_weight) -> None:
    if u.dim() != 3 or u.shape[-1] % 3 != 0:
        raise ValueError(f"hyena_conv: u must be [B, L, 3D], got {tuple(u.shape)}")
    channels, width = u.shape[-1], u.shape[-1] // 3
    if feat_weight is not None and (feat_weight.dim() != 2 or feat_weight.shape[0] != channels):
        raise ValueError(f"hyena_conv: feat_weight must be [{channels}, K], got {tuple(feat_weight.shape)}")
    if feat_bias is not None:
        if feat_weight is None:
            raise ValueError("hyena_conv: feat_bias given without feat_weight")
        if tuple(feat_bias.shape) != (channels,):
            raise ValueError(f"hyena_conv: feat_bias must be [{channels}], got {tuple(feat_bias.shape)}")
    if inner_weight is not None and (inner_weight.dim() != 2 or inner_weight.shape[0] != width):
        raise ValueError(f"hyena_conv: inner_weight must be [{width}, K], got {tuple(inner_weight.shape)}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise causal conv of channel-last x [B, L, C] with weight [C, K]."""
    channels, taps = weight.shape
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=taps - 1, groups=channels)
    return out[..., : x.shape[1]].transpose(1, 2)  # keep the first L outputs: each sees only the past


def hyena_reference(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    check(u, feat_weight, feat_bias, inner_weight)
    if feat_weight is not None:
        u = causal_conv1d(u, feat_weight, feat_bias)
    q, k, v = u.chunk(3, dim=-1)
    kv = k * v
    if inner_weight is not None:
        kv = causal_conv1d(kv, inner_weight, None)
    return q * kv
