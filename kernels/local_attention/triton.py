"""Local attention's Triton kernels. One program owns a rectangle of OWN_Y x OWN_X grid cells (queries in the forward
and dq kernels, keys in the dk/dv kernel) and visits the other side in rectangles of VIS_Y x VIS_X, only over the
halo its window reaches. All arithmetic is fp32; inputs of any float dtype are cast after loading and outputs cast
back on store. Every load is masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from graftc.kernels.local_attention.naive import Window

try:  # Triton is optional: without it every CPU path still works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None


def _jit(kernel):
    """triton.jit, or the plain function where triton is missing (it is then never launched)."""
    return kernel if triton is None else triton.jit(kernel)


@_jit
def _program(HEIGHT, WIDTH, D, OWN_Y: tl.constexpr, OWN_X: tl.constexpr):
    """This program's rectangle: its first cell (y0, x0), and where its (batch, head) starts in [.., N, D] and
    in [.., N]."""
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_x = tl.cdiv(WIDTH, OWN_X)
    return (tile // tiles_x) * OWN_Y, (tile % tiles_x) * OWN_X, bh * HEIGHT * WIDTH * D, bh * HEIGHT * WIDTH


@_jit
def _cells(y0, x0, y_end, x_end, WIDTH, D, base, SIZE_Y: tl.constexpr, SIZE_X: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """The SIZE_Y x SIZE_X cells from (y0, x0): their coordinates, which lie before (y_end, x_end), and their
    elements' offsets [cells, BLOCK_D] with the mask to load them by."""
    cell = tl.arange(0, SIZE_Y * SIZE_X)
    y, x = y0 + cell // SIZE_X, x0 + cell % SIZE_X
    inside = (y < y_end) & (x < x_end)
    dim = tl.arange(0, BLOCK_D)
    return y, x, inside, base + (y * WIDTH + x)[:, None] * D + dim[None, :], inside[:, None] & (dim < D)[None, :]


@_jit
def _halo(y0, x0, HEIGHT, WIDTH, RY, RX, OWN_Y: tl.constexpr, OWN_X: tl.constexpr, CAUSAL: tl.constexpr,
          OWN_KEYS: tl.constexpr):
    """The cells the rectangle at (y0, x0) meets: rows y_lo..y_hi, columns x_lo..x_hi (exclusive). The window is
    symmetric, so the keys its queries see and the queries that see its keys (OWN_KEYS) share one halo, but for a
    causal window (one row, RY = 0): keys up to the rectangle's right edge, queries from its left edge."""
    y_lo, y_hi = tl.maximum(y0 - RY, 0), tl.minimum(y0 + OWN_Y + RY, HEIGHT)
    x_lo, x_hi = tl.maximum(x0 - RX, 0), tl.minimum(x0 + OWN_X + RX, WIDTH)
    if CAUSAL:
        if OWN_KEYS:
            x_lo = x0
        else:
            x_hi = tl.minimum(x_hi, x0 + OWN_X)
    return y_lo, y_hi, x_lo, x_hi


@_jit
def _seen(qy, qx, ky, kx, RY, RX, CAUSAL: tl.constexpr):
    """[queries, keys]: whether each query's window holds each key."""
    seen = (tl.abs(qy[:, None] - ky[None, :]) <= RY) & (tl.abs(qx[:, None] - kx[None, :]) <= RX)
    if CAUSAL:
        seen = seen & (kx[None, :] <= qx[:, None])
    return seen


@_jit
def _load2(A, B, offsets, mask):
    """The same elements of two tensors (keys and values, or queries and their output gradients), in fp32."""
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    return a, tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)


@_jit
def _local_fwd_kernel(Q, K, V, O, LSE, scale, HEIGHT, WIDTH, RY, RX, D,
                      CAUSAL: tl.constexpr, OWN_Y: tl.constexpr, OWN_X: tl.constexpr,
                      VIS_Y: tl.constexpr, VIS_X: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    y0, x0, base, row_base = _program(HEIGHT, WIDTH, D, OWN_Y, OWN_X)
    qy, qx, q_in, q_ptrs, q_mask = _cells(y0, x0, HEIGHT, WIDTH, WIDTH, D, base, OWN_Y, OWN_X, BLOCK_D)
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0).to(tl.float32)

    # Finite start for the running max: a tile that masks a whole row then gives exp(-inf - m) = 0, not NaN.
    m = tl.full([OWN_Y * OWN_X], -1e30, tl.float32)
    total = tl.zeros([OWN_Y * OWN_X], tl.float32)
    acc = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    y_lo, y_hi, x_lo, x_hi = _halo(y0, x0, HEIGHT, WIDTH, RY, RX, OWN_Y, OWN_X, CAUSAL, False)
    for ky0 in range(y_lo, y_hi, VIS_Y):
        for kx0 in range(x_lo, x_hi, VIS_X):
            ky, kx, k_in, k_ptrs, kv_mask = _cells(ky0, kx0, y_hi, x_hi, WIDTH, D, base, VIS_Y, VIS_X, BLOCK_D)
            k, v = _load2(K, V, k_ptrs, kv_mask)
            seen = _seen(qy, qx, ky, kx, RY, RX, CAUSAL) & k_in[None, :]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            rescale = tl.exp(m - m_new)
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new

    total = tl.where(q_in, total, 1.0)  # padding rows saw nothing; keep them finite (they are not stored)
    tl.store(O + q_ptrs, (acc / total[:, None]).to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + row_base + qy * WIDTH + qx, m + tl.log(total), mask=q_in)


