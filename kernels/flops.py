"""FLOP formulas for torch's FlopCounterMode, which the pass manager's reports and the benchmarks count with.

Each graftc kernel registers the work it really does (a window counts only the pairs inside it) through
`formula`. ATen's CPU flash attention gets one here too: torch's counter has none, so on CPU an attention
block would otherwise look free and every FLOP ratio against it would be wrong.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


def formula(*ops):
    """Register a FLOP formula (called with shapes for tensor arguments) for ops not already counted."""
    def register(fn):
        missing = [op for op in ops if op not in flop_registry]
        if missing:
            register_flop_formula(missing)(fn)
        return fn
    return register


def attention_pair_flops(batch: int, heads: int, pairs: int, head_dim: int, value_dim: int | None = None) -> int:
    """QK^T and PV over `pairs` (query, key) pairs per head: 2 FLOPs per multiply-add each."""
    return 2 * batch * heads * pairs * (head_dim + (head_dim if value_dim is None else value_dim))


def pairs_1d(tokens: int, window: int, causal: bool) -> int:
    """(query, key) pairs with |i - j| <= window (and j <= i if causal), closed form."""
    w = min(window, max(tokens - 1, 0))
    one_side = tokens * w - w * (w + 1) // 2  # pairs with 0 < i - j <= w
    return tokens + one_side * (1 if causal else 2)


def pairs_2d(height: int, width: int, kernel: int) -> int:
    """(query, key) pairs of a k x k neighbourhood truncated at the grid's borders: rows and columns separate."""
    r = kernel // 2
    return pairs_1d(height, r, False) * pairs_1d(width, r, False)


@formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa(query, key, value, *args, **kwargs) -> int:
    batch, heads, queries, head_dim = query
    return attention_pair_flops(batch, heads, queries * key[-2], head_dim, value[-1])


@formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    batch, heads, queries, head_dim = query
    return 2 * attention_pair_flops(batch, heads, queries * key[-2], head_dim, value[-1])  # dQ, dK, dV, dP
