"""Depth->width: two DiT blocks computed side by side as one width-doubled block, and the two fusions it uses.

Two implementations of the maths in naive.py:
    parallel_dit_block_reference   the unfused composition: each branch exactly as DiTBlock.forward (F.linear,
                                   SDPA over H heads), then the merge. The definition.
    parallel_dit_block             the width-doubled computation the grafted model runs: one GEMM for both
                                   adaLN projections, one batched GEMM (baddbmm over G) for both qkv projections,
                                   one SDPA call over 2B x H (twice the heads), one baddbmm for both output
                                   projections, one per MLP layer, one GEMM for the merge. Between the GEMMs, two
                                   fused ops replace chains of elementwise kernels:
        modulated_layer_norm   LN(x) * (1 + scale_g) + shift_g for both branches in one pass (the adaLN prologue;
                               x may be shared by the branches, as before attention, or per branch, before the MLP)
        parallel_merge_input   the merge epilogue's input: [u_0 | u_1] laid out [B*N, 2D] for the merge GEMM, from
                               the branch outputs and gates, plus x + merge bias (the GEMM's accumulator)
Each fused op is a kernel family (graftc.kernels.family): a torch custom op (one call in exported graphs and
--emit-code) with a plain-PyTorch reference (naive.py), a PyTorch path (aten.py, CPU default) and a Triton kernel
(triton.py, CUDA default); their backward is aten.py's. Under GRAFTC_KERNELS=reference, `parallel_dit_block`
runs `parallel_dit_block_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graftc.kernels import dispatch
from graftc.kernels.family import Family
from graftc.kernels.parallel import aten, triton
from graftc.kernels.parallel.naive import (PairWeights, check_merge, check_modln, modulated_layer_norm_reference,
                                           parallel_dit_block_reference, parallel_merge_input_reference)

__all__ = ["PairWeights", "parallel_dit_block", "modulated_layer_norm", "parallel_merge_input"]


def _modln_fake(x, shift, scale, eps):
    check_modln(x, shift, scale)
    return x.new_empty(shift.shape[0], x.shape[1], x.shape[2], x.shape[3])


def _merge_fake(attn, gate_attn, mlp, gate_mlp, x, bias, tokens):
    check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    groups, rows, width = attn.shape
    return attn.new_empty(rows, groups * width), x.new_empty(rows, width)


modulated_layer_norm_op = Family(
    "modulated_layer_norm", "(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor",
    reference=modulated_layer_norm_reference, torch=aten.modulated_layer_norm, triton=triton.modulated_layer_norm,
    fake=_modln_fake,
    backward=lambda family, inputs, outputs, grad: (*aten.modulated_layer_norm_backward(grad, *inputs), None))
parallel_merge_input_op = Family(
    "parallel_merge_input", "(Tensor attn, Tensor gate_attn, Tensor mlp, Tensor gate_mlp, Tensor x, Tensor bias, "
    "int tokens) -> (Tensor, Tensor)",
    reference=parallel_merge_input_reference, torch=aten.merge_input, triton=triton.merge_input,
    fake=_merge_fake,
    backward=lambda family, inputs, outputs, grad_u, grad_acc: (
        *aten.merge_input_backward(grad_u, grad_acc, *inputs[:4], inputs[-1]), None))


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LN(x) * (1 + scale) + shift per branch: x [G or 1, B, N, D] (1 = shared by the branches), shift and
    scale [G, B, D] (any strides) -> [G, B, N, D]. LayerNorm without affine weights, as DiT's."""
    check_modln(x, shift, scale)
    return modulated_layer_norm_op(x, shift, scale, eps)


def parallel_merge_input(attn: Tensor, gate_attn: Tensor, mlp: Tensor, gate_mlp: Tensor, x: Tensor, bias: Tensor,
                         tokens: int) -> tuple[Tensor, Tensor]:
    """attn, mlp [G, B*N, D] (branch outputs before gating), gates [G, B, D], x [B*N, D], bias [D] ->
    (u [B*N, G*D] with u[:, g*D:(g+1)*D] = gate_attn_g * attn_g + gate_mlp_g * mlp_g,  acc = x + bias)."""
    check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    return parallel_merge_input_op(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)


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
