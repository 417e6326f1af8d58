"""Evaluation of a model or a graft (``graftc eval``): sample quality, agreement with the teacher, cost.

* Sample quality (graftc's DiT): N class-balanced DDIM samples (``graftc.diffusion.sample_dit``) are compared
  with reference data through a pluggable :class:`FeatureExtractor`: the Frechet distance of pooled features
  (FID-style, ``graftc.models.demo.frechet_distance``), the Frechet distance of spatial features (sFID), the
  Inception Score of the extractor's class logits and k-NN precision / recall (Kynkaanniemi et al., 2019).
  Extractors: ``demo`` (:class:`DigitExtractor`, the digits dataset is its reference) and ``inception:PATH``
  (:class:`InceptionExtractor`, graftc's own Inception-v3 in ``graftc.inception`` with a local weights file:
  FID's pool_3 features, sFID's mixed_6/conv features, IS over its classes). The reference is a ``--reference``
  .npz in the usual reference-batch layout (``mu``/``sigma``, ``mu_s``/``sigma_s``, images ``arr_0``; see
  :func:`read_reference`) or, for the demo's 8x8 digits, the digits dataset itself.
* Agreement (any model): MSE and cosine between teacher and graft outputs on held-out inputs of the model's
  distillation task (``graftc.distill.data.make_task``); for encoders also the cosine of their sentence
  embeddings (mask-weighted mean of the last hidden state).
* Held-out real text (transformers models with a tokenizer; :func:`heldout_quality`), on ``graftc.text``'s
  held-out pydoc_data topics, never trained on. Causal LMs: perplexity by the reference protocol of
  ``graftc.text`` (4 windows of 512 tokens), and on those windows the greedy next-token agreement with the
  teacher and the mean per-token KL(teacher || graft); decode tokens/s with the cache after a prompt of
  ``context`` held-out tokens. Encoders: the cosine of each held-out sentence's mean-pooled embedding to the
  teacher's, and retrieval top-1 (each graft embedding's nearest teacher embedding, by cosine, among all the
  sentences' is the same sentence's).
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

__all__ = ["FeatureExtractor", "DigitExtractor", "InceptionExtractor", "read_reference", "parse_features",
           "fd_of_features", "inception_score", "precision_recall", "sample_quality", "agreement",
           "sentence_embedding", "perplexity", "text_tokenizer", "heldout_quality", "lm_windows", "decode_speed",
           "embedding_quality", "cost", "evaluate", "table"]


# ------------------------------------------------------------------ feature extractors


class FeatureExtractor:
    """What sample-quality metrics need from a feature network.

    ``features(images) -> [N, D]`` pooled features (FD), ``spatial(images) -> [N, D']`` spatial features (sFID)
    or None, ``logits(images) -> [N, K]`` class logits (IS) or None; ``reference()`` returns a dict with the
    reference data's ``features`` [M, D] (and ``spatial`` [M, D'] where the extractor has them), or with
    ``mu``/``sigma`` (and ``mu_s``/``sigma_s``) only when the reference data are not at hand. ``image_shape``
    is (C, H, W) of the images it takes, with values in [-1, 1]; ``feature_dim``/``spatial_dim`` are D and D'
    where known. ``use_reference(path)`` swaps the built-in reference for an .npz (:func:`read_reference`)."""

    name = "features"
    image_shape: tuple = ()
    feature_dim: Optional[int] = None
    spatial_dim: Optional[int] = None
    reference_file: Optional[str] = None

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

    def use_reference(self, path) -> None:
        """Read (and check) a reference .npz now, so that a bad file fails before any model is loaded."""
        self._file = read_reference(path, self)
        self.reference_file = str(path)

    def _reference_from_file(self, chunk: int = 500) -> dict:
        """The file's statistics, plus the features of its images where it has some (in chunks: the images
        stay uint8 in memory until their turn)."""
        ref = {k: v for k, v in self._file.items() if k != "images"}
        images = self._file.get("images")
        if images is not None:
            feats, spatial = [], []
            for i in range(0, len(images), chunk):
                x = torch.from_numpy(images[i:i + chunk]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                feats.append(self.features(x))
                spatial.append(self.spatial(x))
            ref["features"] = np.concatenate(feats)
            if spatial[0] is not None:
                ref["spatial"] = np.concatenate(spatial)
        return ref


class DigitExtractor(FeatureExtractor):
    """The demo's digit classifier: 64-d penultimate features, its 64x4x4 second conv map (post-GELU,
    flattened to 1024-d) as spatial features, its 10-way head for IS; the reference is scikit-learn's digits
    (1797 images), or the committed reference statistics when scikit-learn is missing (FD only)."""

    name = "demo"
    image_shape = (1, 8, 8)
    feature_dim, spatial_dim = 64, 1024

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
        if self._ref is None and self.reference_file:
            self._ref = self._reference_from_file()
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


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 (``graftc.inception``) from a local weights file: pool_3 features [N, 2048] (FD), the 7
    mixed_6/conv channels [N, 2023] (sFID), the classifier's logits (IS, softmax over all of its 1008 or 1000
    classes). Images of any size with 1 or 3 channels; features, spatial features and logits come from one
    forward pass in batches of ``batch_size``, on the GPU where there is one.

    The reference is the ``--reference`` .npz, or, for the demo's 8x8 digit images, the 1797 digits themselves.
    Those cost about 10 TFLOPs at 299x299 (minutes on a CPU core, seconds on a GPU), so their features are
    computed once per weights file and cached in ``<cache>/inception/digits-<weights sha256>.npz``."""

    name = "inception"
    feature_dim, spatial_dim = 2048, 2023

    def __init__(self, path, cache: Optional[str] = None, batch_size: int = 50, device=None,
                 log=lambda line: None):
        from graftc.inception import load_inception

        self.path = Path(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = load_inception(self.path).to(self.device)
        self.cache, self.batch_size, self.log = cache, batch_size, log
        self._last = None  # (images, outputs) of the last call: features/spatial/logits share one pass
        self._ref = None

    @torch.no_grad()
    def _outputs(self, images: torch.Tensor) -> dict:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        x = torch.as_tensor(images)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise GraftError(f"inception features: expected images [N, 1 or 3, H, W], got {tuple(x.shape)}")
        parts = {"pool": [], "spatial": [], "logits": []}
        cudnn = torch.backends.cudnn
        # true float32 convolutions on a GPU too: cuDNN's default TF32 would move the features by ~1e-3
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            for i in range(0, x.shape[0], self.batch_size):
                out = self.net(x[i:i + self.batch_size].float().clamp(-1, 1).to(self.device))
                for key, value in parts.items():
                    value.append(out[key].double().cpu())
        result = {k: torch.cat(v).numpy() for k, v in parts.items()}
        if not all(np.isfinite(v).all() for v in result.values()):
            raise GraftError("inception features: the images give non-finite features (are there NaNs in them?)")
        self._last = (images, result)
        return result

    def features(self, images):
        return self._outputs(images)["pool"]

    def spatial(self, images):
        return self._outputs(images)["spatial"]

    def logits(self, images):
        return self._outputs(images)["logits"]

    def fits(self, model) -> Optional[str]:
        c, size = int(getattr(model, "in_channels", -1)), int(getattr(model, "input_size", -1))
        if c not in (1, 3):
            return (f"the model's samples have {c} channels: Inception-v3 scores 1- or 3-channel images, and a "
                    "latent model's samples need a VAE to decode them first")
        if self.reference_file is None and (c, size, size) != DigitExtractor.image_shape:
            return f"no reference data for {c}x{size}x{size} images: give --reference REF.npz"
        return None

    def reference(self) -> dict:
        if self._ref is None:
            self._ref = self._reference_from_file() if self.reference_file else self._digits_reference()
        return self._ref

    def _digits_reference(self) -> dict:
        import os

        from graftc.distill.data import cache_root
        from graftc.files import file_sha256
        from graftc.models.demo import load_digits_tensor

        file = cache_root(self.cache) / "inception" / f"digits-{file_sha256(self.path)[:16]}.npz"
        if file.is_file():
            try:
                with np.load(file, allow_pickle=False) as z:
                    return {"features": z["features"].astype(np.float64), "spatial": z["spatial"].astype(np.float64)}
            except Exception:  # a damaged cache file is simply recomputed
                pass
        images, _ = load_digits_tensor()
        self.log(f"eval: Inception features of the {len(images)} reference digits (once per weights file, "
                 f"cached in {file})")
        out = self._outputs(images)
        ref = {"features": out["pool"], "spatial": out["spatial"]}
        # float32 on disk: the network computes in float32, so nothing is lost and a cached run equals a fresh one
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=ref["features"].astype(np.float32), spatial=ref["spatial"].astype(np.float32))
        os.replace(tmp, file)
        return ref


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def read_reference(path, extractor: Optional[FeatureExtractor] = None) -> dict:
    """A reference .npz in the usual reference-batch layout (guided-diffusion's evaluator and its followers),
    read with ``allow_pickle=False``: ``mu`` [D] and ``sigma`` [D, D] for FD, optionally ``mu_s``/``sigma_s``
    for sFID, and/or ``arr_0``: uint8 images [N, H, W, 3] (or [N, H, W] / [N, H, W, 1]).

    Returns the statistics it holds (float64) and its images under ``images`` (uint8 [N, H, W, C]). Where the
    file has images, the reference's features come from them (so precision/recall work too, and FD/sFID compare
    one network's features on both sides); its ``mu``/``sigma`` (``mu_s``/``sigma_s``) serve when it has none."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"--reference: file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise GraftError(f"--reference {path}: cannot read it as an .npz archive ({_one_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise GraftError(f"--reference {path}: a single array; expected an .npz archive (np.savez) holding "
                         "mu/sigma, mu_s/sigma_s and/or images arr_0")
    with archive:
        try:
            arrays = {k: archive[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "arr_0") if k in archive.files}
        except Exception as exc:  # object arrays (pickles) are refused; a damaged member fails to read
            raise GraftError(f"--reference {path}: cannot read its arrays ({_one_line(exc)})") from None
        keys = sorted(archive.files)
    ref = {}
    dims = getattr(extractor, "feature_dim", None), getattr(extractor, "spatial_dim", None)
    for mu_key, sigma_key, dim, what in (("mu", "sigma", dims[0], "features"),
                                         ("mu_s", "sigma_s", dims[1], "spatial features")):
        if (mu_key in arrays) != (sigma_key in arrays):
            have, lack = (mu_key, sigma_key) if mu_key in arrays else (sigma_key, mu_key)
            raise GraftError(f"--reference {path}: has {have} but not {lack}")
        if mu_key not in arrays:
            continue
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.dtype.kind not in "fiu" \
                or sigma.dtype.kind not in "fiu":
            raise GraftError(f"--reference {path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not a "
                             "numeric mean [D] and covariance [D, D]")
        if dim is not None and mu.shape[0] != dim:
            raise GraftError(f"--reference {path}: {mu_key} has {mu.shape[0]} dims, but the {extractor.name} "
                             f"{what} have {dim}")
        mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise GraftError(f"--reference {path}: {mu_key}/{sigma_key} contain NaN or inf")
        ref[mu_key], ref[sigma_key] = mu, sigma
    if "arr_0" in arrays:
        images = arrays["arr_0"]
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
            raise GraftError(f"--reference {path}: arr_0 is {images.dtype} {arrays['arr_0'].shape}; expected at least "
                             "2 uint8 images [N, H, W, 3] (or [N, H, W] / [N, H, W, 1])")
        ref["images"] = images
    if "mu" not in ref and "images" not in ref:
        raise GraftError(f"--reference {path}: holds neither mu/sigma nor images arr_0 "
                         f"(keys: {', '.join(keys) or 'none'})")
    return ref


def parse_features(spec: str, reference=None, cache: Optional[str] = None, log=lambda line: None) -> FeatureExtractor:
    """``demo`` or ``inception:PATH`` (its weights load here, so a bad file fails before any model is loaded),
    with an optional reference .npz; a one-line GraftError for anything else."""
    if spec == "demo":
        extractor = DigitExtractor()
    else:
        head, _, path = spec.partition(":")
        if head != "inception":
            raise GraftError(f"--features: unknown feature extractor {spec!r} (use demo or inception:PATH)")
        if not path:
            raise GraftError("--features inception:PATH: give the path of an Inception-v3 weights file")
        if not Path(path).is_file():
            raise GraftError(f"--features inception:PATH: file not found: {path}")
        extractor = InceptionExtractor(path, cache=cache, log=log)
    if reference is not None:
        extractor.use_reference(reference)
    return extractor


# ------------------------------------------------------------------ metrics


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise GraftError(f"need at least 2 feature rows [N, D] for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_of_features(a: np.ndarray, b) -> float:
    """Frechet distance between the Gaussians fitted to features ``a`` [N, D] and ``b`` ([M, D] or (mu, sigma))."""
    from graftc.models.demo import frechet_distance

    if not isinstance(b, tuple):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.ndim == b64.ndim == 2 and a64.shape[1] == b64.shape[1] and min(len(a64), len(b64)) >= 2 \
                and len(a64) * len(b64) < a64.shape[1] ** 2:
            return _fd_low_rank(a64, b64)
    mu_b, sigma_b = b if isinstance(b, tuple) else _stats(b)
    return frechet_distance(*_stats(a), mu_b, sigma_b)


def _fd_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance for few rows in many dimensions (e.g. tens of samples of 2048-d Inception features),
    without a D x D matrix: with S_a = A^T A and S_b = B^T B (A, B the centred rows over sqrt(N - 1)), the
    nonzero eigenvalues of S_a S_b are those of (A B^T)(A B^T)^T, so Tr (S_a S_b)^(1/2) is the sum of the
    singular values of the N x M matrix A B^T. Exact, and O(N M D) instead of O(D^3)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)
    if not (np.isfinite(ca).all() and np.isfinite(cb).all()):
        raise GraftError("frechet distance: the features contain NaN or inf")
    tr_covmean = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    d = mu_a - mu_b
    return max(float(d @ d + (ca * ca).sum() + (cb * cb).sum() - 2.0 * tr_covmean), 0.0)


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
    from graftc.plan import parse_plan

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
    from graftc.distill.data import make_task

    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        data = _eval_data(loaded, samples=max(samples, 4), sampler_steps=steps, cfg_scale=cfg, val_fraction=0.5,
                          text=text, cache=cache or tmp)
        task = make_task(loaded, data, seed)
        task.prepare(teacher, log=lambda line: None)
        # a task with a held-out test split (images) is evaluated on it, else on its validation split
        batches = getattr(task, "eval_batches", task.val_batches)(batch_size)
    encoder = loaded.family == "transformers" and task.own_objective != "lm"
    device = next(student.parameters()).device
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    sq = n = 0.0
    cosines, embedding_cosines = [], []
    classifies = getattr(task, "classifies", False)
    labelled = classifies and task.labels_fit(teacher)
    same = correct_t = correct_s = 0
    for b in batches:
        args, kwargs = tuple(move(a) for a in b.args), {k: move(v) for k, v in b.kwargs.items()}
        if encoder:  # models with a head return no last_hidden_state: the last of the hidden states is it
            kwargs["output_hidden_states"] = True
        t_out, s_out = teacher(*args, **kwargs), student(*args, **kwargs)
        t = task.output(t_out).double().flatten(1)
        s = task.output(s_out).double().flatten(1)
        sq += float(((s - t) ** 2).sum())
        n += t.numel()
        cosines.append(torch.nn.functional.cosine_similarity(s, t, dim=1))
        if classifies:  # logits [B, classes]: the predicted class of each image
            same += int((s.argmax(-1) == t.argmax(-1)).sum())
            if labelled:
                y = b.target["y"].to(t.device)
                correct_t += int((t.argmax(-1) == y).sum())
                correct_s += int((s.argmax(-1) == y).sum())
        if encoder:
            mask = kwargs.get("attention_mask")  # the text task's blocks carry none: every token is real
            embedding_cosines.append(torch.nn.functional.cosine_similarity(
                sentence_embedding(s_out, mask), sentence_embedding(t_out, mask), dim=1))
    cos = torch.cat(cosines)
    out = {"inputs": int(cos.numel()), "task": task.name, "mse": sq / max(n, 1), "cosine": float(cos.mean()),
           "cosine_min": float(cos.min())}
    if embedding_cosines:
        out["embedding_cosine"] = float(torch.cat(embedding_cosines).mean())
    if classifies:
        out["images"] = task.source
        out["top1_agreement"] = same / cos.numel()
        if labelled:
            out["top1_accuracy"] = {"teacher": correct_t / cos.numel(), "graft": correct_s / cos.numel()}
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
    import math

    from graftc.distill.data import make_task

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


# ------------------------------------------------------------------ held-out real text


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
    import math

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
    import time

    import inspect

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
        return torch.nn.functional.normalize(torch.cat(rows), dim=1)

    t, g = embed(teacher), embed(graft)
    cos = (t * g).sum(1)
    hits = (g @ t.T).argmax(1) == torch.arange(len(sentences))
    return {"sentences": len(sentences), "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "retrieval_top1": float(hits.double().mean())}


def heldout_quality(teacher, graft, loaded, tokenizer, context: int = 128, new_tokens: int = 32,
                    sentences: int = 512, log=lambda line: None) -> dict:
    """graftc.text's held-out evaluation of a transformers model (``graft``) beside its teacher (which may be
    the same model). Returns {"models": {"teacher": {...}, "graft": {...}}, "agreement": {...}, "settings"}."""
    from graftc import text

    if is_causal_lm(loaded.model):
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or 10**9
        protocol = dict(text.REFERENCE)
        protocol["length"] = min(protocol["length"], positions)
        windows = text.token_windows(tokenizer, **protocol)
        log(f"eval: {len(windows)} held-out windows of {windows.shape[1]} tokens, teacher beside graft")
        lm = lm_windows(teacher, graft, windows)
        prompt = text.token_windows(tokenizer, "heldout", min(context, positions - new_tokens), 1)
        log(f"eval: decode speed, {new_tokens} tokens after {prompt.shape[1]} tokens of context")
        speed = {"teacher": decode_speed(teacher, prompt, new_tokens)}
        speed["graft"] = speed["teacher"] if graft is teacher else decode_speed(graft, prompt, new_tokens)
        models = {name: {"heldout_perplexity": lm[f"{name}_perplexity"], "decode_tokens_per_s": speed[name]}
                  for name in ("teacher", "graft")}
        return {"models": models, "settings": {"windows": list(windows.shape), "protocol": protocol,
                                               "context": prompt.shape[1], "new_tokens": new_tokens},
                "agreement": {"next_token_agreement": lm["next_token_agreement"], "kl": lm["kl"]}}
    found = text.sentences("heldout")[:sentences]
    log(f"eval: embeddings of {len(found)} held-out sentences, teacher beside graft")
    return {"models": {}, "settings": {"sentences": len(found)},
            "agreement": embedding_quality(teacher, graft, tokenizer, found)}


@torch.no_grad()
def cost(model, loaded) -> dict:
    """Parameters and forward FLOPs at the example inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    from graftc.passes import rules_by_op

    rules_by_op()  # loading the operator library changes how attention is counted: count as compile does
    device = next(model.parameters()).device
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    counter = FlopCounterMode(display=False)
    with counter:
        model(*(move(a) for a in loaded.args), **{k: move(v) for k, v in loaded.kwargs.items()})
    return {"params": int(sum(p.numel() for p in model.parameters())), "flops": int(counter.get_total_flops())}


