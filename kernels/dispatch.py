"""Which implementation a kernel op runs: the GRAFTC_KERNELS switch, shared by every kernel family.

GRAFTC_KERNELS = auto (default: Triton on CUDA tensors, the fast PyTorch path on CPU)
               | triton (always Triton; on CPU tensors this needs TRITON_INTERPRET=1 before triton is imported)
               | reference (the naive PyTorch reference, for debugging)
"""
from __future__ import annotations

import os

import torch

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


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1), where CPU tensors are allowed."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
