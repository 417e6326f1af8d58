"""Kernels: one file per family, each with its Triton kernel, a plain-PyTorch reference and a dispatcher."""
