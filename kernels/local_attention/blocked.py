"""The blocked CPU path: rectangles of queries against their key halos.

Queries are cut into tiles of ty x tx. Keys are laid out band by band (a band: the ty + 2 ry rows a row of tiles
reaches), each band column by column, bands one after another in one flat sequence. In that layout every tile's
halo is one contiguous window and consecutive tiles' windows start tx * (ty + 2 ry) keys apart, so all halos are
a single strided view: the keys are copied once per band (1 + 2 ry / ty times; a 1D sequence is one band of
height 1), never once per tile. A window that runs past a band's edge reads the neighbouring band (or zero
padding); the tile mask hides those keys.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels.local_attention.naive import Window


@dataclass(frozen=True)
class Tiling:
    """The window's grid cut into tiles of ty x tx queries (the last row and column of tiles padded)."""
    win: Window
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


def tiling_of(win: Window, tile: tuple[int, int]) -> Tiling:
    return Tiling(win, max(1, min(tile[0], win.height)), max(1, min(tile[1], win.width)))


@functools.lru_cache(maxsize=8)
def _tile_bias(tiling: Tiling, device: torch.device, dtype: torch.dtype) -> Tensor:
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


def _to_tiles(x: Tensor, tiling: Tiling) -> Tensor:
    """[B, H, N, d] -> [tiles, B*H, ty*tx, d] (a strided view of a tile-major copy), zero padded past the edge."""
    b, h, _, d = x.shape
    win, (tiles_y, tiles_x), ty, tx = tiling.win, tiling.tiles, tiling.ty, tiling.tx
    grid = x.reshape(b * h, win.height, win.width, d)
    if (tiles_y * ty, tiles_x * tx) != (win.height, win.width):
        grid = F.pad(grid, (0, 0, 0, tiles_x * tx - win.width, 0, tiles_y * ty - win.height))
    grid = grid.reshape(b * h, tiles_y, ty, tiles_x, tx, d).transpose(2, 3)
    return grid.reshape(b * h, tiles_y * tiles_x, ty * tx, d).transpose(0, 1)  # no copy in 1D


def _from_tiles(x: Tensor, tiling: Tiling, shape: torch.Size) -> Tensor:
    """Inverse of _to_tiles: [tiles, B*H, ty*tx, d] -> shape [B, H, N, d]."""
    (tiles_y, tiles_x), ty, tx, d = tiling.tiles, tiling.ty, tiling.tx, x.shape[-1]
    grid = x.transpose(0, 1).reshape(-1, tiles_y, tiles_x, ty, tx, d).transpose(2, 3)
    grid = grid.reshape(-1, tiles_y * ty, tiles_x * tx, d)
    return grid[:, :tiling.win.height, :tiling.win.width].reshape(shape)


def _to_halos(x: Tensor, tiling: Tiling) -> Tensor:
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


def _from_halos(x: Tensor, tiling: Tiling, shape: torch.Size) -> Tensor:
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
class Blocked:
    """All tiles at once through ATen's fused CPU flash attention: tiles as the batch, heads as heads.

    ATen's kernel returns lse and has a backward taking it, so nothing N x N (nor tiles x T x halo) is stored.
    Heads go through in chunks whose gathered keys stay near cache size: fewer, smaller fresh buffers, faster than
    all heads at once (benches/RESULTS.md).
    """
    tile: tuple[int, int] | None = None
    chunk_bytes: int = 4 << 20

    def tiling(self, win: Window) -> Tiling:
        return tiling_of(win, self.tile or _default_tile(win))

    def chunks(self, x: Tensor, tiling: Tiling):
        heads = max(1, self.chunk_bytes // (tiling.flat_length * x.shape[-1] * x.element_size()))
        rows = x.shape[0] * x.shape[1]
        return [slice(start, min(start + heads, rows)) for start in range(0, rows, heads)]

    def forward(self, q, k, v, win: Window, scale: float) -> tuple[Tensor, Tensor]:
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

    def backward(self, dout, q, k, v, out, lse, win: Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
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
def _default_tile(win: Window) -> tuple[int, int]:
    if win.height == 1:
        return 1, (32 if win.rx <= 16 else 64)
    return 8, 8
