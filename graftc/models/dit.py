"""DiT, the class-conditional diffusion transformer of Peebles & Xie (2023).

Parameter names and shapes follow the published checkpoints exactly, so their
state dicts load with ``load_dit_checkpoint`` without any renaming. The forward
pass has no control flow on tensor values, so ``torch.export`` can trace it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from graftc.errors import GraftError
from graftc.files import check_fits, read_weights

__all__ = [
    "DIT_CONFIGS",
    "DiTConfig",
    "DiT",
    "DiTBlock",
    "Attention",
    "Mlp",
    "build_dit",
    "load_dit_checkpoint",
    "example_inputs",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


class DiTConfig(NamedTuple):
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int


def _family(depth: int, hidden: int, heads: int, prefix: str) -> dict:
    return {f"{prefix}/{p}": DiTConfig(depth, hidden, p, heads) for p in (2, 4, 8)}


DIT_CONFIGS: dict[str, DiTConfig] = {
    **_family(28, 1152, 16, "DiT-XL"),
    **_family(24, 1024, 16, "DiT-L"),
    **_family(12, 768, 12, "DiT-B"),
    **_family(12, 384, 6, "DiT-S"),
    "tiny": DiTConfig(depth=6, hidden_size=128, patch_size=2, num_heads=4),
}

# Defaults of build_dit: the published models work on 32x32x4 SD-VAE latents of
# 256x256 ImageNet images; "tiny" is a demo model for 8x8 single-channel inputs.
_DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
_TINY_DEFAULTS = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=False)

_FREQ_DIM = 256  # width of the sinusoidal timestep features fed to t_embedder


# ---------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int = _FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: [B] -> [B, dim], cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # static: depends on a Python int, not on tensor values
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos table [grid_size**2, dim] laid out as in the official checkpoints.

    Token n = row * grid_size + col; the first dim/2 channels encode the column,
    the last dim/2 the row (the official code calls them h and w the other way
    round, but the stored tables are what we must reproduce). Computed in float64.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens [B, (H/p)*(W/p), D]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = _FREQ_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        # The features are float32; match the weights so half-precision models work too.
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embeddings; the extra last row is the "null" class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# -------------------------------------------------------------- transformer


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, 3*C] -> 3 x [B, heads, N, head_dim]; qkv packs q, k, v along the output dim.
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted/scaled and residuals gated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: (latents [B,C,H,W], timesteps [B], labels [B]) -> [B, out_channels, H, W]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        problems = []
        if input_size % patch_size:
            problems.append(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            problems.append(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if hidden_size % 4:
            problems.append(f"hidden_size {hidden_size} is not a multiple of 4 (needed by the 2D sin-cos table)")
        if problems:
            raise GraftError("bad DiT shape: " + "; ".join(problems))

        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        # learn_sigma: the model also predicts the diagonal variance, doubling the output channels.
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Stored as a frozen parameter (not a buffer) because that is where the checkpoints keep it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official DiT init. Every call is also valid on the meta device, where it does nothing."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.pos_embed.is_meta:
            table = sincos_pos_embed_2d(self.hidden_size, self.grid_size)
            self.pos_embed.copy_(table.unsqueeze(0).to(self.pos_embed.dtype))
        # The patchify conv is initialised like a Linear on its flattened kernel.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model predicts zero.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]; h, w come from the input's static shape."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c), h, w)


# ------------------------------------------------------------------ helpers

_OVERRIDABLE = ("depth", "hidden_size", "patch_size", "num_heads", "mlp_ratio")


def build_dit(
    name: str,
    input_size: Optional[int] = None,
    in_channels: Optional[int] = None,
    num_classes: Optional[int] = None,
    learn_sigma: Optional[bool] = None,
    **overrides,
) -> DiT:
    """Build a named DiT. Arguments left as None take the defaults input_size=32, in_channels=4,
    num_classes=1000, learn_sigma=True ("tiny": 8, 1, 10, False). ``overrides`` may replace
    depth, hidden_size, patch_size, num_heads or mlp_ratio."""
    if name not in DIT_CONFIGS:
        raise GraftError(f"unknown DiT model {name!r}; allowed: {', '.join(DIT_CONFIGS)}")
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise GraftError(f"unknown DiT override(s) {', '.join(bad)}; allowed: {', '.join(_OVERRIDABLE)}")
    given = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma)
    defaults = _TINY_DEFAULTS if name == "tiny" else _DEFAULTS
    args = {k: defaults[k] if v is None else v for k, v in given.items()}
    return DiT(**{**DIT_CONFIGS[name]._asdict(), **overrides}, **args)


def example_inputs(model: DiT, batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic (x, t, y) for ``model``: latents, int64 timesteps in [0, 1000), int64 labels."""
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(batch_size, model.in_channels, s, s, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    p = model.pos_embed
    return x.to(device=p.device, dtype=p.dtype), t.to(p.device), y.to(p.device)


def load_dit_checkpoint(model: DiT, path) -> None:
    """Load official-format DiT weights into ``model`` in place, after checking every key and shape."""
    state = read_weights(path, "DiT checkpoint")
    check_fits(model.state_dict(), state, "DiT checkpoint", path)
    # A model built on the meta device has no storage to copy into: adopt the loaded tensors instead.
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
