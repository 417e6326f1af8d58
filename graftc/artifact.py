"""The artifact directory: model.safetensors, plan.yaml (resolved), manifest.json, report.md.

Written into a temporary sibling and renamed at the end, so OUT exists only when complete. Loading replays
the manifest's rewrites on the base model and reads tensors from safetensors: nothing in an artifact is
executed or unpickled. The manifest records its format and the sha256 of model.safetensors; loading checks
both (`verify`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from graftc.compiler import replay
from graftc.errors import GraftError, one_line, read_json
from graftc.files import file_sha256, write_atomic_dir
from graftc.plan import dump_plan
from graftc.spec import load_model as load_spec
from graftc.version import __version__

FILES = ("model.safetensors", "plan.yaml", "manifest.json", "report.md")
FORMAT = 2  # 2: the manifest records model_sha256 and its own manifest_sha256; 1: neither (read, not verified)


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


@contextmanager
def out_lock(out: Path):
    """Hold an exclusive lock beside `out` while a run writes it, so a second run into the same OUT fails at once
    instead of replacing the first one's artifact. The kernel drops a flock when its process ends (even on
    kill -9), so a lock file left by a dead run is simply taken over. Folders made for the lock are removed
    again when nothing was written into them."""
    import fcntl

    out = Path(out)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 writes OUT, so only rank 0 locks it
        yield None
        return
    check_parent(out)
    made = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise GraftError(f"output {out} is being written by another graftc run"
                                 f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish or choose "
                                 f"another -o (lock file {path})") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as exc:
        raise GraftError(f"output {out}: cannot create the lock file {path}: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.unlink(path)  # still holding the lock, so no one else can be using this file
        os.close(fd)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the output (or something else) is in it
                break


def save(out: str | Path, result, spec: str, base_hash: str, report_md: str, force: bool = False,
         distill: dict | None = None, quality: dict | None = None, files: dict | None = None) -> Path:
    """Write the artifact. `distill`/`quality` go into the manifest; `files` (name -> file or folder) are copied in."""
    from safetensors.torch import save_model

    out = Path(out)
    check_out_dir(out, force)

    def fill(tmp: Path) -> None:  # a full disk: an existing OUT is left as it was
        save_model(result.model, str(tmp / "model.safetensors"))
        (tmp / "plan.yaml").write_text(dump_plan(result.plan))
        manifest = {"format": FORMAT, "graftc_version": __version__,
                    "model_sha256": file_sha256(tmp / "model.safetensors"),
                    "base": {"spec": spec, "class": type(result.model).__qualname__, "weights_sha256": base_hash},
                    "rewrites": result.rewrites, "distill": distill or {}}
        if quality:
            manifest["quality"] = quality
        for name, source in (files or {}).items():
            (shutil.copytree if Path(source).is_dir() else shutil.copyfile)(source, tmp / name)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "report.md").write_text(report_md)

    write_atomic_dir(out, fill)
    return out


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own digest (canonical JSON: key order and spacing ignored)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(out: str | Path) -> dict:
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        raise GraftError(f"{out}: not a graftc artifact (no manifest.json)")
    manifest = read_json(path)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if type(fmt) is int and fmt > FORMAT:
        raise GraftError(f"{path}: artifact format {fmt} (written by graftc {manifest.get('graftc_version', '?')}) "
                         f"is newer than this graftc {__version__} reads (format {FORMAT}); upgrade graftc")
    if type(fmt) is not int or fmt < 1:
        raise GraftError(f"{path}: unsupported manifest format {fmt!r} (this graftc reads formats 1 to {FORMAT})")
    return manifest


def verify_artifact(out: str | Path, manifest: dict | None = None) -> dict:
    """Check the artifact's format, that the manifest is as written (its recorded digest) and that
    model.safetensors is the file the manifest recorded (sha256). Returns {"format", "sha256", "bytes"}; any
    problem is a GraftError."""
    out = Path(out)
    manifest = manifest if manifest is not None else read_manifest(out)
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise GraftError(f"{out}: model.safetensors is missing")
    recorded = manifest.get("model_sha256")
    if manifest["format"] < 2:
        raise GraftError(f"{out}: format 1 artifact (graftc {manifest.get('graftc_version', '?')}) records no sha256 "
                         "of model.safetensors, so it cannot be verified; compile it again to get one")
    if not (isinstance(recorded, str) and len(recorded) == 64):
        raise GraftError(f"{out / 'manifest.json'}: model_sha256 is missing or not a sha256 hex digest")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise GraftError(f"{out / 'manifest.json'}: its content does not match the manifest_sha256 it recorded: "
                         "the file was changed or damaged after it was written")
    actual = file_sha256(weights)
    if actual != recorded:
        raise GraftError(f"{weights}: sha256 {actual[:16]}... does not match the {recorded[:16]}... recorded in "
                         "manifest.json: the file was changed or damaged after it was written")
    return {"format": manifest["format"], "sha256": actual, "bytes": weights.stat().st_size}


def load(out: str | Path, model: torch.nn.Module | None = None, allow_python: bool = False,
         verify: bool = True) -> torch.nn.Module:
    """Rebuild a grafted model: base model (from the manifest's spec, or `model`) + replayed rewrites + weights.

    A `python:` base spec runs the named function to build the model; it is only followed when
    `allow_python=True` (or pass the base `model` yourself), because the spec string comes from the artifact.
    `verify`: check the manifest and model.safetensors against the sha256 digests the manifest recorded
    (format 2; format 1 records none); `verify=False` skips reading the weights twice.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    out = Path(out)
    manifest = read_manifest(out)
    base = manifest.get("base")
    spec = base.get("spec") if isinstance(base, dict) else None
    if model is None:
        if not isinstance(spec, str):
            raise GraftError(f"{out / 'manifest.json'}: base.spec is missing, so the base model is unknown; pass model=")
        if spec.startswith("python:") and not allow_python:
            raise GraftError(f"{out}: base model {spec!r} is built by running code; pass model= or allow_python=True")
        try:
            model = load_spec(spec).model
        except GraftError as exc:
            raise GraftError(f"{out}: cannot load its base model: {exc}") from None
    rewrites = manifest.get("rewrites", [])
    try:
        if not isinstance(rewrites, list) or not all(isinstance(r, dict) for r in rewrites):
            raise ValueError("rewrites is not a list of records")
        replay(model, rewrites)
    except GraftError as exc:
        raise GraftError(f"{out}: {exc}") from None
    except Exception as exc:  # a damaged record (a wrong module path, a missing field) is bad input, not a crash
        raise GraftError(f"{out / 'manifest.json'}: its rewrites cannot be replayed on the base model "
                         f"({one_line(exc)})") from None
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise GraftError(f"{out}: model.safetensors is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise GraftError(f"{weights}: cannot read weights: {one_line(exc)}") from None
    if missing or unexpected:
        raise GraftError(f"{weights}: does not match the replayed model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    if verify and manifest["format"] >= 2:  # after reading, so a file that is not safetensors says so first
        verify_artifact(out, manifest)
    return model.eval()
