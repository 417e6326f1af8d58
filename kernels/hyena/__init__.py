"""Hyena gated short convolution: y = q * conv_inner(k * v), with q, k, v from a causal featurizer conv.

One op serves every Hyena variant grafted by graftc (and the MLP variant, where u is [B, L, 6d]):
    Hyena-X   featurizer only        q, k, v = split(conv_feat(u));  y = q * k * v
    Hyena-Y   inner filter only      q, k, v = split(u);             y = q * conv_inner(k * v)
    Hyena-SE  both                   q, k, v = split(conv_feat(u));  y = q * conv_inner(k * v)
Both convs are depthwise and causal: out[t, c] = bias[c] + sum_j w[c, j] * x[t - (K-1) + j, c], x = 0 before t = 0.

Three implementations of the same maths, each a forward and a written-out backward (graftc.kernels.family):
    naive.py     the definition with F.conv1d (GRAFTC_KERNELS=reference; its backward is the shifted one, eager)
    shifted.py   shifted multiply-adds, torch.compile'd into one fused loop (CPU default)
    triton.py    one fused forward kernel, two backward kernels (CUDA default)
`hyena_conv` is the public entry: the custom op `torch.ops.graftc.hyena_conv`, so `torch.export` shows one call;
its backward is the op `graftc::hyena_conv_backward`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from graftc.kernels.family import Family
from graftc.kernels.hyena import shifted, triton
from graftc.kernels.hyena.naive import causal_conv1d, check, hyena_reference
from graftc.kernels.hyena.shifted import conv_tail, hyena_continue

__all__ = ["hyena_conv", "hyena_continue", "conv_tail", "causal_conv1d"]


class _Path(NamedTuple):
    forward: Callable
    backward: Callable


_PATHS = dict(reference=_Path(hyena_reference, shifted.backward),
              torch=_Path(shifted.compiled_forward, shifted.compiled_backward),
              triton=_Path(triton.forward, triton.backward))


def _fake(u, feat_weight, feat_bias, inner_weight):
    check(u, feat_weight, feat_bias, inner_weight)
    return u.new_empty(u.shape[0], u.shape[1], u.shape[2] // 3)


def _flops(u, feat_weight, feat_bias, inner_weight, **kwargs) -> int:
    """Multiply-adds of the featurizer over 3D channels and the inner filter over D, plus the two gating products."""
    batch, length, channels = u
    width = channels // 3
    per_position = 2 * width
    if feat_weight is not None:
        per_position += 2 * channels * feat_weight[-1]
    if inner_weight is not None:
        per_position += 2 * width * inner_weight[-1]
    return batch * length * per_position


def _backward(family, inputs, outputs, grad):
    grads = hyena_conv_backward_op(grad, *inputs)
    return [None if x is None else g for x, g in zip(inputs, grads)]  # drop the placeholders of absent weights


def _run_backward(path: _Path, grad, u, feat_weight, feat_bias, inner_weight):
    grads = path.backward(grad, u, feat_weight, feat_bias, inner_weight)
    # A custom op cannot return None: an absent weight gets an empty placeholder grad, dropped again in _backward.
    return tuple(u.new_empty(0) if g is None else g for g in grads)


def _fake_backward(grad, u, feat_weight, feat_bias, inner_weight):
    return tuple(u.new_empty(0) if w is None else torch.empty_like(w) for w in (u, feat_weight, feat_bias, inner_weight))


_SCHEMA = "Tensor u, Tensor? feat_weight, Tensor? feat_bias, Tensor? inner_weight"
hyena_conv_op = Family("hyena_conv", f"({_SCHEMA}) -> Tensor", **_PATHS, call=lambda path, *args: path.forward(*args),
                       fake=_fake, flops=_flops, backward=_backward)
hyena_conv_backward_op = Family(
    "hyena_conv_backward", f"(Tensor grad, {_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)", **_PATHS,
    call=_run_backward, fake=_fake_backward,
    flops=lambda grad, *shapes, **kwargs: 2 * _flops(*shapes))  # recompute the forward, then its adjoint


def hyena_conv(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    """Gated short conv of the in-projection u [B, L, 3D] -> y [B, L, D] (see the module docstring).
    feat_weight [3D, K], feat_bias [3D]: featurizer conv over all channels; inner_weight [D, K]: inner filter."""
    check(u, feat_weight, feat_bias, inner_weight)
    return hyena_conv_op(u, feat_weight, feat_bias, inner_weight)
