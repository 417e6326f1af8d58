"""`linear`: linear attention, phi(q) (sum_j phi(k_j) v_j^T) normalized by phi(q) . sum_j phi(k_j).

The teacher's heads and projections are kept (`init: teacher` copies them); only the softmax is replaced by a
feature map. The default, `hedgehog`, is learnable (a per-head map trained to mimic softmax attention, identity-
initialized), so stage-1 distillation has something to fit besides the projections; `elu` (elu + 1) and `relu`
are fixed maps. Bidirectional for image and encoder models; causal where the teacher is (language models).
K/V stay at the teacher's kv_heads (one key feature map per K/V head), the teacher's q/k norms and rotary positions
are applied before the feature maps, and padded keys are dropped from the sums.

Decoding keeps the O(1) recurrent state, the running sums phi(k)^T [v, 1] per head, in transformers' conv/recurrent
cache layer: one decode step costs O(heads x features x head_dim) whatever the context.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from graftc.kernels.linear_attention import (HedgehogFeatureMap, elu_plus_one, linear_attention,
                                            linear_attention_continue, linear_attention_state, relu)
from graftc.match import Region
from graftc.rules import Rule
from graftc.passes.common import (MixerConfig, ProjectedAttention, build_projected, guard_causal_decoding,
                                  guard_positions, teacher_is_causal)

FIXED_MAPS = {"elu": elu_plus_one, "relu": relu}


class LinearAttention(ProjectedAttention):
    decode_state = "recurrent sums"

    def __init__(self, width, heads, head_dim, out_width, feature_map: str, causal: bool, kv_heads=None, teacher=None,
                 **like):
        super().__init__(width, heads, head_dim, out_width, kv_heads, teacher, **like)
        self.feature_map, self.causal = feature_map, causal
        if feature_map == "hedgehog":  # separate maps for queries and keys, as softmax treats them differently
            self.phi_q = HedgehogFeatureMap(head_dim, heads).to(**like)
            self.phi_k = HedgehogFeatureMap(head_dim, self.kv_heads).to(**like)
        else:
            self.phi_q = self.phi_k = FIXED_MAPS[feature_map]

    def features(self, q, k):
        scale = self.head_dim ** -0.25  # split softmax's 1/sqrt(dh) between queries and keys
        if self.feature_map == "hedgehog":  # the learned maps fold the scale into their [d, d] weights
            return self.phi_q(q, scale), self.phi_k(k, scale)
        return self.phi_q(q * scale), self.phi_k(k * scale)

    def core(self, q, k, v, call):
        from graftc.decode import RecurrentState

        phi_q, phi_k = self.features(q, k)
        cached = call.state(RecurrentState, RecurrentState) if call.cache is not None else None
        past = cached.get_seq_length() if cached is not None else 0
        valid = call.valid(q.shape[-2], past)
        if valid is not None:  # padded keys add nothing to the sums
            phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
        phi_k, v = self.repeat_kv(phi_k), self.repeat_kv(v)
        if cached is None:
            return linear_attention(phi_q, phi_k, v, self.causal)
        state = cached.recurrent(0)
        if state is None:  # prefill: the chunked kernel, then the sums it leaves behind
            out, state = linear_attention(phi_q, phi_k, v, self.causal), linear_attention_state(phi_k, v)
        else:
            out, state = linear_attention_continue(phi_q, phi_k, v, state)
        cached.set_recurrent(0, state)
        cached.seen += q.shape[-2]
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"feature_map={self.feature_map}, causal={self.causal}")


class LinearConfig(MixerConfig):
    op: Literal["linear"] = "linear"
    feature_map: Literal["hedgehog", "elu", "relu"] = Field(
        "hedgehog", description="hedgehog: learnable softmax-mimicking map; elu: elu(x)+1; relu")
    causal: bool | None = Field(None, description="only earlier tokens; default: causal exactly when the teacher is")


def guard_linear(region: Region, config: LinearConfig) -> str | None:
    return guard_causal_decoding(region, config.causal) or guard_positions(region, config)


def build_linear(region: Region, config: LinearConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    causal = teacher_is_causal(region, model) if config.causal is None else config.causal
    return build_projected(region, config, model, LinearAttention, feature_map=config.feature_map, causal=causal)


RULES = [
    Rule("linear", ("attention",), LinearConfig, build_linear, guard_linear,
         summary="linear attention with a (learnable) feature map", plugs_in=True,
         decode_state="running sums phi(k)^T [v, 1] per head", memory="0 (fixed heads x features x (head_dim + 1), fp32)"),
]
