"""Graft sensitivity: how far the model's output moves when one attention layer alone is grafted.

Every candidate layer is rewritten with the step's operator and all of them get one short stage 1 together
(one teacher pass per step serves every node, and each node is fed the teacher's own input, so the nodes do
not interact). Then each trained node is put alone into a copy of the model, and the mean squared difference
of that model's output from the original's on held-out inputs is the layer's sensitivity. The
`least-sensitive-first` strategy grafts the layers that move the output least (graftc.rankings caches the
ranking); benches/RESULTS.md compares it on the demo DiT with the FD of single-layer grafts and with locality.
"""
from __future__ import annotations

import copy
import re

from graftc.metrics import output_error
from graftc.plan import parse_plan
from graftc.trial import held_out, trial_graft, trial_plan
from graftc.rules import set_submodule

STEPS = 600  # stage-1 steps of the measurement (fewer left a layer of the demo under-trained and misranked)
BATCH = 64


def steps_for(plan) -> int:
    """The measurement's stage-1 steps: STEPS, never more than the plan's own stage 1."""
    stage1 = plan.distill.stage1 if plan.distill else None
    return min(STEPS, stage1.steps) if stage1 else STEPS


def graft_sensitivity(loaded, model, fqns: list[str], replace, data, seed: int, steps: int = STEPS,
                      batch_size: int = BATCH) -> dict[str, float]:
    """{fqn: output MSE vs `model`} with only that attention module grafted by `replace` after a short stage 1."""
    pattern = "re:^(" + "|".join(re.escape(f) for f in fqns) + ")$"
    raw = trial_plan([{"select": {"kind": "attention", "fqn": pattern}, "replace": replace.model_dump(mode="json")}],
                     steps, batch_size, data.model_dump(mode="json") | {"fd_samples": 0})
    plan = parse_plan(raw, "sensitivity")
    trial = trial_graft(loaded, model, plan, seed)
    teacher, student = trial.teacher, trial.student
    task = held_out(loaded, plan.data, seed, teacher)
    errors, alone = {}, copy.deepcopy(teacher)  # one copy; each trained node visits it in turn
    for record in trial.result.rewrites:
        fqn = record["fqn"]
        original = alone.get_submodule(fqn)
        set_submodule(alone, fqn, student.get_submodule(fqn))
        errors[fqn] = output_error(task, teacher, alone, batch_size)
        set_submodule(alone, fqn, original)
    return errors
