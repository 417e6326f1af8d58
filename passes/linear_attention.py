"""`linear`: linear attention, phi(q) (sum_j phi(k_j) v_j^T) normalized by phi(q) . sum_j phi(k_j).

The teacher's heads and projections are kept (`init: teacher` copies them); only the softmax is replaced by a
feature map. The default, `hedgehog`, is learnable (a per-head map trained to mimic softmax attention, identity-
initialized), so stage-1 distillation has something to fit besides the projections; `elu` (elu + 1) and `relu`
are fixed maps. Bidirectional for image and encoder models; causal where the teacher is (language models).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from graftc.kernels.linear_attention import HedgehogFeatureMap, elu_plus_one, linear_attention, relu
from graftc.match import Region
from graftc.rules import Rule
from graftc.passes.common import MixerConfig, ProjectedAttention, build_projected, guard_site, teacher_is_causal

FIXED_MAPS = {"elu": elu_plus_one, "relu": relu}


class LinearAttention(ProjectedAttention):
    def __init__(self, width, heads, head_dim, out_width, feature_map: str, causal: bool, teacher=None, **like):
        super().__init__(width, heads, head_dim, out_width, teacher, **like)
        self.feature_map, self.causal = feature_map, causal
        if feature_map == "hedgehog":  # separate maps for queries and keys, as softmax treats them differently
            self.phi_q = HedgehogFeatureMap(head_dim, heads).to(**like)
            self.phi_k = HedgehogFeatureMap(head_dim, heads).to(**like)
        else:
            self.phi_q = self.phi_k = FIXED_MAPS[feature_map]

    def core(self, q, k, v):
        scale = self.head_dim ** -0.25  # split softmax's 1/sqrt(dh) between queries and keys
        if self.feature_map == "hedgehog":  # the learned maps fold the scale into their [d, d] weights
            return linear_attention(self.phi_q(q, scale), self.phi_k(k, scale), v, self.causal)
        return linear_attention(self.phi_q(q * scale), self.phi_k(k * scale), v, self.causal)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, feature_map={self.feature_map}, causal={self.causal}"


class LinearConfig(MixerConfig):
    op: Literal["linear"] = "linear"
    feature_map: Literal["hedgehog", "elu", "relu"] = Field(
        "hedgehog", description="hedgehog: learnable softmax-mimicking map; elu: elu(x)+1; relu")
    causal: bool | None = Field(None, description="only earlier tokens; default: causal exactly when the teacher is")


def build_linear(region: Region, config: LinearConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    causal = teacher_is_causal(region, model) if config.causal is None else config.causal
    return build_projected(region, config, model, LinearAttention, feature_map=config.feature_map, causal=causal)


linear_attention_rules = [
    Rule("linear", ("attention",), LinearConfig, build_linear, guard_site,
         summary="linear attention with a (learnable) feature map", plugs_in=True),
]
