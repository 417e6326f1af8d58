"""Evaluation of a model or a graft (``graftc eval``): sample quality, agreement with the teacher, cost.

* Sample quality (graftc's DiT): N class-balanced DDIM samples (``graftc.diffusion.sample_dit``) are compared
  with reference data through a pluggable :class:`FeatureExtractor`: the Frechet distance of pooled features
  (FID-style, ``graftc.models.demo.frechet_distance``), the Frechet distance of spatial features (sFID), the
  Inception Score of the extractor's class logits and k-NN precision / recall (Kynkaanniemi et al., 2019).
  The demo's extractor is ``DigitFeatures`` (the digits dataset is its reference). Inception-v3 features
  (``inception:PATH``) are not available yet.
* Agreement (any model): MSE and cosine between teacher and graft outputs on held-out inputs of the model's
  distillation task (``graftc.distill.data.make_task``).
* Cost: parameters, FLOPs at the example inputs (``torch.utils.flop_counter``) and forward latency measured
  side by side with the teacher (``graftc.distill.speed.compare``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from graftc.errors import GraftError

__all__ = ["FeatureExtractor", "DigitExtractor", "parse_features", "fd_of_features", "inception_score",
           "precision_recall", "sample_quality", "agreement", "cost", "evaluate", "table"]


# ------------------------------------------------------------------ feature extractors


class FeatureExtractor:
    """What sample-quality metrics need from a feature network.

    ``features(images) -> [N, D]`` pooled features (FD), ``spatial(images) -> [N, D']`` spatial features (sFID)
    or None, ``logits(images) -> [N, K]`` class logits (IS) or None; ``reference()`` returns a dict with the
    reference data's ``features`` [M, D] (and ``spatial`` [M, D'] where the extractor has them), or with
    ``mu``/``sigma`` only when the reference data are not at hand. ``image_shape`` is (C, H, W) of the images
    it takes, with values in [-1, 1]."""

    name = "features"
    image_shape: tuple = ()

    def features(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def spatial(self, images: torch.Tensor) -> Optional[np.ndarray]:
        return None

    def logits(self, images: torch.Tensor) -> Optional[np.ndarray]:
        return None

    def reference(self) -> dict:
        raise NotImplementedError

    def fits(self, model) -> Optional[str]:
        """None if the model's samples fit this extractor, else why not."""
        shape = (int(getattr(model, "in_channels", -1)), int(getattr(model, "input_size", -1)),
                 int(getattr(model, "input_size", -1)))
        if shape != tuple(self.image_shape):
            return f"samples {shape} do not fit the {self.name} features (images {tuple(self.image_shape)})"
        return None


class DigitExtractor(FeatureExtractor):
    """The demo's digit classifier: 64-d penultimate features, its 64x4x4 second conv map (post-GELU,
    flattened to 1024-d) as spatial features, its 10-way head for IS; the reference is scikit-learn's digits
    (1797 images), or the committed reference statistics when scikit-learn is missing (FD only)."""

    name = "demo"
    image_shape = (1, 8, 8)

    def __init__(self, batch_size: int = 1024):
        from graftc.models.demo import load_feature_net

        self.net = load_feature_net()
        self.batch_size = batch_size
        self._ref = None

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn) -> np.ndarray:
        images = torch.as_tensor(images).float().clamp(-1, 1).cpu()
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise GraftError(f"demo features: expected images [N, 1, 8, 8], got {tuple(images.shape)}")
        out = torch.cat([fn(images[i:i + self.batch_size]) for i in range(0, images.shape[0], self.batch_size)])
        out = out.double().numpy()
        if not np.isfinite(out).all():
            raise GraftError("demo features: the images give non-finite features (are there NaNs in them?)")
        return out

    def features(self, images):
        return self._run(images, self.net.features)

    def spatial(self, images):
        net = self.net
        return self._run(images, lambda x: net.act(net.conv2(net.act(net.conv1(x)))).flatten(1))

    def logits(self, images):
        return self._run(images, self.net)

    def reference(self) -> dict:
        if self._ref is None:
            try:
                from graftc.models.demo import load_digits_tensor

                images, _ = load_digits_tensor()
                self._ref = {"features": self.features(images), "spatial": self.spatial(images)}
            except GraftError:  # no scikit-learn: the committed statistics still give FD
                from graftc.models.demo import reference_stats

                mu, sigma = reference_stats()
                self._ref = {"mu": mu, "sigma": sigma}
        return self._ref


