"""Model families: what differs by family lives in one module each, found through FAMILIES.

A family module loads its models (returning `graftc.spec.Loaded`), makes their distillation data
(`task(loaded, data, seed)`, a `graftc.distill.data.Task` whose `quality` is the family's figure, where it has
one), and says what the family makes (`MAKES_IMAGES`). `Loaded.family` names the family; models of a family
with nothing of its own (timm models without a classifier head, python: factories) get the generic `example`.

The modules are imported when first asked for: they build on graftc.spec and graftc.distill.data, which look
families up here, so importing every family up front would make those package imports circular.
"""
from __future__ import annotations

import importlib

FAMILIES = {"dit": "dit", "diffusers": "diffusers", "transformers": "transformers", "image-classifier": "images"}


def family(name: str):
    """The module of family `name` (the generic `example` module for a family without one)."""
    return importlib.import_module(f"{__name__}.{FAMILIES.get(name, 'example')}")
