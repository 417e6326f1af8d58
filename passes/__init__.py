"""Rewrite rules, one module per operator family, each listing its rules in a module-level `RULES`.

`rules_by_op()` is the registry the plan, the pass manager, the tests and the README read: it imports every module
of this package once and collects their `RULES`, so a new operator is a new module here (and its kernel and test),
with no list to edit.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from graftc.rules import Rule


@functools.cache
def _discovered() -> tuple[Rule, ...]:
    found: dict[str, Rule] = {}
    for info in pkgutil.iter_modules(__path__):  # sorted by module name: a stable order
        module = importlib.import_module(f"{__name__}.{info.name}")
        for rule in getattr(module, "RULES", ()):
            if rule.op in found:
                raise ImportError(f"op {rule.op!r} is defined twice (graftc.passes.{info.name} and an earlier module)")
            found[rule.op] = rule
    return tuple(found.values())


def rules_by_op() -> dict[str, Rule]:
    """Every registered rule by its plan `op`, in module order."""
    return {rule.op: rule for rule in _discovered()}
