"""What a rewrite rule is. Rules are data: `graftc.passes.RULES` is a list of them, one per operator.

A rule names its plan `op`, the region kinds it applies to, a strict config (its plan fields), a guard that
says why a region cannot take it, and a builder that returns the replacement modules for the region's cover.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from graftc.match import Region


class Strict(BaseModel):
    """Base for every plan object: unknown keys are errors, every field has a default and a description."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # no inf/NaN lr, scale, ...


class OpConfig(Strict):
    op: str
    init: Literal["copy", "teacher", "random"] = Field("teacher", description="how the new operator's weights start")


# build(region, config, model) -> {fqn: new module} for the region's cover; the pass manager installs them.
Builder = Callable[[Region, OpConfig, torch.nn.Module], dict[str, torch.nn.Module]]
Guard = Callable[[Region, OpConfig], "str | None"]


@dataclass(frozen=True)
class Rule:
    op: str
    kinds: tuple[str, ...]
    config: type[OpConfig]
    build: Builder
    guard: Guard = lambda region, config: None
    summary: str = ""
    plugs_in: bool = False  # builds a new operator behind a graftc.site.Site: regions need their call site probed


def submodule(model: torch.nn.Module, fqn: str) -> torch.nn.Module:
    return model.get_submodule(fqn) if fqn else model


def set_submodule(model: torch.nn.Module, fqn: str, module: torch.nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(submodule(model, parent), name, module)


def rules_by_op() -> dict[str, Rule]:
    from graftc.passes import RULES

    return {rule.op: rule for rule in RULES}
