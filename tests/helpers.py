"""Shared test helpers: comparable outputs, perturbed weights, quick compile + round trip."""
from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_flatten

import graftc
from graftc.artifact import save
from graftc.report import artifact_report


def leaves(output) -> list[torch.Tensor]:
    """Tensor leaves of any model output (tensor, tuple, ModelOutput, diffusers output)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor)]


def run(model, loaded):
    with torch.no_grad():
        return leaves(model(*loaded.args, **loaded.kwargs))


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def perturb(model, scale: float = 0.02, seed: int = 0):
    """Small random offsets on every weight, so zero-initialized layers (adaLN-Zero) carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def graft(loaded, plan: dict):
    """Compile a deep copy of loaded.model by plan; returns (teacher outputs, result)."""
    teacher = run(loaded.model, loaded)
    model = copy.deepcopy(loaded.model)
    result = graftc.compile(model, plan, loaded.example)
    return teacher, result


def save_and_load(result, spec: str, out, **load_kw):
    save(out, result, spec, "test", artifact_report(spec, result))
    return graftc.load(out, **load_kw)


def plan_of(*steps) -> dict:
    return {"version": 1, "graft": [{"select": sel, "replace": rep} for sel, rep in steps]}


def zoo_family_fixture(families: list[str]):
    """A module-scoped fixture over zoo families: (name, spec, loaded model with every layer given signal)."""
    import pytest

    from graftc.spec import load_model
    from tests import zoo

    @pytest.fixture(scope="module", params=families)
    def family(request, tmp_path_factory):
        spec = zoo.FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
        loaded = load_model(spec)
        perturb(loaded.model)  # graftc's DiT starts adaLN-Zero: give every layer signal
        return request.param, spec, loaded

    return family
