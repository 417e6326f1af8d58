"""A trial graft: rewrite a copy of the model, give it a short stage 1, and see how far its output then is from
the teacher's on held-out inputs. `graftc sweep` tries each candidate plan this way; the sensitivity ranking tries
every candidate attention layer at once (graftc.sensitivity)."""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from graftc.compiler import GraftResult, graft
from graftc.distill import Outcome
from graftc.distill import run as run_distill
from graftc.families import make_task

LR = 2e-3


def trial_plan(graft_steps: list[dict], stage1_steps: int, batch_size: int, data: dict) -> dict:
    """A plan (as a dict) grafting `graft_steps` and distilling with `stage1_steps` of stage 1 only, no checkpoints."""
    return {"version": 1, "graft": graft_steps,
            "distill": {"stage1": {"steps": stage1_steps, "batch_size": batch_size, "lr": LR, "eval_every": stage1_steps},
                        "checkpoint_every": 10 ** 9},
            "data": data}


@dataclass
class Trial:
    teacher: torch.nn.Module  # a copy of the model as given
    student: torch.nn.Module  # the grafted copy after the short stage 1
    result: GraftResult
    outcome: Outcome


def trial_graft(loaded, model: torch.nn.Module, plan, seed: int, rankings: dict | None = None) -> Trial:
    """Graft a copy of `model` by `plan` (parsed, with a short stage 1) and distill it quietly, in a temporary
    folder."""
    teacher, student = copy.deepcopy(model), copy.deepcopy(model)
    result = graft(student, plan, loaded.example, rankings)
    with tempfile.TemporaryDirectory(prefix="graftc-trial-") as work:
        outcome = run_distill(teacher, student, result.rewrites, plan, loaded, make_task(loaded, plan.data, seed),
                              Path(work) / "run", False, seed, log=lambda *_: None)
    return Trial(teacher, student, result, outcome)


def held_out(loaded, data, seed: int, teacher: torch.nn.Module):
    """The task whose validation split trials are judged on (made, or read from the data cache)."""
    task = make_task(loaded, data, seed)
    task.prepare(teacher, lambda *_: None)
    return task
