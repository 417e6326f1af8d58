"""Reference data for sample quality: a ``--reference`` .npz in the usual reference-batch layout, read safely."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graftc.errors import GraftError, one_line


def read_reference(path, extractor=None) -> dict:
    """A reference .npz in the usual reference-batch layout (guided-diffusion's evaluator and its followers),
    read with ``allow_pickle=False``: ``mu`` [D] and ``sigma`` [D, D] for FD, optionally ``mu_s``/``sigma_s``
    for sFID, and/or ``arr_0``: uint8 images [N, H, W, 3] (or [N, H, W] / [N, H, W, 1]).

    Returns the statistics it holds (float64) and its images under ``images`` (uint8 [N, H, W, C]). Where the
    file has images, the reference's features come from them (so precision/recall work too, and FD/sFID compare
    one network's features on both sides); its ``mu``/``sigma`` (``mu_s``/``sigma_s``) serve when it has none.
    With a feature ``extractor``, the statistics must have its ``feature_dim``/``spatial_dim``."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"--reference: file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise GraftError(f"--reference {path}: cannot read it as an .npz archive ({one_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise GraftError(f"--reference {path}: a single array; expected an .npz archive (np.savez) holding "
                         "mu/sigma, mu_s/sigma_s and/or images arr_0")
    with archive:
        try:
            arrays = {k: archive[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "arr_0") if k in archive.files}
        except Exception as exc:  # object arrays (pickles) are refused; a damaged member fails to read
            raise GraftError(f"--reference {path}: cannot read its arrays ({one_line(exc)})") from None
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
