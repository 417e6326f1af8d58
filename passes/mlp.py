"""`mlp`: the same MLP with another expansion ratio (hidden width = ratio x model width).

The region's modules are kept (so activations, gating and the model's code stay as they were) and its
Linears are resized. `init: teacher` keeps the teacher's first hidden units; units beyond the teacher's width
get random input weights and zero output weights, so a wider MLP starts as exactly the teacher.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from graftc.match import Region
from graftc.rules import OpConfig, Rule, set_submodule, submodule

IN_ROLES = ("w_in", "w_gate", "w_up")
OUT_ROLES = ("w_out", "w_down")


class MlpConfig(OpConfig):
    op: Literal["mlp"] = "mlp"
    ratio: float = Field(4.0, gt=0, le=64, description="hidden width / model width")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: keep the teacher's first units")


def hidden_width(region: Region, ratio: float) -> int:
    return max(1, round(ratio * region.attrs["width"]))


def _resized(linear: torch.nn.Linear, in_features: int, out_features: int, keep: bool) -> torch.nn.Linear:
    new = torch.nn.Linear(in_features, out_features, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    if keep:
        with torch.no_grad():
            rows, cols = min(out_features, linear.out_features), min(in_features, linear.in_features)
            if in_features > linear.in_features:  # new hidden units feed nothing yet
                new.weight.zero_()
            new.weight[:rows, :cols] = linear.weight[:rows, :cols]
            if linear.bias is not None:
                new.bias[:rows] = linear.bias[:rows]
    return new


def build_mlp(region: Region, config: MlpConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    hidden = hidden_width(region, config.ratio)
    keep = config.init == "teacher"
    new = {fqn: copy.deepcopy(submodule(model, fqn)) for fqn in region.cover}
    for role, fqn in region.roles.items():
        owner = next(c for c in region.cover if fqn == c or fqn.startswith(c + "."))
        old = submodule(model, fqn)
        if role in IN_ROLES:
            resized = _resized(old, old.in_features, hidden, keep)
        elif role in OUT_ROLES:
            resized = _resized(old, hidden, old.out_features, keep)
        else:
            continue
        if fqn == owner:
            new[owner] = resized
        else:
            set_submodule(new[owner], fqn[len(owner) + 1:], resized)
    return new


def guard_mlp(region: Region, config: MlpConfig) -> str | None:
    if not region.cover:
        return "the MLP is computed inline in its block's forward, with no module boundary to rewrite at"
    if not any(r in region.roles for r in IN_ROLES) or not any(r in region.roles for r in OUT_ROLES):
        return f"no input/output projections recognized (found roles {sorted(region.roles)})"
    return None


RULES = [
    Rule("mlp", ("mlp",), MlpConfig, build_mlp, guard_mlp,
         summary="the MLP with another expansion ratio (`init: teacher`: the first units kept, new units start silent)",
         example={"ratio": 2}, decode_state="none", memory="0"),
]