@_jit
def _local_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, HEIGHT, WIDTH, RY, RX, D,
                     CAUSAL: tl.constexpr, OWN_Y: tl.constexpr, OWN_X: tl.constexpr,
                     VIS_Y: tl.constexpr, VIS_X: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    y0, x0, base, row_base = _program(HEIGHT, WIDTH, D, OWN_Y, OWN_X)
    qy, qx, q_in, q_ptrs, q_mask = _cells(y0, x0, HEIGHT, WIDTH, WIDTH, D, base, OWN_Y, OWN_X, BLOCK_D)
    q, do = _load2(Q, DO, q_ptrs, q_mask)
    rows = row_base + qy * WIDTH + qx
    lse, delta = tl.load(LSE + rows, mask=q_in, other=0.0), tl.load(DELTA + rows, mask=q_in, other=0.0)
    dq = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    y_lo, y_hi, x_lo, x_hi = _halo(y0, x0, HEIGHT, WIDTH, RY, RX, OWN_Y, OWN_X, CAUSAL, False)
    for ky0 in range(y_lo, y_hi, VIS_Y):
        for kx0 in range(x_lo, x_hi, VIS_X):
            ky, kx, k_in, k_ptrs, kv_mask = _cells(ky0, kx0, y_hi, x_hi, WIDTH, D, base, VIS_Y, VIS_X, BLOCK_D)
            k, v = _load2(K, V, k_ptrs, kv_mask)
            seen = _seen(qy, qx, ky, kx, RY, RX, CAUSAL) & k_in[None, :] & q_in[:, None]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, k, input_precision=PRECISION)

    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@_jit
def _local_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, HEIGHT, WIDTH, RY, RX, D,
                       CAUSAL: tl.constexpr, OWN_Y: tl.constexpr, OWN_X: tl.constexpr,
                       VIS_Y: tl.constexpr, VIS_X: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    y0, x0, base, row_base = _program(HEIGHT, WIDTH, D, OWN_Y, OWN_X)
    ky, kx, k_in, k_ptrs, k_mask = _cells(y0, x0, HEIGHT, WIDTH, WIDTH, D, base, OWN_Y, OWN_X, BLOCK_D)
    k, v = _load2(K, V, k_ptrs, k_mask)
    dk = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)
    dv = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    y_lo, y_hi, x_lo, x_hi = _halo(y0, x0, HEIGHT, WIDTH, RY, RX, OWN_Y, OWN_X, CAUSAL, True)
    for qy0 in range(y_lo, y_hi, VIS_Y):
        for qx0 in range(x_lo, x_hi, VIS_X):
            qy, qx, q_in, q_ptrs, q_mask = _cells(qy0, qx0, y_hi, x_hi, WIDTH, D, base, VIS_Y, VIS_X, BLOCK_D)
            q, do = _load2(Q, DO, q_ptrs, q_mask)
            rows = row_base + qy * WIDTH + qx
            lse, delta = tl.load(LSE + rows, mask=q_in, other=0.0), tl.load(DELTA + rows, mask=q_in, other=0.0)
            seen = _seen(qy, qx, ky, kx, RY, RX, CAUSAL) & q_in[:, None] & k_in[None, :]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [visited queries, own keys]
            p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)

    tl.store(DK + k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + k_ptrs, dv.to(DV.dtype.element_ty), mask=k_mask)


@dataclass(frozen=True)
class Triton:
    """The Triton kernels: programs own `own` rectangles and step over halos `visit` rectangles at a time."""
    own: tuple[int, int] | None = None
    visit: tuple[int, int] | None = None

    def tiles(self, win: Window) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.own and self.visit:
            return self.own, self.visit
        # 1D: 64 queries against 64 keys; 2D: 8 x 8 queries against halo rows 16 keys wide, 4 rows a step.
        return ((1, 64), (1, 64)) if win.height == 1 else ((8, 8), (4, 16))

    def launch(self, kernel, q: Tensor, win: Window, scale: float, *tensors: Tensor) -> None:
        if triton is None:
            raise RuntimeError("local attention: the Triton path needs triton, which is not installed")
        if q.device.type == "cpu" and isinstance(kernel, triton.runtime.JITFunction):  # compiled, not interpreted
            raise RuntimeError("local attention: Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                               "before triton is first imported")
        (own_y, own_x), (visit_y, visit_x) = self.tiles(win)
        batch, heads, _, dim = q.shape
        grid = (-(-win.height // own_y) * -(-win.width // own_x), batch * heads)
        kernel[grid](*tensors, scale, win.height, win.width, win.ry, win.rx, dim,
                     CAUSAL=win.causal, OWN_Y=own_y, OWN_X=own_x, VIS_Y=visit_y, VIS_X=visit_x,
                     BLOCK_D=max(16, triton.next_power_of_2(dim)),
                     # fp32 inputs get exact fp32 products; 16-bit inputs fit tf32's mantissa exactly.
                     PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)

    def forward(self, q, k, v, win: Window, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        self.launch(_local_fwd_kernel, q, win, scale, q, k, v, out, lse)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, win: Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
        lse = lse.float().contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # the flash preprocess: rowsum(dO * O) = sum_j P_ij dP_ij
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.launch(_local_dq_kernel, q, win, scale, q, k, v, dout, lse, delta, dq)
        self.launch(_local_dkdv_kernel, q, win, scale, q, k, v, dout, lse, delta, dk, dv)
        return dq, dk, dv
