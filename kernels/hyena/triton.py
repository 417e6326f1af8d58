"""Hyena gated short convolution: y = q * conv_inner(k * v), with q, k, v from a causal featurizer conv.

One op serves every Hyena variant grafted by graftc (and the MLP variant, where u is [B, L, 6d]):
    Hyena-X   featurizer only        q, k, v = split(conv_feat(u));  y = q * k * v
    Hyena-Y   inner filter only      q, k, v = split(u);             y = q * conv_inner(k * v)
    Hyena-SE  both                   q, k, v = split(conv_feat(u));  y = q * conv_inner(k * v)
Both convs are depthwise and causal: out[t, c] = bias[c] + sum_j w[c, j] * x[t - (K-1) + j, c], x = 0 before t = 0.

Three implementations of the same maths, picked per call by `kernels.dispatch`:
    hyena_reference   naive PyTorch with F.conv1d (the definition; autograd does the backward)
    torch path        shifted multiply-adds, torch.compile'd into one fused loop (CPU default)
    Triton path       one fused forward kernel, two backward kernels (CUDA default)
`hyena_conv` is the public entry: the custom op `torch.ops.graftc.hyena_conv`, so `torch.export` shows one call.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels import dispatch
from graftc.kernels.flops import formula

try:  # triton is optional: graftc imports and runs on CPU without it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["hyena_conv", "hyena_reference", "hyena_continue", "conv_tail", "hyena_conv_triton", "hyena_conv_cpu"]


def _check_inputs(u: Tensor, feat_weight, feat_bias, inner_weight) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# Reference: the definition, written for clarity.


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise causal conv of channel-last x [B, L, C] with weight [C, K]."""
    channels, taps = weight.shape
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=taps - 1, groups=channels)
    return out[..., : x.shape[1]].transpose(1, 2)  # keep the first L outputs: each sees only the past


