"""Depth->width, the definition: two DiT blocks side by side, each exactly as DiTBlock.forward, then the merge;
and the references of the two fused ops the width-doubled computation uses.

A parallel pair of graftc DiT blocks (adaLN-Zero, fused qkv, GELU-tanh MLP) keeps both branches' weights stacked
along a leading branch axis G = 2 (`PairWeights`). Both branches read the same input x [B, N, D] and the same
conditioning c [B, D]; branch g computes the residual update of its pretrained block,

    u_g = gate_msa_g * attn_g(modulate(LN(x), shift_msa_g, scale_msa_g))
        + gate_mlp_g * mlp_g(modulate(LN(x + gate_msa_g * attn_g(...)), shift_mlp_g, scale_mlp_g)),

and the updates are merged by one linear projection: out = x + merge([u_0 | u_1]) (merge: 2D -> D).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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


def check_modln(x: Tensor, shift: Tensor, scale: Tensor) -> None:
    if x.dim() != 4 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"modulated_layer_norm: x must be [G or 1, B, N, D] and shift, scale [G, B, D]; got "
                         f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}")
    groups, batch, _, width = x.shape
    if shift.shape[1:] != (batch, width) or groups not in (1, shift.shape[0]):
        raise ValueError(f"modulated_layer_norm: shift/scale {tuple(shift.shape)} do not fit x {tuple(x.shape)}")


def modulated_layer_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """The definition, in fp32 whatever the storage dtype."""
    check_modln(x, shift, scale)
    xhat = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = xhat * (1 + scale.float().unsqueeze(2)) + shift.float().unsqueeze(2)
    return out.to(x.dtype).contiguous()


def check_merge(attn: Tensor, gate_attn: Tensor, mlp: Tensor, gate_mlp: Tensor, x: Tensor, bias: Tensor,
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
    check_merge(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    groups, rows, width = attn.shape
    shape = (groups, rows // tokens, tokens, width)
    u = gate_attn.float().unsqueeze(2) * attn.float().view(shape) + gate_mlp.float().unsqueeze(2) * mlp.float().view(shape)
    u = u.reshape(groups, rows, width).permute(1, 0, 2).reshape(rows, groups * width)
    return u.to(attn.dtype), (x.float() + bias.float()).to(x.dtype)
