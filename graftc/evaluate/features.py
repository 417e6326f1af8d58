"""Feature extractors for sample quality: what FD, sFID, IS and precision/recall measure images with.

``demo`` (:class:`DigitExtractor`: the demo's digit classifier; the digits dataset is its reference) and
``inception:PATH`` (:class:`InceptionExtractor`: graftc's own Inception-v3 in ``graftc.inception`` with a local
weights file: FID's pool_3 features, sFID's mixed_6/conv features, IS over its classes). Either takes a
``--reference`` .npz instead of its built-in reference (``graftc.evaluate.reference``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from graftc.distill.data import cache_root
from graftc.errors import GraftError
from graftc.evaluate.reference import read_reference
from graftc.files import file_sha256, write_atomic
from graftc.inception import load_inception
from graftc.models import demo


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
        self.net = demo.load_feature_net()
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
                images, _ = demo.load_digits_tensor()
                self._ref = {"features": self.features(images), "spatial": self.spatial(images)}
            except GraftError:  # no scikit-learn: the committed statistics still give FD
                mu, sigma = demo.reference_stats()
                self._ref = {"mu": mu, "sigma": sigma}
        return self._ref


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 (``graftc.inception``) from a local weights file: pool_3 features [N, 2048] (FD), the 7
    mixed_6/conv channels [N, 2023] (sFID), the classifier's logits (IS, softmax over all of its 1008 or 1000
    classes). Images of any size with 1 or 3 channels; features, spatial features and logits come from one
    forward pass in batches of ``batch_size``, on the GPU where there is one.

    The reference is the ``--reference`` .npz, or, for the demo's 8x8 digit images, the 1797 digits themselves.
    Those are costly at 299x299 on a CPU, so their features are computed once per weights file and cached in
    ``<cache>/inception/digits-<weights sha256>.npz``."""

    name = "inception"
    feature_dim, spatial_dim = 2048, 2023

    def __init__(self, path, cache: Optional[str] = None, batch_size: int = 50, device=None,
                 log=lambda line: None):
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
        # true float32 convolutions on a GPU too: cuDNN's default TF32 would move the features
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
        file = cache_root(self.cache) / "inception" / f"digits-{file_sha256(self.path)[:16]}.npz"
        if file.is_file():
            try:
                with np.load(file, allow_pickle=False) as z:
                    return {"features": z["features"].astype(np.float64), "spatial": z["spatial"].astype(np.float64)}
            except Exception:  # a damaged cache file is simply recomputed
                pass
        images, _ = demo.load_digits_tensor()
        self.log(f"eval: Inception features of the {len(images)} reference digits (once per weights file, "
                 f"cached in {file})")
        out = self._outputs(images)
        ref = {"features": out["pool"], "spatial": out["spatial"]}

        def write(tmp):  # float32 on disk: the network computes in float32, so a cached run equals a fresh one
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
                np.savez(f, features=ref["features"].astype(np.float32), spatial=ref["spatial"].astype(np.float32))

        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, write)
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

