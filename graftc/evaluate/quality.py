"""Quality measurements that differ by model family, side by side so that each family's can move to its own home.

* Sample quality (graftc's DiT, :func:`sample_quality`): N class-balanced DDIM samples
  (``graftc.diffusion.sample_dit``) are compared with reference data through a feature extractor
  (``graftc.evaluate.features``): the Frechet distance of pooled features (FID-style), the Frechet distance of
  spatial features (sFID), the Inception Score of the extractor's class logits and k-NN precision / recall.
* Agreement (any model, :func:`agreement`): MSE and cosine between teacher and graft outputs on held-out inputs
  of the model's distillation task (``graftc.distill.data.make_task``); for encoders also the cosine of their
  sentence embeddings (mask-weighted mean of the last hidden state); for image classifiers top-1 agreement.
* Held-out real text (transformers models with a tokenizer; :func:`heldout_quality`), on ``graftc.text``'s
  held-out pydoc_data topics, never trained on. Causal LMs: perplexity by the reference protocol of
  ``graftc.text``, and on those windows the greedy next-token agreement with the teacher and the mean per-token
  KL(teacher || graft); decode tokens/s with the cache after a prompt of ``context`` held-out tokens. Encoders:
  the cosine of each held-out sentence's mean-pooled embedding to the teacher's, and retrieval top-1 (each graft
  embedding's nearest teacher embedding, by cosine, among all the sentences' is the same sentence's).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

from graftc import text as heldout_text
from graftc.diffusion import sample_dit
from graftc.distill.data import make_task
from graftc.errors import GraftError
from graftc.evaluate.metrics import fd_of_features, inception_score, output_error, precision_recall
from graftc.plan import parse_plan


@torch.no_grad()
def sample_quality(model, extractor, n: int, steps: int, cfg: float, seed: int) -> dict:
    """FD, sFID, IS, precision, recall of ``n`` class-balanced DDIM samples of a graftc DiT, with the features of
    ``extractor`` (a ``graftc.evaluate.features.FeatureExtractor``)."""
    labels = torch.arange(n) % int(model.num_classes)
    images = sample_dit(model, labels, steps=steps, cfg_scale=cfg, generator=torch.Generator().manual_seed(seed),
                        progress=True)
    images = images.float().clamp(-1, 1).cpu()
    ref = extractor.reference()
    feats = extractor.features(images)
    out = {"fd": fd_of_features(feats, ref["features"] if "features" in ref else (ref["mu"], ref["sigma"]))}
    spatial = extractor.spatial(images)
    if spatial is not None and ("spatial" in ref or "mu_s" in ref):
        out["sfid"] = fd_of_features(spatial, ref["spatial"] if "spatial" in ref else (ref["mu_s"], ref["sigma_s"]))
    logits = extractor.logits(images)
    if logits is not None:
        out["is"] = inception_score(logits)
    if "features" in ref and min(n, len(ref["features"])) > 3:  # k=3 neighbours need more rows on each side
        out["precision"], out["recall"] = precision_recall(ref["features"], feats, k=3)
    return out


def _eval_data(loaded, **update):
    """The plan's default data settings with `update`, text blocks no longer than the model can embed."""
    data = parse_plan({"version": 1}).data
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and 2 <= positions < data.seq_len:
        update["seq_len"] = positions
    return data.model_copy(update={"fd_samples": 0, **update})



@torch.no_grad()
def agreement(teacher, student, loaded, samples: int, steps: int, cfg: float, seed: int,
              text: Optional[str] = None, cache: Optional[str] = None, batch_size: int = 16) -> dict:
    """Output MSE and mean per-sample cosine of student vs teacher on held-out inputs of the model's task; for
    encoders (transformers models that are not causal LMs) also ``embedding_cosine``, the mean cosine of their
    sentence embeddings (:func:`sentence_embedding`); for image classifiers ``top1_agreement``, the share of
    held-out images both give the same class, and where the images' labels are the classifier's classes each
    model's ``top1_accuracy`` ({"teacher": ..., "graft": ...})."""
    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        data = _eval_data(loaded, samples=max(samples, 4), sampler_steps=steps, cfg_scale=cfg, val_fraction=0.5,
                          text=text, cache=cache or tmp)
        task = make_task(loaded, data, seed)
        task.prepare(teacher, log=lambda line: None)
        # a task with a held-out test split (images) is evaluated on it, else on its validation split
        batches = getattr(task, "eval_batches", task.val_batches)(batch_size)
    encoder = loaded.family == "transformers" and task.own_objective != "lm"
    if encoder:  # models with a head return no last_hidden_state: the last of the hidden states is it
        batches = [dataclasses.replace(b, kwargs={**b.kwargs, "output_hidden_states": True}) for b in batches]
    cosines, embedding_cosines = [], []
    classifies = getattr(task, "classifies", False)
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


def sentence_embedding(output, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H] float64: the attention-mask-weighted mean of an encoder's last hidden state over its tokens (the
    pooling of sentence-transformers' MiniLM and most of its models)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        states = getattr(output, "hidden_states", None)
        if not states:
            raise GraftError("embedding cosine: the encoder's output has neither last_hidden_state nor hidden_states")
        hidden = states[-1]
    hidden = hidden.double()
    mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


