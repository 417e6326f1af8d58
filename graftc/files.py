"""I/O plumbing shared by artifacts, checkpoints, caches and model loaders: atomic file and folder writes, one-line
write errors, digests, reading a weights file safely and checking that it fits a model, moving inputs to a device."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from graftc.errors import GraftError, one_line


@contextlib.contextmanager
def _replacing(path: Path, tmp: Path, remove):
    """Around the writing of `tmp`, which is to replace `path`: on any failure `remove(tmp)`, and a failed write
    (a full disk, a file-size limit) becomes a GraftError naming `path`."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        remove(tmp)
        raise write_failed(path, exc) from None
    except BaseException:
        remove(tmp)
        raise


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over it: readers (another run,
    a resume) see the old file or the new one, never a part. A failed write removes the temporary file, leaves
    `path` as it was, and is a GraftError naming `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique: runs may share a folder
    with _replacing(path, tmp, lambda t: t.unlink(missing_ok=True)):
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:  # on disk before the rename, so a power cut cannot leave a renamed but empty file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def write_atomic_dir(out: Path, fill):
    """`fill(tmp)` fills a fresh hidden folder beside `out` (parents made as needed), which then takes the place
    of `out` (a file or folder there is removed first): a failure or an interrupt never leaves a half-written
    `out`, and a failed write is a GraftError naming `out`. Returns what `fill` returns."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    with _replacing(out, tmp, lambda t: shutil.rmtree(t, ignore_errors=True)):
        result = fill(tmp)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    return result


def write_failed(path: Path, exc: Exception) -> GraftError:
    """One line for a write that failed: the path and the system's reason ("No space left on device")."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", reason)  # safetensors wraps the OS's message
    return GraftError(f"cannot write {path}: {found[1] if found else reason}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the base weights a graft was made from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def to_device(value, device):
    """`value` with every tensor in it (nested in tuples, lists and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


# ---------------------------------------------------------------- weights files
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_weights(path, what: str, suffixes: tuple[str, ...] | None = TORCH_SUFFIXES, expected: str = "") -> dict:
    """The state dict in a local weights file: safetensors, or a torch.save file read with weights_only (a pickle
    can run code; only tensors in plain containers load). `what` names the file in errors ("DiT checkpoint");
    `suffixes` are the torch.save suffixes allowed beside .safetensors (None: any); `expected` says what the file
    should hold. A training checkpoint's EMA ("ema"), "model" or "state_dict" entry is the state dict it holds."""
    path = Path(path)
    hint = f"; expected {expected}" if expected else ""
    suffix = path.suffix.lower()
    if suffixes is not None and suffix not in (*suffixes, ".safetensors"):
        raise GraftError(f"{what} {path}: unsupported file type {suffix or '(none)'!r}; allowed: "
                         f"{', '.join((*suffixes, '.safetensors'))}{hint}")
    if not path.is_file():
        raise GraftError(f"{what} not found: no such file {path}")
    try:
        if suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a weights file, or a pickle with objects weights_only refuses
        raise GraftError(f"cannot read {what} {path} ({_unreadable(exc)}){hint}") from None
    if isinstance(state, dict):
        for key in ("ema", "model", "state_dict"):  # the EMA weights are the ones to sample with
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)] \
            if isinstance(state, dict) else []
        found = type(state).__name__ + (f" with non-tensor entries {first_few(not_tensors)}" if not_tensors else "")
        raise GraftError(f"{what} {path} is not a plain state dict (found {found}){hint}")
    return state


def _unreadable(exc: Exception) -> str:
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's own text goes on to suggest weights_only=False, which graftc never does
        reason = " ".join(text.split(marker, 1)[1].split("Please use")[0].split("Check the documentation")[0].split())
        return (f"weights_only=True refused it: {reason[:160] or 'not a torch.save file'}; graftc never runs "
                "pickled code, so a .pth must hold tensors in plain containers only")
    return one_line(exc)


def misfit(expected: dict, state: dict) -> tuple[list[str], list[str], list[tuple[str, list, list]]]:
    """How a state dict differs from the one a model expects: missing keys, unexpected keys, and
    (key, found shape, expected shape) for every shape mismatch."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, list(state[k].shape), list(expected[k].shape))
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, mismatched


def check_fits(expected: dict, state: dict, what: str, path) -> None:
    """A GraftError naming the first few missing and unexpected keys and shape mismatches, if there are any."""
    missing, unexpected, mismatched = misfit(expected, state)
    problems = [f"{kind} {first_few(items)}" for kind, items in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatch", [f"{k} expected {want} found {got}" for k, got, want in mismatched])) if items]
    if problems:
        raise GraftError(f"{what} {path} does not fit the model: " + "; ".join(problems))


def first_few(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
