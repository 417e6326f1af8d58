"""Agreement (any model, :func:`agreement`): MSE and cosine between teacher and graft outputs on held-out inputs
of the model's distillation task (``graftc.families.make_task``); for encoders also the cosine of their sentence
embeddings (``graftc.metrics.sentence_embedding``); for image classifiers top-1 agreement. What only one family
measures (DiT sample quality, perplexity, held-out text) lives in its graftc.families module.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Optional

import torch
import torch.nn.functional as F

from graftc.families import make_task
from graftc.families.example import eval_data
from graftc.metrics import output_error, sentence_embedding


@torch.no_grad()
def agreement(teacher, student, loaded, samples: int, steps: int, cfg: float, seed: int,
              text: Optional[str] = None, cache: Optional[str] = None, batch_size: int = 16) -> dict:
    """Output MSE and mean per-sample cosine of student vs teacher on held-out inputs of the model's task; for
    encoders (transformers models that are not causal LMs) also ``embedding_cosine``, the mean cosine of their
    sentence embeddings (:func:`sentence_embedding`); for image classifiers ``top1_agreement``, the share of
    held-out images both give the same class, and where the images' labels are the classifier's classes each
    model's ``top1_accuracy`` ({"teacher": ..., "graft": ...})."""
    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        data = eval_data(loaded, samples=max(samples, 4), sampler_steps=steps, cfg_scale=cfg, val_fraction=0.5,
                         text=text, cache=cache or tmp)
        task = make_task(loaded, data, seed)
        task.prepare(teacher, log=lambda line: None)
        # a task with a held-out test split (images) is evaluated on it, else on its validation split
        batches = getattr(task, "eval_batches", task.val_batches)(batch_size)
    encoder = task.encoder
    if encoder:  # models with a head return no last_hidden_state: the last of the hidden states is it
        batches = [dataclasses.replace(b, kwargs={**b.kwargs, "output_hidden_states": True}) for b in batches]
    cosines, embedding_cosines = [], []
    classifies = task.classifies
    labelled = classifies and task.labels_fit(teacher)
    hits = {"same": 0, "teacher": 0, "graft": 0}

    def score(batch, t_out, s_out, t, s):
        t, s = t.flatten(1), s.flatten(1)
        cosines.append(F.cosine_similarity(s, t, dim=1))
        if classifies:  # logits [B, classes]: the predicted class of each image
            hits["same"] += int((s.argmax(-1) == t.argmax(-1)).sum())
            if labelled:
                hits["teacher"] += int((t.argmax(-1) == batch.target["y"]).sum())
                hits["graft"] += int((s.argmax(-1) == batch.target["y"]).sum())
        if encoder:
            mask = batch.kwargs.get("attention_mask")  # the text task's blocks carry none: every token is real
            embedding_cosines.append(F.cosine_similarity(sentence_embedding(s_out, mask),
                                                         sentence_embedding(t_out, mask), dim=1))

    mse = output_error(task, teacher, student, batches, each=score)
    cos = torch.cat(cosines)
    out = {"inputs": int(cos.numel()), "task": task.name, "mse": mse, "cosine": float(cos.mean()),
           "cosine_min": float(cos.min())}
    if embedding_cosines:
        out["embedding_cosine"] = float(torch.cat(embedding_cosines).mean())
    if classifies:
        out["images"] = task.source
        out["top1_agreement"] = hits["same"] / cos.numel()
        if labelled:
            out["top1_accuracy"] = {name: hits[name] / cos.numel() for name in ("teacher", "graft")}
    return out
