"""Rankings of a model's attention layers, for the plan's ranked strategies (graftc.plan.RANKED_STRATEGIES).

A ranking is handed to the compiler as data (`graftc.compiler.graft(..., rankings={name: Ranking})`); the
compiler measures nothing itself. Each ranking returns {"order": [attention indices, first taken first], ...}
and the pass report records it.

* locality (local-first, nonlocal-first): attention band mass L_k at default_k (graftc.analysis), measured on
  the example inputs (`on_examples`, graftc.compile's default) or on the model's own data (`locality_on_data`);
* sensitivity (least-sensitive-first): how far the output moves when a layer alone is grafted and given a short
  stage 1 (graftc.sensitivity), on the model's own data (`sensitivity_on_data`).

A new ranking is a function here returning a `Ranking`, and an entry in RANKED_STRATEGIES for the strategy that
reads it. Measurements on the model's own data are cached as JSON under the data cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from graftc.analysis import DEFAULT_KS, analyze, default_k, layer_order
from graftc.distill.data import cache_root
from graftc.families import make_task
from graftc.files import write_atomic
from graftc.sensitivity import STEPS, graft_sensitivity, steps_for
from graftc.spec import weights_hash


@dataclass(frozen=True)
class Ranking:
    """`measure(model, regions, replace) -> {"order": [...], ...}`. `per_step` False: measured once, on the untouched
    model right after matching (replace is None); True: for every step that reads it, on the model as the earlier
    steps left it, for that step's operator (`replace`, its config)."""

    measure: Callable[[torch.nn.Module, list, Any], dict]
    per_step: bool = False

    def __call__(self, model: torch.nn.Module, regions: list, replace: Any = None) -> dict:
        return self.measure(model, regions, replace)


def locality_ranking(model: torch.nn.Module, source, regions, n_batches: int = 2, batch_size: int = 8) -> dict:
    """What the local-first / nonlocal-first strategies select by: attention indices, most local first, at
    default_k, measured on `source` (a Task or batches, see graftc.analysis.analyze) before any rewrite."""
    result = analyze(model, source, DEFAULT_KS, regions=regions, n_batches=n_batches, batch_size=batch_size)
    k = default_k(result)
    return {"k": k, "order": layer_order(result, k),
            "band_mass": {a["index"]: a["band_mass"][str(k)] for a in result["attention"]}}


def on_examples(args: tuple, kwargs: dict) -> Ranking:
    """Locality measured on the example inputs alone (one batch): what graftc.compile ranks by when it is not
    handed a locality ranking."""
    return Ranking(lambda model, regions, _replace: locality_ranking(model, [(args, kwargs)], regions, n_batches=1))


def cached_json(cache: str | None, kind: str, key: list, make: Callable[[], dict], log=None) -> dict:
    """`make()`'s result, cached as <cache root>/analysis/<kind>-<hash of key>.json (written atomically) and
    read back from there on later calls with the same key."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_root(cache) / "analysis" / f"{kind}-{digest}.json"
    if path.is_file():
        if log:
            log(f"{kind}: using the cached measurement {path}")
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result)))
    return json.loads(path.read_text())


def locality_on_data(loaded, data, seed: int) -> Ranking:
    """Locality on the model's own data (as `graftc analyze` measures it), cached, keyed by the weights and the
    data settings."""
    def measure_locality(model, regions) -> dict:
        task = make_task(loaded, data.model_copy(update={"fd_samples": 0}), seed)
        task.prepare(model, lambda *_: None)
        return locality_ranking(model, task, regions, n_batches=4, batch_size=8)

    def rank(model, regions, _replace) -> dict:
        settings = data.model_dump(mode="json", exclude={"fd_samples", "cache"})
        return cached_json(data.cache, "locality", [weights_hash(model), settings, seed],
                           lambda: measure_locality(model, regions))

    return Ranking(rank)


def sensitivity_on_data(loaded, data, seed: int, steps: int = STEPS, log=print) -> Ranking:
    """Graft sensitivity for the step's operator, least sensitive first, measured on the model's own data after
    `steps` stage-1 steps; cached, keyed by the weights, the operator, the data settings, the seed and the steps."""
    def rank(model, regions, replace) -> dict:
        pool = [r for r in regions if r.kind == "attention"]
        fqns = [r.fqn for r in pool]  # a layer an earlier step rewrote is measured only if it still matches attention

        def ranking() -> dict:
            log(f"sensitivity: {replace.op} in each of {len(fqns)} attention layers alone, after {steps} "
                "stage-1 steps")
            errors = graft_sensitivity(loaded, model, fqns, replace, data, seed, steps)
            position = {r.fqn: i for i, r in enumerate(pool)}
            order = sorted((position[f] for f in errors), key=lambda i: errors[pool[i].fqn])
            log("sensitivity: least sensitive first " + ", ".join(f"{i} ({errors[pool[i].fqn]:.3g})" for i in order))
            return {"op": replace.op, "steps": steps, "order": order,
                    "output_mse": {str(position[f]): e for f, e in errors.items()}}

        settings = data.model_dump(mode="json", exclude={"fd_samples", "cache"})
        key = [weights_hash(model), replace.model_dump(mode="json"), settings, seed, steps, fqns]
        return cached_json(data.cache, "sensitivity", key, ranking, log)

    return Ranking(rank, per_step=True)


def for_model(loaded, plan, seed: int, log=print) -> dict[str, Ranking]:
    """The rankings `graftc compile` and `graftc sweep` hand the compiler: measured on the model's own data
    (only when a step reads them), the sensitivity with no more stage-1 steps than the plan's own stage 1."""
    return {"locality": locality_on_data(loaded, plan.data, seed),
            "sensitivity": sensitivity_on_data(loaded, plan.data, seed, steps_for(plan), log)}
