"""`mamba2`: the Mamba-2 mixer (state space duality), in plain PyTorch with the chunked SSD of graftc.kernels.ssd.

x -> in_proj -> [z | x | B | C | dt]; causal depthwise conv + SiLU over [x | B | C]; SSD scan per head with scalar
decay exp(dt * A); y + D * x; gated RMSNorm with SiLU(z); out_proj. Defaults are the grafting paper's Mamba-2
(d_state 64, conv 4, expand 2, head dim 16). Causal by construction (it scans the raster order once).
Only `init: random`: the teacher's softmax attention has no counterpart of A, dt or the state.

Decoding keeps the conv state (last d_conv-1 inputs) and the SSM state [heads, d_state, head_dim] in transformers'
conv/recurrent cache layer: O(1) per token, the recurrent form of the same SSD layer. In a padded batch the
padding's conv inputs are zeroed and its dt set to 0, so the state passes padding by unchanged.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from graftc.kernels import dispatch
from graftc.kernels.hyena import causal_conv1d, conv_tail
from graftc.kernels.ssd import ssd, ssd_reference
from graftc.match import Region
from graftc.passes.common import MixerConfig, install, like, linear, widths
from graftc.rules import Rule
from graftc.site import Call


class Mamba2Mixer(torch.nn.Module):
    decode_state = "conv + SSM state"

    def __init__(self, width: int, out_width: int, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 head_dim: int = 16, groups: int = 1, chunk: int = 64, **like):
        super().__init__()
        self.inner, self.d_state, self.head_dim, self.groups, self.chunk = expand * width, d_state, head_dim, groups, chunk
        self.d_conv = d_conv
        self.heads = self.inner // head_dim
        conv_channels = self.inner + 2 * groups * d_state
        self.in_proj = linear(width, self.inner + conv_channels + self.heads, has_bias=False, **like)
        bound = 1 / math.sqrt(d_conv)
        self.conv_weight = torch.nn.Parameter(torch.empty(conv_channels, d_conv, **like).uniform_(-bound, bound))
        self.conv_bias = torch.nn.Parameter(torch.zeros(conv_channels, **like))
        # dt starts log-uniform in [1e-3, 1e-1] (stored through softplus's inverse), decay rates A in [1, 16]
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = torch.nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(**like))
        self.A_log = torch.nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)).to(**like))
        self.D = torch.nn.Parameter(torch.ones(self.heads, **like))
        self.norm_weight = torch.nn.Parameter(torch.ones(self.inner, **like))
        self.out_proj = linear(self.inner, out_width, has_bias=False, **like)

    def forward(self, x: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        if call is not None and (call.cache is not None or call.mask is not None):
            return self._continue(x, call)
        if dispatch.plain_cpu_inference(x):
            return self._inference(x)[0]
        batch, length = x.shape[0], x.shape[-2]
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.groups * self.d_state, self.heads], -1)
        xbc = F.silu(causal_conv1d(xbc, self.conv_weight, self.conv_bias))
        xs, b, c = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], -1)
        y = ssd(xs.reshape(batch, length, self.heads, self.head_dim), F.softplus(dt + self.dt_bias),
                -torch.exp(self.A_log.float()), b.reshape(batch, length, self.groups, self.d_state),
                c.reshape(batch, length, self.groups, self.d_state), self.D, self.chunk)
        return self.out_proj(_epilogue(y.reshape(batch, length, self.inner).to(x.dtype), z, self.norm_weight))

    def _continue(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        """forward for new tokens after cached ones, and for padded batches: the conv over the kept inputs and
        the new ones, the SSD scan from the kept state; padding gets zero conv input and dt = 0."""
        from graftc.decode import RecurrentState

        cached = call.state(RecurrentState, RecurrentState) if call.cache is not None else None
        batch, length = x.shape[0], x.shape[-2]
        valid = call.valid(length, cached.seen if cached is not None else 0)
        if cached is not None and cached.seen == 0 and valid is None and dispatch.plain_cpu_inference(x):
            out, state, conv_inputs = self._inference(x)  # a prompt into a fresh cache: the fused forward
            cached.conv_window(conv_inputs[:, -max(self.d_conv - 1, 1):], 0, self.d_conv)
            cached.set_recurrent(1, state)
            cached.seen += length
            return out
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.groups * self.d_state, self.heads], -1)
        dt = F.softplus(dt + self.dt_bias)
        if valid is not None:
            mask = valid[..., None].to(x.dtype)
            xbc, dt = xbc * mask, dt * mask
        if cached is not None:
            xbc = cached.conv_window(xbc, 0, self.d_conv)
        else:
            xbc = F.pad(xbc, (0, 0, max(self.d_conv - 1, 1), 0))
        xbc = F.silu(conv_tail(xbc, self.conv_weight, self.conv_bias, length))
        xs, b, c = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], -1)
        initial = cached.recurrent(1) if cached is not None else None
        # one decode step is one step of the recurrence (the chunked scan's set-up costs more than the step)
        scan = ssd_reference if length == 1 else functools.partial(ssd, chunk=self.chunk)
        y, state = scan(xs.reshape(batch, length, self.heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
                        b.reshape(batch, length, self.groups, self.d_state),
                        c.reshape(batch, length, self.groups, self.d_state), self.D,
                        initial_state=initial, return_final_state=True)
        if cached is not None:
            cached.set_recurrent(1, state)
            cached.seen += length
        return self.out_proj(_epilogue(y.reshape(batch, length, self.inner).to(x.dtype), z, self.norm_weight))

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """forward on CPU without autograd: the same maths in fewer passes over memory. The conv runs as
        shifted multiply-adds, token-major (F.conv1d wants channel-major: a transposed copy in, and a
        channel-major output that every later step would read across the grain); conv + SiLU + softplus and
        gate + RMSNorm are each one fused loop (torch.compile) on large inputs, a few in-place ops otherwise.
        Returns (output, final SSM state, conv inputs): the last two seed a decode cache."""
        batch, length = x.shape[0], x.shape[-2]
        proj = self.in_proj(x)
        conv_channels = self.inner + 2 * self.groups * self.d_state
        big = proj.numel() >= _COMPILE_FROM
        xbc, dt = (_prologue_compiled if big else _prologue)(proj, self.conv_weight, self.conv_bias, self.dt_bias,
                                                             self.inner, conv_channels)
        xs, b, c = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], -1)
        y, state = ssd(xs.reshape(batch, length, self.heads, self.head_dim), dt,
                       -torch.exp(self.A_log.float()), b.reshape(batch, length, self.groups, self.d_state),
                       c.reshape(batch, length, self.groups, self.d_state), self.D, self.chunk, return_final_state=True)
        y = y.reshape(batch, length, self.inner).to(x.dtype)
        out = self.out_proj((_epilogue_compiled if big else _epilogue)(y, proj[..., :self.inner], self.norm_weight))
        return out, state, proj[..., self.inner:self.inner + conv_channels]

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, d_state={self.d_state}, groups={self.groups}"


def _prologue(proj, conv_weight, conv_bias, dt_bias, inner: int, conv_channels: int):
    """From the in_proj output [B, L, ...]: silu(causal conv(x | B | C)) token-major, and softplus(dt + bias)."""
    xbc, dt = proj[..., inner:inner + conv_channels], proj[..., inner + conv_channels:]
    taps, length = conv_weight.shape[1], xbc.shape[1]
    out = torch.addcmul(conv_bias, xbc, conv_weight[:, -1])
    for j in range(taps - 1):  # tap j reads `shift` steps back
        shift = taps - 1 - j
        if shift < length:
            out[:, shift:] = torch.addcmul(out[:, shift:], xbc[:, :length - shift], conv_weight[:, j])
    return F.silu(out), F.softplus(dt + dt_bias)


def _epilogue(y, z, norm_weight):
    """Gated RMSNorm: y * silu(z), normalized over the last dim (statistics in fp32), times the weight."""
    y = y * F.silu(z)
    return y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(y.dtype) * norm_weight


_COMPILE_FROM = 1 << 20  # in_proj output elements; below this, compiling costs more than it saves
_prologue_compiled = dispatch.LazyCompiled(_prologue, "mamba2")
_epilogue_compiled = dispatch.LazyCompiled(_epilogue, "mamba2")


class Mamba2Config(MixerConfig):
    op: Literal["mamba2"] = "mamba2"
    init: Literal["random"] = Field("random", description="random only: softmax attention has no state to copy")
    d_state: int = Field(64, ge=1, le=1024, description="state size per head")
    d_conv: int = Field(4, ge=1, le=64, description="taps of the causal conv before the scan")
    expand: int = Field(2, ge=1, le=8, description="inner width / model width")
    head_dim: int = Field(16, ge=1, description="channels per SSD head; must divide expand x width")
    groups: int = Field(1, ge=1, description="B/C groups shared by heads; must divide the head count")
    chunk: int = Field(64, ge=1, le=1024, description="chunk length of the SSD algorithm (64 measured fastest on CPU)")


def build_mamba2(region: Region, config: Mamba2Config, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    width, out_width = widths(region)
    mixer = Mamba2Mixer(width, out_width, config.d_state, config.d_conv, config.expand, config.head_dim,
                        config.groups, config.chunk, **like(region, model))
    return install(region, mixer)


def guard_mamba2(region: Region, config: Mamba2Config) -> str | None:
    inner = config.expand * region.input_shape[-1]
    if inner % config.head_dim:
        return f"head_dim {config.head_dim} does not divide the inner width {inner} (expand x width)"
    if (inner // config.head_dim) % config.groups:
        return f"groups {config.groups} does not divide the {inner // config.head_dim} heads"
    return None


RULES = [
    Rule("mamba2", ("attention",), Mamba2Config, build_mamba2, guard_mamba2,
         summary="Mamba-2 (SSD) mixer, pure PyTorch, causal over the token order", plugs_in=True,
         example={"d_state": 8, "head_dim": 8, "chunk": 4}, decode_state="conv state + SSM state",
         memory="0 (fixed (d_conv-1) x (expand x width + 2 x groups x d_state) + expand x width x d_state)"),
]
