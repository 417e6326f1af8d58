"""What every new-operator rule shares: plugging a token mixer in at a region, and the teacher's weights.

A new operator is an nn.Module `forward(x, call=None)` mapping the region's input [B, N, D] to its output
[B, N, D']; `call` (graftc.site.Call) carries the rest of the replaced module's call: padding mask, rotary
positions, decode cache, layer index. `install` puts it at the region's site (graftc.site.Site adapts the call
signature) and turns the rest of a chained cover (BERT's `attention.output.dense`) into identities, since the
operator already computes the whole region. The registry checks the call site (`graftc.rules.Rule.check`) before
a rule's guard runs, so the guards here may read `region.attrs["site"]`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from graftc.match import Region
from graftc.rules import OpConfig, submodule
from graftc.site import Call, Site

class MixerConfig(OpConfig):
    """Base of configs for new operators plugged in at a region (a token mixer or an MLP variant)."""

    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: start from the teacher's projections; random: fresh weights")


def install(region: Region, operator: torch.nn.Module) -> dict[str, torch.nn.Module]:
    entry, *rest = region.cover
    return {entry: Site(operator, region.attrs["site"]), **{fqn: torch.nn.Identity() for fqn in rest}}


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
    """The teacher's projections. q has `heads` heads and k, v have `kv_heads` (grouped-query attention), unless
    made with repeat_kv, which repeats each K/V head for the query heads it serves (q, k, v equally wide)."""

    heads: int
    kv_heads: int
    head_dim: int
    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, D], rows q | k | v
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [D', heads * head_dim]
    o_bias: torch.Tensor | None
    q_norm: torch.nn.Module | None = None  # per-head norms applied to q and k before RoPE (Qwen3)
    k_norm: torch.nn.Module | None = None


def teacher_attention(region: Region, model: torch.nn.Module, repeat_kv: bool = False) -> TeacherAttention:
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

    def repeat(t):  # GQA: each kv head serves heads // kv_heads query heads
        if t is None or not repeat_kv or kv_heads == heads:
            return t
        return t.reshape(kv_heads, dh, *t.shape[1:]).repeat_interleave(heads // kv_heads, 0).reshape(heads * dh, *t.shape[1:])

    ws = [ws[0], repeat(ws[1]), repeat(ws[2])]
    bs = [bs[0], repeat(bs[1]), repeat(bs[2])]
    bias = None if bs[0] is None else torch.cat(bs).detach().clone()
    attention = submodule(model, region.cover[0])
    norms = [copy.deepcopy(getattr(attention, name, None)) for name in ("q_norm", "k_norm")]
    return TeacherAttention(heads, heads if repeat_kv else kv_heads, dh, torch.cat(ws).detach().clone(), bias,
                            linear["o"].weight.detach().clone(),
                            None if linear["o"].bias is None else linear["o"].bias.detach().clone(), *norms)


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


def projections(width: int, q_width: int, kv_width: int, out_width: int, teacher: TeacherAttention | None,
                **like) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """In-projection width -> q | k | v (q_width + 2 * kv_width) and out-projection q_width -> out_width: the
    teacher's, or fresh."""
    if teacher is None:
        return linear(width, q_width + 2 * kv_width, **like), linear(q_width, out_width, **like)
    return (linear(width, q_width + 2 * kv_width, teacher.qkv_weight, teacher.qkv_bias, **like),
            linear(q_width, out_width, teacher.o_weight, teacher.o_bias, **like))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [B, H, N, dh] with cos/sin [B, N, dh] (the rotate-half convention of
    Llama, Qwen3 and most transformers models)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class ProjectedAttention(torch.nn.Module):
    """The teacher attention's skeleton with another core: q | k | v projection (K/V at the teacher's kv_heads),
    the teacher's q/k norms and rotary positions where it has them, `core(q, k, v, call)` on [B, heads or
    kv_heads, N, dh], out projection. Local and linear attention are this with their own core."""

    def __init__(self, width: int, heads: int, head_dim: int, out_width: int, kv_heads: int | None = None,
                 teacher: TeacherAttention | None = None, **like):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, head_dim
        self.qkv, self.out = projections(width, heads * head_dim, self.kv_heads * head_dim, out_width, teacher, **like)
        self.q_norm = teacher.q_norm if teacher is not None else None
        self.k_norm = teacher.k_norm if teacher is not None else None

    def forward(self, x: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        call = call or Call()
        batch, tokens, dh = x.shape[0], x.shape[-2], self.head_dim
        q, k, v = self.qkv(x).split([self.heads * dh, self.kv_heads * dh, self.kv_heads * dh], -1)
        q = q.view(batch, tokens, self.heads, dh)
        k, v = k.view(batch, tokens, self.kv_heads, dh), v.view(batch, tokens, self.kv_heads, dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if call.positions is not None:
            cos, sin = call.positions
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = self.core(q, k, v, call)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, self.heads * dh))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> torch.Tensor:
        raise NotImplementedError

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, N, dh] -> [B, heads, N, dh]: each K/V head serves heads // kv_heads query heads."""
        return t if self.kv_heads == self.heads else t.repeat_interleave(self.heads // self.kv_heads, 1)


def build_projected(region: Region, config: MixerConfig, model: torch.nn.Module, kind: type[ProjectedAttention],
                    **extra) -> dict[str, torch.nn.Module]:
    """Build `kind` with the teacher's heads and widths, start it from the teacher if asked, install it."""
    width, out_width = widths(region)
    teacher = teacher_attention(region, model) if config.init == "teacher" else None
    return install(region, kind(width, region.attrs["heads"], region.attrs["head_dim"], out_width,
                                kv_heads=region.attrs["kv_heads"], teacher=teacher, **extra, **like(region, model)))


def guard_positions(region: Region, config: OpConfig) -> str | None:
    """For operators that apply the teacher's rotary embeddings to q and k: the tables must span a head."""
    positions = region.attrs["site"].get("context", {}).get("positions")
    if positions and positions.get("dim") != region.attrs.get("head_dim"):
        return (f"the model's rotary tables are {positions.get('dim')} wide but a head is "
                f"{region.attrs.get('head_dim')} (partial rotary embeddings are not supported by {config.op})")
    return None


def guard_causal_decoding(region: Region, causal: bool | None) -> str | None:
    """A model that decodes with a cache needs a causal operator: a bidirectional one would see future tokens
    in a full forward that the cached decode never sees."""
    if causal is False and "cache" in region.attrs["site"].get("context", {}):
        return f"causal: false, but {region.cover[0]} decodes token by token with a cache (only causal: true or unset)"
    return None
