"""Local softmax attention, the definition: which keys each query sees (`Window`), and dense masked attention
over it (builds N x N: for tests, debugging, GRAFTC_KERNELS=reference and the few keys of a decode step)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Window:
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


def window_geometry(q: Tensor, window: int, causal: bool) -> Window:
    if window < 0:
        raise ValueError(f"window_attention: window must be >= 0, got {window}")
    return Window(1, q.shape[-2], 0, window, causal)


def neighborhood_geometry(q: Tensor, height: int, width: int, kernel: int) -> Window:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"neighborhood_attention: kernel must be odd and positive, got {kernel}")
    if height < 1 or width < 1 or height * width != q.shape[-2]:
        raise ValueError(f"neighborhood_attention: a {height}x{width} grid does not hold {q.shape[-2]} tokens")
    return Window(height, width, kernel // 2, kernel // 2)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[-2] == 0:
        raise ValueError(f"local attention: q, k, v must share one [B, H, N > 0, dh] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def scale_of(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def lse_dtype(q: Tensor) -> torch.dtype:
    """lse is kept in at least fp32 (float64 stays float64)."""
    return torch.promote_types(q.dtype, torch.float32)


def _dense(q: Tensor, k: Tensor, v: Tensor, win: Window, scale: float) -> tuple[Tensor, Tensor]:
    mask = win.dense_mask(q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q.to(lse_dtype(q)) @ k.to(lse_dtype(q)).transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    return out, torch.logsumexp(scores, dim=-1)


@dataclass(frozen=True)
class Reference:
    """Dense SDPA with the boolean mask, and the textbook softmax backward on the dense probabilities."""

    def forward(self, q, k, v, win: Window, scale: float) -> tuple[Tensor, Tensor]:
        return _dense(q, k, v, win, scale)

    def backward(self, dout, q, k, v, out, lse, win: Window, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dtype = lse_dtype(q)
        q, k, v, dout, out = (x.to(dtype) for x in (q, k, v, dout, out))
        probs = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
        probs = probs.masked_fill(~win.dense_mask(q.device), 0.0)
        dscores = probs * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        return dscores @ k * scale, dscores.transpose(-1, -2) @ q * scale, probs.transpose(-1, -2) @ dout


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                               scale: float | None = None) -> Tensor:
    """SDPA with the dense |i - j| <= window (and j <= i) mask; differentiable by autograd."""
    check_qkv(q, k, v)
    return _dense(q, k, v, window_geometry(q, window, causal), scale_of(q, scale))[0]


def neighborhood_attention_reference(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                                     scale: float | None = None) -> Tensor:
    """SDPA with the dense k x k neighborhood mask on the grid; differentiable by autograd."""
    check_qkv(q, k, v)
    return _dense(q, k, v, neighborhood_geometry(q, *grid, kernel), scale_of(q, scale))[0]


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
        return F.scaled_dot_product_attention(q, k, v, scale=scale_of(q, scale), enable_gqa=k.shape[1] != q.shape[1])
    qi = torch.arange(nk - nq, nk, device=q.device)[:, None]
    kj = torch.arange(nk, device=q.device)[None, :]
    allowed = (qi - kj <= window) & ((kj <= qi) if causal else (kj - qi <= window))
    allowed = allowed[None, None]
    if keys_valid is not None:
        allowed = (allowed & keys_valid[:, None, None, :].to(torch.bool)) | (qi == kj)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale_of(q, scale))
