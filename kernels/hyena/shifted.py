"""Hyena's PyTorch path: the convs as K shifted multiply-adds, which Inductor fuses with the gating into one loop
(the CPU default, compiled on first use). The backward is written out (not autograd) so it compiles too, and
recomputes q, k, v from u. Cached decoding (hyena_continue) runs the same multiply-adds over the new tokens."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels import dispatch
from graftc.kernels.hyena.naive import check


def conv_tail(x: Tensor, weight: Tensor, bias: Optional[Tensor], new: int) -> Tensor:
    """The last `new` outputs of the depthwise causal conv of x [B, L, C] (weight [C, K]), where x's first
    L - new >= K - 1 rows are the inputs before the new ones: out[t] = bias + sum_j w[j] x[t - (K-1) + j]."""
    taps, length = weight.shape[1], x.shape[1]
    start = length - new - (taps - 1)
    out = x[:, start:start + new] * weight[:, 0]
    for j in range(1, taps):
        out = out + x[:, start + j:start + j + new] * weight[:, j]
    return out if bias is None else out + bias


def _causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out[t] = bias + sum_j w[j] x[t - (K-1) + j], zeros before t = 0."""
    return conv_tail(F.pad(x, (0, 0, weight.shape[1] - 1, 0)), weight, bias, x.shape[1])


def _causal_conv_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """Adjoint of _causal_conv in x: dx[s] = sum_j w[j] grad[s + (K-1) - j] (looks ahead, not back)."""
    taps, length = weight.shape[1], grad.shape[1]
    padded = F.pad(grad, (0, 0, 0, taps - 1))
    out = padded[:, taps - 1 : taps - 1 + length] * weight[:, 0]
    for j in range(1, taps):
        out = out + padded[:, taps - 1 - j : taps - 1 - j + length] * weight[:, j]
    return out


def _causal_conv_weight_grad(grad: Tensor, x: Tensor, taps: int) -> Tensor:
    """dw[c, j] = sum_{b, t} grad[b, t, c] x[b, t - (K-1) + j, c]."""
    length = x.shape[1]
    padded = F.pad(x, (0, 0, taps - 1, 0))
    return torch.stack([(grad * padded[:, j : j + length]).sum((0, 1)) for j in range(taps)], dim=-1)


def forward(u: Tensor, feat_weight, feat_bias, inner_weight) -> Tensor:
    a = u.float()  # fp32 maths whatever the storage dtype; Inductor fuses the casts
    if feat_weight is not None:
        a = _causal_conv(a, feat_weight.float(), None if feat_bias is None else feat_bias.float())
    q, k, v = a.chunk(3, dim=-1)
    h = k * v
    if inner_weight is not None:
        h = _causal_conv(h, inner_weight.float())
    return (q * h).to(u.dtype)


def backward(grad: Tensor, u: Tensor, feat_weight, feat_bias, inner_weight):
    g, a = grad.float(), u.float()
    if feat_weight is not None:
        a = _causal_conv(a, feat_weight.float(), None if feat_bias is None else feat_bias.float())
    q, k, v = a.chunk(3, dim=-1)
    kv = k * v
    d_inner = None
    if inner_weight is not None:
        dh = g * q
        dq = g * _causal_conv(kv, inner_weight.float())
        dkv = _causal_conv_input_grad(dh, inner_weight.float())
        d_inner = _causal_conv_weight_grad(dh, kv, inner_weight.shape[1]).to(inner_weight.dtype)
    else:
        dq, dkv = g * kv, g * q
    da = torch.cat([dq, dkv * v, dkv * k], dim=-1)
    d_feat = d_bias = None
    if feat_weight is not None:
        d_feat = _causal_conv_weight_grad(da, u.float(), feat_weight.shape[1]).to(feat_weight.dtype)
        if feat_bias is not None:
            d_bias = da.sum((0, 1)).to(feat_bias.dtype)
        da = _causal_conv_input_grad(da, feat_weight.float())
    return da.to(u.dtype), d_feat, d_bias, d_inner


compiled_forward = dispatch.LazyCompiled(forward, "hyena_conv")
compiled_backward = dispatch.LazyCompiled(backward, "hyena_conv")


def hyena_continue(u: Tensor, history: Callable[[Tensor, int], Tensor], feat_weight=None, feat_bias=None,
                   inner_weight=None, mask: Optional[Tensor] = None) -> Tensor:
    """The same maths as hyena_reference for new tokens u [B, Q, 3D] that follow earlier ones (cached decoding)
    or sit in a padded batch. `history(x, i)` returns x preceded by at least K-1 earlier inputs of convolution i
    (0: featurizer, 1: inner filter; zeros before the sequence starts) and remembers x's for the next call.
    `mask` [B, Q, 1] (1 = real token) zeroes padding's k*v before the inner filter, so padding never reaches a
    real token (u's padding rows must already be zero). fp32 maths, output in u's dtype."""
    check(u, feat_weight, feat_bias, inner_weight)
    new, a = u.shape[1], u.float()
    if feat_weight is not None:
        a = conv_tail(history(a, 0), feat_weight.float(), None if feat_bias is None else feat_bias.float(), new)
    q, k, v = a.chunk(3, dim=-1)
    h = k * v
    if inner_weight is not None:
        if mask is not None:
            h = h * mask
        h = conv_tail(history(h, 1), inner_weight.float(), None, new)
    return (q * h).to(u.dtype)
