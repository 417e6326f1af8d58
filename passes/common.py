"""What every new-operator rule shares: plugging a token mixer in at a region, and the teacher's weights.

A new operator is an nn.Module mapping the region's input [B, N, D] to its output [B, N, D']. `install` puts it
at the region's site (graftc.site.Site adapts the call signature) and turns the rest of a chained cover
(BERT's `attention.output.dense`) into identities, since the operator already computes the whole region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from graftc.match import Region
from graftc.rules import OpConfig, submodule
from graftc.site import Site, site_problem

class MixerConfig(OpConfig):
    """Base of configs for new operators plugged in at a region (a token mixer or an MLP variant)."""

    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: start from the teacher's projections; random: fresh weights")


def install(region: Region, operator: torch.nn.Module) -> dict[str, torch.nn.Module]:
    entry, *rest = region.cover
    return {entry: Site(operator, region.attrs["site"]), **{fqn: torch.nn.Identity() for fqn in rest}}


def guard_site(region: Region, config: OpConfig) -> str | None:
    return site_problem(region)


def widths(region: Region) -> tuple[int, int]:
    """(input width, output width) of the region."""
    return region.input_shape[-1], region.output_shape[-1]


def like(region: Region, model: torch.nn.Module) -> dict:
    """device/dtype of the region's teacher weights, so new operators are made to match."""
    weight = next(iter(submodule(model, region.cover[0]).parameters()), None)
    return {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}


def teacher_is_causal(region: Region, model: torch.nn.Module) -> bool:
    """Causal if the teacher's attention is: SDPA's is_causal, or the module says so (transformers' decoders)."""
    return bool(region.attrs.get("causal")) or bool(getattr(submodule(model, region.cover[0]), "is_causal", False))


@dataclass
class TeacherAttention:
    """The teacher's projections, GQA heads already repeated so q, k and v are all heads*head_dim wide."""

    heads: int
    head_dim: int
    qkv_weight: torch.Tensor  # [3 * heads * head_dim, D], rows q | k | v
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [D', heads * head_dim]
    o_bias: torch.Tensor | None


def teacher_attention(region: Region, model: torch.nn.Module) -> TeacherAttention:
    heads, kv_heads, dh = region.attrs["heads"], region.attrs["kv_heads"], region.attrs["head_dim"]
    linear = {role: submodule(model, fqn) for role, fqn in region.roles.items()}
    if "qkv" in linear:
        sizes = [heads * dh, kv_heads * dh, kv_heads * dh]
        ws = linear["qkv"].weight.split(sizes)
        bs = linear["qkv"].bias.split(sizes) if linear["qkv"].bias is not None else (None,) * 3
    else:
        ws = [linear[r].weight for r in "qkv"]
        bs = [linear[r].bias for r in "qkv"]
        if any(b is None for b in bs) and not all(b is None for b in bs):  # e.g. only q and v biased
            bs = [b if b is not None else torch.zeros_like(w[:, 0]) for w, b in zip(ws, bs)]

    def repeat(t, n_heads):  # GQA: each kv head serves heads // kv_heads query heads
        if t is None or n_heads == heads:
            return t
        return t.reshape(n_heads, dh, *t.shape[1:]).repeat_interleave(heads // n_heads, 0).reshape(heads * dh, *t.shape[1:])

    ws = [ws[0], repeat(ws[1], kv_heads), repeat(ws[2], kv_heads)]
    bs = [bs[0], repeat(bs[1], kv_heads), repeat(bs[2], kv_heads)]
    bias = None if bs[0] is None else torch.cat(bs).detach().clone()
    return TeacherAttention(heads, dh, torch.cat(ws).detach().clone(), bias,
                            linear["o"].weight.detach().clone(),
                            None if linear["o"].bias is None else linear["o"].bias.detach().clone())


def linear(in_features: int, out_features: int, weight=None, bias=None, has_bias: bool = True, **like) -> torch.nn.Linear:
    """A Linear, optionally set to given weights (then it has a bias exactly when one is given)."""
    if weight is not None:
        has_bias = bias is not None
    layer = torch.nn.Linear(in_features, out_features, bias=has_bias, **like)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


def projections(width: int, inner: int, out_width: int, teacher: TeacherAttention | None,
                **like) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """In-projection width -> 3*inner (q | k | v) and out-projection inner -> out_width: the teacher's, or fresh."""
    if teacher is None:
        return linear(width, 3 * inner, **like), linear(inner, out_width, **like)
    return (linear(width, 3 * inner, teacher.qkv_weight, teacher.qkv_bias, **like),
            linear(inner, out_width, teacher.o_weight, teacher.o_bias, **like))


class ProjectedAttention(torch.nn.Module):
    """The teacher attention's skeleton with another core: qkv projection -> `core(q, k, v)` on [B, H, N, dh]
    -> out projection. Local and linear attention are this with their own core."""

    def __init__(self, width: int, heads: int, head_dim: int, out_width: int,
                 teacher: TeacherAttention | None = None, **like):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv, self.out = projections(width, heads * head_dim, out_width, teacher, **like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[-2]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.core(q, k, v)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def build_projected(region: Region, config: MixerConfig, model: torch.nn.Module, kind: type[ProjectedAttention],
                    **extra) -> dict[str, torch.nn.Module]:
    """Build `kind` with the teacher's heads and widths, start it from the teacher if asked, install it."""
    width, out_width = widths(region)
    teacher = teacher_attention(region, model) if config.init == "teacher" else None
    return install(region, kind(width, region.attrs["heads"], region.attrs["head_dim"], out_width, teacher=teacher,
                                **extra, **like(region, model)))
