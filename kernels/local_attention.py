"""Local softmax attention: a 1D sliding window and a 2D neighborhood, with a reference, a blocked CPU path and
Triton kernels behind two torch custom ops.

Shapes: q, k, v [B, H, N, dh] (same heads; callers repeat GQA heads first). Scale defaults to 1/sqrt(dh).

* ``window_attention(q, k, v, window, causal)``: query i sees keys j with |i - j| <= window (and j <= i if causal).
* ``neighborhood_attention(q, k, v, (Hg, Wg), kernel)``: tokens in raster order on an Hg x Wg grid; query (y, x)
  sees keys (y', x') with |y - y'| <= r and |x - x'| <= r, r = kernel // 2 (truncated at the borders, not shifted).

Both are one geometry, `_Window`: radii (ry, rx) on a height x width grid, a 1D window being a 1 x N grid with
ry = 0. Every path works on that. The blocked CPU path cuts the grid into rectangles of queries, lays the keys out
so that each rectangle's halo (the rectangle grown by the radii) is one window of a strided view, and runs ATen's
fused CPU flash attention on all (rectangle, halo) pairs at once with a small mask. The Triton kernels own a
rectangle of queries (or keys, in the backward) and loop over only the rectangles of keys (queries) that meet its
halo, flash style. Neither ever builds the N x N matrix; the references do.

Dispatch inside the ops (graftc.kernels.dispatch): CUDA -> Triton, CPU -> blocked, GRAFTC_KERNELS=triton forces
Triton, GRAFTC_KERNELS=reference runs the dense reference. Triton on CPU tensors runs in Triton's interpreter,
which needs TRITON_INTERPRET=1 in the environment before triton is first imported (triton.jit, here and in
triton.language itself, decides then; note torch.utils.flop_counter imports triton, and graftc.kernels imports
that), so set it before importing graftc.

The ops return (out, lse): lse, each query's log-sum-exp of scaled scores, is what the backward rebuilds the
probabilities from; it is not differentiable. The public functions return out.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.dispatch import use_reference, use_triton
from graftc.kernels.flops import attention_pair_flops, formula, pairs_1d, pairs_2d

try:  # Triton is optional: without it every CPU path still works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

__all__ = [
    "window_attention", "neighborhood_attention", "window_attention_over",
    "window_attention_reference", "neighborhood_attention_reference",
    "window_attention_blocked", "neighborhood_attention_blocked",
    "window_attention_triton", "neighborhood_attention_triton",
    "flex_window_attention", "flex_neighborhood_attention",
]


# ----------------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class _Window:
    """Keys within (ry, rx) of the query on a height x width raster grid; causal keeps keys at or before it.

    Radii are clamped to the grid, so a window wider than the sequence costs no more than the sequence.
    Causal is defined only with ry = 0 (keys in the query's own row: the 1D case).
    """
    height: int
    width: int
    ry: int
    rx: int
    causal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ry", min(self.ry, self.height - 1))
        object.__setattr__(self, "rx", min(self.rx, self.width - 1))
        if self.causal and self.ry:
            raise ValueError("local attention: a causal window must stay within one row (ry = 0)")

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def right(self) -> int:
        """How far right of the query keys reach (rx to the left)."""
        return 0 if self.causal else self.rx

    def allowed(self, qy: Tensor, qx: Tensor, ky: Tensor, kx: Tensor) -> Tensor:
        """Whether query (qy, qx) sees key (ky, kx); broadcasts."""
        near = ((qy - ky).abs() <= self.ry) & ((qx - kx).abs() <= self.rx)
        return near & (kx <= qx) if self.causal else near

    def dense_mask(self, device) -> Tensor:
        """[N, N] boolean mask, for the references."""
        idx = torch.arange(self.tokens, device=device)
        y, x = idx // self.width, idx % self.width
        return self.allowed(y[:, None], x[:, None], y[None, :], x[None, :])


def _window_geometry(q: Tensor, window: int, causal: bool) -> _Window:
    if window < 0:
        raise ValueError(f"window_attention: window must be >= 0, got {window}")
    return _Window(1, q.shape[-2], 0, window, causal)


def _neighborhood_geometry(q: Tensor, height: int, width: int, kernel: int) -> _Window:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"neighborhood_attention: kernel must be odd and positive, got {kernel}")
    if height < 1 or width < 1 or height * width != q.shape[-2]:
        raise ValueError(f"neighborhood_attention: a {height}x{width} grid does not hold {q.shape[-2]} tokens")
    return _Window(height, width, kernel // 2, kernel // 2)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[-2] == 0:
        raise ValueError(f"local attention: q, k, v must share one [B, H, N > 0, dh] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _lse_dtype(q: Tensor) -> torch.dtype:
    """lse is kept in at least fp32 (float64 stays float64)."""
    return torch.promote_types(q.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Reference: dense masked attention (builds N x N; for tests and debugging)


def _dense(q: Tensor, k: Tensor, v: Tensor, win: _Window, scale: float) -> tuple[Tensor, Tensor]:
    mask = win.dense_mask(q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q.to(_lse_dtype(q)) @ k.to(_lse_dtype(q)).transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    return out, torch.logsumexp(scores, dim=-1)


@dataclass(frozen=True)
class _Reference:
    """Dense SDPA with the boolean mask, and the textbook softmax backward on the dense probabilities."""

    def forward(self, q, k, v, win: _Window, scale: float) -> tuple[Tensor, Tensor]:
        return _dense(q, k, v, win, scale)

    def backward(self, dout, q, k, v, out, lse, win: _Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dtype = _lse_dtype(q)
        q, k, v, dout, out = (x.to(dtype) for x in (q, k, v, dout, out))
        probs = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
        probs = probs.masked_fill(~win.dense_mask(q.device), 0.0)
        dscores = probs * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        return dscores @ k * scale, dscores.transpose(-1, -2) @ q * scale, probs.transpose(-1, -2) @ dout


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                               scale: float | None = None) -> Tensor:
    """SDPA with the dense |i - j| <= window (and j <= i) mask; differentiable by autograd."""
    _check_qkv(q, k, v)
    return _dense(q, k, v, _window_geometry(q, window, causal), _scale(q, scale))[0]


def neighborhood_attention_reference(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                                     scale: float | None = None) -> Tensor:
    """SDPA with the dense k x k neighborhood mask on the grid; differentiable by autograd."""
    _check_qkv(q, k, v)
    return _dense(q, k, v, _neighborhood_geometry(q, *grid, kernel), _scale(q, scale))[0]


# ----------------------------------------------------------------------------------------------------------------
# Blocked CPU path: rectangles of queries against their key halos
#
# Queries are cut into tiles of ty x tx. Keys are laid out band by band (a band: the ty + 2 ry rows a row of tiles
# reaches), each band column by column, bands one after another in one flat sequence. In that layout every tile's
# halo is one contiguous window and consecutive tiles' windows start tx * (ty + 2 ry) keys apart, so all halos are
# a single strided view: the keys are copied once per band (1 + 2 ry / ty times; a 1D sequence is one band of
# height 1), never once per tile. A window that runs past a band's edge reads the neighbouring band (or zero
# padding); the tile mask hides those keys.


@dataclass(frozen=True)
class _Tiling:
    """The window's grid cut into tiles of ty x tx queries (the last row and column of tiles padded)."""
    win: _Window
    ty: int
    tx: int

    @property
    def tiles(self) -> tuple[int, int]:
        return -(-self.win.height // self.ty), -(-self.win.width // self.tx)

    @property
    def halo(self) -> tuple[int, int]:
        """(rows, columns) of keys a tile's queries can reach."""
        return self.ty + 2 * self.win.ry, self.tx + self.win.rx + self.win.right

    @property
    def band_width(self) -> int:
        return self.tiles[1] * self.tx

    @property
    def flat_length(self) -> int:
        """Keys in the flat band layout: rx columns of zeros, the bands, `right` columns of zeros."""
        hy, win = self.halo[0], self.win
        return (win.rx + self.tiles[0] * self.band_width + win.right) * hy


def _tiling(win: _Window, tile: tuple[int, int]) -> _Tiling:
    return _Tiling(win, max(1, min(tile[0], win.height)), max(1, min(tile[1], win.width)))


@functools.lru_cache(maxsize=8)
def _tile_bias(tiling: _Tiling, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[tiles, 1, ty*tx, halo] additive mask (0 or -inf): which keys of its halo window each query sees.

    Padding queries (past the grid's edge) also see keys outside the grid, so every row keeps at least its own
    position and softmax stays finite; those queries are zero, their outputs cropped and their output gradients
    zero, so they add nothing to any gradient.
    """
    win, (hy, hx), (tiles_y, tiles_x) = tiling.win, tiling.halo, tiling.tiles
    arange = functools.partial(torch.arange, device=device)
    tile_y, tile_x = arange(tiles_y)[:, None, None, None], arange(tiles_x)[None, :, None, None]
    query, key = arange(tiling.ty * tiling.tx)[:, None], arange(hy * hx)[None, :]  # keys column by column
    qy, qx = tile_y * tiling.ty + query // tiling.tx, tile_x * tiling.tx + query % tiling.tx
    ky, kx = tile_y * tiling.ty - win.ry + key % hy, tile_x * tiling.tx - win.rx + key // hy
    key_inside = (ky >= 0) & (ky < win.height) & (kx >= 0) & (kx < win.width)
    query_outside = (qy >= win.height) | (qx >= win.width)
    seen = win.allowed(qy, qx, ky, kx) & (key_inside | query_outside)
    bias = torch.zeros(seen.shape, device=device, dtype=dtype).masked_fill_(~seen, -math.inf)
    return bias.reshape(tiles_y * tiles_x, 1, tiling.ty * tiling.tx, hy * hx)


def _to_tiles(x: Tensor, tiling: _Tiling) -> Tensor:
    """[B, H, N, d] -> [tiles, B*H, ty*tx, d] (a strided view of a tile-major copy), zero padded past the edge."""
    b, h, _, d = x.shape
    win, (tiles_y, tiles_x), ty, tx = tiling.win, tiling.tiles, tiling.ty, tiling.tx
    grid = x.reshape(b * h, win.height, win.width, d)
    if (tiles_y * ty, tiles_x * tx) != (win.height, win.width):
        grid = F.pad(grid, (0, 0, 0, tiles_x * tx - win.width, 0, tiles_y * ty - win.height))
    grid = grid.reshape(b * h, tiles_y, ty, tiles_x, tx, d).transpose(2, 3)
    return grid.reshape(b * h, tiles_y * tiles_x, ty * tx, d).transpose(0, 1)  # no copy in 1D


def _from_tiles(x: Tensor, tiling: _Tiling, shape: torch.Size) -> Tensor:
    """Inverse of _to_tiles: [tiles, B*H, ty*tx, d] -> shape [B, H, N, d]."""
    (tiles_y, tiles_x), ty, tx, d = tiling.tiles, tiling.ty, tiling.tx, x.shape[-1]
    grid = x.transpose(0, 1).reshape(-1, tiles_y, tiles_x, ty, tx, d).transpose(2, 3)
    grid = grid.reshape(-1, tiles_y * ty, tiles_x * tx, d)
    return grid[:, :tiling.win.height, :tiling.win.width].reshape(shape)


def _to_halos(x: Tensor, tiling: _Tiling) -> Tensor:
    """[B, H, N, d] -> [tiles, B*H, halo, d]: each tile's window of keys in the flat band layout (one copy)."""
    b, h, _, d = x.shape
    win, (hy, hx), (tiles_y, _), width = tiling.win, tiling.halo, tiling.tiles, tiling.band_width
    grid = x.reshape(b * h, win.height, win.width, d)
    if hy > 1:  # rows of zeros above and below, so that every band has hy rows
        grid = F.pad(grid, (0, 0, 0, 0, win.ry, tiles_y * tiling.ty - win.height + win.ry))
    flat = grid.new_zeros(b * h, tiling.flat_length, d)
    start = win.rx * hy
    bands = flat[:, start:start + tiles_y * width * hy].view(b * h, tiles_y, width, hy, d)
    bands[:, :, :win.width].copy_(grid.unfold(1, hy, tiling.ty).transpose(-1, -2))  # [BH, bands, W, hy, d]
    tiles = tiles_y * tiling.tiles[1]
    return flat.as_strided((tiles, b * h, hx * hy, d), (tiling.tx * hy * d, flat.stride(0), d, 1))


def _overlap_add(x: Tensor, dim: int, step: int, size: int) -> Tensor:
    """Adjoint of unfold(dim, size, step) on a tensor of `count` windows (dim = window index, dim + 1 = offset).

    Chunks of `step` offsets of all windows land on disjoint positions, so it is one strided add per chunk.
    """
    count = x.shape[dim]
    chunks = -(-size // step)
    out = x.new_zeros(x.shape[:dim] + ((count + chunks - 1) * step,) + x.shape[dim + 2:])
    for c in range(chunks):
        part = x.narrow(dim + 1, c * step, min(step, size - c * step))
        target = out.narrow(dim, c * step, count * step).unflatten(dim, (count, step))
        target.narrow(dim + 1, 0, part.shape[dim + 1]).add_(part)
    return out


def _from_halos(x: Tensor, tiling: _Tiling, shape: torch.Size) -> Tensor:
    """Adjoint of _to_halos: sums each window's gradient back onto the keys it was read from."""
    win, (hy, hx), (tiles_y, _), width = tiling.win, tiling.halo, tiling.tiles, tiling.band_width
    flat = _overlap_add(x.transpose(0, 1), 1, tiling.tx * hy, hx * hy)  # [BH, >= flat_length, d]
    start = win.rx * hy
    bands = flat[:, start:start + tiles_y * width * hy].unflatten(1, (tiles_y, width, hy))
    grid = _overlap_add(bands.transpose(2, 3), 1, tiling.ty, hy)  # [BH, >= padded rows, width, d]
    return grid[:, win.ry:win.ry + win.height, :win.width].reshape(shape)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class _Blocked:
    """All tiles at once through ATen's fused CPU flash attention: tiles as the batch, heads as heads.

    ATen's kernel returns lse and has a backward taking it, so nothing N x N (nor tiles x T x halo) is stored.
    Heads go through in chunks whose gathered keys stay near cache size (fewer, smaller fresh buffers: measured
    1.3-1.7x faster than all heads at once in 2D).
    """
    tile: tuple[int, int] | None = None
    chunk_bytes: int = 4 << 20

    def tiling(self, win: _Window) -> _Tiling:
        return _tiling(win, self.tile or _default_tile(win))

    def chunks(self, x: Tensor, tiling: _Tiling):
        heads = max(1, self.chunk_bytes // (tiling.flat_length * x.shape[-1] * x.element_size()))
        rows = x.shape[0] * x.shape[1]
        return [slice(start, min(start + heads, rows)) for start in range(0, rows, heads)]

    def forward(self, q, k, v, win: _Window, scale: float) -> tuple[Tensor, Tensor]:
        tiling = self.tiling(win)
        bias = _tile_bias(tiling, q.device, q.dtype)
        outs, lses = [], []
        for rows in self.chunks(q, tiling):
            q_, k_, v_ = (x.flatten(0, 1)[rows][None] for x in (q, k, v))
            out, lse = _flash_cpu(_to_tiles(q_, tiling), _to_halos(k_, tiling), _to_halos(v_, tiling),
                                  attn_mask=bias, scale=scale)
            outs.append(_from_tiles(out, tiling, q_.shape))
            lses.append(_from_tiles(lse[..., None], tiling, q_.shape[:-1] + (1,)))
        return torch.cat(outs, 1).view(q.shape), torch.cat(lses, 1).view(q.shape[:-1])

    def backward(self, dout, q, k, v, out, lse, win: _Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        tiling = self.tiling(win)
        bias = _tile_bias(tiling, q.device, q.dtype)
        grads = []
        for rows in self.chunks(q, tiling):
            do_, q_, k_, v_, out_, lse_ = (x.flatten(0, 1)[rows][None] for x in (dout, q, k, v, out, lse))
            dq, dk, dv = _flash_cpu_backward(
                _to_tiles(do_, tiling), _to_tiles(q_, tiling), _to_halos(k_, tiling), _to_halos(v_, tiling),
                _to_tiles(out_, tiling), _to_tiles(lse_[..., None], tiling)[..., 0], 0.0, False,
                attn_mask=bias, scale=scale)
            grads.append((_from_tiles(dq, tiling, q_.shape), _from_halos(dk, tiling, k_.shape),
                          _from_halos(dv, tiling, v_.shape)))
        return tuple(torch.cat(parts, 1).view(q.shape) for parts in zip(*grads))


# Query tiles for the blocked path, tuned (forward and backward) at DiT-XL/2 head shapes (16 heads x 72, N = 1024
# to 16384; 1D w = 4, 64; 2D k = 7, 9): small windows want short blocks (less halo to compute), wide ones longer
# (bigger matmuls, and less halo to zero-fill and sum back in the backward).
def _default_tile(win: _Window) -> tuple[int, int]:
    if win.height == 1:
        return 1, (32 if win.rx <= 16 else 64)
    return 8, 8


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. One program owns a rectangle of OWN_Y x OWN_X grid cells (queries in the forward and dq
# kernels, keys in the dk/dv kernel) and visits the other side in rectangles of VIS_Y x VIS_X, only over the halo
# its window reaches. All arithmetic is fp32; inputs of any float dtype are cast after loading and outputs cast
# back on store. Every load is masked.


def _jit(kernel):
    """triton.jit, or the plain function where triton is missing (it is then never launched)."""
    return kernel if triton is None else triton.jit(kernel)


@_jit
def _local_fwd_kernel(Q, K, V, O, LSE, scale, HEIGHT, WIDTH, RY, RX, D,
                      CAUSAL: tl.constexpr, OWN_Y: tl.constexpr, OWN_X: tl.constexpr,
                      VIS_Y: tl.constexpr, VIS_X: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    tiles_x = tl.cdiv(WIDTH, OWN_X)
    y0, x0 = (tile // tiles_x) * OWN_Y, (tile % tiles_x) * OWN_X
    base = bh.to(tl.int64) * HEIGHT * WIDTH * D

    own = tl.arange(0, OWN_Y * OWN_X)
    qy, qx = y0 + own // OWN_X, x0 + own % OWN_X
    q_in = (qy < HEIGHT) & (qx < WIDTH)
    dim = tl.arange(0, BLOCK_D)
    d_in = dim < D
    q_ptrs = base + (qy * WIDTH + qx)[:, None] * D + dim[None, :]
    q = tl.load(Q + q_ptrs, mask=q_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)

    # Finite start for the running max: a tile that masks a whole row then gives exp(-inf - m) = 0, not NaN.
    m = tl.full([OWN_Y * OWN_X], -1e30, tl.float32)
    total = tl.zeros([OWN_Y * OWN_X], tl.float32)
    acc = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    y_lo, y_hi = tl.maximum(y0 - RY, 0), tl.minimum(y0 + OWN_Y + RY, HEIGHT)
    x_lo, x_hi = tl.maximum(x0 - RX, 0), tl.minimum(x0 + OWN_X + RX, WIDTH)
    if CAUSAL:  # keys share the query's row (RY = 0), so none right of the tile is seen
        x_hi = tl.minimum(x_hi, x0 + OWN_X)
    vis = tl.arange(0, VIS_Y * VIS_X)
    for ky0 in range(y_lo, y_hi, VIS_Y):
        for kx0 in range(x_lo, x_hi, VIS_X):
            ky, kx = ky0 + vis // VIS_X, kx0 + vis % VIS_X
            k_in = (ky < y_hi) & (kx < x_hi)
            k_ptrs = base + (ky * WIDTH + kx)[:, None] * D + dim[None, :]
            kv_mask = k_in[:, None] & d_in[None, :]
            k = tl.load(K + k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)

            seen = (tl.abs(qy[:, None] - ky[None, :]) <= RY) & (tl.abs(qx[:, None] - kx[None, :]) <= RX)
            seen = seen & k_in[None, :]
            if CAUSAL:
                seen = seen & (kx[None, :] <= qx[:, None])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            rescale = tl.exp(m - m_new)
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new

    total = tl.where(q_in, total, 1.0)  # padding rows saw nothing; keep them finite (they are not stored)
    tl.store(O + q_ptrs, (acc / total[:, None]).to(O.dtype.element_ty), mask=q_in[:, None] & d_in[None, :])
    tl.store(LSE + bh.to(tl.int64) * HEIGHT * WIDTH + qy * WIDTH + qx, m + tl.log(total), mask=q_in)


@_jit
def _local_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, HEIGHT, WIDTH, RY, RX, D,
                     CAUSAL: tl.constexpr, OWN_Y: tl.constexpr, OWN_X: tl.constexpr,
                     VIS_Y: tl.constexpr, VIS_X: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    tiles_x = tl.cdiv(WIDTH, OWN_X)
    y0, x0 = (tile // tiles_x) * OWN_Y, (tile % tiles_x) * OWN_X
    base = bh.to(tl.int64) * HEIGHT * WIDTH * D
    row_base = bh.to(tl.int64) * HEIGHT * WIDTH

    own = tl.arange(0, OWN_Y * OWN_X)
    qy, qx = y0 + own // OWN_X, x0 + own % OWN_X
    q_in = (qy < HEIGHT) & (qx < WIDTH)
    dim = tl.arange(0, BLOCK_D)
    d_in = dim < D
    q_ptrs = base + (qy * WIDTH + qx)[:, None] * D + dim[None, :]
    q_mask = q_in[:, None] & d_in[None, :]
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row_base + qy * WIDTH + qx, mask=q_in, other=0.0)
    delta = tl.load(DELTA + row_base + qy * WIDTH + qx, mask=q_in, other=0.0)
    dq = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    y_lo, y_hi = tl.maximum(y0 - RY, 0), tl.minimum(y0 + OWN_Y + RY, HEIGHT)
    x_lo, x_hi = tl.maximum(x0 - RX, 0), tl.minimum(x0 + OWN_X + RX, WIDTH)
    if CAUSAL:
        x_hi = tl.minimum(x_hi, x0 + OWN_X)
    vis = tl.arange(0, VIS_Y * VIS_X)
    for ky0 in range(y_lo, y_hi, VIS_Y):
        for kx0 in range(x_lo, x_hi, VIS_X):
            ky, kx = ky0 + vis // VIS_X, kx0 + vis % VIS_X
            k_in = (ky < y_hi) & (kx < x_hi)
            k_ptrs = base + (ky * WIDTH + kx)[:, None] * D + dim[None, :]
            kv_mask = k_in[:, None] & d_in[None, :]
            k = tl.load(K + k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)

            seen = (tl.abs(qy[:, None] - ky[None, :]) <= RY) & (tl.abs(qx[:, None] - kx[None, :]) <= RX)
            seen = seen & k_in[None, :] & q_in[:, None]
            if CAUSAL:
                seen = seen & (kx[None, :] <= qx[:, None])
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
    tile, bh = tl.program_id(0), tl.program_id(1)
    tiles_x = tl.cdiv(WIDTH, OWN_X)
    y0, x0 = (tile // tiles_x) * OWN_Y, (tile % tiles_x) * OWN_X
    base = bh.to(tl.int64) * HEIGHT * WIDTH * D
    row_base = bh.to(tl.int64) * HEIGHT * WIDTH

    own = tl.arange(0, OWN_Y * OWN_X)
    ky, kx = y0 + own // OWN_X, x0 + own % OWN_X
    k_in = (ky < HEIGHT) & (kx < WIDTH)
    dim = tl.arange(0, BLOCK_D)
    d_in = dim < D
    k_ptrs = base + (ky * WIDTH + kx)[:, None] * D + dim[None, :]
    k_mask = k_in[:, None] & d_in[None, :]
    k = tl.load(K + k_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    v = tl.load(V + k_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    dk = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)
    dv = tl.zeros([OWN_Y * OWN_X, BLOCK_D], tl.float32)

    # The queries that see this tile's keys: the same halo (the window is symmetric), or only those at or after
    # the keys when causal.
    y_lo, y_hi = tl.maximum(y0 - RY, 0), tl.minimum(y0 + OWN_Y + RY, HEIGHT)
    x_lo, x_hi = tl.maximum(x0 - RX, 0), tl.minimum(x0 + OWN_X + RX, WIDTH)
    if CAUSAL:
        x_lo = x0
    vis = tl.arange(0, VIS_Y * VIS_X)
    for qy0 in range(y_lo, y_hi, VIS_Y):
        for qx0 in range(x_lo, x_hi, VIS_X):
            qy, qx = qy0 + vis // VIS_X, qx0 + vis % VIS_X
            q_in = (qy < y_hi) & (qx < x_hi)
            q_ptrs = base + (qy * WIDTH + qx)[:, None] * D + dim[None, :]
            q_mask = q_in[:, None] & d_in[None, :]
            q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
            do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
            lse = tl.load(LSE + row_base + qy * WIDTH + qx, mask=q_in, other=0.0)
            delta = tl.load(DELTA + row_base + qy * WIDTH + qx, mask=q_in, other=0.0)

            seen = (tl.abs(qy[:, None] - ky[None, :]) <= RY) & (tl.abs(qx[:, None] - kx[None, :]) <= RX)
            seen = seen & q_in[:, None] & k_in[None, :]
            if CAUSAL:
                seen = seen & (kx[None, :] <= qx[:, None])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [visited queries, own keys]
            p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)

    tl.store(DK + k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + k_ptrs, dv.to(DV.dtype.element_ty), mask=k_mask)


@dataclass(frozen=True)
class _Triton:
    """The Triton kernels: programs own `own` rectangles and step over halos `visit` rectangles at a time."""
    own: tuple[int, int] | None = None
    visit: tuple[int, int] | None = None

    def tiles(self, win: _Window) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.own and self.visit:
            return self.own, self.visit
        # 1D: 64 queries against 64 keys; 2D: 8 x 8 queries against halo rows 16 keys wide, 4 rows a step.
        return ((1, 64), (1, 64)) if win.height == 1 else ((8, 8), (4, 16))

    def launch(self, kernel, q: Tensor, win: _Window, scale: float, *tensors: Tensor) -> None:
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

    def forward(self, q, k, v, win: _Window, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        self.launch(_local_fwd_kernel, q, win, scale, q, k, v, out, lse)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, win: _Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
        lse = lse.float().contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # the flash preprocess: rowsum(dO * O) = sum_j P_ij dP_ij
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.launch(_local_dq_kernel, q, win, scale, q, k, v, dout, lse, delta, dq)
        self.launch(_local_dkdv_kernel, q, win, scale, q, k, v, dout, lse, delta, dk, dv)
        return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Direct paths with autograd (for benchmarks and tests; the ops run the same code)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, win: _Window, scale: float, path):
        out, lse = path.forward(q, k, v, win, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.win, ctx.scale, ctx.path = win, scale, path
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return *ctx.path.backward(dout, q, k, v, out, lse, ctx.win, ctx.scale), None, None, None


def window_attention_blocked(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                             scale: float | None = None, block: int | None = None) -> Tensor:
    """The blocked CPU path, `block` queries per tile (default: tuned); differentiable."""
    _check_qkv(q, k, v)
    path = _Blocked((1, block) if block else None)
    return _LocalAttention.apply(q, k, v, _window_geometry(q, window, causal), _scale(q, scale), path)


def neighborhood_attention_blocked(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                                   scale: float | None = None, tile: tuple[int, int] | None = None) -> Tensor:
    """The blocked CPU path, tile[0] x tile[1] queries per tile (default: tuned); differentiable."""
    _check_qkv(q, k, v)
    win = _neighborhood_geometry(q, *grid, kernel)
    return _LocalAttention.apply(q, k, v, win, _scale(q, scale), _Blocked(tuple(tile) if tile else None))


def window_attention_triton(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                            scale: float | None = None, block: int = 64) -> Tensor:
    """The Triton kernels, `block` queries per program and `block` keys per step (a power of 2); differentiable."""
    _check_qkv(q, k, v)
    path = _Triton((1, block), (1, block))
    return _LocalAttention.apply(q, k, v, _window_geometry(q, window, causal), _scale(q, scale), path)


def neighborhood_attention_triton(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                                  scale: float | None = None, tile: tuple[int, int] = (8, 8),
                                  visit: tuple[int, int] = (4, 16)) -> Tensor:
    """The Triton kernels: programs own tile rectangles, step over halos in visit rectangles (power-of-2 areas)."""
    _check_qkv(q, k, v)
    win = _neighborhood_geometry(q, *grid, kernel)
    return _LocalAttention.apply(q, k, v, win, _scale(q, scale), _Triton(tuple(tile), tuple(visit)))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops: one call in an exported graph, fake kernels for shape propagation, autograd through a backward op


def _path(q: Tensor):
    if use_reference():
        return _Reference()
    return _Triton() if use_triton(q) else _Blocked()


@torch.library.custom_op("graftc::window_attention", mutates_args=())
def _window_attention_op(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool,
                         scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _path(q).forward(q, k, v, _window_geometry(q, window, causal), scale)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@torch.library.custom_op("graftc::neighborhood_attention", mutates_args=())
def _neighborhood_attention_op(q: Tensor, k: Tensor, v: Tensor, height: int, width: int, kernel: int,
                               scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _path(q).forward(q, k, v, _neighborhood_geometry(q, height, width, kernel), scale)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@torch.library.custom_op("graftc::local_attention_backward", mutates_args=())
def _local_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 height: int, width: int, ry: int, rx: int, causal: bool,
                                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    win = _Window(height, width, ry, rx, causal)
    dq, dk, dv = _path(q).backward(dout, q, k, v, out, lse, win, scale)
    return tuple(grad.to(x.dtype).contiguous() for grad, x in zip((dq, dk, dv), (q, k, v)))


# The ops return contiguous tensors whatever the inputs' strides; the fakes say so.
def _fake_forward(q: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


_window_attention_op.register_fake(lambda q, k, v, window, causal, scale: _fake_forward(q))
_neighborhood_attention_op.register_fake(lambda q, k, v, height, width, kernel, scale: _fake_forward(q))
_local_attention_backward_op.register_fake(
    lambda dout, q, k, v, *geometry: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)))


def _save(ctx, q, k, v, output, win: _Window, scale: float) -> None:
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.geometry, ctx.scale = (win.height, win.width, win.ry, win.rx, win.causal), scale


def _grads(ctx, dout):
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.graftc.local_attention_backward(dout, q, k, v, out, lse, *ctx.geometry, ctx.scale)


def _setup_window(ctx, inputs, output):
    q, k, v, window, causal, scale = inputs
    _save(ctx, q, k, v, output, _window_geometry(q, window, causal), scale)


def _setup_neighborhood(ctx, inputs, output):
    q, k, v, height, width, kernel, scale = inputs
    _save(ctx, q, k, v, output, _neighborhood_geometry(q, height, width, kernel), scale)


_window_attention_op.register_autograd(lambda ctx, dout, _: (*_grads(ctx, dout), None, None, None),
                                       setup_context=_setup_window)
_neighborhood_attention_op.register_autograd(lambda ctx, dout, _: (*_grads(ctx, dout), None, None, None, None),
                                             setup_context=_setup_neighborhood)


def _pairs(height: int, width: int, ry: int, rx: int, causal: bool) -> int:
    """(query, key) pairs a window computes; a causal window is only ever 1D (one row)."""
    return pairs_1d(height, ry, False) * pairs_1d(width, rx, causal)


@formula(torch.ops.graftc.window_attention)
def _window_flops(q, k, v, window, causal, scale, **kwargs) -> int:
    batch, heads, tokens, head_dim = q
    return attention_pair_flops(batch, heads, _pairs(1, tokens, 0, window, causal), head_dim)


@formula(torch.ops.graftc.neighborhood_attention)
def _neighborhood_flops(q, k, v, height, width, kernel, scale, **kwargs) -> int:
    batch, heads, _, head_dim = q
    return attention_pair_flops(batch, heads, pairs_2d(height, width, kernel), head_dim)


@formula(torch.ops.graftc.local_attention_backward)
def _backward_flops(dout, q, k, v, out, lse, height, width, ry, rx, causal, scale, **kwargs) -> int:
    batch, heads, _, head_dim = q
    return 2 * attention_pair_flops(batch, heads, _pairs(height, width, ry, rx, causal), head_dim)  # dQ, dK, dV, dP


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                     scale: float | None = None) -> Tensor:
    """Sliding-window attention over [B, H, N, dh]: query i sees keys |i - j| <= window (and j <= i if causal)."""
    _check_qkv(q, k, v)
    return torch.ops.graftc.window_attention(q, k, v, int(window), bool(causal), _scale(q, scale))[0]


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                           scale: float | None = None) -> Tensor:
    """kernel x kernel neighborhood attention over [B, H, N, dh], tokens in raster order on grid (height, width)."""
    _check_qkv(q, k, v)
    height, width = grid
    return torch.ops.graftc.neighborhood_attention(q, k, v, int(height), int(width), int(kernel),
                                                   _scale(q, scale))[0]


def window_attention_over(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, keys_valid: Tensor | None = None,
                          scale: float | None = None) -> Tensor:
    """Sliding-window attention of the last Nq of Nk tokens (the new tokens of a decode step, after the cached
    ones) over all Nk keys, skipping keys marked invalid (padding). q [B, H, Nq, dh]; k, v [B, Hkv, Nk, dh] with
    H a multiple of Hkv (grouped-query attention); keys_valid [B, Nk] bool or None. Dense masked SDPA over the
    Nq x Nk block: a decode step has Nk <= window + Nq. A query that would see no valid key (a padding token's
    own row) keeps its own key, so its output stays finite; it is padding and nobody reads it."""
    nq, nk = q.shape[-2], k.shape[-2]
    if nq == 1 and nk <= window + 1 and (keys_valid is None or bool(keys_valid.all())):
        # a decode step over a window cache without padding: every key is visible, no mask to build
        return F.scaled_dot_product_attention(q, k, v, scale=_scale(q, scale), enable_gqa=k.shape[1] != q.shape[1])
    qi = torch.arange(nk - nq, nk, device=q.device)[:, None]
    kj = torch.arange(nk, device=q.device)[None, :]
    allowed = (qi - kj <= window) & ((kj <= qi) if causal else (kj - qi <= window))
    allowed = allowed[None, None]
    if keys_valid is not None:
        allowed = (allowed & keys_valid[:, None, None, :].to(torch.bool)) | (qi == kj)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=_scale(q, scale))


# ----------------------------------------------------------------------------------------------------------------
# FlexAttention peers with the same masks, for benchmarks


def _compiled_flex(mask_mod, tokens: int, device):
    """A compiled flex_attention callable (q, k, v) -> out whose block mask skips the blocks no query sees."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    attend = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: attend(q, k, v, block_mask=block_mask)


def flex_window_attention(tokens: int, window: int, causal: bool = False, device="cpu"):
    """Compiled FlexAttention with window_attention's mask: (q, k, v) -> out."""
    def mask_mod(b, h, i, j):
        near = (i - j).abs() <= window
        return near & (j <= i) if causal else near
    return _compiled_flex(mask_mod, tokens, device)


def flex_neighborhood_attention(grid: tuple[int, int], kernel: int, device="cpu"):
    """Compiled FlexAttention with neighborhood_attention's mask (tokens in raster order): (q, k, v) -> out.

    Reordering tokens into 8 x 16 tiles first (so Flex's 128-token blocks are rectangles) measured 1.5-2x slower
    on 32 x 32 and 64 x 64 grids: a 128-token raster block (whole rows) meets no more key blocks there.
    """
    height, width = grid
    r = kernel // 2

    def mask_mod(b, h, i, j):
        return ((i // width - j // width).abs() <= r) & ((i % width - j % width).abs() <= r)
    return _compiled_flex(mask_mod, height * width, device)
