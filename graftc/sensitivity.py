"""Graft sensitivity: how far the model's output moves when one attention layer alone is grafted.

Every candidate layer is rewritten with the step's operator and all of them get one short stage 1 together
(one teacher pass per step serves every node, and each node is fed the teacher's own input, so the nodes do
not interact). Then each trained node is put alone into a copy of the model, and the mean squared difference
of that model's output from the original's on held-out inputs is the layer's sensitivity. The
`least-sensitive-first` strategy grafts the layers that move the output least. On the demo DiT with Hyena-X
it ranks 0, 2, 3, 5, 1, 4; the FD of single-layer grafts agrees on the extremes (0 best; 1 and 4 worst), where
locality alone would take layer 1 (benches/RESULTS.md).
"""
from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

STEPS = 600  # stage-1 steps of the measurement (on the demo, 200 left layer 2 under-trained and misranked)
BATCH = 64


def steps_for(plan) -> int:
    """The measurement's stage-1 steps: STEPS, never more than the plan's own stage 1."""
    stage1 = plan.distill.stage1 if plan.distill else None
    return min(STEPS, stage1.steps) if stage1 else STEPS


def measure(loaded, model, fqns: list[str], replace, data, seed: int, steps: int = STEPS,
            batch_size: int = BATCH) -> dict[str, float]:
    """{fqn: output MSE vs `model`} with only that attention module grafted by `replace` after a short stage 1."""
    import graftc
    from graftc.distill import run as run_distill
    from graftc.distill.data import make_task
    from graftc.plan import parse_plan
    from graftc.rules import set_submodule
    from graftc.sweep import output_error

    pattern = "re:^(" + "|".join(re.escape(f) for f in fqns) + ")$"
    raw = {"version": 1,
           "graft": [{"select": {"kind": "attention", "fqn": pattern}, "replace": replace.model_dump(mode="json")}],
           "distill": {"stage1": {"steps": steps, "batch_size": batch_size, "lr": 2e-3, "eval_every": steps},
                       "checkpoint_every": 10 ** 9},
           "data": data.model_dump(mode="json") | {"fd_samples": 0}}
    plan = parse_plan(raw, "sensitivity")
    teacher, student = copy.deepcopy(model), copy.deepcopy(model)
    result = graftc.compile(student, plan, loaded.example)
    with tempfile.TemporaryDirectory(prefix="graftc-sensitivity-") as work:
        run_distill(teacher, student, result.rewrites, plan, loaded, Path(work) / "run", False, seed,
                    log=lambda *_: None)
    task = make_task(loaded, plan.data, seed)
    task.prepare(teacher, lambda *_: None)
    errors, alone = {}, copy.deepcopy(teacher)  # one copy; each trained node visits it in turn
    for record in result.rewrites:
        fqn = record["fqn"]
        original = alone.get_submodule(fqn)
        set_submodule(alone, fqn, student.get_submodule(fqn))
        errors[fqn] = output_error(task, teacher, alone, batch_size)
        set_submodule(alone, fqn, original)
    return errors


def provider(loaded, data, seed: int, steps: int = STEPS, log=print):
    """A `sensitivity` provider for graftc.compile: ranks the model's attention layers, least
    sensitive first, for the step's operator; cached as JSON under the data cache, keyed by the weights, the
    operator, the data settings, the seed and the steps."""
    from graftc.analysis import cached_json
    from graftc.spec import weights_hash

    def rank(model, regions, replace) -> dict:
        pool = [r for r in regions if r.kind == "attention"]
        fqns = [r.fqn for r in pool]  # a layer an earlier step rewrote is measured only if it still matches attention

        def ranking() -> dict:
            log(f"sensitivity: {replace.op} in each of {len(fqns)} attention layers alone, after {steps} "
                "stage-1 steps")
            errors = measure(loaded, model, fqns, replace, data, seed, steps)
            position = {r.fqn: i for i, r in enumerate(pool)}
            order = sorted((position[f] for f in errors), key=lambda i: errors[pool[i].fqn])
            log("sensitivity: least sensitive first " + ", ".join(f"{i} ({errors[pool[i].fqn]:.3g})" for i in order))
            return {"op": replace.op, "steps": steps, "order": order,
                    "output_mse": {str(position[f]): e for f, e in errors.items()}}

        settings = data.model_dump(mode="json", exclude={"fd_samples", "cache"})
        key = [weights_hash(model), replace.model_dump(mode="json"), settings, seed, steps, fqns]
        return cached_json(data.cache, "sensitivity", key, ranking, log)

    return rank
