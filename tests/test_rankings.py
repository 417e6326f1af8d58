"""Rankings are handed to the compiler as data: a once-ranking is measured on the untouched model, a per-step
ranking for each step on the model as the earlier steps left it; a ranked step without its ranking is refused."""
from __future__ import annotations

import pytest

import graftc
from graftc.compiler import graft
from graftc.errors import GraftError
from graftc.rankings import Ranking

PLAN = {"version": 1, "graft": [
    {"select": {"kind": "mlp", "layers": [0]}, "replace": {"op": "mlp", "ratio": 3}},
    {"select": {"kind": "attention", "ratio": 0.5, "strategy": "local-first"}, "replace": {"op": "hyena_x"}},
    {"select": {"kind": "attention", "ratio": 0.5, "strategy": "least-sensitive-first"}, "replace": {"op": "swa"}},
]}


def test_once_and_per_step_rankings_see_the_model_when_they_should():
    loaded = graftc.load_model("demo:tiny-dit")
    calls = []

    def seen(model, regions, kind, index):
        region = next(r for r in regions if r.kind == kind and r.index == index)
        module = model.get_submodule(region.cover[0])
        return type(module).__name__, sum(p.numel() for p in module.parameters())

    def locality(model, regions, replace):
        calls.append(("locality", replace, seen(model, regions, "mlp", 0), seen(model, regions, "attention", 0)))
        return {"order": [0, 1, 2, 3, 4, 5]}

    def sensitivity(model, regions, replace):
        calls.append(("sensitivity", replace.op, seen(model, regions, "mlp", 0), seen(model, regions, "attention", 0)))
        return {"order": [5, 4, 3, 2, 1, 0]}

    original_mlp, original_attention = (seen(loaded.model, graftc.inspect_regions(loaded.model, loaded.example), k, 0)
                                        for k in ("mlp", "attention"))
    result = graft(loaded.model, PLAN, loaded.example,
                   {"locality": Ranking(locality), "sensitivity": Ranking(sensitivity, per_step=True)})
    assert calls[0] == ("locality", None, original_mlp, original_attention)  # before any rewrite
    assert len(calls) == 2 and calls[1][:2] == ("sensitivity", "swa")
    assert calls[1][2] != original_mlp and calls[1][3] != original_attention  # after steps 0 and 1
    assert [r["index"] for r in result.rewrites if r["rule"] == "hyena_x"] == [0, 1, 2]
    assert [r["index"] for r in result.rewrites if r["rule"] == "swa"] == [3, 4, 5]
    assert result.reports[-2].details["locality"] == {"order": [0, 1, 2, 3, 4, 5]}
    assert result.reports[-1].details["sensitivity"] == {"order": [5, 4, 3, 2, 1, 0]}


def test_ranked_steps_need_their_ranking():
    loaded = graftc.load_model("demo:tiny-dit")
    plan = {"version": 1, "graft": [PLAN["graft"][1]]}
    with pytest.raises(GraftError, match="local-first ranks attention layers by measured locality"):
        graft(loaded.model, plan, loaded.example)  # the compiler measures nothing itself
    # graftc.compile ranks locality on the example inputs when given none
    result = graftc.compile(loaded.model, plan, loaded.example)
    ranking = result.reports[-1].details["locality"]
    assert sorted(ranking["order"]) == list(range(6)) and ranking["k"] in (1, 2, 4, 8, 16, 32)
    assert [r["index"] for r in result.rewrites] == sorted(ranking["order"][:3])