def hyena_reference(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    _check_inputs(u, feat_weight, feat_bias, inner_weight)
    if feat_weight is not None:
        u = causal_conv1d(u, feat_weight, feat_bias)
    q, k, v = u.chunk(3, dim=-1)
    kv = k * v
    if inner_weight is not None:
        kv = causal_conv1d(kv, inner_weight, None)
    return q * kv


def conv_tail(x: Tensor, weight: Tensor, bias: Optional[Tensor], new: int) -> Tensor:
    """The last `new` outputs of the depthwise causal conv of x [B, L, C] (weight [C, K]), where x's first
    L - new >= K - 1 rows are the inputs before the new ones: out[t] = bias + sum_j w[j] x[t - (K-1) + j]."""
    taps, length = weight.shape[1], x.shape[1]
    start = length - new - (taps - 1)
    out = x[:, start:start + new] * weight[:, 0]
    for j in range(1, taps):
        out = out + x[:, start + j:start + j + new] * weight[:, j]
    return out if bias is None else out + bias


def hyena_continue(u: Tensor, history: Callable[[Tensor, int], Tensor], feat_weight=None, feat_bias=None,
                   inner_weight=None, mask: Optional[Tensor] = None) -> Tensor:
    """The same maths as hyena_reference for new tokens u [B, Q, 3D] that follow earlier ones (cached decoding)
    or sit in a padded batch. `history(x, i)` returns x preceded by at least K-1 earlier inputs of convolution i
    (0: featurizer, 1: inner filter; zeros before the sequence starts) and remembers x's for the next call.
    `mask` [B, Q, 1] (1 = real token) zeroes padding's k*v before the inner filter, so padding never reaches a
    real token (u's padding rows must already be zero). fp32 maths, output in u's dtype."""
    _check_inputs(u, feat_weight, feat_bias, inner_weight)
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


# ----------------------------------------------------------------------------------------------------------
# Torch path: the convs as K shifted multiply-adds, which Inductor fuses with the gating into one loop.
# The backward is written out (not autograd) so it compiles too, and recomputes q, k, v from u.


def _causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out[t] = bias + sum_j w[j] x[t - (K-1) + j]."""
    taps, length = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, taps - 1, 0))
    out = padded[:, :length] * weight[:, 0]
    for j in range(1, taps):
        out = out + padded[:, j : j + length] * weight[:, j]
    return out if bias is None else out + bias


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


def _torch_forward(u: Tensor, feat_weight, feat_bias, inner_weight) -> Tensor:
    a = u.float()  # fp32 maths whatever the storage dtype; Inductor fuses the casts
    if feat_weight is not None:
        a = _causal_conv(a, feat_weight.float(), None if feat_bias is None else feat_bias.float())
    q, k, v = a.chunk(3, dim=-1)
    h = k * v
    if inner_weight is not None:
        h = _causal_conv(h, inner_weight.float())
    return (q * h).to(u.dtype)


def _torch_backward(grad: Tensor, u: Tensor, feat_weight, feat_bias, inner_weight):
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


_compiled_forward = dispatch.LazyCompiled(_torch_forward, "hyena_conv")
_compiled_backward = dispatch.LazyCompiled(_torch_backward, "hyena_conv")


# ----------------------------------------------------------------------------------------------------------
# Triton path. Layout: u [B, L, 3D] contiguous, channels q | k | v; each program owns BLOCK_L positions x
# BLOCK_D channels and reads the causal halo by masked shifted loads (they hit L1/L2, not HBM). All maths is
# fp32. KF / KI are the featurizer / inner-filter tap counts, 1 when that conv is absent (then its weight is
# an implicit 1, so the same code serves every variant). Flags and tap counts are constexpr: one compiled
# kernel per variant, loops fully unrolled. Batch offsets are int64; offsets inside one sequence are int32
# (fine up to L * 3D < 2^31).
#
# The kernels are plain functions here and jitted on first use (_jitted), because triton reads
# TRITON_INTERPRET when a function is jitted: this way the interpreter can be switched on after import.


def _forward_kernel(
    u_ptr, feat_w_ptr, feat_b_ptr, inner_w_ptr, y_ptr, L, D,
    FEATURIZE: tl.constexpr, FEAT_BIAS: tl.constexpr, INNER: tl.constexpr,
    KF: tl.constexpr, KI: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    batch = tl.program_id(2).to(tl.int64)
    c_ok = c < D
    row = 3 * D
    u_q = u_ptr + batch * L * row + c  # q channel c; k and v sit D and 2D further along the row
    u_k, u_v = u_q + D, u_q + 2 * D
    w_q = feat_w_ptr + c * KF  # featurizer taps of q channel c
    w_k, w_v = w_q + D * KF, w_q + 2 * D * KF
    w_inner = inner_w_ptr + c * KI

    # q at t: the featurizer conv over the KF positions ending at t.
    q = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(KF):
        r = t - (KF - 1) + j
        x = tl.load(u_q + r * row, mask=(r >= 0) & (r < L) & c_ok, other=0.0).to(tl.float32)
        if FEATURIZE:
            x *= tl.load(w_q + j, mask=c_ok, other=0.0).to(tl.float32)
        q += x
    if FEAT_BIAS:
        q += tl.load(feat_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)

    # h at t = sum_i w_inner[i] * (k * v) at s = t - (KI-1) + i, each k, v featurized over KF positions.
    h = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(KI):
        s = t - (KI - 1) + i
        k = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        v = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(KF):
            r = s - (KF - 1) + j
            mask = (r >= 0) & (r < L) & c_ok
            xk = tl.load(u_k + r * row, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(u_v + r * row, mask=mask, other=0.0).to(tl.float32)
            if FEATURIZE:
                xk *= tl.load(w_k + j, mask=c_ok, other=0.0).to(tl.float32)
                xv *= tl.load(w_v + j, mask=c_ok, other=0.0).to(tl.float32)
            k += xk
            v += xv
        if FEAT_BIAS:
            k += tl.load(feat_b_ptr + D + c, mask=c_ok, other=0.0).to(tl.float32)
            v += tl.load(feat_b_ptr + 2 * D + c, mask=c_ok, other=0.0).to(tl.float32)
        kv = tl.where(s >= 0, k * v, 0.0)  # the inner conv pads k * v with zeros, not with featurized bias
        if INNER:
            kv *= tl.load(w_inner + i, mask=c_ok, other=0.0).to(tl.float32)
        h += kv

    y = q * h
    tl.store(y_ptr + batch * L * D + t * D + c, y.to(y_ptr.dtype.element_ty), mask=(t < L) & c_ok)


def _gate_backward_kernel(
    u_ptr, feat_w_ptr, feat_b_ptr, inner_w_ptr, grad_ptr, da_ptr, d_inner_ptr, L, D, BLOCKS_PER_PROGRAM,
    FEATURIZE: tl.constexpr, FEAT_BIAS: tl.constexpr, INNER: tl.constexpr,
    KF: tl.constexpr, KI: tl.constexpr, KI_POW2: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient through the gating and the inner filter: da = d(q | k | v) [B, L, 3D] (before the featurizer),
    and per-program partial sums of d inner_weight. Each program walks BLOCKS_PER_PROGRAM position tiles so
    the partial sums stay few (reduced in torch afterwards: deterministic)."""
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    batch = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    c_ok = c < D
    row = 3 * D
    u_q = u_ptr + batch * L * row + c
    u_k, u_v = u_q + D, u_q + 2 * D
    w_q = feat_w_ptr + c * KF
    w_k, w_v = w_q + D * KF, w_q + 2 * D * KF
    w_inner = inner_w_ptr + c * KI
    g_b = grad_ptr + batch * L * D + c
    da_q = da_ptr + batch * L * row + c
    taps = tl.arange(0, KI_POW2)[:, None]
    d_inner = tl.zeros([KI_POW2, BLOCK_D], dtype=tl.float32)

    for block in range(BLOCKS_PER_PROGRAM):
        t = (chunk * BLOCKS_PER_PROGRAM + block) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]

        # dh = grad * q. The inner conv's input grad looks ahead: dkv(t) = sum_i w_inner[KI-1-i] dh(t + i).
        dkv = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        g_t = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        dh_t = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(KI):
            r = t + i
            q = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(KF):
                p = r - (KF - 1) + j
                x = tl.load(u_q + p * row, mask=(p >= 0) & (p < L) & c_ok, other=0.0).to(tl.float32)
                if FEATURIZE:
                    x *= tl.load(w_q + j, mask=c_ok, other=0.0).to(tl.float32)
                q += x
            if FEAT_BIAS:
                q += tl.load(feat_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            g = tl.load(g_b + r * D, mask=(r < L) & c_ok, other=0.0).to(tl.float32)
            dh = g * q
            if i == 0:
                g_t = g
                dh_t = dh
            if INNER:
                dh *= tl.load(w_inner + (KI - 1 - i), mask=c_ok, other=0.0).to(tl.float32)
            dkv += dh

        # h(t) = sum_i w_inner[i] kv(t - (KI-1) + i), recomputed; d w_inner[i] += sum_t dh(t) kv(t - (KI-1) + i).
        h = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        k_t = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        v_t = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(KI):
            s = t - (KI - 1) + i
            k = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            v = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(KF):
                p = s - (KF - 1) + j
                mask = (p >= 0) & (p < L) & c_ok
                xk = tl.load(u_k + p * row, mask=mask, other=0.0).to(tl.float32)
                xv = tl.load(u_v + p * row, mask=mask, other=0.0).to(tl.float32)
                if FEATURIZE:
                    xk *= tl.load(w_k + j, mask=c_ok, other=0.0).to(tl.float32)
                    xv *= tl.load(w_v + j, mask=c_ok, other=0.0).to(tl.float32)
                k += xk
                v += xv
            if FEAT_BIAS:
                k += tl.load(feat_b_ptr + D + c, mask=c_ok, other=0.0).to(tl.float32)
                v += tl.load(feat_b_ptr + 2 * D + c, mask=c_ok, other=0.0).to(tl.float32)
            if i == KI - 1:
                k_t = k
                v_t = v
            kv = tl.where(s >= 0, k * v, 0.0)
            if INNER:
                d_inner += tl.where(taps == i, tl.sum(dh_t * kv, axis=0)[None, :], 0.0)
                kv *= tl.load(w_inner + i, mask=c_ok, other=0.0).to(tl.float32)
            h += kv

        out = (t < L) & c_ok
        dtype = da_ptr.dtype.element_ty
        tl.store(da_q + t * row, (g_t * h).to(dtype), mask=out)
        tl.store(da_q + D + t * row, (dkv * v_t).to(dtype), mask=out)
        tl.store(da_q + 2 * D + t * row, (dkv * k_t).to(dtype), mask=out)

    if INNER:
        partial = d_inner_ptr + (tl.program_id(1) * tl.num_programs(2) + chunk) * KI * D
        tl.store(partial + taps * D + c, d_inner, mask=(taps < KI) & c_ok)


def _feat_backward_kernel(
    u_ptr, feat_w_ptr, da_ptr, du_ptr, d_feat_ptr, d_bias_ptr, L, C, BLOCKS_PER_PROGRAM,
    KF: tl.constexpr, KF_POW2: tl.constexpr, FEAT_BIAS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient through the featurizer (all C = 3D channels): du(t) = sum_j w[j] da(t + (KF-1) - j), and
    per-program partial sums of d feat_weight[j] = sum_t da(t) u(t - (KF-1) + j) and d feat_bias = sum_t da(t)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = cols[None, :]
    batch = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    c_ok = c < C
    offset = batch * L * C + c
    w = feat_w_ptr + c * KF
    taps = tl.arange(0, KF_POW2)[:, None]
    d_feat = tl.zeros([KF_POW2, BLOCK_D], dtype=tl.float32)
    d_bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    for block in range(BLOCKS_PER_PROGRAM):
        t = (chunk * BLOCKS_PER_PROGRAM + block) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]
        da_t = tl.load(da_ptr + offset + t * C, mask=(t < L) & c_ok, other=0.0)
        du = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(KF):
            r = t + (KF - 1 - j)
            da_r = tl.load(da_ptr + offset + r * C, mask=(r < L) & c_ok, other=0.0)
            du += da_r * tl.load(w + j, mask=c_ok, other=0.0).to(tl.float32)
            s = t - (KF - 1) + j
            u_s = tl.load(u_ptr + offset + s * C, mask=(s >= 0) & (s < L) & c_ok, other=0.0).to(tl.float32)
            d_feat += tl.where(taps == j, tl.sum(da_t * u_s, axis=0)[None, :], 0.0)
        d_bias += tl.sum(da_t, axis=0)
        tl.store(du_ptr + offset + t * C, du.to(du_ptr.dtype.element_ty), mask=(t < L) & c_ok)

    program = tl.program_id(1) * tl.num_programs(2) + chunk
    tl.store(d_feat_ptr + program * KF * C + taps * C + c, d_feat, mask=(taps < KF) & c_ok)
    if FEAT_BIAS:
        tl.store(d_bias_ptr + program * C + cols, d_bias, mask=cols < C)




class _Kernels(NamedTuple):
    forward: Callable
    gate_backward: Callable
    feat_backward: Callable


@functools.cache
def _jitted(interpret: bool) -> _Kernels:
    return _Kernels(*(triton.jit(fn) for fn in (_forward_kernel, _gate_backward_kernel, _feat_backward_kernel)))


class _Launch(NamedTuple):
    block_l: int
    block_d: int
    num_warps: int
    chunks: int  # backward: programs per (channel block, sequence), each walking tiles_per_chunk position tiles
    tiles_per_chunk: int


def _launch_config(u: Tensor, length: int, channels: int, batch: int, gpu_block_l: int) -> _Launch:
    if u.is_cuda:
        # 64 channels = one 128-byte line per bf16 row; 4 warps. gpu_block_l keeps every kernel variant free of
        # register spills (ptxas, sm_90, bf16: 48 to 198 registers a thread; 16 rows would spill Hyena-SE).
        block_l, block_d, warps = gpu_block_l, 64, 4
        programs = 4 * torch.cuda.get_device_properties(u.device).multi_processor_count
    else:
        # The interpreter costs ~0.1 ms per op and program: few, large programs (2 chunks exercise the walk).
        block_l, block_d, warps = 128, 128, 1
        programs = None
    block_l = min(block_l, max(16, triton.next_power_of_2(length)))
    block_d = min(block_d, max(16, triton.next_power_of_2(channels)))
    tiles = triton.cdiv(length, block_l)
    if programs is None:
        chunks = 2
    else:  # enough programs to fill the GPU, no more: fewer partial weight-grad sums to reduce
        chunks = programs // (triton.cdiv(channels, block_d) * batch)
    per_chunk = triton.cdiv(tiles, max(1, min(tiles, chunks)))
    return _Launch(block_l, block_d, warps, triton.cdiv(tiles, per_chunk), per_chunk)


def _kernels_for(u: Tensor) -> _Kernels:
    if triton is None:
        raise RuntimeError("hyena_conv: the Triton path needs triton installed")
    if not u.is_cuda and not dispatch.interpreting():
        raise RuntimeError(
            "hyena_conv: the Triton path on CPU tensors needs the interpreter: set TRITON_INTERPRET=1"
        )
    return _jitted(dispatch.interpreting())


def _flags(feat_weight, feat_bias, inner_weight) -> dict:
    return dict(
        FEATURIZE=feat_weight is not None,
        FEAT_BIAS=feat_bias is not None,
        INNER=inner_weight is not None,
        KF=1 if feat_weight is None else feat_weight.shape[1],
        KI=1 if inner_weight is None else inner_weight.shape[1],
    )


def _contiguous(*tensors):
    return [None if x is None else x.contiguous() for x in tensors]


def _pointers(u: Tensor, *weights):
    """Absent weights still need a valid pointer argument; the constexpr flags keep the kernel off it."""
    return [u if w is None else w for w in weights]


def _triton_forward(u: Tensor, feat_weight, feat_bias, inner_weight) -> Tensor:
    kernels = _kernels_for(u)
    u, feat_weight, feat_bias, inner_weight = _contiguous(u, feat_weight, feat_bias, inner_weight)
    batch, length, width = u.shape[0], u.shape[1], u.shape[2] // 3
    y = torch.empty(batch, length, width, dtype=u.dtype, device=u.device)
    if y.numel() == 0:
        return y
    hyena_se = feat_weight is not None and inner_weight is not None  # K x K shifted loads: half the rows
    launch = _launch_config(u, length, width, batch, gpu_block_l=8 if hyena_se else 16)
    grid = (triton.cdiv(length, launch.block_l), triton.cdiv(width, launch.block_d), batch)
    kernels.forward[grid](
        u, *_pointers(u, feat_weight, feat_bias, inner_weight), y, length, width,
        **_flags(feat_weight, feat_bias, inner_weight),
        BLOCK_L=launch.block_l, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    return y


def _triton_backward(grad: Tensor, u: Tensor, feat_weight, feat_bias, inner_weight):
    kernels = _kernels_for(u)
    grad, u, feat_weight, feat_bias, inner_weight = _contiguous(grad, u, feat_weight, feat_bias, inner_weight)
    batch, length, channels = u.shape
    width = channels // 3
    flags = _flags(feat_weight, feat_bias, inner_weight)
    # Without a featurizer da is du itself; with one, da is an fp32 intermediate the second kernel reads.
    da = torch.empty(u.shape, dtype=u.dtype if feat_weight is None else torch.float32, device=u.device)
    if u.numel() == 0:
        zeros = [None if w is None else torch.zeros_like(w) for w in (feat_weight, feat_bias, inner_weight)]
        return (da.to(u.dtype), *zeros)

    launch = _launch_config(u, length, width, batch, gpu_block_l=8 if inner_weight is not None else 16)
    d_inner = torch.empty(batch * launch.chunks, flags["KI"], width, dtype=torch.float32, device=u.device)
    kernels.gate_backward[(triton.cdiv(width, launch.block_d), batch, launch.chunks)](
        u, *_pointers(u, feat_weight, feat_bias, inner_weight), grad, da, d_inner,
        length, width, launch.tiles_per_chunk,
        **flags, KI_POW2=triton.next_power_of_2(flags["KI"]),
        BLOCK_L=launch.block_l, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    d_inner = None if inner_weight is None else d_inner.sum(0).t().to(inner_weight.dtype)
    if feat_weight is None:
        return da, None, None, d_inner

    launch = _launch_config(u, length, channels, batch, gpu_block_l=16)
    du = torch.empty_like(u)
    d_feat = torch.empty(batch * launch.chunks, flags["KF"], channels, dtype=torch.float32, device=u.device)
    d_bias = torch.empty(batch * launch.chunks, channels, dtype=torch.float32, device=u.device)
    kernels.feat_backward[(triton.cdiv(channels, launch.block_d), batch, launch.chunks)](
        u, feat_weight, da, du, d_feat, d_bias, length, channels, launch.tiles_per_chunk,
        KF=flags["KF"], KF_POW2=triton.next_power_of_2(flags["KF"]), FEAT_BIAS=feat_bias is not None,
        BLOCK_L=launch.block_l, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    d_feat = d_feat.sum(0).t().to(feat_weight.dtype)
    d_bias = None if feat_bias is None else d_bias.sum(0).to(feat_bias.dtype)
    return du, d_feat, d_bias, d_inner


# ----------------------------------------------------------------------------------------------------------
# Dispatch and the custom op.


class _Impl(NamedTuple):
    forward: Callable
    backward: Callable


_IMPLS = {
    "reference": _Impl(hyena_reference, _torch_backward),  # the written-out backward, eager
    "torch": _Impl(_compiled_forward, _compiled_backward),
    "triton": _Impl(_triton_forward, _triton_backward),
}


def _impl_for(u: Tensor) -> _Impl:
    if dispatch.use_reference():
        return _IMPLS["reference"]
    if dispatch.use_triton(u) and (triton is not None or dispatch.mode() == "triton"):
        return _IMPLS["triton"]  # forced without triton installed: _kernels_for says so
    return _IMPLS["torch"]


@torch.library.custom_op("graftc::hyena_conv", mutates_args=())
def _hyena_conv_op(
    u: Tensor, feat_weight: Optional[Tensor], feat_bias: Optional[Tensor], inner_weight: Optional[Tensor]
) -> Tensor:
    _check_inputs(u, feat_weight, feat_bias, inner_weight)
    return _impl_for(u).forward(u, feat_weight, feat_bias, inner_weight)


@_hyena_conv_op.register_fake
def _(u, feat_weight, feat_bias, inner_weight):
    _check_inputs(u, feat_weight, feat_bias, inner_weight)
    return u.new_empty(u.shape[0], u.shape[1], u.shape[2] // 3)


@torch.library.custom_op("graftc::hyena_conv_backward", mutates_args=())
def _hyena_conv_backward_op(
    grad: Tensor, u: Tensor, feat_weight: Optional[Tensor], feat_bias: Optional[Tensor],
    inner_weight: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _impl_for(u).backward(grad, u, feat_weight, feat_bias, inner_weight)
    # A custom op cannot return None: an absent weight gets an empty placeholder grad, dropped again below.
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@_hyena_conv_backward_op.register_fake
def _(grad, u, feat_weight, feat_bias, inner_weight):
    inputs = (u, feat_weight, feat_bias, inner_weight)
    return tuple(u.new_empty(0) if w is None else torch.empty_like(w) for w in inputs)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # only the inputs: the backward recomputes q, k, v


def _backward(ctx, grad):
    u, feat_weight, feat_bias, inner_weight = ctx.saved_tensors
    grads = torch.ops.graftc.hyena_conv_backward(grad, u, feat_weight, feat_bias, inner_weight)
    return tuple(None if w is None else g for w, g in zip((u, feat_weight, feat_bias, inner_weight), grads))


_hyena_conv_op.register_autograd(_backward, setup_context=_setup_context)


@formula(torch.ops.graftc.hyena_conv)
def _hyena_flops(u, feat_weight, feat_bias, inner_weight, **kwargs) -> int:
    """Multiply-adds of the featurizer over 3D channels and the inner filter over D, plus the two gating products."""
    batch, length, channels = u
    width = channels // 3
    per_position = 2 * width
    if feat_weight is not None:
        per_position += 2 * channels * feat_weight[-1]
    if inner_weight is not None:
        per_position += 2 * width * inner_weight[-1]
    return batch * length * per_position


@formula(torch.ops.graftc.hyena_conv_backward)
def _hyena_backward_flops(grad, u, feat_weight, feat_bias, inner_weight, **kwargs) -> int:
    return 2 * _hyena_flops(u, feat_weight, feat_bias, inner_weight)  # recompute forward, then its adjoint


def hyena_conv(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    """Gated short conv of the in-projection u [B, L, 3D] -> y [B, L, D] (see the module docstring).
    feat_weight [3D, K], feat_bias [3D]: featurizer conv over all channels; inner_weight [D, K]: inner filter."""
    return torch.ops.graftc.hyena_conv(u, feat_weight, feat_bias, inner_weight)


class _Direct(torch.autograd.Function):
    """One implementation, forward and backward, bypassing the dispatch: for benchmarks and tests."""

    @staticmethod
    def forward(ctx, impl: _Impl, u, feat_weight, feat_bias, inner_weight):
        _check_inputs(u, feat_weight, feat_bias, inner_weight)
        ctx.impl = impl
        ctx.save_for_backward(u, feat_weight, feat_bias, inner_weight)
        return impl.forward(u, feat_weight, feat_bias, inner_weight)

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.impl.backward(grad.contiguous(), *ctx.saved_tensors))


def hyena_conv_triton(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    """The Triton kernels, whatever GRAFTC_KERNELS says (CPU tensors need TRITON_INTERPRET=1)."""
    return _Direct.apply(_IMPLS["triton"], u, feat_weight, feat_bias, inner_weight)


def hyena_conv_cpu(u: Tensor, feat_weight=None, feat_bias=None, inner_weight=None) -> Tensor:
    """The compiled shifted multiply-add path (the CPU default), whatever GRAFTC_KERNELS says."""
    return _Direct.apply(_IMPLS["torch"], u, feat_weight, feat_bias, inner_weight)
