"""`retention`: RetNet's multi-scale retention (Sun et al. 2023) in place of softmax attention.

The teacher's heads and projections are kept (`init: teacher` copies q | k | v and o; its q/k norms and rotary
positions are applied as in the teacher, where RetNet has xPos); the softmax becomes retention,

    y_i = sum_{j <= i} gamma_h^(i - j) (q_i . k_j / sqrt(head_dim)) v_j,   gamma_h = 1 - 2^(-5-h),

a fixed decay per head h (the first head remembers about 32 tokens, each next one twice as many), then RetNet's
per-head normalization (an RMS norm over each head's channels, learnable gain) before the teacher's out projection.
Causal by construction, like RetNet (also in image and encoder models: it reads the token order once); padded keys
are dropped (left padding changes no distance between real tokens). RetNet's swish output gate is not added: the
operator keeps the teacher's attention skeleton, like `linear`.

Prefill runs the chunkwise form (graftc.kernels.retention); decoding keeps the recurrent state, sum_j
gamma^(n-j) k_j v_j^T per head, in transformers' conv/recurrent cache layer: O(1) per token whatever the context.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from graftc.kernels.retention import retention, retention_continue, retention_state, retnet_log_decay
from graftc.passes.common import MixerConfig, ProjectedAttention, build_projected, guard_positions
from graftc.rules import Rule


class Retention(ProjectedAttention):
    decode_state = "retention state"

    def __init__(self, width, heads, head_dim, out_width, chunk: int, kv_heads=None, teacher=None, **like):
        super().__init__(width, heads, head_dim, out_width, kv_heads, teacher, **like)
        self.chunk = chunk
        self.norm_weight = torch.nn.Parameter(torch.ones(head_dim, **like))

    def core(self, q, k, v, call):
        from graftc.decode import RecurrentState  # transformers' cache classes: loaded when a model decodes

        cached = call.state(RecurrentState, RecurrentState) if call.cache is not None else None
        tokens = q.shape[-2]
        valid = call.valid(tokens, cached.get_seq_length() if cached is not None else 0)
        if valid is not None:  # a padded key adds nothing to any sum
            k = k * valid[:, None, :, None].to(k.dtype)
        q, k, v = q * self.head_dim ** -0.5, self.repeat_kv(k), self.repeat_kv(v)
        log_decay = retnet_log_decay(self.heads, q.device)  # fixed: made here, so no dtype cast reaches it
        if cached is None:
            y = retention(q, k, v, log_decay, self.chunk)
        else:
            state = cached.recurrent(0)
            if state is None:  # prefill: the chunked op, then the state it leaves behind
                y, state = retention(q, k, v, log_decay, self.chunk), retention_state(k, v, log_decay)
            else:
                y, state = retention_continue(q, k, v, log_decay, state, self.chunk)
            cached.set_recurrent(0, state)
            cached.seen += tokens
        return F.rms_norm(y, (self.head_dim,), self.norm_weight, eps=1e-6)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, chunk={self.chunk}"


class RetentionConfig(MixerConfig):
    op: Literal["retention"] = "retention"
    chunk: int = Field(64, ge=1, le=1024, description="chunk length of the chunkwise form at prefill")


def build_retention(region, config: RetentionConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return build_projected(region, config, model, Retention, chunk=config.chunk)


RULES = [
    Rule("retention", ("attention",), RetentionConfig, build_retention, guard_positions,
         summary="RetNet retention: causal, a fixed decay 1 - 2^(-5-h) per head h, per-head RMS norm",
         plugs_in=True, example={"chunk": 4}, decode_state="recurrent state sum_j gamma^(n-j) k_j v_j^T per head",
         memory="0 (fixed heads x head_dim x head_dim, fp32)"),
]
