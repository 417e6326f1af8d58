"""``graftc eval``: what is measured for which model (sample quality, agreement with the teacher, held-out text),
and cost: parameters, FLOPs at the example inputs (``torch.utils.flop_counter``) and forward latency measured
side by side with the teacher (``graftc.distill.speed.compare``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from graftc.distill.speed import compare
from graftc.evaluate.quality import agreement
from graftc.families import family
from graftc.files import to_device
from graftc.passes import rules_by_op


@torch.no_grad()
def cost(model, loaded) -> dict:
    """Parameters and forward FLOPs at the example inputs."""
    rules_by_op()  # loading the operator library changes how attention is counted: count as compile does
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(*to_device(loaded.args, device), **to_device(loaded.kwargs, device))
    return {"params": int(sum(p.numel() for p in model.parameters())), "flops": int(counter.get_total_flops())}


@dataclass
class Evaluation:
    """One `graftc eval`: the models ({"name", "spec", "model"}), its settings, and the result that the model's
    family (its graftc.families module's `evaluate`) fills in."""

    target: dict
    teacher: Optional[dict]
    loaded: Any
    extractor: Any
    samples: int
    steps: int
    cfg: float
    seed: int
    text: Optional[str]
    cache: Optional[str]
    log: Callable
    context: int
    new_tokens: int
    sentences: int
    result: dict

    @property
    def entries(self) -> list[dict]:
        return [e for e in (self.teacher, self.target) if e is not None]


def evaluate(target: dict, teacher: Optional[dict], loaded, extractor, samples: int,
             steps: int, cfg: float, seed: int, text: Optional[str] = None, cache: Optional[str] = None,
             log=lambda line: None, context: int = 128, new_tokens: int = 32, sentences: int = 512) -> dict:
    """``target``/``teacher``: {"name", "spec", "model"}; ``extractor``: a ``graftc.evaluate.features``
    FeatureExtractor, or None for no sample quality. Returns the JSON-able result."""
    entries = [e for e in (teacher, target) if e is not None]
    result = {"settings": {"samples": samples, "steps": steps, "cfg": cfg, "seed": seed,
                           "features": extractor.name if extractor else None},
              "models": {e["name"]: {"spec": e["spec"], **cost(e["model"], loaded)} for e in entries}, "notes": []}
    if extractor is not None and extractor.reference_file:
        result["settings"]["reference"] = extractor.reference_file
    run = Evaluation(target, teacher, loaded, extractor, samples, steps, cfg, seed, text, cache, log, context,
                     new_tokens, sentences, result)
    measure_agreement = family(loaded.family).evaluate(run)
    if teacher is not None:
        if measure_agreement:
            log("eval: teacher-vs-graft agreement")
            result["agreement"] = agreement(teacher["model"], target["model"], loaded, samples, steps, cfg, seed,
                                            text=text, cache=cache)
            for name, accuracy in result["agreement"].pop("top1_accuracy", {}).items():
                result["models"][name]["top1_accuracy"] = accuracy  # the teacher beside the graft
        speed = compare(teacher["model"], target["model"], loaded)
    else:
        speed = compare(target["model"], target["model"], loaded)
        speed = {"where": speed["where"], "teacher_ms": round((speed["teacher_ms"] + speed["graft_ms"]) / 2, 3)}
    result["latency"] = speed
    return result
