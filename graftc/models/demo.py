"""The demo that ships with graftc: a tiny DiT pretrained on scikit-learn's 8x8 digits, and a Frechet distance.

``load_demo_dit()`` is the teacher behind ``demo:tiny-dit``: graftc's "tiny" DiT (depth 6, width 128,
patch 2, 4 heads; 8x8x1 inputs, 10 classes plus the null class for classifier-free guidance), trained
with DiT's diffusion objective by ``scripts/train_demo.py``. ``demo_fd`` measures how good a (grafted) model's
samples are: the Frechet distance (FD) between the features of its samples and of the whole digits dataset,
the features being the 64-dim penultimate layer of ``DigitFeatures``, a small CNN digit classifier whose
weights and reference statistics ship in ``weights/digit-features.safetensors``. Nothing here needs
scikit-learn or scipy at run time except ``load_digits_tensor``, and nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from graftc.diffusion import sample_dit
from graftc.errors import GraftError, one_line
from graftc.models.dit import DIT_CONFIGS, build_dit, load_dit_checkpoint

__all__ = [
    "WEIGHTS_DIR",
    "DEMO_STEPS",
    "DEMO_CFG_SCALE",
    "DIT_WEIGHTS",
    "FEATURE_WEIGHTS",
    "DigitFeatures",
    "load_demo_dit",
    "load_feature_net",
    "reference_stats",
    "feature_stats",
    "frechet_distance",
    "demo_fd",
    "load_digits_tensor",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_WEIGHTS = WEIGHTS_DIR / "tiny-dit.safetensors"
FEATURE_WEIGHTS = WEIGHTS_DIR / "digit-features.safetensors"
_REF_KEYS = ("ref_mu", "ref_sigma")
# Sampler settings of demo_fd: the teacher's FD is lowest without guidance (guidance trades diversity for
# fidelity, which FD penalises: 3.1 at cfg 1, 7.6 at 1.5, 13.7 at 2); 50 DDIM steps lower it only to 2.5 at
# twice the cost, 10 steps raise it to 6.5. Measured values are in weights/tiny-dit.json.
DEMO_STEPS = 25
DEMO_CFG_SCALE = 1.0
_HOW_TO_MAKE = "reinstall graftc, or recreate it with `python scripts/train_demo.py --what all`"


class DigitFeatures(nn.Module):
    """Small CNN digit classifier on 8x8x1 images in [-1, 1]; ``features`` is its 64-dim penultimate layer."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)           # 8x8
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # 4x4
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.act = nn.GELU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] -> [B, 64] (after the GELU that follows the first linear layer)."""
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10]."""
        return self.head(self.features(x))


# ------------------------------------------------------------------ loading


def _read(path: Path, what: str) -> tuple[dict, dict]:
    if not path.is_file():
        raise GraftError(f"{what} weights not found at {path}; {_HOW_TO_MAKE}")
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), meta
    except Exception as e:  # truncated or corrupt file
        raise GraftError(f"cannot read {what} weights {path}: {one_line(e, 160)}; {_HOW_TO_MAKE}") from None


def load_demo_dit(path=None):
    """graftc's tiny DiT with the committed pretrained (EMA) weights, in eval mode, on the CPU, float32.

    ``path`` overrides the committed weights file (e.g. one that scripts/train_demo.py --out wrote)."""
    path = Path(path) if path is not None else DIT_WEIGHTS
    _, meta = _read(path, "demo DiT")
    model = build_dit("tiny")
    if "config" in meta:  # the weights name the architecture they were trained with; check it still matches
        config = json.loads(meta["config"])
        arch = {k: config.get(k) for k in DIT_CONFIGS["tiny"]._fields}
        if arch != DIT_CONFIGS["tiny"]._asdict():
            raise GraftError(f"demo DiT weights {path} were trained for {arch}, but the 'tiny' config is "
                             f"{DIT_CONFIGS['tiny']._asdict()}; {_HOW_TO_MAKE}")
    load_dit_checkpoint(model, path)
    return model.eval()


