"""Depth->width: two DiT blocks computed side by side as one width-doubled block, and the two fusions it uses.

A parallel pair of graftc DiT blocks (adaLN-Zero, fused qkv, GELU-tanh MLP) keeps both branches' weights stacked
along a leading branch axis G = 2 (`PairWeights`). Both branches read the same input x [B, N, D] and the same
conditioning c [B, D]; branch g computes the residual update of its pretrained block,

    u_g = gate_msa_g * attn_g(modulate(LN(x), shift_msa_g, scale_msa_g))
        + gate_mlp_g * mlp_g(modulate(LN(x + gate_msa_g * attn_g(...)), shift_mlp_g, scale_mlp_g)),

and the updates are merged by one linear projection: out = x + merge([u_0 | u_1]) (merge: 2D -> D).

Two implementations of that maths:
    parallel_dit_block_reference   the unfused composition: each branch exactly as DiTBlock.forward (F.linear,
                                   SDPA over H heads), then the merge. The definition.
    parallel_dit_block             the width-doubled computation the grafted model runs: one GEMM for both
                                   adaLN projections, one batched GEMM (baddbmm over G) for both qkv projections,
                                   one SDPA call over 2B x H (= 2x the heads), one baddbmm for both output
                                   projections, one per MLP layer, one GEMM for the merge. Between the GEMMs, two
                                   fused ops replace chains of elementwise kernels:
        modulated_layer_norm   LN(x) * (1 + scale_g) + shift_g for both branches in one pass (the adaLN prologue;
                               x may be shared by the branches, as before attention, or per branch, before the MLP)
        parallel_merge_input   the merge epilogue's input: [u_0 | u_1] laid out [B*N, 2D] for the merge GEMM, from
                               the branch outputs and gates, plus x + merge bias (the GEMM's accumulator)
Each fused op is a torch custom op (one call in exported graphs and --emit-code) with a plain-PyTorch reference,
a PyTorch path (CPU default) and a Triton kernel (CUDA default), picked by graftc.kernels.dispatch
(GRAFTC_KERNELS=auto|triton|reference). Their backward is written out in PyTorch (they are elementwise and
bandwidth-bound; the forward fusion is what pays at inference). Under GRAFTC_KERNELS=reference,
`parallel_dit_block` runs `parallel_dit_block_reference`.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels import dispatch

try:  # triton is optional: every CPU path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

__all__ = ["PairWeights", "parallel_dit_block", "parallel_dit_block_reference", "modulated_layer_norm",
           "modulated_layer_norm_reference", "parallel_merge_input", "parallel_merge_input_reference"]


class PairWeights(NamedTuple):
    """Both branches' weights, stored the way the width-doubled computation consumes them (no per-call reshapes):
    GEMM right-hand operands input-major (the transpose of nn.Linear's weight), biases broadcastable over rows.
    Branch g of a stacked tensor is index g (branch 0 = the pair's first block)."""

    ada_w: Tensor  # [2*6D, D]  adaLN modulation Linear weights (after SiLU), branch 0's 6D rows first
    ada_b: Tensor  # [2*6D]     per branch: shift/scale/gate for attention, then for the MLP
    qkv_w: Tensor  # [2, D, 3D]
    qkv_b: Tensor  # [2, 1, 3D]
    proj_w: Tensor  # [2, D, D]
    proj_b: Tensor  # [2, 1, D]
    fc1_w: Tensor  # [2, D, M]
    fc1_b: Tensor  # [2, 1, M]
    fc2_w: Tensor  # [2, M, D]
    fc2_b: Tensor  # [2, 1, D]
    merge_w: Tensor  # [2D, D]  out = x + [u_0 | u_1] @ merge_w + merge_b
    merge_b: Tensor  # [D]


def _eager(*tensors: Tensor) -> bool:
    """A plain eager call (real tensors, no autograd needed, no tracing, compiling or dispatch mode): the fused
    ops then call their implementation directly, skipping the custom-op dispatcher's ~15 us per call, which at
    batch 1 on a GPU is as long as the kernel itself. Everything else (export, FakeTensor shape propagation,
    FlopCounterMode, training) goes through the registered op."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch.compiler.is_compiling() or any(type(t) not in (Tensor, torch.nn.Parameter) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# ----------------------------------------------------------------------------------------------------------
# The block: reference composition and width-doubled computation.


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _branch_update(x: Tensor, c: Tensor, w: PairWeights, g: int, heads: int, eps: float) -> Tensor:
    """Branch g's residual update, computed exactly as graftc.models.dit.DiTBlock.forward computes it."""
    batch, tokens, width = x.shape
    mod = F.linear(F.silu(c), w.ada_w.view(-1, 6 * width, width)[g], w.ada_b.view(-1, 6 * width)[g])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    h = _modulate(F.layer_norm(x, (width,), eps=eps), shift_msa, scale_msa)
    q, k, v = (F.linear(h, w.qkv_w[g].t(), w.qkv_b[g, 0]).reshape(batch, tokens, 3, heads, width // heads)
               .permute(2, 0, 3, 1, 4).unbind(0))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    attn = gate_msa.unsqueeze(1) * F.linear(o, w.proj_w[g].t(), w.proj_b[g, 0])
    h = _modulate(F.layer_norm(x + attn, (width,), eps=eps), shift_mlp, scale_mlp)
    mlp = F.linear(F.gelu(F.linear(h, w.fc1_w[g].t(), w.fc1_b[g, 0]), approximate="tanh"), w.fc2_w[g].t(), w.fc2_b[g, 0])
    return attn + gate_mlp.unsqueeze(1) * mlp


def parallel_dit_block_reference(x: Tensor, c: Tensor, w: PairWeights, heads: int, eps: float = 1e-6) -> Tensor:
    """The unfused composition: both branches one after the other, then x + merge([u_0 | u_1])."""
    updates = [_branch_update(x, c, w, g, heads, eps) for g in range(w.qkv_w.shape[0])]
    return x + F.linear(torch.cat(updates, dim=-1), w.merge_w.t(), w.merge_b)


def parallel_dit_block(x: Tensor, c: Tensor, w: PairWeights, heads: int, eps: float = 1e-6) -> Tensor:
    """Both branches as one width-doubled computation (see the module docstring); x [B, N, D], c [B, D]."""
    if dispatch.use_reference():
        return parallel_dit_block_reference(x, c, w, heads, eps)
    batch, tokens, width = x.shape
    branches, rows, head_dim = w.qkv_w.shape[0], batch * tokens, width // heads
    # one GEMM for both adaLN projections: [B, G*6*D] -> six [G, B, D] views
    mod = F.linear(F.silu(c), w.ada_w, w.ada_b)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod.view(batch, branches, 6, width).permute(2, 1, 0, 3).unbind(0))
    x0 = x.unsqueeze(0)
    h = modulated_layer_norm(x0, shift_msa, scale_msa, eps).view(branches, rows, width)  # both branches
    qkv = torch.baddbmm(w.qkv_b, h, w.qkv_w)  # [G, B*N, 3D]
    # [G, B*N, 3D] is [G*B, N, 3, H, dh]: one attention call over G*B x H (twice the heads of one block)
    q, k, v = qkv.view(branches * batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(branches, rows, width)
    attn = torch.baddbmm(w.proj_b, o, w.proj_w)  # [G, B*N, D]
    x1 = torch.addcmul(x0, gate_msa.unsqueeze(2), attn.view(branches, batch, tokens, width))
    h = modulated_layer_norm(x1, shift_mlp, scale_mlp, eps).view(branches, rows, width)
    mlp = torch.baddbmm(w.fc2_b, F.gelu(torch.baddbmm(w.fc1_b, h, w.fc1_w), approximate="tanh"), w.fc2_w)
    u, acc = parallel_merge_input(attn, gate_msa, mlp, gate_mlp, x.reshape(rows, width), w.merge_b, tokens)
    return torch.addmm(acc, u, w.merge_w).view(batch, tokens, width)


# ----------------------------------------------------------------------------------------------------------
# modulated_layer_norm: out[g, b, n] = LN(x[g or 0, b, n]) * (1 + scale[g, b]) + shift[g, b]


def _check_modln(x: Tensor, shift: Tensor, scale: Tensor) -> None:
    if x.dim() != 4 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"modulated_layer_norm: x must be [G or 1, B, N, D] and shift, scale [G, B, D]; got "
                         f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}")
    groups, batch, _, width = x.shape
    if shift.shape[1:] != (batch, width) or groups not in (1, shift.shape[0]):
        raise ValueError(f"modulated_layer_norm: shift/scale {tuple(shift.shape)} do not fit x {tuple(x.shape)}")


def modulated_layer_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """The definition, in fp32 whatever the storage dtype."""
    _check_modln(x, shift, scale)
    xhat = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = xhat * (1 + scale.float().unsqueeze(2)) + shift.float().unsqueeze(2)
    return out.to(x.dtype).contiguous()


def _modln_torch(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """Two ATen kernels, in the storage dtype as DiTBlock does (LayerNorm accumulates in fp32 internally)."""
    xhat = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return torch.addcmul(shift.unsqueeze(2), xhat, scale.unsqueeze(2).add(1.0)).contiguous()


def _modln_backward(grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    """d x, d shift, d scale; fp32 maths. A shared x (x.shape[0] == 1 < G) sums its gradient over the branches."""
    g, xf = grad.float(), x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (xf - mean) * rstd
    d_shift = g.sum(2)
    d_scale = (g * xhat).sum(2)
    dxhat = g * (1 + scale.float().unsqueeze(2))
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if x.shape[0] != grad.shape[0]:
        dx = dx.sum(0, keepdim=True)
    return dx.to(x.dtype), d_shift.to(shift.dtype), d_scale.to(scale.dtype)


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


def _modln_triton(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    kernels = _kernels_for(x)
    x = x.contiguous()
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


@torch.library.custom_op("graftc::modulated_layer_norm", mutates_args=())
def _modln_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _modln_impl(x, shift, scale, eps)


def _modln_impl(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    _check_modln(x, shift, scale)
    if dispatch.use_reference():
        return modulated_layer_norm_reference(x, shift, scale, eps)
    if dispatch.use_triton(x) and (triton is not None or dispatch.mode() == "triton"):
        if shift.stride(-1) != 1 or scale.stride(-1) != 1:
            shift, scale = shift.contiguous(), scale.contiguous()
        return _modln_triton(x, shift, scale, eps)
    return _modln_torch(x, shift, scale, eps)


@_modln_op.register_fake
def _(x, shift, scale, eps):
    _check_modln(x, shift, scale)
    return x.new_empty(shift.shape[0], x.shape[1], x.shape[2], x.shape[3])


def _modln_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, shift, scale)


def _modln_grad(ctx, grad):
    x, shift, scale = ctx.saved_tensors
    return (*_modln_backward(grad, x, shift, scale, ctx.eps), None)


_modln_op.register_autograd(_modln_grad, setup_context=_modln_setup)


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LN(x) * (1 + scale) + shift per branch: x [G or 1, B, N, D] (1 = shared by the branches), shift and
    scale [G, B, D] (any strides) -> [G, B, N, D]. LayerNorm without affine weights, as DiT's."""
    if _eager(x, shift, scale):
        return _modln_impl(x, shift, scale, eps)
    return torch.ops.graftc.modulated_layer_norm(x, shift, scale, eps)


# ----------------------------------------------------------------------------------------------------------
# parallel_merge_input: the merge GEMM's operands, out = acc + u @ merge_w^T


def _check_merge(attn: Tensor, gate_attn: Tensor, mlp: Tensor, gate_mlp: Tensor, x: Tensor, bias: Tensor,
                 tokens: int) -> None:
    if attn.dim() != 3 or attn.shape != mlp.shape or gate_attn.shape != gate_mlp.shape or gate_attn.dim() != 3:
        raise ValueError(f"parallel_merge_input: attn and mlp must be [G, B*N, D] and gates [G, B, D]; got "
                         f"{tuple(attn.shape)}, {tuple(mlp.shape)}, {tuple(gate_attn.shape)}, {tuple(gate_mlp.shape)}")
    groups, rows, width = attn.shape
    if gate_attn.shape != (groups, rows // max(tokens, 1), width) or rows % max(tokens, 1):
        raise ValueError(f"parallel_merge_input: gates {tuple(gate_attn.shape)} do not fit {rows} rows of {tokens} tokens")
    if x.shape != (rows, width) or bias.shape != (width,):
        raise ValueError(f"parallel_merge_input: x must be [{rows}, {width}] and bias [{width}]; got "
                         f"{tuple(x.shape)}, {tuple(bias.shape)}")


def parallel_merge_input_reference(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
    _check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    groups, rows, width = attn.shape
    shape = (groups, rows // tokens, tokens, width)
    u = gate_attn.float().unsqueeze(2) * attn.float().view(shape) + gate_mlp.float().unsqueeze(2) * mlp.float().view(shape)
    u = u.reshape(groups, rows, width).permute(1, 0, 2).reshape(rows, groups * width)
    return u.to(attn.dtype), (x.float() + bias.float()).to(x.dtype)


def _merge_torch(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
    groups, rows, width = attn.shape
    shape = (groups, rows // tokens, tokens, width)
    u = torch.addcmul(gate_attn.unsqueeze(2) * attn.view(shape), gate_mlp.unsqueeze(2), mlp.view(shape))
    return u.reshape(groups, rows, width).permute(1, 0, 2).reshape(rows, groups * width), x + bias


def _merge_triton(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
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


@torch.library.custom_op("graftc::parallel_merge_input", mutates_args=())
def _merge_op(attn: Tensor, gate_attn: Tensor, mlp: Tensor, gate_mlp: Tensor, x: Tensor, bias: Tensor,
              tokens: int) -> tuple[Tensor, Tensor]:
    return _merge_impl(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)


def _merge_impl(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
    _check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    if dispatch.use_reference():
        return parallel_merge_input_reference(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    if dispatch.use_triton(attn) and (triton is not None or dispatch.mode() == "triton"):
        return _merge_triton(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    return _merge_torch(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)


@_merge_op.register_fake
def _(attn, gate_attn, mlp, gate_mlp, x, bias, tokens):
    _check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    groups, rows, width = attn.shape
    return attn.new_empty(rows, groups * width), x.new_empty(rows, width)


def _merge_setup(ctx, inputs, output):
    attn, gate_attn, mlp, gate_mlp, x, bias, tokens = inputs
    ctx.tokens = tokens
    ctx.save_for_backward(attn, gate_attn, mlp, gate_mlp)


def _merge_grad(ctx, grad_u, grad_acc):
    attn, gate_attn, mlp, gate_mlp = ctx.saved_tensors
    groups, rows, width = attn.shape
    shape = (groups, rows // ctx.tokens, ctx.tokens, width)
    du = grad_u.view(rows, groups, width).permute(1, 0, 2).reshape(shape)
    d_attn = (du * gate_attn.unsqueeze(2)).view(groups, rows, width)
    d_mlp = (du * gate_mlp.unsqueeze(2)).view(groups, rows, width)
    d_gate_attn = (du * attn.view(shape)).sum(2)
    d_gate_mlp = (du * mlp.view(shape)).sum(2)
    return d_attn, d_gate_attn, d_mlp, d_gate_mlp, grad_acc, grad_acc.sum(0), None


_merge_op.register_autograd(_merge_grad, setup_context=_merge_setup)


def parallel_merge_input(attn: Tensor, gate_attn: Tensor, mlp: Tensor, gate_mlp: Tensor, x: Tensor, bias: Tensor,
                         tokens: int) -> tuple[Tensor, Tensor]:
    """attn, mlp [G, B*N, D] (branch outputs before gating), gates [G, B, D], x [B*N, D], bias [D] ->
    (u [B*N, G*D] with u[:, g*D:(g+1)*D] = gate_attn_g * attn_g + gate_mlp_g * mlp_g,  acc = x + bias)."""
    if _eager(attn, gate_attn, mlp, gate_mlp, x, bias):
        return _merge_impl(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    return torch.ops.graftc.parallel_merge_input(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
