"""What a rewrite rule is. Rules are data: each module of `graftc.passes` lists its own in `RULES`, and
`graftc.passes.rules_by_op()` finds them all (adding an operator edits no list).

A rule names its plan `op`, the region kinds it applies to, a strict config (its plan fields), a guard that
says why a region cannot take it, a builder that returns the replacement modules for the region's cover, a
small example config (what the test matrices and benchmarks instantiate), and the text of its row in README's
operator table.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from graftc.match import Region
from graftc.site import site_problem


class Strict(BaseModel):
    """Base for every plan object: unknown keys are errors, every field has a default and a description."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # no inf/NaN lr, scale, ...


class OpConfig(Strict):
    op: str
    init: Literal["copy", "teacher", "random"] = Field("teacher", description="how the new operator's weights start")


# build(region, config, model) -> {fqn: new module} for the region's cover; the pass manager installs them.
Builder = Callable[[Region, OpConfig, torch.nn.Module], dict[str, torch.nn.Module]]
Guard = Callable[[Region, OpConfig], "str | None"]


# What a model must offer an operator besides a call site; the guard refuses models without it.
NEEDS = {
    "grid": "image models (a token grid)",
    "no-cache": "models that do not decode with a cache (encoders, image models)",
}


@dataclass(frozen=True)
class Rule:
    op: str
    kinds: tuple[str, ...]
    config: type[OpConfig]
    build: Builder
    guard: Guard = lambda region, config: None
    summary: str = ""
    plugs_in: bool = False  # builds a new operator behind a graftc.site.Site: regions need their call site probed
    example: dict = field(default_factory=dict)  # small valid fields (no "op"): what tests and benchmarks build
    needs: tuple[str, ...] = ()  # keys of NEEDS
    decode_state: str = ""  # README: what a cached generate() keeps for a layer it replaced
    memory: str = ""  # README: how that state grows with the context

    def __post_init__(self):
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"rule {self.op}: unknown needs {unknown} (known: {', '.join(NEEDS)})")
        self.config.model_validate({"op": self.op, **self.example})  # a broken example fails at import

    def check(self, region: Region, config: OpConfig) -> str | None:
        """Why the region cannot take this rule, or None. The call-site check of every rule that plugs in runs
        here, first, so a guard may read `region.attrs["site"]` and need not repeat it."""
        if self.plugs_in:
            problem = site_problem(region)
            if problem:
                return problem
        return self.guard(region, config)

    @property
    def inits(self) -> tuple[str, ...]:
        """The `init` values its config allows."""
        return typing.get_args(self.config.model_fields["init"].annotation)


def submodule(model: torch.nn.Module, fqn: str) -> torch.nn.Module:
    return model.get_submodule(fqn) if fqn else model


def set_submodule(model: torch.nn.Module, fqn: str, module: torch.nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(submodule(model, parent), name, module)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _value(value) -> str:
    if value is None:
        return "inferred"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if isinstance(value, str) else str(value)


def _fields(config: type[OpConfig]) -> str:
    """`name` (default) for each plan field but op and init; the choices where there are few."""
    out = []
    for name, info in config.model_fields.items():
        if name in ("op", "init"):
            continue
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else ()
        shown = " | ".join(f"`{c}`" for c in choices) if choices else _value(info.default)
        out.append(f"`{name}` ({shown})")
    return ", ".join(out) or "—"


def operator_table(rules) -> str:
    """README's operator table, one row per rule, from the rules and their configs."""
    rows = ["| op | replaces | what | fields (default) | `init` | fits | decode state (cached `generate()`) "
            "| memory per token of context |",
            "|---|---|---|---|---|---|---|---|"]
    for rule in rules:
        cells = [f"`{rule.op}`", ", ".join(rule.kinds), rule.summary, _fields(rule.config),
                 " | ".join(f"`{i}`" for i in rule.inits), "; ".join(NEEDS[n] for n in rule.needs) or "any model",
                 rule.decode_state or "—", rule.memory or "—"]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"
