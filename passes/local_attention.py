"""Local softmax attention: `swa` (a window of +-w tokens on the flattened sequence) and `swa2d` (a k x k
neighbourhood on the model's token grid). Same heads, K/V heads, head size, projections, q/k norms and rotary
positions as the teacher; only which keys a query sees changes, so with `init: teacher` a window that covers the
whole sequence reproduces the teacher.

Prefix tokens (a ViT's class token, DeiT's distillation token, register tokens) lead the sequence before the patch
grid. In `swa2d` they stay global: a prefix token attends to every token, and every token attends to the prefix
tokens besides its k x k neighbourhood, in one softmax. So the class token still pools the whole image, and a kernel
that covers the grid is the teacher's attention again.

Decoding: `swa` keeps the last `window` tokens' K/V (at the teacher's kv_heads) in transformers' sliding-window
cache layer, so a token sees the last `window` tokens and itself, with memory O(window) whatever the context.
Padding (the model's mask) is honoured in every path: padded keys take no part.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from graftc.kernels.local_attention import neighborhood_attention, window_attention, window_attention_over
from graftc.match import Region
from graftc.rules import Rule
from graftc.passes.common import (MixerConfig, ProjectedAttention, build_projected, guard_causal_decoding,
                                  guard_positions, teacher_is_causal)


class WindowAttention(ProjectedAttention):
    decode_state = "sliding-window KV"

    def __init__(self, width, heads, head_dim, out_width, window: int, causal: bool, kv_heads=None, teacher=None,
                 **like):
        super().__init__(width, heads, head_dim, out_width, kv_heads, teacher, **like)
        self.window, self.causal = window, causal

    def core(self, q, k, v, call):
        from graftc.decode import WindowKV  # transformers is needed only where a model decodes with a cache

        cached = call.state(WindowKV, lambda replaced: WindowKV(self.window)) if call.cache is not None else None
        past = cached.get_seq_length() if cached is not None else 0
        valid = call.valid(q.shape[-2], past)
        if valid is None and past == 0:  # the whole sequence at once, no padding: the fast kernels
            if cached is not None:
                cached.append(k, v, q.new_ones(q.shape[0], q.shape[-2], dtype=torch.bool))
            return window_attention(q, self.repeat_kv(k), self.repeat_kv(v), self.window, self.causal)
        if valid is None:
            valid = q.new_ones(q.shape[0], q.shape[-2], dtype=torch.bool)
        valid = valid.expand(q.shape[0], -1)
        if cached is not None:
            k, v, valid = cached.append(k, v, valid)
        return window_attention_over(q, k, v, self.window, self.causal, valid)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"causal={self.causal}")


class _GridWithGlobalKeys(torch.autograd.Function):
    """Softmax attention of grid queries over their k x k neighbourhood (the kernel) and over a few global keys,
    in one softmax: the two partial results are merged by their log-sum-exps. The backward hands the kernel's
    backward the merged output and log-sum-exp, from which it rebuilds each local key's share of the merged
    softmax, and adds the global keys' part densely (they are few)."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, grid, kernel):
        scale = q.shape[-1] ** -0.5
        out_local, lse_local = torch.ops.graftc.neighborhood_attention(q, k, v, grid[0], grid[1], kernel, scale)
        scores = (q @ k_global.transpose(-1, -2)).to(lse_local.dtype) * scale  # [B, H, N, P]
        lse = torch.logaddexp(lse_local, torch.logsumexp(scores, -1))
        probs = torch.exp(scores - lse[..., None])
        out = (out_local * torch.exp(lse_local - lse)[..., None] + (probs @ v_global.to(probs.dtype))).to(q.dtype)
        ctx.save_for_backward(q, k, v, k_global, v_global, out, lse, probs)
        ctx.geometry, ctx.scale = (grid[0], grid[1], kernel // 2, kernel // 2, False), scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_global, v_global, out, lse, probs = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.ops.graftc.local_attention_backward(dout, q, k, v, out, lse, *ctx.geometry, ctx.scale)
        d32 = dout.to(probs.dtype)
        delta = (d32 * out.to(probs.dtype)).sum(-1, keepdim=True)
        dscores = probs * (d32 @ v_global.to(probs.dtype).transpose(-1, -2) - delta)
        dq = dq + (dscores @ k_global.to(probs.dtype) * ctx.scale).to(dq.dtype)
        dk_global = (dscores.transpose(-1, -2) @ q.to(probs.dtype) * ctx.scale).to(k_global.dtype)
        dv_global = (probs.transpose(-1, -2) @ d32).to(v_global.dtype)
        return dq, dk, dv, dk_global, dv_global, None, None


def grid_attention(q, k, v, grid: tuple[int, int], kernel: int, prefix: int = 0) -> torch.Tensor:
    """swa2d's attention on [B, H, prefix + height * width, dh]: the `prefix` leading tokens attend to all tokens,
    grid tokens to the prefix tokens and their k x k neighbourhood (one softmax each)."""
    if not prefix:
        return neighborhood_attention(q, k, v, grid, kernel)
    head = F.scaled_dot_product_attention(q[:, :, :prefix], k, v)
    cells = [t[:, :, prefix:].contiguous() for t in (q, k, v)]
    rest = _GridWithGlobalKeys.apply(*cells, k[:, :, :prefix], v[:, :, :prefix], tuple(grid), kernel)
    return torch.cat([head, rest], 2)


class NeighborhoodAttention(ProjectedAttention):
    def __init__(self, width, heads, head_dim, out_width, grid: tuple[int, int], kernel: int, kv_heads=None,
                 teacher=None, prefix: int = 0, **like):
        super().__init__(width, heads, head_dim, out_width, kv_heads, teacher, **like)
        self.grid, self.kernel, self.prefix = tuple(grid), kernel, prefix

    def core(self, q, k, v, call):
        valid = call.valid(q.shape[-2]) if call.mask is not None else None
        # a shape-only forward (export) cannot tell an all-true mask, e.g. the one transformers' ViT builds there
        if valid is not None and not is_fake(valid):
            raise ValueError("swa2d: padded tokens on an image grid are not supported (every grid cell is a token)")
        grid = self.grid_for(q.shape[-2] - self.prefix)
        return grid_attention(q, self.repeat_kv(k), self.repeat_kv(v), grid, self.kernel, self.prefix)

    def grid_for(self, tokens: int) -> tuple[int, int]:
        """The grid seen at graft time; a square grid scales to another square resolution. `tokens`: grid tokens
        (the prefix tokens left out)."""
        height, width = self.grid
        if height * width == tokens:
            return height, width
        side = math.isqrt(tokens)
        if height == width and side * side == tokens:
            return side, side
        raise ValueError(f"swa2d was grafted for a {height}x{width} token grid and cannot place {tokens} tokens on it")

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, grid={self.grid}, kernel={self.kernel}"
                + (f", prefix={self.prefix}" if self.prefix else ""))


