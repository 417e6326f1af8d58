"""Mamba-2's scalar-decay state space (SSD): the sequential reference and the chunked algorithm.

Per head h with head dim P and state size N, heads sharing B and C within a group:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * B_t x_t^T        state: [N, P]
    y_t     = C_t^T state_t + D_h * x_t

Shapes: x [Bt, L, H, P]; dt [Bt, L, H] (positive, already softplus'ed); A [H] (negative);
B, C [Bt, L, G, N] with H % G == 0 (head h reads group h // (H // G)); D [H]; state [Bt, H, N, P].

The chunked form splits L into chunks of Q steps. Inside a chunk the recurrence unrolls into a masked
attention-like product (C_i . B_j) * exp(a_j+1 + ... + a_i) with a = dt * A, computed as batched matmuls;
across chunks only the [N, P] state is carried, by a scan over L / Q steps.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.dispatch import use_reference, use_triton
from graftc.kernels.flops import formula

__all__ = ["ssd", "ssd_reference", "ssd_chunked", "ssd_fast"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; float64 stays float64 (tests use it as the truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, initial_state) -> None:
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
    _check(x, dt, A, B, C, D, initial_state)
    dtype = _compute_dtype(x)
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


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
                initial_state: Tensor | None = None, return_final_state: bool = False):
    """The chunked SSD algorithm; same contract as ssd_reference, differentiable by autograd."""
    _check(x, dt, A, B, C, D, initial_state)
    if chunk < 1:
        raise ValueError(f"ssd: chunk must be positive, got {chunk}")
    dtype = _compute_dtype(x)
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
    # that difference of two large sums loses the small segments that matter most (measured: often 10x
    # or more error in the gradient of A). The -inf mask goes in before exp, so nothing overflows to inf.
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
# Rank-one decay form of the chunked SSD: the forward fast path (CPU default).
#
# Inside a chunk, exp(c_i - c_j) = exp(c_i - r) * exp(r - c_j) for any reference r (c = inclusive cumsum of
# a = dt * A within the chunk). Scaling the inputs by exp(r - c_j) and the outputs by exp(c_i - r) turns the
# per-head decay mask into two diagonal scalings, so all heads of a group share one masked C.B^T, and a
# chunk's within-chunk product, its state contribution and its read of the carried state are one GEMM each
# over all the group's heads ([Q, Q] @ [Q, r*P], [r*P, Q] @ [Q, N], [Q, N] @ [N, r*P]): no [heads, Q, Q]
# tensor is ever formed. r = c_last / 2 keeps both factors within exp(+-|c_last| / 2); a (chunk, head) that
# decays by more than _RANK_ONE_RANGE e-folds over the chunk would push them towards fp32's limits, so it
# takes the segment-sum form instead, on that subset only. The cumsums and exponents are computed in
# float64: they are [L, H] scalars (1/P of the activations), and the wider type keeps c_i - r exact to fp32
# precision however large c grows.
# Across chunks the states are not scanned one chunk at a time (two small ops per chunk) but mixed by one
# batched GEMM per segment: per head, a lower-triangular [n+1, n+1] matrix of chunk-to-chunk decays
# (products of per-chunk factors, from float64 cumsums) times the [n+1, P*N] stack of entering state and
# chunk contributions. The sequence is processed in segments of about _SEGMENT_TOKENS tokens, so every
# temporary is a few MB: it stays in cache, and the allocator reuses it instead of mapping fresh pages
# (first-touch page faults cost as much as the arithmetic here). Few, large ops also matter on a shared
# machine: each parallel op can wait for a descheduled worker thread.

_RANK_ONE_RANGE = 100.0  # factors up to exp(50): far from fp32's exp(+-87), no product over- or underflows
_SEGMENT_TOKENS = 1024


def ssd_fast(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
             initial_state: Tensor | None = None, return_final_state: bool = False):
    """The chunked SSD in rank-one decay form: same contract and FLOPs as ssd_chunked, far faster on CPU.
    For forward passes: the op's backward differentiates ssd_chunked instead, whose segment sums keep the
    gradient of A exact (a difference of cumsums, which autograd would see here, loses it)."""
    _check(x, dt, A, B, C, D, initial_state)
    if chunk < 1:
        raise ValueError(f"ssd: chunk must be positive, got {chunk}")
    dtype, wide = _compute_dtype(x), torch.float64
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    size = min(chunk, length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length

    # Per (step, head) scalars in float64, chunked and padded with dt = 0 (no decay: c_last of a short last
    # chunk is its last real c_i).
    dt_c = F.pad(dt.to(wide), (0, 0, 0, pad)).reshape(batch, n_chunks, size, heads)
    cum = (dt_c * A.to(wide)).cumsum(2)  # c_i = a_0 + ... + a_i within each chunk, <= 0
    last = cum[:, :, -1]  # [b, c, h]: the chunk's total decay
    wild = last < -_RANK_ONE_RANGE
    ref = torch.where(wild, torch.zeros_like(last), 0.5 * last)
    ref_next = F.pad(ref[:, 1:], (0, 0, 0, 1))  # 0 after the last chunk: the final state is unscaled
    inward = torch.exp(ref[:, :, None] - cum)  # exp(ref - c_j); may overflow for the wild pairs (zeroed below)
    scalars = _Scalars(
        dt=dt_c, cum=cum, wild=wild if bool(wild.any()) else None, ref_next=ref_next,
        # inputs times dt_j exp(ref - c_j) (0 for the segment-sum pairs), chunk-major [c, b, g, i, r, 1]
        scale_in=_grouped((dt_c * inward).masked_fill(wild[:, :, None], 0.0), groups, dtype)
        .permute(1, 0, 3, 2, 4)[..., None].contiguous(),
        scale_out=_grouped(inward.reciprocal_(), groups, dtype)[..., None],  # exp(c_i - ref): [b, c, i, g, r, 1]
        # log of the factor taking a state relative to ref_c through chunk c, re-referenced to ref_c+1
        log_carry=last - ref + ref_next,  # [b, c, h], <= 0
    )

    x = x.to(dtype)
    B, C, D = B.to(dtype), C.to(dtype), D.to(dtype).reshape(groups, per_group, 1)
    out = torch.empty(batch, length, heads, head_dim, dtype=dtype, device=x.device)
    # The state entering the next chunk, times exp(ref of that chunk), transposed: [b, g, r, p, n].
    state = x.new_zeros(batch, groups, per_group, head_dim, state_size)
    if initial_state is not None:
        initial = initial_state.to(dtype).reshape(batch, groups, per_group, state_size, head_dim).transpose(3, 4)
        state = initial * torch.exp(ref[:, 0]).to(dtype).reshape(batch, groups, per_group, 1, 1)
    full = length // size
    step = max(1, _SEGMENT_TOKENS // size)
    for first in range(0, full, step):
        state = _segment(x, B, C, D, out, state, scalars, first, min(step, full - first), size)
    if pad:
        state = _segment(x, B, C, D, out, state, scalars, full, 1, length - full * size)
    y = out.to(x.dtype) if out.dtype != x.dtype else out
    if return_final_state:
        return y, state.transpose(3, 4).reshape(batch, heads, state_size, head_dim)
    return y


class _Scalars(NamedTuple):
    dt: Tensor  # [b, c, i, h] float64
    cum: Tensor  # [b, c, i, h] float64
    wild: Tensor | None  # [b, c, h] bool: the pairs in segment-sum form, None if there are none
    ref_next: Tensor  # [b, c, h] float64
    scale_in: Tensor  # [c, b, g, i, r, 1]
    scale_out: Tensor  # [b, c, i, g, r, 1]
    log_carry: Tensor  # [b, c, h] float64


def _grouped(t: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """[b, c, (i,) h] -> [b, c, (i,) g, r] in dtype."""
    return t.to(dtype).reshape(*t.shape[:-1], groups, -1)


def _segment(x, B, C, D, out, state, s: _Scalars, first: int, n: int, size: int) -> Tensor:
    """Chunks first .. first + n - 1 (all of `size` steps) in rank-one form: writes their outputs into `out`,
    returns the state entering the next chunk (relative to its reference)."""
    batch, _, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group, width = heads // groups, heads // groups * head_dim
    gemms = n * batch * groups  # GEMM index k = (chunk, batch, group)
    tokens = slice(first * s.dt.shape[2], first * s.dt.shape[2] + n * size)
    chunks = slice(first, first + n)
    xv = x[:, tokens].reshape(batch, n, size, groups, per_group, head_dim)
    xs = x.new_empty(n, batch, groups, size, per_group, head_dim)
    torch.mul(xv.permute(1, 0, 3, 2, 4, 5), s.scale_in[chunks, :, :, :size], out=xs)
    xs = xs.view(gemms, size, width)

    def per_gemm(t: Tensor) -> Tensor:  # B or C [Bt, L, G, N] -> [k, size, N]
        return t[:, tokens].reshape(batch, n, size, groups, state_size).transpose(0, 1).transpose(2, 3) \
            .reshape(gemms, size, state_size)

    Bk, Ck = per_gemm(B), per_gemm(C)
    scores = torch.bmm(Ck, Bk.transpose(1, 2)).tril_()  # C_i . B_j for j <= i, shared by the group's heads
    outv = out[:, tokens].view(batch, n, size, groups, per_group, head_dim)
    direct = batch == 1 and groups == 1  # then [k, i, width] is out's own layout: the GEMMs write it in place
    y = outv.view(gemms, size, width) if direct else x.new_empty(gemms, size, width)
    torch.bmm(scores, xs, out=y)  # the within-chunk part, before the output scaling

    # parts[0]: the state entering the segment; parts[c + 1]: what chunk c adds, xs^T B (relative to ref_c).
    # Layout [c, b, g, r, p, n]: each head's [P, N] state is one contiguous block.
    parts = x.new_empty(n + 1, batch, groups, per_group, head_dim, state_size)
    parts[0].copy_(state)
    torch.bmm(xs.transpose(1, 2), Bk, out=parts[1:].view(gemms, width, state_size))
    wild = None if s.wild is None else s.wild[:, chunks]
    patch = None
    if wild is not None and bool(wild.any()):
        states, patch = _scan_with_wild_pairs(parts, s, chunks, size, xv, scores, Bk)
    else:
        # states[c] = sum_m decay[c, m] parts[m], per head: decay[c, 0] = prod_{k < c} f_k,
        # decay[c, m >= 1] = prod_{m - 1 <= k < c} f_k with f_k = exp(log_carry_k), 0 above the diagonal.
        log_carry = s.log_carry[:, chunks]  # [b, n, h]
        total = F.pad(log_carry.cumsum(1), (0, 0, 1, 0))  # [b, n + 1, h]: log prod_{k < c} f_k
        start = torch.cat([total[:, :1], total[:, :-1]], dim=1)  # the same, up to where each part enters
        log_decay = (total[:, :, None] - start[:, None, :]).permute(0, 3, 1, 2)  # [b, h, c, m]
        causal = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(log_decay.masked_fill(~causal, float("-inf"))).to(x.dtype)
        states = torch.empty_like(parts)
        flat = (n + 1, batch * heads, head_dim * state_size)  # per head: [c, P*N] with a row stride of all heads
        torch.bmm(decay.reshape(batch * heads, n + 1, n + 1), parts.view(flat).transpose(0, 1),
                  out=states.view(flat).transpose(0, 1))
    # + C_i . (state entering the chunk)
    y.baddbmm_(Ck, states[:n].view(gemms, width, state_size).transpose(1, 2))

    # y_i = exp(c_i - ref) (within + carried) + D x_i
    scale_out = s.scale_out[:, chunks, :size]
    if direct:
        outv.mul_(scale_out)
    else:
        torch.mul(y.view(n, batch, groups, size, per_group, head_dim).permute(1, 0, 3, 2, 4, 5), scale_out, out=outv)
    if patch is not None:
        b, c, h, within = patch
        outv.view(batch, n, size, heads, head_dim).permute(0, 1, 3, 2, 4).index_put_((b, c, h), within, accumulate=True)
    outv.addcmul_(xv, D)
    return states[n]


def _scan_with_wild_pairs(parts, s: _Scalars, chunks: slice, size: int, xv, scores, Bk):
    """The segment's (chunk, head) pairs that decay too much for the rank-one form, in segment-sum form as in
    ssd_chunked. What they add to the state joins a sequential scan over the segment's chunks, done in place
    on `parts`, which is returned as the states entering each chunk (and the next), as the mixing GEMM
    would. Their within-chunk outputs are returned as (b, c, h, [W, i, p]), to add once `out` is scaled."""
    batch, n, _, groups, per_group, head_dim = xv.shape
    dtype = xv.dtype
    b, c, h = s.wild[:, chunks].nonzero().unbind(1)
    g, r = h // per_group, h % per_group
    k = (c * batch + b) * groups + g  # the GEMM index of each pair
    cum = s.cum[:, chunks, :size][b, c, :, h]  # [W, i], float64
    log_decay = torch.cat([cum[:, :1], cum[:, 1:] - cum[:, :-1]], dim=1)  # a_i back (exact: a_i was added)
    causal = torch.ones(size, size, dtype=torch.bool, device=xv.device).tril()
    segment = log_decay[:, :, None].expand(-1, size, size).masked_fill(~causal.tril(-1), 0.0)
    segment = segment.cumsum(1).masked_fill(~causal, float("-inf"))  # [W, i, j]: a_{j+1} + ... + a_i
    x_dt = xv[b, c, :, g, r, :] * s.dt[:, chunks, :size][b, c, :, h].to(dtype)[..., None]  # [W, j, p]
    within = (scores[k] * torch.exp(segment).to(dtype)) @ x_dt  # [W, i, p]
    to_end = torch.exp(segment[:, -1, :]).to(dtype)  # [W, j]: exp(a_{j+1} + ... + a_last)
    added = x_dt.transpose(1, 2) @ (Bk[k] * to_end[..., None])  # [W, p, N]
    extra = torch.zeros_like(parts[1:])  # [n, b, g, r, p, N]
    extra[c, b, g, r] = added * torch.exp(s.ref_next[:, chunks][b, c, h]).to(dtype)[:, None, None]
    carry = torch.exp(s.log_carry[:, chunks]).to(dtype).reshape(batch, n, groups, per_group, 1, 1).transpose(0, 1)
    for step in range(n):
        parts[step + 1].add_(parts[step]).mul_(carry[step]).add_(extra[step])
    return parts, (b, c, h, within)


def _run(x, dt, A, B, C, D, chunk, initial_state, differentiable: bool = False):
    """The implementation the current GRAFTC_KERNELS mode selects, returning (y, final state). The backward
    asks for a `differentiable` one: the rank-one form's forward is exact, but its gradient of A is not."""
    if use_reference():
        return ssd_reference(x, dt, A, B, C, D, initial_state, return_final_state=True)
    if not differentiable and not use_triton(x):  # CPU tensors in auto mode: the fast forward
        return ssd_fast(x, dt, A, B, C, D, chunk, initial_state, return_final_state=True)
    # No Triton kernel for SSD yet: CUDA tensors and GRAFTC_KERNELS=triton take the chunked path.
    return ssd_chunked(x, dt, A, B, C, D, chunk, initial_state, return_final_state=True)


