"""``graftc eval``: what is measured for which model (sample quality, agreement with the teacher, held-out text),
and cost: parameters, FLOPs at the example inputs (``torch.utils.flop_counter``) and forward latency measured
side by side with the teacher (``graftc.distill.speed.compare``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from graftc.distill.speed import compare
from graftc.evaluate.quality import agreement, heldout_quality, perplexity, sample_quality, text_tokenizer
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
    if loaded.family == "dit" and extractor is not None:
        why = extractor.fits(target["model"])
        if why is None:
            for e in entries:
                log(f"eval: sampling {samples} images from {e['name']} ({steps} steps, cfg {cfg})")
                result["models"][e["name"]].update(sample_quality(e["model"], extractor, samples, steps, cfg, seed))
        else:
            result["notes"].append(f"sample quality skipped: {why}")
    elif extractor is not None:
        result["notes"].append(f"sample quality skipped: only graftc's DiT is sampled so far (family {loaded.family!r})")
    if loaded.family == "transformers" and text:
        for e in entries:
            ppl = perplexity(e["model"], loaded, text, seed, cache)
            if ppl is not None:
                result["models"][e["name"]]["perplexity"] = ppl
    tokenizer = text_tokenizer(loaded) if loaded.family == "transformers" else None
    if tokenizer is not None:
        held = heldout_quality((teacher or target)["model"], target["model"], loaded, tokenizer, context, new_tokens,
                               sentences, log)
        for e in entries:  # without a teacher the model is called "teacher" and compared with itself
            result["models"][e["name"]].update(held["models"].get(e["name"], {}))
        result["settings"]["heldout"] = held["settings"]
        if teacher is not None:
            result["heldout"] = held["agreement"]
    elif loaded.family == "transformers":
        result["notes"].append("held-out text evaluation skipped: the model has no tokenizer")
    if teacher is not None:
        if loaded.family == "transformers" and not text:
            pass  # the held-out evaluation above compares teacher and graft; --text adds output agreement on it
        else:
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
