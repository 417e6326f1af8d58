"""Kernels: one sub-package per operator family (kernels/<op>/), each declared with family.py as one torch custom op
(graftc::<op>, dispatched by device and GRAFTC_KERNELS, see dispatch.py): naive.py holds the reference, beside one
module per fast path: a PyTorch path everywhere, and Triton kernels for hyena, local_attention and parallel
(linear_attention and ssd have none yet). flops.py registers the FLOP formulas FlopCounterMode counts with."""
from graftc.kernels import flops  # noqa: F401  (FLOP formulas must be registered before anything is counted)