@torch.library.custom_op("graftc::ssd", mutates_args=())
def _ssd_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int,
            initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    y, state = _run(x, dt, A, B, C, D, chunk, initial_state)
    return y, state.contiguous()


@_ssd_op.register_fake
def _(x, dt, A, B, C, D, chunk, initial_state):
    batch, _, heads, head_dim = x.shape
    state = x.new_empty(batch, heads, B.shape[3], head_dim, dtype=_compute_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), state


@formula(torch.ops.graftc.ssd)
def _ssd_flops(x, dt, A, B, C, D, chunk, initial_state, **kwargs) -> int:
    """Chunked SSD: C.B^T within a chunk (per group), its product with x (per head), state in and out."""
    batch, length, heads, head_dim = x
    groups, state = B[2], B[3]
    q = min(chunk, length)
    return 2 * batch * length * (groups * q * state + heads * q * head_dim + 2 * heads * state * head_dim)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, chunk, initial_state = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state)
    ctx.chunk = chunk


def _backward(ctx, grad_y, grad_state):
    """Recompute the forward under torch.func.vjp: no chunk-sized intermediates are kept between
    forward and backward (like activation checkpointing), at the price of one extra forward."""
    x, dt, A, B, C, D, initial_state = ctx.saved_tensors
    primals = (x, dt, A, B, C, D) if initial_state is None else (x, dt, A, B, C, D, initial_state)

    def forward(x, dt, A, B, C, D, *initial):
        return _run(x, dt, A, B, C, D, ctx.chunk, initial[0] if initial else None, differentiable=True)

    (y, state), vjp = torch.func.vjp(forward, *primals)
    grads = vjp((torch.zeros_like(y) if grad_y is None else grad_y,
                 torch.zeros_like(state) if grad_state is None else grad_state))
    return (*grads[:6], None, grads[6] if initial_state is not None else None)


_ssd_op.register_autograd(_backward, setup_context=_setup_context)


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 64,
        initial_state: Tensor | None = None, return_final_state: bool = False):
    """Mamba-2 SSD as one op (torch.ops.graftc.ssd): the chunked path, or the sequential reference
    under GRAFTC_KERNELS=reference. Returns y [Bt, L, H, P], and the final state
    [Bt, H, N, P] (fp32 or wider) if return_final_state."""
    _check(x, dt, A, B, C, D, initial_state)
    y, state = torch.ops.graftc.ssd(x, dt, A, B, C, D, chunk, initial_state)
    return (y, state) if return_final_state else y
