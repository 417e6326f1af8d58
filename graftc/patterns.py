"""Region patterns, written as example PyTorch functions and traced into pattern graphs.

A pattern says *what* a region computes; the matcher (graftc.match) finds it in a model's graph while
looking through layout and scalar ops (views, transposes, dtype casts, scaling by a constant), so one
pattern covers the many ways models spell the same computation. Adding a form is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str  # the region kind it anchors: "attention" (a softmax(QK^T)V core) or "mlp"
    example: Callable[..., torch.Tensor]
    shapes: tuple[tuple[int, ...], ...]  # example input shapes, in the example's argument order

    @cached_property
    def graph(self) -> fx.Graph:
        """The example traced with the same tracer as models, so both speak the same aten ops."""
        names = self.example.__code__.co_varnames[: self.example.__code__.co_argcount]
        fn = self.example

        class Example(torch.nn.Module):
            def forward(self, *args):
                return fn(*args)

        inputs = tuple(torch.randn(shape) for shape in self.shapes)
        graph = torch.export.export(Example(), inputs, strict=False).graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, name in zip(placeholders, names):
            node.meta["binds"] = name  # the role this input plays, e.g. "q" or "w_down"
        return graph


# softmax(QK^T)V attention cores. q, k, v: [batch, heads, tokens, head_dim].
_QKV = ((1, 2, 4, 8),) * 3
_MASK = ((1, 1, 4, 4),)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def explicit(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


def explicit_masked(q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125 + mask, dim=-1) @ v


# MLPs. x: [batch, tokens, width]; weights as F.linear takes them.
def mlp(x, w_in, w_out):
    return F.linear(F.gelu(F.linear(x, w_in)), w_out)


def gated_mlp(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


PATTERNS: list[Pattern] = [
    Pattern("sdpa", "attention", sdpa, _QKV),
    Pattern("explicit", "attention", explicit, _QKV),
    Pattern("explicit_masked", "attention", explicit_masked, _QKV + _MASK),
    Pattern("mlp", "mlp", mlp, ((1, 4, 8), (16, 8), (8, 16))),
    Pattern("gated_mlp", "mlp", gated_mlp, ((1, 4, 8), (16, 8), (16, 8), (8, 16))),
]
