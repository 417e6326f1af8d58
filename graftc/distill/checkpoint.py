"""Atomic checkpoints of a distillation run: tensors in safetensors, everything else in JSON (no pickles).

A checkpoint is one `ckpt-<stage>-<step>.safetensors` plus `state.json` naming it. Both are written to
temporary files and renamed, the state last, so a kill at any moment leaves the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def save(workdir: Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    from safetensors.torch import save_file

    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".{name}.tmp"
    seen, flat = set(), {}
    for k, v in tensors.items():  # tied weights (an LM head sharing the embedding) are stored once each, unshared
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        flat[k] = v.clone() if key in seen else v
        seen.add(key)
    save_file(flat, str(tmp))
    os.replace(tmp, workdir / f"{name}.safetensors")
    state_tmp = workdir / ".state.json.tmp"
    state_tmp.write_text(json.dumps({**state, "tensors": f"{name}.safetensors"}, indent=1))
    os.replace(state_tmp, workdir / "state.json")
    for old in workdir.glob("ckpt-*.safetensors"):
        if old.name != f"{name}.safetensors":
            old.unlink()


def load(workdir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    from safetensors.torch import load_file

    path = workdir / "state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return state, load_file(str(workdir / state["tensors"]))


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