def load_feature_net(path=None) -> DigitFeatures:
    """The FD feature network with its committed weights (or those in ``path``), in eval mode, on the CPU."""
    path = Path(path) if path is not None else FEATURE_WEIGHTS
    state, _ = _read(path, "digit feature network")
    net = DigitFeatures()
    weights = {k: v for k, v in state.items() if k not in _REF_KEYS}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise GraftError(f"digit feature weights {path} do not fit DigitFeatures: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}; {_HOW_TO_MAKE}")
    return net.eval()


def reference_stats(path=None) -> tuple[np.ndarray, np.ndarray]:
    """(mu [64], sigma [64, 64]), float64: feature statistics of the whole digits dataset (1797 images)."""
    path = Path(path) if path is not None else FEATURE_WEIGHTS
    state, _ = _read(path, "digit feature network")
    if any(k not in state for k in _REF_KEYS):
        raise GraftError(f"digit feature weights {path} hold no reference statistics; {_HOW_TO_MAKE}")
    return state["ref_mu"].double().numpy(), state["ref_sigma"].double().numpy()


# ------------------------------------------------------------------ Frechet distance


@torch.no_grad()
def feature_stats(images: torch.Tensor, net: Optional[DigitFeatures] = None,
                  batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of the features of ``images`` [N, 1, 8, 8] with values in [-1, 1].

    The covariance is the unbiased sample covariance (N - 1), so N must be at least 2."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise GraftError(f"feature_stats: expected images [N, 1, 8, 8], got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise GraftError(f"feature_stats: need at least 2 images for a covariance, got {images.shape[0]}")
    net = net if net is not None else load_feature_net()
    param = next(net.parameters())
    feats = torch.cat([net.features(images[i:i + batch_size].to(device=param.device, dtype=param.dtype))
                       for i in range(0, images.shape[0], batch_size)])
    f = feats.double().cpu().numpy()
    if not np.isfinite(f).all():
        raise GraftError("feature_stats: the images give non-finite features (are there NaNs in them?)")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), in float64.

    Tr((s1 s2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    s1^(1/2) s2 s1^(1/2) (which has the same eigenvalues as s1 s2), with tiny negative eigenvalues from
    rounding clamped to 0. This is exact for singular (rank-deficient) covariances, where the usual
    scipy.linalg.sqrtm route needs an epsilon fudge, and it needs no scipy."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise GraftError(f"frechet_distance: shapes do not agree: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise GraftError("frechet_distance: the statistics contain NaN or inf")
    r1 = _psd_sqrt(s1)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # it is a squared distance; rounding can leave -1e-13


def demo_fd(model, n: int = 1000, steps: int = DEMO_STEPS, cfg_scale: float = DEMO_CFG_SCALE, seed: int = 0,
            net: Optional[DigitFeatures] = None, ref: Optional[tuple] = None, batch_size: int = 500) -> float:
    """FD between ``n`` DDIM samples of ``model`` and the digits dataset (``reference_stats``).

    Labels are class-balanced (``arange(n) % 10``), the noise comes from ``torch.Generator().manual_seed(seed)``
    and samples are clamped to [-1, 1] like images before their features are taken. Lower is better; the
    committed teacher and the data's own noise floor are recorded in ``weights/tiny-dit.json``. ``net`` and
    ``ref`` (mu, sigma) default to the committed feature network and ``reference_stats()``."""
    if n < 2:
        raise GraftError(f"demo_fd: n must be at least 2 (got {n})")
    labels = torch.arange(n) % 10
    generator = torch.Generator().manual_seed(seed)
    images = sample_dit(model, labels, steps=steps, cfg_scale=cfg_scale, generator=generator, batch_size=batch_size)
    net = net if net is not None else load_feature_net()
    mu, sigma = feature_stats(images.float().clamp(-1, 1).cpu(), net)
    return frechet_distance(mu, sigma, *(ref if ref is not None else reference_stats()))


# ------------------------------------------------------------------ data


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: (images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64).

    Needs scikit-learn (the ``demo`` extra); the data ship inside it, so nothing is downloaded."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GraftError("the digits dataset needs scikit-learn: pip install 'graftc[demo]' "
                         "(or pip install scikit-learn)") from None
    data = load_digits()
    images = torch.from_numpy(np.asarray(data.images, dtype=np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(data.target, dtype=np.int64))
    return images, labels
