"""The Triton path of the two fused ops: one pass over the rows for each (CUDA default)."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from graftc.kernels import dispatch

try:  # triton is optional: every CPU path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None


def _modln_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, rows, tokens, width, x_group_stride,
                  sh_g, sh_b, sc_g, sc_b, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, g): BLOCK_R rows of branch g. A row is one token of one sample; the whole row (D) in registers."""
    group = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (r < rows) & (d < width)
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + group.to(tl.int64) * x_group_stride + r64 * width + d, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1)[:, None] / width
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1)[:, None] / width + eps)
    b = r // tokens
    shift = tl.load(shift_ptr + group * sh_g + b * sh_b + d, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + group * sc_g + b * sc_b + d, mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + group.to(tl.int64) * rows * width + r64 * width + d, y.to(out_ptr.dtype.element_ty), mask=ok)


def _merge_kernel(attn_ptr, ga_ptr, mlp_ptr, gm_ptr, x_ptr, bias_ptr, u_ptr, acc_ptr, rows, tokens, width,
                  ga_g, ga_b, gm_g, gm_b, GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """u[r, g*D + d] = ga[g, b] * attn[g, r, d] + gm[g, b] * mlp[g, r, d]  (b = r // N);  acc[r] = x[r] + bias."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    ok = (r < rows) & (d < width)
    r64 = r.to(tl.int64)
    b = r // tokens
    for g in tl.static_range(GROUPS):
        a = tl.load(attn_ptr + g * rows * width + r64 * width + d, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mlp_ptr + g * rows * width + r64 * width + d, mask=ok, other=0.0).to(tl.float32)
        gate_a = tl.load(ga_ptr + g * ga_g + b * ga_b + d, mask=ok, other=0.0).to(tl.float32)
        gate_m = tl.load(gm_ptr + g * gm_g + b * gm_b + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(u_ptr + r64 * (GROUPS * width) + g * width + d, (gate_a * a + gate_m * m).to(u_ptr.dtype.element_ty),
                 mask=ok)
    x = tl.load(x_ptr + r64 * width + d, mask=ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=d < width, other=0.0).to(tl.float32)
    tl.store(acc_ptr + r64 * width + d, (x + bias).to(acc_ptr.dtype.element_ty), mask=ok)


class _Kernels(NamedTuple):
    modln: Callable
    merge: Callable


@functools.cache
def _jitted(interpret: bool) -> _Kernels:
    # jitted on first use, not at import: triton reads TRITON_INTERPRET when a function is jitted
    return _Kernels(triton.jit(_modln_kernel), triton.jit(_merge_kernel))


def _kernels_for(t: Tensor) -> _Kernels:
    if triton is None:
        raise RuntimeError("parallel kernels: the Triton path needs triton installed")
    if not t.is_cuda and not dispatch.interpreting():
        raise RuntimeError("parallel kernels: the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    return _jitted(dispatch.interpreting())


def _row_blocks(t: Tensor, width: int) -> tuple[int, int, int]:
    """(rows per program, padded row width, warps). Interpreted: few, large programs."""
    block_d = triton.next_power_of_2(width)
    if t.is_cuda:
        return max(1, 4096 // block_d), block_d, 8 if block_d >= 2048 else 4
    return 64, block_d, 1


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    kernels = _kernels_for(x)
    x = x.contiguous()
    if shift.stride(-1) != 1 or scale.stride(-1) != 1:
        shift, scale = shift.contiguous(), scale.contiguous()
    groups = shift.shape[0]
    _, batch, tokens, width = x.shape
    out = torch.empty(groups, batch, tokens, width, dtype=x.dtype, device=x.device)
    rows = batch * tokens
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _row_blocks(x, width)
    kernels.modln[(triton.cdiv(rows, block_r), groups)](
        x, shift, scale, out, rows, tokens, width, 0 if x.shape[0] == 1 else rows * width,
        shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), eps,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


def merge_input(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels_for(attn)
    attn, mlp, x, bias = attn.contiguous(), mlp.contiguous(), x.contiguous(), bias.contiguous()
    if gate_attn.stride(-1) != 1 or gate_mlp.stride(-1) != 1:
        gate_attn, gate_mlp = gate_attn.contiguous(), gate_mlp.contiguous()
    groups, rows, width = attn.shape
    u = torch.empty(rows, groups * width, dtype=attn.dtype, device=attn.device)
    acc = torch.empty_like(x)
    if u.numel() == 0:
        return u, acc
    block_r, block_d, warps = _row_blocks(attn, width)
    if attn.is_cuda:  # elementwise: 2D tiles of 8 rows x 128 channels, plenty of programs
        block_r, block_d, warps = 8, min(128, block_d), 4
    kernels.merge[(triton.cdiv(rows, block_r), triton.cdiv(width, block_d))](
        attn, gate_attn, mlp, gate_mlp, x, bias, u, acc, rows, tokens, width,
        gate_attn.stride(0), gate_attn.stride(1), gate_mlp.stride(0), gate_mlp.stride(1),
        GROUPS=groups, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return u, acc
