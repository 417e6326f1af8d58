"""Metrics: Frechet distance of features (FD, sFID), Inception Score, k-NN precision / recall (Kynkaanniemi et
al., 2019), the mean squared difference of two models' outputs, and an encoder's sentence embedding. Family-
independent: graftc.evaluate and the model families (graftc.families) both build on them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from graftc.errors import GraftError
from graftc.models.demo import frechet_distance


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise GraftError(f"need at least 2 feature rows [N, D] for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_of_features(a: np.ndarray, b) -> float:
    """Frechet distance between the Gaussians fitted to features ``a`` [N, D] and ``b`` ([M, D] or (mu, sigma))."""
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


@torch.no_grad()
def output_error(task, teacher, student, batches, each=None) -> float:
    """Mean squared difference of the two models' outputs (``task.output``) over ``batches``, or over the task's
    validation split in batches of that size where ``batches`` is an int; summed in float64, on the student's
    device. ``each(batch, teacher_out, student_out, t, s)``, if given, sees every batch's raw model outputs and
    task outputs, for further metrics from the same forward passes."""
    if isinstance(batches, int):
        batches = task.val_batches(batches)
    device = next(student.parameters()).device
    total = count = 0.0
    for batch in batches:
        batch = batch.to(device)
        t_out, s_out = teacher(*batch.args, **batch.kwargs), student(*batch.args, **batch.kwargs)
        t, s = task.output(t_out).double(), task.output(s_out).double()
        total += float(((s - t) ** 2).sum())
        count += t.numel()
        if each is not None:
            each(batch, t_out, s_out, t, s)
    return total / max(count, 1)


def sentence_embedding(output, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H] float64: the attention-mask-weighted mean of an encoder's last hidden state over its tokens (the
    pooling of sentence-transformers' MiniLM and most of its models)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        states = getattr(output, "hidden_states", None)
        if not states:
            raise GraftError("embedding cosine: the encoder's output has neither last_hidden_state nor hidden_states")
        hidden = states[-1]
    return mean_pool(hidden.double(), attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L, H] -> [B, H]: the mean over each sample's real tokens (all of them without a mask)."""
    mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