class SwaConfig(MixerConfig):
    op: Literal["swa"] = "swa"
    window: int = Field(4, ge=0, description="each token sees tokens within +-window on the flattened sequence")
    causal: bool | None = Field(None, description="only earlier tokens; default: causal exactly when the teacher is")


class Swa2dConfig(MixerConfig):
    op: Literal["swa2d"] = "swa2d"
    kernel: int = Field(7, ge=1, description="odd side of the k x k neighbourhood on the token grid")
    grid: list[int] | None = Field(None, min_length=2, max_length=2,
                                   description="[height, width] of the token grid; default: inferred from the model")
    prefix: int | None = Field(None, ge=0, description="tokens before the grid (class, distillation, register "
                                                      "tokens), global: they see every token and every token sees "
                                                      "them; default: inferred with the grid, 0 when grid is given")


def guard_swa(region: Region, config: SwaConfig) -> str | None:
    return guard_causal_decoding(region, config.causal) or guard_positions(region, config)


def build_swa(region: Region, config: SwaConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    causal = teacher_is_causal(region, model) if config.causal is None else config.causal
    return build_projected(region, config, model, WindowAttention, window=config.window, causal=causal)


def _grid_and_prefix(region: Region, config: Swa2dConfig) -> tuple[list[int] | None, int]:
    if config.grid is not None:
        return config.grid, config.prefix or 0
    prefix = region.attrs.get("prefix", 0) if config.prefix is None else config.prefix
    return region.attrs.get("grid"), prefix


def build_swa2d(region: Region, config: Swa2dConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    grid, prefix = _grid_and_prefix(region, config)
    return build_projected(region, config, model, NeighborhoodAttention, grid=grid, kernel=config.kernel,
                           prefix=prefix)


def guard_swa2d(region: Region, config: Swa2dConfig) -> str | None:
    if config.kernel % 2 == 0:
        return f"kernel must be odd (a centred k x k neighbourhood), got {config.kernel}"
    tokens = region.input_shape[-2]
    grid, prefix = _grid_and_prefix(region, config)
    if grid is None:
        return (f"no token grid can be inferred for its {tokens} tokens (no 2D patch embedding of that size "
                "was seen); give one with replace: {op: swa2d, grid: [height, width]}")
    if prefix + grid[0] * grid[1] != tokens:
        return (f"grid {grid[0]}x{grid[1]}" + (f" after {prefix} prefix tokens" if prefix else "")
                + f" does not hold the region's {tokens} tokens")
    problem = guard_positions(region, config)
    if problem is None and "cache" in region.attrs["site"].get("context", {}):
        return f"{region.cover[0]} decodes with a cache; swa2d is for image grids (use swa)"
    return problem


RULES = [
    Rule("swa", ("attention",), SwaConfig, build_swa, guard_swa,
         summary="sliding-window softmax attention on the flattened sequence", plugs_in=True, example={"window": 2},
         decode_state="sliding-window KV of the last `window` tokens, at the teacher's kv_heads",
         memory="0 beyond the window (fixed 2 x kv_heads x head_dim x window)"),
    Rule("swa2d", ("attention",), Swa2dConfig, build_swa2d, guard_swa2d,
         summary="k x k neighbourhood softmax attention on the token grid (`kernel` odd)", plugs_in=True,
         example={"kernel": 3}, needs=("grid",)),
]