@torch.no_grad()
def perplexity(model, loaded, text: str, seed: int, cache: Optional[str] = None, batch_size: int = 8) -> Optional[float]:
    """exp(mean next-token cross-entropy) over the held-out blocks of `text`; None for models that are not
    causal language models."""
    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        task = make_task(loaded, _eval_data(loaded, text=text, cache=cache or tmp), seed)
        if task.own_objective != "lm":
            return None
        task.prepare(model, log=lambda line: None)
        batches = task.val_batches(batch_size)
    device = next(model.parameters()).device
    total = count = 0.0
    for b in batches:
        ids = b.kwargs["input_ids"].to(device)
        out = task.output(model(**{**b.kwargs, "input_ids": ids}))
        tokens = ids[:, 1:].numel()
        total += float(task.own_loss(out, type(b)(b.args, b.kwargs, {"input_ids": ids}))) * tokens
        count += tokens
    return math.exp(total / count)


def text_tokenizer(loaded):
    """The spec's tokenizer (demo:smollm2, demo:minilm, .gguf), else the model folder's; None where it has none."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(loaded.spec)
    except Exception:
        return None
    return tokenizer if len(tokenizer) > 1 else None  # a config without a vocabulary gives an empty one


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


@torch.no_grad()
def lm_windows(teacher, graft, windows: torch.Tensor) -> dict:
    """Teacher and graft on the same windows [N, L] (each scored on its own): both perplexities (every token but
    a window's first is predicted), the share of positions where the graft's greedy next token is the
    teacher's, and the mean per-token KL(teacher || graft) in nats."""
    nll = {"teacher": 0.0, "graft": 0.0}
    same = kl = 0.0
    tokens = positions = 0
    for row in windows.split(1):
        t = teacher(input_ids=row, use_cache=False).logits.float().log_softmax(-1)
        g = t if graft is teacher else graft(input_ids=row, use_cache=False).logits.float().log_softmax(-1)
        target = row[:, 1:].flatten()
        for name, logp in (("teacher", t), ("graft", g)):
            nll[name] -= float(logp[:, :-1].flatten(0, 1).gather(1, target[:, None]).sum())
        same += float((t.argmax(-1) == g.argmax(-1)).sum())
        kl += float((t.exp() * (t - g)).sum())
        tokens += target.numel()
        positions += row.numel()
    return {"teacher_perplexity": math.exp(nll["teacher"] / tokens), "graft_perplexity": math.exp(nll["graft"] / tokens),
            "next_token_agreement": same / positions, "kl": kl / positions}


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode tokens/s with the model's cache after prefilling `prompt` [B, context] (not timed)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x
    kept = lambda out: out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # noqa: E731
    out = model(input_ids=prompt, use_cache=True)
    cache, token = kept(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = kept(out), out.logits[:, -1:].argmax(-1)
    return new_tokens * prompt.shape[0] / (time.perf_counter() - start)


@torch.no_grad()
def embedding_quality(teacher, graft, tokenizer, sentences: list[str], batch_size: int = 32) -> dict:
    """Mean-pooled sentence embeddings of teacher and graft: mean and min cosine per sentence, and retrieval
    top-1, the share of sentences whose graft embedding is nearest (by cosine) the teacher embedding of the
    same sentence among all of them."""
    def embed(model):
        rows = []
        for start in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            mask = enc["attention_mask"]
            out = model(**enc, output_hidden_states=True)
            rows.append(sentence_embedding(out, mask))
        return F.normalize(torch.cat(rows), dim=1)

    t, g = embed(teacher), embed(graft)
    cos = (t * g).sum(1)
    hits = (g @ t.T).argmax(1) == torch.arange(len(sentences))
    return {"sentences": len(sentences), "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "retrieval_top1": float(hits.double().mean())}


def heldout_quality(teacher, graft, loaded, tokenizer, context: int = 128, new_tokens: int = 32,
                    sentences: int = 512, log=lambda line: None) -> dict:
    """graftc.text's held-out evaluation of a transformers model (``graft``) beside its teacher (which may be
    the same model). Returns {"models": {"teacher": {...}, "graft": {...}}, "agreement": {...}, "settings"}."""
    if is_causal_lm(loaded.model):
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or 10**9
        protocol = dict(heldout_text.REFERENCE)
        protocol["length"] = min(protocol["length"], positions)
        windows = heldout_text.token_windows(tokenizer, **protocol)
        log(f"eval: {len(windows)} held-out windows of {windows.shape[1]} tokens, teacher beside graft")
        lm = lm_windows(teacher, graft, windows)
        prompt = heldout_text.token_windows(tokenizer, "heldout", min(context, positions - new_tokens), 1)
        log(f"eval: decode speed, {new_tokens} tokens after {prompt.shape[1]} tokens of context")
        speed = {"teacher": decode_speed(teacher, prompt, new_tokens)}
        speed["graft"] = speed["teacher"] if graft is teacher else decode_speed(graft, prompt, new_tokens)
        models = {name: {"heldout_perplexity": lm[f"{name}_perplexity"], "decode_tokens_per_s": speed[name]}
                  for name in ("teacher", "graft")}
        return {"models": models, "settings": {"windows": list(windows.shape), "protocol": protocol,
                                               "context": prompt.shape[1], "new_tokens": new_tokens},
                "agreement": {"next_token_agreement": lm["next_token_agreement"], "kl": lm["kl"]}}
    found = heldout_text.sentences("heldout")[:sentences]
    log(f"eval: embeddings of {len(found)} held-out sentences, teacher beside graft")
    return {"models": {}, "settings": {"sentences": len(found)},
            "agreement": embedding_quality(teacher, graft, tokenizer, found)}

