"""Which implementation a kernel op runs: the GRAFTC_KERNELS switch, shared by every kernel family.

GRAFTC_KERNELS = auto (default: Triton on CUDA tensors, the fast PyTorch path on CPU)
               | triton (always Triton; on CPU tensors this needs TRITON_INTERPRET=1 before triton is imported)
               | reference (the naive PyTorch reference, for debugging)
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

MODES = ("auto", "triton", "reference")


def mode() -> str:
    """The current GRAFTC_KERNELS mode; read on every call so tests can switch it."""
    value = os.environ.get("GRAFTC_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"GRAFTC_KERNELS={value!r} is not one of {', '.join(MODES)}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel on this tensor: forced, or automatic on a CUDA tensor."""
    current = mode()
    return current == "triton" or (current == "auto" and t.is_cuda)


def use_reference() -> bool:
    return mode() == "reference"


def plain_cpu_inference(x: Tensor) -> bool:
    """Eager CPU inference, nothing watching: no autograd, no tracing or export, no dispatch mode (such as
    FlopCounterMode, which must count the reference path's arithmetic). Where CPU-only fused paths may run."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def plain_eager(args) -> bool:
    """A plain eager call: real tensors, no autograd needed, nothing tracing, compiling or watching. A kernel family
    may then skip the custom-op dispatcher (export, FakeTensor, FlopCounterMode and training all go through it)."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    tensors = [x for x in args if isinstance(x, Tensor)]
    if torch.compiler.is_compiling() or any(type(x) not in (Tensor, torch.nn.Parameter) for x in tensors):
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1), where CPU tensors are allowed."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


class LazyCompiled:
    """torch.compile on first call; if compiling fails (no C++ compiler, unsupported platform), warn once and
    run eagerly from then on (the fused CPU loops of hyena_conv and mamba2). Inputs are validated before this is
    called, so a failure here is the compiler's.

    Batch and length are dynamic from the start (no recompile per sequence length); channels and taps, fixed
    per model, stay static. Each variant, dtype and size-1 batch or length still gets its own graph, so the
    recompile limit is raised for these calls only."""

    RECOMPILE_LIMIT = 64

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.compiled, self.failed = fn, name, None, False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, fullgraph=True)
                args = [x.detach() if isinstance(x, Tensor) else x for x in args]  # no graphs per requires_grad
                for x in args:
                    if isinstance(x, Tensor) and x.dim() == 3:  # activations [B, L, C]
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                        torch._dynamo.maybe_mark_dynamic(x, 1)
                limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: use eager
                self.failed = True
                warnings.warn(f"graftc {self.name}: torch.compile failed, running eagerly ({error!r})", stacklevel=2)
        return self.fn(*args)
