"""`self`: the region's own modules again, copied (reproduces the teacher exactly) or re-initialized."""
from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from graftc.match import Region
from graftc.rules import OpConfig, Rule, submodule


class SelfConfig(OpConfig):
    op: Literal["self"] = "self"
    init: Literal["copy", "random"] = Field("copy", description="copy: the teacher's weights; random: re-initialized")


def reinitialize(module: torch.nn.Module) -> None:
    """Fresh weights for every submodule that knows how to make them (Linear, norms, convs...)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def build_self(region: Region, config: SelfConfig, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    new = {}
    for fqn in region.cover:
        module = copy.deepcopy(submodule(model, fqn))
        if config.init == "random":
            reinitialize(module)
        new[fqn] = module
    return new


RULES = [
    Rule("self", ("attention", "mlp"), SelfConfig, build_self,
         summary="the same operator, copied from the teacher (exactly the teacher) or re-initialized",
         decode_state="the teacher's KV", memory="2 x kv_heads x head_dim values per layer"),
]
