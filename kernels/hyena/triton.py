"""Hyena's Triton path: one fused forward kernel, two backward kernels. Layout: u [B, L, 3D] contiguous, channels q |
k | v; each program owns BLOCK_L positions x BLOCK_D channels and reads the causal halo by masked shifted loads
(they hit L1/L2, not HBM). All maths is fp32. KF / KI are the featurizer / inner-filter tap counts, 1 when that
conv is absent (then its weight is an implicit 1, so the same code serves every variant). Flags and tap counts are
constexpr: one compiled kernel per variant, loops fully unrolled. Batch offsets are int64; offsets inside one
sequence are int32 (fine up to L * 3D < 2^31).

The kernels are plain functions here and jitted on first use (_jitted), because triton reads
TRITON_INTERPRET when a function is jitted: this way the interpreter can be switched on after import.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from graftc.kernels import dispatch

try:  # triton is optional: graftc imports and runs on CPU without it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


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
        # register spills (ptxas's counts: benches/RESULTS.md).
        block_l, block_d, warps = gpu_block_l, 64, 4
        programs = 4 * torch.cuda.get_device_properties(u.device).multi_processor_count
    else:
        # The interpreter pays per op and program: few, large programs (2 chunks exercise the walk).
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


def forward(u: Tensor, feat_weight, feat_bias, inner_weight) -> Tensor:
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


def backward(grad: Tensor, u: Tensor, feat_weight, feat_bias, inner_weight):
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
