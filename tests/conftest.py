"""Without a GPU, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set before triton is first
imported (graftc.kernels imports it indirectly), so it is set here, before any test module loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