def evaluate(target: dict, teacher: Optional[dict], loaded, extractor: Optional[FeatureExtractor], samples: int,
             steps: int, cfg: float, seed: int, text: Optional[str] = None, cache: Optional[str] = None,
             log=lambda line: None, context: int = 128, new_tokens: int = 32, sentences: int = 512) -> dict:
    """``target``/``teacher``: {"name", "spec", "model"}. Returns the JSON-able result."""
    from graftc.distill.speed import compare

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
              "perplexity": "perplexity (--text)", "heldout_perplexity": "perplexity (held-out pydoc_data)",
              "decode_tokens_per_s": "decode tokens/s (cache)", "top1_accuracy": "top-1 accuracy (image labels)"}
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
    if "heldout" in s:  # a transformers model: the diffusion settings do not apply
        h = s["heldout"]
        head = (f"eval: held-out pydoc_data topics (graftc.text), {h['windows'][0]} windows of {h['windows'][1]} tokens, "
                f"decode {h['new_tokens']} tokens after {h['context']}" if "windows" in h else
                f"eval: held-out pydoc_data sentences (graftc.text), {h['sentences']} of them")
    if "images" in result.get("agreement", {}):  # an image classifier: the diffusion settings do not apply
        head = f"eval: held-out images from {result['agreement']['images']}, seed {s['seed']}"
    if s.get("reference"):
        head += f" (reference {s['reference']})"
    out = [head, *lines]
    if "graft_ms" in speed:
        out.append(f"speedup vs teacher: {speed['speedup']:.2f}x")
    if "agreement" in result:
        a = result["agreement"]
        line = (f"agreement with the teacher on {a['inputs']} held-out inputs: output MSE {a['mse']:.4g}, "
                f"cosine {a['cosine']:.4f} (min {a['cosine_min']:.4f})")
        if "embedding_cosine" in a:
            line += f", sentence-embedding cosine {a['embedding_cosine']:.6f}"
        if "top1_agreement" in a:
            line = (f"agreement with the teacher on {a['inputs']} held-out images ({a['images']}): top-1 agreement "
                    f"{a['top1_agreement']:.2%}, logits MSE {a['mse']:.4g}, cosine {a['cosine']:.4f}")
        out.append(line)
    if "heldout" in result:
        h, where = result["heldout"], result["settings"]["heldout"]
        if "next_token_agreement" in h:
            out.append(f"held-out windows {where['windows']}: greedy next-token agreement with the teacher "
                       f"{h['next_token_agreement']:.2%}, mean KL(teacher || graft) {h['kl']:.4g} nats/token")
        else:
            out.append(f"held-out sentences ({h['sentences']}): mean-pooled embedding cosine to the teacher's "
                       f"{h['embedding_cosine']:.4f} (min {h['embedding_cosine_min']:.4f}), retrieval top-1 "
                       f"{h['retrieval_top1']:.2%}")
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)
