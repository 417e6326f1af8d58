"""Feature maps for linear attention: fixed (elu + 1, relu) and learned (Hedgehog)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1: positive, and linear (not saturating) for x > 0 (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


def relu(x: Tensor) -> Tensor:
    """max(x, 0): non-negative and sparse; an all-negative query gets all-zero weights (output 0)."""
    return F.relu(x)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learnable feature map (Zhang et al. 2024), trained to make linear attention mimic softmax.

    Per head h, with W_h [d, d] (identity at init) and b_h [d] (zero at init), a token x in R^d maps to

        z = x W_h + b_h,    phi(x) = softmax([z, -z])   in R^{2d}

    i.e. phi(x)_i is proportional to exp(z_i) for i < d and to exp(-z_{i-d}) after. Then phi(q) . phi(k)
    is a sum of exp(+-(z_q,i + z_k,i)): positive and spiky like softmax attention's exp(q . k), which a
    fixed map such as elu + 1 cannot be. The softmax is the numerically safe way to take those
    exponentials: its per-token normalizer cancels for queries (linear attention divides by the
    query's total weight) and acts as a learned per-key weight for keys.

    Input [B, H, N, d] -> features [B, H, N, 2d], all positive.
    """

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))  # [H, d, d]
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor, scale: float | None = None) -> Tensor:
        """phi(x * scale) (scale folded into the [d, d] weights, not applied to x). [z, -z] comes out of one
        GEMM against [W, -W] with bias [b, -b]: twice the FLOPs of x W (counted as such), but no negation and
        concatenation passes over the [.., N, 2d] activations."""
        weight = self.weight if scale is None else self.weight * scale
        weight = torch.cat([weight, -weight], dim=-1)  # [H, d, 2d]
        bias = torch.cat([self.bias, -self.bias], dim=-1)[:, None, :]  # [H, 1, 2d]
        if x.dim() == 4 and x.shape[0] == 1 and x.shape[1] == weight.shape[0]:
            # [1, H, N, d]: one batched GEMM over the heads, reading x where it lies: BLAS takes a strided view
            # of the qkv projection (row stride 3 H d) as it is, where flattening it below would copy it.
            return torch.softmax(torch.baddbmm(bias, x[0], weight), dim=-1)[None]
        if x.dim() == 4 and x.shape[1] == weight.shape[0]:  # [B, H, N, d]: one batched GEMM with the bias fused
            batch, heads, tokens, dim = x.shape
            z = torch.baddbmm(bias.expand(batch, -1, -1, -1).reshape(batch * heads, 1, -1),
                              x.reshape(batch * heads, tokens, dim),
                              weight.expand(batch, -1, -1, -1).reshape(batch * heads, dim, -1))
            z = z.view(batch, heads, tokens, -1)
        else:
            z = x @ weight + bias
        return torch.softmax(z, dim=-1)

    def extra_repr(self) -> str:
        heads, head_dim, _ = self.weight.shape
        return f"head_dim={head_dim}, heads={heads}"