def parse_features(spec: str) -> FeatureExtractor:
    """``demo`` or ``inception:PATH``; a one-line GraftError for anything else."""
    if spec == "demo":
        return DigitExtractor()
    head, _, path = spec.partition(":")
    if head == "inception":
        if not path:
            raise GraftError("--features inception:PATH: give the path of an Inception-v3 weights file")
        if not Path(path).is_file():
            raise GraftError(f"--features inception:PATH: file not found: {path}")
        raise GraftError("--features inception:PATH: Inception-v3 features are not available yet "
                         "(graftc has no own Inception-v3 definition); use --features demo")
    raise GraftError(f"--features: unknown feature extractor {spec!r} (use demo or inception:PATH)")


# ------------------------------------------------------------------ metrics


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise GraftError(f"need at least 2 feature rows [N, D] for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_of_features(a: np.ndarray, b) -> float:
    """Frechet distance between the Gaussians fitted to features ``a`` [N, D] and ``b`` ([M, D] or (mu, sigma))."""
    from graftc.models.demo import frechet_distance

    mu_b, sigma_b = b if isinstance(b, tuple) else _stats(b)
    return frechet_distance(*_stats(a), mu_b, sigma_b)


def inception_score(logits: np.ndarray, probs: bool = False) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the samples (one split)."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise GraftError(f"inception_score: expected [N, K] class scores, got {x.shape}")
    if probs:
        p = x / x.sum(axis=1, keepdims=True)
    else:
        p = np.exp(x - x.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    py = p.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(py)), 0.0).sum(axis=1)
    return float(np.exp(kl.mean()))


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
    return d.kthvalue(k + 1, dim=1).values.numpy()  # k + 1: the point itself is its own 0th neighbour


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019): the share of ``fake`` inside the union of
    k-NN balls around ``real`` (precision), and of ``real`` inside the balls around ``fake`` (recall)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise GraftError(f"precision_recall: feature shapes do not agree: {real.shape} vs {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise GraftError(f"precision_recall: need more than k={k} rows in each set (got {len(real)}, {len(fake)})")

    def covered(points, centres):
        radius = torch.from_numpy(_kth_radius(centres, k))
        d = torch.cdist(torch.from_numpy(points), torch.from_numpy(centres))
        return float((d <= radius[None, :] * (1 + 1e-9) + 1e-12).any(dim=1).double().mean())

    return covered(fake, real), covered(real, fake)


# ------------------------------------------------------------------ evaluations


@torch.no_grad()
def sample_quality(model, extractor: FeatureExtractor, n: int, steps: int, cfg: float, seed: int) -> dict:
    """FD, sFID, IS, precision, recall of ``n`` class-balanced DDIM samples of a graftc DiT."""
    from graftc.diffusion import sample_dit

    labels = torch.arange(n) % int(model.num_classes)
    images = sample_dit(model, labels, steps=steps, cfg_scale=cfg, generator=torch.Generator().manual_seed(seed))
    images = images.float().clamp(-1, 1).cpu()
    ref = extractor.reference()
    feats = extractor.features(images)
    out = {"fd": fd_of_features(feats, ref["features"] if "features" in ref else (ref["mu"], ref["sigma"]))}
    spatial = extractor.spatial(images)
    if spatial is not None and "spatial" in ref:
        out["sfid"] = fd_of_features(spatial, ref["spatial"])
    logits = extractor.logits(images)
    if logits is not None:
        out["is"] = inception_score(logits)
    if "features" in ref and n > 3:
        out["precision"], out["recall"] = precision_recall(ref["features"], feats, k=3)
    return out


@torch.no_grad()
def agreement(teacher, student, loaded, samples: int, steps: int, cfg: float, seed: int,
              text: Optional[str] = None, cache: Optional[str] = None, batch_size: int = 16) -> dict:
    """Output MSE and mean per-sample cosine of student vs teacher on held-out inputs of the model's task."""
    from graftc.distill.data import make_task
    from graftc.plan import parse_plan

    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        data = parse_plan({"version": 1}).data.model_copy(update={
            "samples": max(samples, 4), "fd_samples": 0, "sampler_steps": steps, "cfg_scale": cfg,
            "val_fraction": 0.5, "text": text, "cache": cache or tmp})
        task = make_task(loaded, data, seed)
        task.prepare(teacher, log=lambda line: None)
        batches = task.val_batches(batch_size)
    device = next(student.parameters()).device
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    sq = n = 0.0
    cosines = []
    for b in batches:
        args, kwargs = tuple(move(a) for a in b.args), {k: move(v) for k, v in b.kwargs.items()}
        t = task.output(teacher(*args, **kwargs)).double().flatten(1)
        s = task.output(student(*args, **kwargs)).double().flatten(1)
        sq += float(((s - t) ** 2).sum())
        n += t.numel()
        cosines.append(torch.nn.functional.cosine_similarity(s, t, dim=1))
    cos = torch.cat(cosines)
    return {"inputs": int(cos.numel()), "task": task.name, "mse": sq / max(n, 1), "cosine": float(cos.mean()),
            "cosine_min": float(cos.min())}


@torch.no_grad()
def perplexity(model, loaded, text: str, seed: int, cache: Optional[str] = None, batch_size: int = 8) -> Optional[float]:
    """exp(mean next-token cross-entropy) over the held-out blocks of `text`; None for models that are not
    causal language models."""
    import math

    from graftc.distill.data import make_task
    from graftc.plan import parse_plan

    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        data = parse_plan({"version": 1}).data.model_copy(update={"text": text, "fd_samples": 0, "cache": cache or tmp})
        task = make_task(loaded, data, seed)
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


@torch.no_grad()
def cost(model, loaded) -> dict:
    """Parameters and forward FLOPs at the example inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    from graftc.rules import rules_by_op

    rules_by_op()  # loading the operator library changes how attention is counted: count as compile does
    device = next(model.parameters()).device
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    counter = FlopCounterMode(display=False)
    with counter:
        model(*(move(a) for a in loaded.args), **{k: move(v) for k, v in loaded.kwargs.items()})
    return {"params": int(sum(p.numel() for p in model.parameters())), "flops": int(counter.get_total_flops())}


def evaluate(target: dict, teacher: Optional[dict], loaded, extractor: Optional[FeatureExtractor], samples: int,
             steps: int, cfg: float, seed: int, text: Optional[str] = None, cache: Optional[str] = None,
             log=lambda line: None) -> dict:
    """``target``/``teacher``: {"name", "spec", "model"}. Returns the JSON-able result."""
    from graftc.distill.speed import compare

    entries = [e for e in (teacher, target) if e is not None]
    result = {"settings": {"samples": samples, "steps": steps, "cfg": cfg, "seed": seed,
                           "features": extractor.name if extractor else None},
              "models": {e["name"]: {"spec": e["spec"], **cost(e["model"], loaded)} for e in entries}, "notes": []}
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
    if teacher is not None:
        if loaded.family == "transformers" and not text:
            result["notes"].append("agreement skipped: this language model needs --text")
        else:
            log("eval: teacher-vs-graft agreement")
            result["agreement"] = agreement(teacher["model"], target["model"], loaded, samples, steps, cfg, seed,
                                            text=text, cache=cache)
        speed = compare(teacher["model"], target["model"], loaded)
    else:
        speed = compare(target["model"], target["model"], loaded)
        speed = {"where": speed["where"], "teacher_ms": round((speed["teacher_ms"] + speed["graft_ms"]) / 2, 3)}
    result["latency"] = speed
    return result


# ------------------------------------------------------------------ output


def _fmt(v) -> str:
    from graftc.report import human

    if v is None:
        return "-"
    if isinstance(v, int):
        return human(v)
    return f"{v:.4g}"


def table(result: dict) -> str:
    names = list(result["models"])
    rows = [("", *names)]
    labels = {"params": "params", "flops": "FLOPs (example inputs)", "fd": "FD (lower is better)", "sfid": "sFID",
              "is": "IS", "precision": "precision (k=3)", "recall": "recall (k=3)",
              "perplexity": "perplexity (held-out text)"}
    for key, label in labels.items():
        if any(key in result["models"][n] for n in names):
            rows.append((label, *(_fmt(result["models"][n].get(key)) for n in names)))
    speed = result["latency"]
    if "graft_ms" in speed:
        rows.append((f"latency ms ({speed['where']})", _fmt(speed["teacher_ms"]), _fmt(speed["graft_ms"])))
    else:
        rows.append((f"latency ms ({speed['where']})", _fmt(speed["teacher_ms"])))
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    s = result["settings"]
    head = f"eval: {s['samples']} samples, {s['steps']} steps, cfg {s['cfg']}, seed {s['seed']}, features {s['features']}"
    out = [head, *lines]
    if "graft_ms" in speed:
        out.append(f"speedup vs teacher: {speed['speedup']:.2f}x")
    if "agreement" in result:
        a = result["agreement"]
        out.append(f"agreement with the teacher on {a['inputs']} held-out inputs: output MSE {a['mse']:.4g}, "
                   f"cosine {a['cosine']:.4f} (min {a['cosine_min']:.4f})")
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)
