"""The chunked SSD in rank-one decay form: the forward fast path for CPU tensors.

Inside a chunk, exp(c_i - c_j) = exp(c_i) * exp(-c_j) (c = inclusive cumsum of a = dt * A within the
chunk, <= 0). Scaling the inputs by exp(-c_j) and the outputs by exp(c_i) turns the per-head decay mask into
two diagonal scalings, so all heads of a group share one masked C.B^T, and a chunk's within-chunk product,
its state contribution and its read of the carried state are one GEMM each over all the group's heads
([Q, Q] @ [Q, r*P], [N, Q] @ [Q, r*P], [Q, N] @ [N, r*P]): no [heads, Q, Q] tensor is ever formed. Steps
past _RANK_ONE_RANGE e-folds of decay into their chunk would push exp(-c_j) towards fp32's limit, so their
within-chunk terms (all with i and j past it) take exp(c_i - c_j) directly instead, on that subset only. Every
choice depends on steps <= i only (the reference is the chunk's start, not its end), so an output never
changes, not even in its last bit, when a later input does. The cumsums and exponents are computed in
float64: they are [L, H] scalars (1/P of the activations), and the wider type keeps them exact to fp32
precision however large c grows.

Across chunks the recurrence is s_c+1 = f_c s_c + u_c (f_c = exp(c_last) per head, u_c = B^T (x dt
exp(c_last - c_j))), one in-place multiply-add per chunk. Decay weights below _NEGLIGIBLE relative to
what they scale are set to 0 (in float64, before the cast): it changes nothing at fp32 precision, and
keeps subnormal numbers, which x86 computes far slower, out of the GEMMs and the scan. The sequence
is processed in segments of about _SEGMENT_TOKENS tokens, so every temporary is a few MB: it stays in
cache, and the allocator reuses it instead of mapping new pages.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.ssd.naive import check, compute_dtype

_RANK_ONE_RANGE = 60.0  # input factors up to exp(60) ~ 1e26: far from fp32's 3e38, no sum overflows
_NEGLIGIBLE = 1e-20
_SEGMENT_TOKENS = 1024


class _Scalars(NamedTuple):
    dt: Tensor  # [b, c, i, h] float64
    cum: Tensor  # [b, c, i, h] float64
    wild: Tensor | None  # [b, c, h] bool: pairs with steps past the rank-one range (None: there are none)
    scale_in: Tensor  # dt_j exp(-c_j), 0 past the rank-one range: [c, b, g, j, r, 1] in the compute dtype
    scale_state: Tensor  # dt_j exp(c_last - c_j): [c, b, g, j, r, 1]
    scale_out: Tensor  # exp(c_i): [b, c, i, g, r, 1]
    decay: Tensor  # f_c = exp(c_last): [c, b, g, 1, r, 1]


def _below(t: Tensor, threshold: float) -> Tensor:
    """t (float64, >= 0) with the values below threshold set to exactly 0."""
    return t.masked_fill_(t < threshold, 0.0)


def _flushed(t: Tensor) -> Tensor:
    """A float64 decay weight in [0, 1], with the negligible ones set to exactly 0."""
    return _below(t, _NEGLIGIBLE)


def ssd_fast(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
             initial_state: Tensor | None = None, return_final_state: bool = False):
    """The chunked SSD in rank-one decay form: same contract and FLOPs as ssd_chunked, far faster on CPU.
    For forward passes: the op's backward differentiates ssd_chunked instead, whose segment sums keep the
    gradient of A exact (a difference of cumsums, which autograd would see here, loses it)."""
    check(x, dt, A, B, C, D, initial_state)
    if chunk < 1:
        raise ValueError(f"ssd: chunk must be positive, got {chunk}")
    dtype, wide = compute_dtype(x), torch.float64
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    size = min(chunk, length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length

    # Per (step, head) scalars in float64, chunked and padded with dt = 0 (no decay: c_last of a short last
    # chunk is its last real c_i).
    dt_c = dt.to(wide)
    if pad:
        dt_c = F.pad(dt_c, (0, 0, 0, pad))
    dt_c = dt_c.reshape(batch, n_chunks, size, heads)
    cum = (dt_c * A.to(wide)).cumsum(2)  # c_i = a_0 + ... + a_i within each chunk, <= 0
    last = cum[:, :, -1:]  # [b, c, 1, h]: the chunk's total decay
    beyond = cum < -_RANK_ONE_RANGE  # steps whose within-chunk terms take the segment-sum form
    wild = beyond[:, :, -1]  # [b, c, h]: the pairs that have any
    any_wild = bool(wild.any())
    scale_in = dt_c * torch.exp(-cum)  # may overflow past the range: replaced by 0 there
    if any_wild:
        scale_in.masked_fill_(beyond, 0.0)

    def chunk_major(t: Tensor) -> Tensor:  # [b, c, j, h] float64 -> [c, b, g, j, r, 1] in dtype
        return t.to(dtype).reshape(batch, n_chunks, size, groups, per_group).permute(1, 0, 3, 2, 4)[..., None] \
            .contiguous()

    tiny = torch.finfo(dtype).tiny  # exp(c_i) below fp32's smallest normal: the terms it scales are < e^-27
    s = _Scalars(
        dt=dt_c, cum=cum, wild=wild if any_wild else None,
        scale_in=chunk_major(scale_in),
        scale_state=chunk_major(dt_c * _flushed(torch.exp(last - cum))),
        scale_out=_below(torch.exp(cum), tiny).to(dtype).reshape(batch, n_chunks, size, groups, per_group, 1),
        decay=_flushed(torch.exp(last[:, :, 0])).to(dtype).reshape(batch, n_chunks, groups, per_group)
        .transpose(0, 1)[:, :, :, None, :, None],
    )
    x_dtype, x = x.dtype, x.to(dtype)
    B, C, D = B.to(dtype), C.to(dtype), D.to(dtype).reshape(groups, per_group, 1)
    out = torch.empty(batch, length, heads, head_dim, dtype=dtype, device=x.device)
    state = x.new_zeros(batch, groups, state_size, per_group, head_dim)  # [b, g, n, r, p]
    if initial_state is not None:
        state = initial_state.to(dtype).reshape(batch, groups, per_group, state_size, head_dim).transpose(2, 3)
    full = length // size
    step = max(1, _SEGMENT_TOKENS // size)
    for first in range(0, full, step):
        state = _segment(x, B, C, D, out, state, s, first, min(step, full - first), size)
    if pad:
        state = _segment(x, B, C, D, out, state, s, full, 1, length - full * size)
    y = out.to(x_dtype)
    if return_final_state:
        return y, state.transpose(2, 3).reshape(batch, heads, state_size, head_dim)
    return y


def _segment(x, B, C, D, out, state, s: _Scalars, first: int, n: int, size: int) -> Tensor:
    """Chunks first .. first + n - 1 (all of `size` steps) in rank-one form: writes their outputs into `out`,
    returns the state after the last one."""
    batch, _, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group, width = heads // groups, heads // groups * head_dim
    gemms = n * batch * groups  # GEMM index k = (chunk, batch, group)
    start = first * s.dt.shape[2]
    tokens, chunks = slice(start, start + n * size), slice(first, first + n)
    xv = x[:, tokens].reshape(batch, n, size, groups, per_group, head_dim)
    xt = xv.permute(1, 0, 3, 2, 4, 5)  # [c, b, g, j, r, p], the GEMMs' order

    def scaled(scale: Tensor) -> Tensor:  # x times a per-(step, head) scale, as GEMM operands [k, size, width]
        product = torch.empty_like(xt, memory_format=torch.contiguous_format)
        return torch.mul(xt, scale[chunks, :, :, :size], out=product).view(gemms, size, width)

    def per_gemm(t: Tensor) -> Tensor:  # B or C [Bt, L, G, N] -> [k, size, N]
        return t[:, tokens].reshape(batch, n, size, groups, state_size).transpose(0, 1).transpose(2, 3) \
            .reshape(gemms, size, state_size)

    # Across chunks: S_0 = the entering state, S_c+1 = f_c S_c + u_c, in place over the u_c. One multiply-add
    # per chunk touches each state once, where a log-depth scan touches each log2(n) times, and the states are
    # large (N x width): the scan was slower (benches/RESULTS.md).
    Bk, Ck = per_gemm(B), per_gemm(C)
    now = x.new_empty(n + 1, batch, groups, state_size, per_group, head_dim)
    now[0].copy_(state)
    torch.bmm(Bk.transpose(1, 2), scaled(s.scale_state), out=now[1:].view(gemms, state_size, width))  # u_c
    for c in range(n):
        now[c + 1].addcmul_(now[c], s.decay[first + c])

    # y_i = exp(c_i) ((masked C.B^T) @ (x dt exp(-c_j)) + C_i . S_c) + D x_i, in out's own layout if it can.
    scores = torch.bmm(Ck, Bk.transpose(1, 2)).tril_()  # C_i . B_j for j <= i, shared by the group's heads
    outv = out[:, tokens].view(batch, n, size, groups, per_group, head_dim)
    direct = batch == 1 and groups == 1  # [k, i, width] is then out's layout: the GEMMs write it in place
    y = outv.view(gemms, size, width) if direct else x.new_empty(gemms, size, width)
    torch.bmm(scores, scaled(s.scale_in), out=y)
    y.baddbmm_(Ck, now[:n].view(gemms, state_size, width))
    if direct:
        outv.mul_(s.scale_out[:, chunks, :size])
    else:
        torch.mul(y.view(n, batch, groups, size, per_group, head_dim).permute(1, 0, 3, 2, 4, 5),
                  s.scale_out[:, chunks, :size], out=outv)
    if s.wild is not None and bool(s.wild[:, chunks].any()):
        b, c, h, first_wild, within = _wild_within(s, chunks, size, xv, scores)
        outv.view(batch, n, size, heads, head_dim).permute(0, 1, 3, 2, 4)[..., first_wild:, :] \
            .index_put_((b, c, h), within, accumulate=True)
    outv.addcmul_(xv, D)
    return now[n]


def _wild_within(s: _Scalars, chunks: slice, size: int, xv: Tensor, scores: Tensor):
    """The within-chunk terms left out of the rank-one form: j (and so i >= j) past the rank-one range, with
    the decay exp(c_i - c_j) taken directly, for the segment's pairs that have such steps. Steps before the
    first one past the range (in any of these pairs) have no such terms, so only the steps from there on are
    computed; that first step is the same for every later input wherever it is <= i, so causality stays
    bit-exact. Returns (b, c, h, that first step, [W, steps from it, p]). In float64 the difference of the two
    cumsums is exact to far below fp32's precision (only in fp32, under autograd, does ssd_chunked need segment
    sums)."""
    batch, n, _, groups, per_group, head_dim = xv.shape
    b, c, h = s.wild[:, chunks].nonzero().unbind(1)
    g, r = h // per_group, h % per_group
    cum = s.cum[:, chunks, :size][b, c, :, h]  # [W, i], float64
    beyond = cum < -_RANK_ONE_RANGE
    first = int(beyond.any(0).nonzero()[0])
    cum, beyond = cum[:, first:], beyond[:, first:]
    segment = cum[:, :, None] - cum[:, None, :]  # [W, i, j]: c_i - c_j = a_j+1 + ... + a_i
    keep = torch.ones(size - first, size - first, dtype=torch.bool, device=xv.device).tril() & beyond[:, None, :]
    segment = segment.masked_fill_(~keep | (segment < math.log(_NEGLIGIBLE)), float("-inf")).to(xv.dtype)
    x_dt = xv[b, c, first:, g, r, :] * s.dt[:, chunks, first:size][b, c, :, h].to(xv.dtype)[..., None]  # [W, j, p]
    within = (scores[(c * batch + b) * groups + g][:, first:, first:] * segment.exp_()) @ x_dt
    return b, c, h, first, within
