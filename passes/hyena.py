"""Hyena gated convolutions (METHOD.md): `hyena_x`, `hyena_y`, `hyena_se` for attention, `mlp_hyena_x` for MLPs.

All four are one module: in_proj D -> 3*Dm, the fused gated short convolution of graftc.kernels.hyena, and
out_proj Dm -> D'. They differ only in which convolutions run:
- hyena_x: featurizer (depthwise causal conv over all 3*Dm channels), then y = q * k * v;
- hyena_y: no featurizer; y = q * inner(k * v), the inner filter identity-initialized (last tap 1);
- hyena_se: featurizer, then the inner filter;
- mlp_hyena_x: hyena_x with Dm = 2D (in_proj D -> 6D, out_proj 2D -> D: about the parameters of an r=4 MLP).

Attention ops with `init: teacher` take q|k|v rows of in_proj and out_proj from the teacher's attention (GQA heads
repeated) and start the featurizer as the identity, so at step 0 the operator gates the teacher's own projections.

`hyena_x` with `causal: false` centres its featurizer for encoders and image models: each output also reads the
(kernel-1)//2 tokens after it. It is the causal featurizer read that many positions later (zeros after the last
token), so the same kernels serve it; the guard refuses it where the model decodes with a cache.

Decoding keeps an O(kernel) state per layer in transformers' conv/recurrent cache layer: the last kernel-1 inputs
of each short convolution, so a decode step costs O(width x kernel) whatever the context. In a padded batch the
padding's inputs are zeroed before each convolution, so they never reach a real token.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

import torch.nn.functional as F

from graftc.kernels.hyena import conv_tail, hyena_continue, hyena_conv
from graftc.match import Region
from graftc.rules import Rule
from graftc.passes.common import (MixerConfig, TeacherAttention, guard_causal_decoding, install, like, projections,
                                  teacher_attention, widths)
from graftc.site import Call

KernelField = Field(4, ge=1, le=128, description="taps of each short convolution")


class HyenaMixer(torch.nn.Module):
    """With a teacher, the projections are the teacher's and the featurizer starts as the identity."""

    decode_state = "short-conv inputs"

    def __init__(self, width: int, inner: int, out_width: int, kernel: int, featurize: bool, inner_filter: bool,
                 teacher: TeacherAttention | None = None, lookahead: int = 0, **like):
        super().__init__()
        if lookahead and (inner_filter or not featurize or lookahead >= kernel):
            raise ValueError("only a featurizer without an inner filter can look ahead, by fewer than kernel tokens")
        self.kernel, self.lookahead = kernel, lookahead
        self.in_proj, self.out_proj = projections(width, inner, inner, out_width, teacher, **like)
        self.feat_weight = self.feat_bias = self.inner_weight = None
        if featurize:
            if teacher is not None:  # the tap that reads the token itself
                self.feat_weight = torch.nn.Parameter(identity_taps(3 * inner, kernel, kernel - 1 - lookahead, **like))
            else:
                bound = 1 / math.sqrt(kernel)  # nn.Conv1d's default for a depthwise kernel
                self.feat_weight = torch.nn.Parameter(torch.empty(3 * inner, kernel, **like).uniform_(-bound, bound))
            self.feat_bias = torch.nn.Parameter(torch.zeros(3 * inner, **like))
        if inner_filter:
            self.inner_weight = torch.nn.Parameter(identity_taps(inner, kernel, **like))

    def forward(self, x: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        from graftc.decode import RecurrentState

        call = call or Call()
        u = self.in_proj(x)
        cached = call.state(RecurrentState, RecurrentState) if call.cache is not None else None
        valid = call.valid(x.shape[-2], cached.seen if cached is not None else 0)
        if cached is not None and self.lookahead:
            raise RuntimeError("a hyena_x with causal: false reads later tokens, so it cannot decode with a cache")
        if valid is None and (cached is None or cached.seen == 0):  # a whole sequence, no padding: fused kernels
            y = self._ahead(hyena_conv(self._pad_end(u), self.feat_weight, self.feat_bias, self.inner_weight))
            if cached is not None:  # a prompt into a fresh cache: keep what the next token's convolutions read
                self._seed(cached, u)
            return self.out_proj(y)
        mask = None if valid is None else valid[..., None].to(u.dtype)
        if mask is not None:
            u = u * mask
        if cached is not None:
            history = lambda t, i: cached.conv_window(t, i, self.kernel)
            cached.seen += x.shape[-2]
        else:
            history = lambda t, i: F.pad(t, (0, 0, max(self.kernel - 1, 1), 0))
        mask = None if mask is None else self._pad_end(mask)  # padding's inputs are zero, as are those after the end
        y = hyena_continue(self._pad_end(u), history, self.feat_weight, self.feat_bias, self.inner_weight, mask)
        return self.out_proj(self._ahead(y))

    def _pad_end(self, t: torch.Tensor) -> torch.Tensor:
        """Zero inputs after the last token, which a centred featurizer reads."""
        return F.pad(t, (0, 0, 0, self.lookahead)) if self.lookahead else t

    def _ahead(self, y: torch.Tensor) -> torch.Tensor:
        """Output t of a centred featurizer is the causal one's output t + lookahead."""
        return y[:, self.lookahead:] if self.lookahead else y

    def _seed(self, cached, u: torch.Tensor) -> None:
        """The states hyena_continue would have left after the prompt u: the featurizer's last kernel-1 inputs
        and the inner filter's (k * v of the featurized tail; zero before the sequence starts)."""
        taps, length = self.kernel, u.shape[1]
        keep = max(taps - 1, 1)
        tail = u[:, -(keep + taps - 1):].float()
        tail = F.pad(tail, (0, 0, keep + taps - 1 - tail.shape[1], 0))  # zeros before the sequence starts
        if self.feat_weight is not None:
            cached.conv_window(tail[:, -keep:], 0, taps)
        if self.inner_weight is not None:
            a = tail[:, -keep:] if self.feat_weight is None else conv_tail(tail, self.feat_weight.float(),
                                                                         self.feat_bias.float(), keep)
            q, k, v = a.chunk(3, dim=-1)
            h = k * v
            h[:, :max(keep - length, 0)] = 0
            cached.conv_window(h, 1, taps)
        cached.seen += length


def identity_taps(channels: int, kernel: int, at: int | None = None, **like) -> torch.Tensor:
    """Depthwise taps that pass tap `at` (default: the last, the token itself in a causal conv) through."""
    taps = torch.zeros(channels, kernel, **like)
    taps[:, kernel - 1 if at is None else at] = 1.0
    return taps


class HyenaConfig(MixerConfig):
    kernel: int = KernelField


class HyenaXConfig(HyenaConfig):
    op: Literal["hyena_x"] = "hyena_x"
    causal: bool = Field(True, description="false: a centred featurizer that also reads the (kernel-1)//2 later "
                                           "tokens (encoders, image models; refused where the model decodes)")


class HyenaYConfig(HyenaConfig):
    op: Literal["hyena_y"] = "hyena_y"


class HyenaSEConfig(HyenaConfig):
    op: Literal["hyena_se"] = "hyena_se"


class MlpHyenaConfig(MixerConfig):
    op: Literal["mlp_hyena_x"] = "mlp_hyena_x"
    kernel: int = KernelField
    init: Literal["random"] = Field("random", description="random only: an MLP's weights have no q/k/v to start from")


VARIANTS = {"hyena_x": (True, False), "hyena_y": (False, True), "hyena_se": (True, True)}


def build_hyena(region: Region, config: HyenaConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    featurize, inner_filter = VARIANTS[config.op]
    width, out_width = widths(region)
    inner = region.attrs["heads"] * region.attrs["head_dim"]
    teacher = teacher_attention(region, model, repeat_kv=True) if config.init == "teacher" else None
    lookahead = 0 if getattr(config, "causal", True) else (config.kernel - 1) // 2
    return install(region, HyenaMixer(width, inner, out_width, config.kernel, featurize, inner_filter, teacher,
                                      lookahead, **like(region, model)))


def guard_hyena_x(region: Region, config: HyenaXConfig) -> str | None:
    return guard_causal_decoding(region, config.causal)


def build_mlp_hyena(region: Region, config: MlpHyenaConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    width, out_width = widths(region)
    return install(region, HyenaMixer(width, 2 * width, out_width, config.kernel, True, False, **like(region, model)))


def guard_mlp_hyena(region: Region, config: MlpHyenaConfig) -> str | None:
    if region.attrs["site"].get("decodes"):
        return (f"mlp_hyena_x mixes tokens, but {region.cover[0]} (an MLP) receives neither the padding mask nor the "
                "decode cache, so cached decoding would be wrong; use it in encoders or image models")
    return None


FEATURIZER_STATE = "last kernel-1 inputs of the featurizer (3 x heads x head_dim channels)"
INNER_STATE = "last kernel-1 inputs of the inner filter (width channels)"
RULES = [
    Rule("hyena_x", ("attention",), HyenaXConfig, build_hyena, guard_hyena_x,
         summary="Hyena-X: featurizer short conv, then q*k*v gating", plugs_in=True,
         decode_state=FEATURIZER_STATE, memory="0 (fixed (kernel-1) x 3 x width)"),
    Rule("hyena_y", ("attention",), HyenaYConfig, build_hyena, summary="Hyena-Y: q * inner_conv(k*v)", plugs_in=True,
         decode_state=INNER_STATE, memory="0 (fixed (kernel-1) x width)"),
    Rule("hyena_se", ("attention",), HyenaSEConfig, build_hyena,
         summary="Hyena-SE: featurizer, then q * inner_conv(k*v)", plugs_in=True, example={"kernel": 3},
         decode_state=f"{FEATURIZER_STATE}; {INNER_STATE}", memory="0 (fixed (kernel-1) x 4 x width)"),
    Rule("mlp_hyena_x", ("mlp",), MlpHyenaConfig, build_mlp_hyena, guard_mlp_hyena,
         summary="Hyena-X as an MLP: in_proj d->6d, short conv, 3-way gating, out_proj 2d->d", plugs_in=True,
         needs=("no-cache",)),
]
