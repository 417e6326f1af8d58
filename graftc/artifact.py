"""The artifact directory: model.safetensors, plan.yaml (resolved), manifest.json, report.md.

Written into a temporary sibling and renamed at the end, so OUT exists only when complete. Loading replays
the manifest's rewrites on the base model and reads tensors from safetensors: nothing in an artifact is
executed or unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from graftc import __version__
from graftc.errors import GraftError, read_json
from graftc.plan import dump_plan

FILES = ("model.safetensors", "plan.yaml", "manifest.json", "report.md")


def check_parent(out: Path) -> None:
    """Missing folders above `out` are fine (they are made when it is written); a file in the way is not."""
    ancestor = next(p for p in Path(out).absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise GraftError(f"output {out}: {ancestor} is a file, so no folder can be made under it")


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise GraftError(f"output {out} already exists (use --force to replace it)")
    check_parent(out)


def write_text(path: Path, text: str) -> None:
    """Write a small output file, making missing parent folders (checked by check_parent beforehand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def staging_dir(out: Path) -> Path:
    """A fresh hidden folder beside `out` (parents made as needed): outputs are written there, then renamed to
    `out`, so a failure never leaves a half-written `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def save(out: str | Path, result, spec: str, base_hash: str, report_md: str, force: bool = False,
         distill: dict | None = None, quality: dict | None = None, files: dict | None = None) -> Path:
    """Write the artifact. `distill`/`quality` go into the manifest; `files` (name -> file or folder) are copied in."""
    from safetensors.torch import save_model

    out = Path(out)
    check_out_dir(out, force)
    tmp = staging_dir(out)
    try:
        save_model(result.model, str(tmp / "model.safetensors"))
        (tmp / "plan.yaml").write_text(dump_plan(result.plan))
        manifest = {"format": 1, "graftc_version": __version__,
                    "base": {"spec": spec, "class": type(result.model).__qualname__, "weights_sha256": base_hash},
                    "rewrites": result.rewrites, "distill": distill or {}}
        if quality:
            manifest["quality"] = quality
        for name, source in (files or {}).items():
            (shutil.copytree if Path(source).is_dir() else shutil.copyfile)(source, tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "report.md").write_text(report_md)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(out: str | Path) -> dict:
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        raise GraftError(f"{out}: not a graftc artifact (no manifest.json)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != 1:
        raise GraftError(f"{path}: unsupported manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} (expected 1)")
    return manifest


def load(out: str | Path, model: torch.nn.Module | None = None, allow_python: bool = False) -> torch.nn.Module:
    """Rebuild a grafted model: base model (from the manifest's spec, or `model`) + replayed rewrites + weights.

    A `python:` base spec runs the named function to build the model; it is only followed when
    `allow_python=True` (or pass the base `model` yourself), because the spec string comes from the artifact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from graftc.compiler import replay
    from graftc.spec import load_model as load_spec

    out = Path(out)
    manifest = read_manifest(out)
    spec = manifest.get("base", {}).get("spec", "")
    if model is None:
        if spec.startswith("python:") and not allow_python:
            raise GraftError(f"{out}: base model {spec!r} is built by running code; pass model= or allow_python=True")
        model = load_spec(spec).model
    replay(model, manifest.get("rewrites", []))
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise GraftError(f"{out}: model.safetensors is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise GraftError(f"{weights}: cannot read weights: {str(exc).splitlines()[0][:200]}") from None
    if missing or unexpected:
        raise GraftError(f"{weights}: does not match the replayed model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()
