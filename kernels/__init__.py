"""Kernels: one file per family, each with its Triton kernel, a plain-PyTorch reference and a dispatcher."""
from graftc.kernels import flops  # noqa: F401  (FLOP formulas must be registered before anything is counted)
