"""Forward latency of teacher and graft, measured side by side (interleaved) at the example's shapes."""
from __future__ import annotations

import statistics
import time

import torch

from graftc.files import to_device


def _expand(value, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:]).contiguous()
    return value


@torch.no_grad()
def compare(teacher: torch.nn.Module, graft: torch.nn.Module, loaded, batch: int = 16, reps: int = 15) -> dict:
    device = next(graft.parameters()).device
    args = to_device(tuple(_expand(a, batch) for a in loaded.args), device)
    kwargs = to_device({k: _expand(v, batch) for k, v in loaded.kwargs.items()}, device)
    times = {"teacher": [], "graft": []}
    models = {"teacher": teacher.eval(), "graft": graft.eval()}
    for i in range(reps + 2):
        for name in ("teacher", "graft") if i % 2 else ("graft", "teacher"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            models[name](*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - begin)
    t, g = statistics.median(times["teacher"]) * 1e3, statistics.median(times["graft"]) * 1e3
    return {"where": f"batch {batch}, {device.type}, median of {reps}", "teacher_ms": round(t, 3),
            "graft_ms": round(g, 3), "speedup": round(t / g, 3)}
