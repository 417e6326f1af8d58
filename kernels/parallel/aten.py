"""The PyTorch path of the two fused ops (a few ATen kernels each), and their backward, written out once for every
path (they are elementwise and bandwidth-bound; the forward fusion is what pays at inference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """Two ATen kernels, in the storage dtype as DiTBlock does (LayerNorm accumulates in fp32 internally)."""
    xhat = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return torch.addcmul(shift.unsqueeze(2), xhat, scale.unsqueeze(2).add(1.0)).contiguous()


def modulated_layer_norm_backward(grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, eps: float):
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


def merge_input(attn, gate_attn, mlp, gate_mlp, x, bias, tokens: int) -> tuple[Tensor, Tensor]:
    groups, rows, width = attn.shape
    shape = (groups, rows // tokens, tokens, width)
    u = torch.addcmul(gate_attn.unsqueeze(2) * attn.view(shape), gate_mlp.unsqueeze(2), mlp.view(shape))
    return u.reshape(groups, rows, width).permute(1, 0, 2).reshape(rows, groups * width), x + bias


def merge_input_backward(grad_u: Tensor, grad_acc: Tensor, attn, gate_attn, mlp, gate_mlp, tokens: int):
    """d attn, d gate_attn, d mlp, d gate_mlp, d x, d bias."""
    groups, rows, width = attn.shape
    shape = (groups, rows // tokens, tokens, width)
    du = grad_u.view(rows, groups, width).permute(1, 0, 2).reshape(shape)
    d_attn = (du * gate_attn.unsqueeze(2)).view(groups, rows, width)
    d_mlp = (du * gate_mlp.unsqueeze(2)).view(groups, rows, width)
    d_gate_attn = (du * attn.view(shape)).sum(2)
    d_gate_mlp = (du * mlp.view(shape)).sum(2)
    return d_attn, d_gate_attn, d_mlp, d_gate_mlp, grad_acc, grad_acc.sum(0)
