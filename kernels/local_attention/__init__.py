"""Local softmax attention: a 1D sliding window and a 2D neighborhood, with a reference, a blocked CPU path and
Triton kernels behind two torch custom ops.

Shapes: q, k, v [B, H, N, dh] (same heads; callers repeat GQA heads first). Scale defaults to 1/sqrt(dh).

* ``window_attention(q, k, v, window, causal)``: query i sees keys j with |i - j| <= window (and j <= i if causal).
* ``neighborhood_attention(q, k, v, (Hg, Wg), kernel)``: tokens in raster order on an Hg x Wg grid; query (y, x)
  sees keys (y', x') with |y - y'| <= r and |x - x'| <= r, r = kernel // 2 (truncated at the borders, not shifted).

Both are one geometry, `Window` (naive.py): radii (ry, rx) on a height x width grid, a 1D window being a 1 x N grid
with ry = 0. Every path works on that. The blocked CPU path (blocked.py) cuts the grid into rectangles of queries,
lays the keys out so that each rectangle's halo (the rectangle grown by the radii) is one window of a strided view,
and runs ATen's fused CPU flash attention on all (rectangle, halo) pairs at once with a small mask. The Triton
kernels (triton.py) own a rectangle of queries (or keys, in the backward) and loop over only the rectangles of keys
(queries) that meet its halo, flash style. Neither ever builds the N x N matrix; the references do.

Dispatch (graftc.kernels.family): CUDA -> Triton, CPU -> blocked, GRAFTC_KERNELS=triton forces Triton,
GRAFTC_KERNELS=reference runs the dense reference. Triton on CPU tensors runs in Triton's interpreter, which needs
TRITON_INTERPRET=1 in the environment before triton is first imported (triton.jit, in triton.py and in
triton.language itself, decides then; note torch.utils.flop_counter imports triton, and graftc.kernels imports
that), so set it before importing graftc.

The ops return (out, lse): lse, each query's log-sum-exp of scaled scores, is what the backward op
(`graftc::local_attention_backward`, shared by both) rebuilds the probabilities from; it is not differentiable.
The public functions return out.
"""
from __future__ import annotations

from torch import Tensor

from graftc.kernels.family import Family
from graftc.kernels.flops import attention_pair_flops, pairs_1d, pairs_2d
from graftc.kernels.local_attention.blocked import Blocked
from graftc.kernels.local_attention.naive import (Reference, Window, check_qkv, lse_dtype, neighborhood_geometry,
                                                  scale_of, window_attention_over, window_geometry)
from graftc.kernels.local_attention.triton import Triton

__all__ = ["window_attention", "neighborhood_attention", "window_attention_over"]

_PATHS = dict(reference=Reference(), torch=Blocked(), triton=Triton())


def _pairs(height: int, width: int, ry: int, rx: int, causal: bool) -> int:
    """(query, key) pairs a window computes; a causal window is only ever 1D (one row)."""
    return pairs_1d(height, ry, False) * pairs_1d(width, rx, causal)


def _forward_op(name: str, options: str, geometry, pairs) -> Family:
    """One of the two forward ops, (q, k, v, *options, scale) -> (out, lse): geometry(q, *options) is its Window,
    pairs(tokens, *options) how many (query, key) pairs it computes."""
    def call(path, q, k, v, *options):
        *shape, scale = options
        out, lse = path.forward(q, k, v, geometry(q, *shape), scale)
        return out.contiguous(), lse.to(lse_dtype(q)).contiguous()

    def backward(family, inputs, outputs, dout, _):
        q, k, v, *shape, scale = inputs
        win = geometry(q, *shape)
        grads = local_attention_backward_op(dout, q, k, v, *outputs, win.height, win.width, win.ry, win.rx,
                                            win.causal, scale)
        return (*grads, *[None] * (len(shape) + 1))

    def flops(q, k, v, *options, **kwargs) -> int:
        batch, heads, tokens, head_dim = q
        return attention_pair_flops(batch, heads, pairs(tokens, *options[:-1]), head_dim)

    # The ops return contiguous tensors whatever the inputs' strides; the fake says so.
    fake = lambda q, *args: (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype(q)))  # noqa: E731
    return Family(name, f"(Tensor q, Tensor k, Tensor v, {options}, float scale) -> (Tensor, Tensor)", **_PATHS,
                  call=call, fake=fake, flops=flops, backward=backward, save_outputs=True, nondifferentiable=(1,))


def _backward_call(path, dout, q, k, v, out, lse, height, width, ry, rx, causal, scale):
    dq, dk, dv = path.backward(dout, q, k, v, out, lse, Window(height, width, ry, rx, causal), scale)
    return tuple(grad.to(x.dtype).contiguous() for grad, x in zip((dq, dk, dv), (q, k, v)))


def _backward_flops(dout, q, k, v, out, lse, height, width, ry, rx, causal, scale, **kwargs) -> int:
    batch, heads, _, head_dim = q
    return 2 * attention_pair_flops(batch, heads, _pairs(height, width, ry, rx, causal), head_dim)  # dQ, dK, dV, dP


window_attention_op = _forward_op("window_attention", "int window, bool causal", window_geometry,
                                  lambda tokens, window, causal: _pairs(1, tokens, 0, window, causal))
neighborhood_attention_op = _forward_op("neighborhood_attention", "int height, int width, int kernel",
                                        neighborhood_geometry,
                                        lambda tokens, height, width, kernel: pairs_2d(height, width, kernel))
local_attention_backward_op = Family(
    "local_attention_backward", "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int height, "
    "int width, int ry, int rx, bool causal, float scale) -> (Tensor, Tensor, Tensor)", **_PATHS,
    call=_backward_call, flops=_backward_flops,
    fake=lambda dout, q, k, v, *geometry: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)))


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = False,
                     scale: float | None = None) -> Tensor:
    """Sliding-window attention over [B, H, N, dh]: query i sees keys |i - j| <= window (and j <= i if causal)."""
    check_qkv(q, k, v)
    return window_attention_op(q, k, v, int(window), bool(causal), scale_of(q, scale))[0]


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel: int,
                           scale: float | None = None) -> Tensor:
    """kernel x kernel neighborhood attention over [B, H, N, dh], tokens in raster order on grid (height, width)."""
    check_qkv(q, k, v)
    height, width = grid
    return neighborhood_attention_op(q, k, v, int(height), int(width), int(kernel), scale_of(q, scale))[0]
