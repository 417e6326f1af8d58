"""Model families: what differs by family lives in one module each, found through FAMILIES.

A family module loads its models (returning `graftc.loaded.Loaded`), makes their distillation data
(`task(loaded, data, seed)`, a `graftc.distill.data.Task` whose `quality` is the family's figure, where it has
one), and says what the family makes (`MAKES_IMAGES`). `Loaded.family` names the family; models of a family
with nothing of its own (timm models without a classifier head, python: factories) get the generic `example`.

The family modules build on graftc.loaded and graftc.distill.data, never on graftc.spec or on this package's
lookup, so this package imports them all up front and the dependency runs one way (graftc.spec -> families).
"""
from __future__ import annotations

from graftc.families import diffusers, dit, example, images, transformers

FAMILIES = {"dit": dit, "diffusers": diffusers, "transformers": transformers, "image-classifier": images}


def family(name: str):
    """The module of family `name` (the generic `example` module for a family without one)."""
    return FAMILIES.get(name, example)


def make_task(loaded, data, seed: int):
    """The distillation task (a graftc.distill.data.Task) for a loaded model, by its family."""
    return family(loaded.family).task(loaded, data, seed)
