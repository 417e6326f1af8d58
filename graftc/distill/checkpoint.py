"""Atomic checkpoints of a distillation run: tensors in safetensors, everything else in JSON (no pickles).

A checkpoint is one `ckpt-<stage>-<step>.safetensors` plus `state.json` naming it. Both are written to
temporary files and renamed, the state last, so a kill at any moment leaves the previous complete checkpoint,
and so does a write that fails (a full disk): it ends the run with one line naming the file. On SIGINT/SIGTERM
the training loops save a checkpoint at their next step boundary and stop (graftc.interrupt).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from graftc.errors import GraftError
from graftc.files import write_atomic


def save(workdir: Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    from safetensors.torch import save_file

    workdir.mkdir(parents=True, exist_ok=True)
    seen, flat = set(), {}
    for k, v in tensors.items():  # tied weights (an LM head sharing the embedding) are stored once each, unshared
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        flat[k] = v.clone() if key in seen else v
        seen.add(key)
    target = workdir / f"{name}.safetensors"
    try:
        write_atomic(target, lambda tmp: save_file(flat, str(tmp)))
        text = json.dumps({**state, "tensors": target.name}, indent=1)
        write_atomic(workdir / "state.json", lambda tmp: tmp.write_text(text))
    except BaseException:
        if not _names(workdir / "state.json", target.name):  # state.json still names the previous checkpoint
            target.unlink(missing_ok=True)
        raise
    for old in workdir.glob("ckpt-*.safetensors"):
        if old.name != target.name:
            old.unlink()


def _names(state: Path, tensors: str) -> bool:
    try:
        return json.loads(state.read_text()).get("tensors") == tensors
    except (OSError, ValueError):
        return False


def read_state(workdir: Path) -> dict | None:
    """state.json of the checkpoint in `workdir` (None without one); unreadable is a GraftError."""
    path = workdir / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable(workdir, exc) from None
    if not isinstance(state, dict):
        raise _unreadable(workdir, ValueError("state.json is not an object"))
    return state


def load(workdir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(workdir)
    if state is None:
        return None
    try:
        return state, load_file(str(workdir / state["tensors"]))
    except (OSError, KeyError, TypeError, SafetensorError) as exc:
        raise _unreadable(workdir, exc) from None


def _unreadable(workdir: Path, exc: Exception) -> GraftError:
    return GraftError(f"--resume: the checkpoint in {workdir} cannot be read ({str(exc)[:120]}); "
                      "run without --resume to start over")


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Adam-style per-parameter state as flat named tensors."""
    out = {}
    for i, (_, state) in enumerate(sorted(optimizer.state_dict()["state"].items())):
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    current = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    current["state"] = state
    optimizer.load_state_dict(current)
