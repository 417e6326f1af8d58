"""Local softmax attention: `swa` (a window of +-w tokens on the flattened sequence) and `swa2d` (a k x k
neighbourhood on the model's token grid). Same heads, K/V heads, head size, projections, q/k norms and rotary
positions as the teacher; only which keys a query sees changes, so with `init: teacher` a window that covers the
whole sequence reproduces the teacher.

Decoding: `swa` keeps the last `window` tokens' K/V (at the teacher's kv_heads) in transformers' sliding-window
cache layer, so a token sees the last `window` tokens and itself, with memory O(window) whatever the context.
Padding (the model's mask) is honoured in every path: padded keys take no part.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

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


class NeighborhoodAttention(ProjectedAttention):
    def __init__(self, width, heads, head_dim, out_width, grid: tuple[int, int], kernel: int, kv_heads=None,
                 teacher=None, **like):
        super().__init__(width, heads, head_dim, out_width, kv_heads, teacher, **like)
        self.grid, self.kernel = tuple(grid), kernel

    def core(self, q, k, v, call):
        if call.mask is not None and call.valid(q.shape[-2]) is not None:
            raise ValueError("swa2d: padded tokens on an image grid are not supported (every grid cell is a token)")
        return neighborhood_attention(q, self.repeat_kv(k), self.repeat_kv(v), self.grid_for(q.shape[-2]), self.kernel)

    def grid_for(self, tokens: int) -> tuple[int, int]:
        """The grid seen at graft time; a square grid scales to another square resolution."""
        height, width = self.grid
        if height * width == tokens:
            return height, width
        side = math.isqrt(tokens)
        if height == width and side * side == tokens:
            return side, side
        raise ValueError(f"swa2d was grafted for a {height}x{width} token grid and cannot place {tokens} tokens on it")

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, grid={self.grid}, kernel={self.kernel}"


class SwaConfig(MixerConfig):
    op: Literal["swa"] = "swa"
    window: int = Field(4, ge=0, description="each token sees tokens within +-window on the flattened sequence")
    causal: bool | None = Field(None, description="only earlier tokens; default: causal exactly when the teacher is")


class Swa2dConfig(MixerConfig):
    op: Literal["swa2d"] = "swa2d"
    kernel: int = Field(7, ge=1, description="odd side of the k x k neighbourhood on the token grid")
    grid: list[int] | None = Field(None, min_length=2, max_length=2,
                                   description="[height, width] of the token grid; default: inferred from the model")


def guard_swa(region: Region, config: SwaConfig) -> str | None:
    return guard_causal_decoding(region, config, config.causal)


def build_swa(region: Region, config: SwaConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    causal = teacher_is_causal(region, model) if config.causal is None else config.causal
    return build_projected(region, config, model, WindowAttention, window=config.window, causal=causal)


def build_swa2d(region: Region, config: Swa2dConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return build_projected(region, config, model, NeighborhoodAttention, grid=config.grid or region.attrs["grid"],
                  kernel=config.kernel)


def guard_swa2d(region: Region, config: Swa2dConfig) -> str | None:
    if config.kernel % 2 == 0:
        return f"kernel must be odd (a centred k x k neighbourhood), got {config.kernel}"
    tokens = region.input_shape[-2]
    if config.grid is not None:
        if config.grid[0] * config.grid[1] != tokens:
            return f"grid {config.grid[0]}x{config.grid[1]} does not hold the region's {tokens} tokens"
    elif "grid" not in region.attrs:
        return (f"no token grid can be inferred for its {tokens} tokens (no 2D patch embedding of that size "
                "was seen); give one with replace: {op: swa2d, grid: [height, width]}")
    problem = guard_positions(region, config)
    if problem is None and "cache" in region.attrs["site"].get("context", {}):
        return f"{region.cover[0]} decodes with a cache; swa2d is for image grids (use swa)"
    return problem


local_attention_rules = [
    Rule("swa", ("attention",), SwaConfig, build_swa, guard_swa,
         summary="sliding-window softmax attention on the flattened sequence", plugs_in=True),
    Rule("swa2d", ("attention",), Swa2dConfig, build_swa2d, guard_swa2d,
         summary="k x k neighbourhood softmax attention on the token grid", plugs_in=True),
]
