"""Where a new operator plugs in: the call signature of the module it replaces, and the token grid.

A new operator maps the region's input [B, N, D] to its output [B, N, D']. The user's code, however, calls the
cover's first module with its own signature and expects its own output structure: diffusers'
`Attention(hidden_states, encoder_hidden_states=None, ...) -> tensor`, Qwen3's
`self_attn(hidden_states, position_embeddings, attention_mask, ...) -> (out, weights)`, BERT's self-attention
returning a tuple. `probe` watches one shape-only forward and writes what it saw into `region.attrs["site"]`
(JSON, so a saved artifact replays without probing); `Site` is the adapter built from that record.

The same forward also records the token grid of image models (`region.attrs["grid"]`): the output of a 2D
convolution whose spatial size h x w equals the region's token count (the patch embedding of a DiT, PixArt or
ViT), which 2D operators need to know where a token's neighbours are.
"""
from __future__ import annotations

import inspect

import torch

from graftc.errors import GraftError
from graftc.match import Region


def probe(model: torch.nn.Module, args: tuple, kwargs: dict, regions: list[Region]) -> None:
    """Record `site` (and `grid` where one exists) in the attrs of every region that has a cover."""
    from graftc.manager import fake_forward

    entries = {r.cover[0]: r for r in regions if r.cover and r.kind in ("attention", "mlp", "block_pair")}
    seen: dict[str, dict] = {}
    grids: set[tuple[int, int]] = set()

    def on_call(fqn, region):
        def hook(module, call_args, call_kwargs, output):
            if fqn not in seen:
                seen[fqn] = _site(module, call_args, call_kwargs, output, region)
        return hook

    def on_conv(module, call_args, output):
        if output.dim() == 4:
            grids.add((int(output.shape[-2]), int(output.shape[-1])))

    handles = [model.get_submodule(fqn).register_forward_hook(on_call(fqn, r), with_kwargs=True)
               for fqn, r in entries.items()]
    handles += [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        fake_forward(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    for fqn, region in entries.items():
        if fqn in seen:
            region.attrs["site"] = seen[fqn]
        tokens = region.input_shape[-2] if len(region.input_shape) >= 2 else -1
        grid = sorted(g for g in grids if g[0] * g[1] == tokens)
        if grid:
            region.attrs["grid"] = list(grid[0])


def _site(module, call_args, call_kwargs, output, region: Region) -> dict:
    shape = list(region.input_shape)
    params = list(inspect.signature(module.forward).parameters)
    where = None
    for i, a in enumerate(call_args):
        if isinstance(a, torch.Tensor) and list(a.shape) == shape:
            where = {"position": i, "name": params[i] if i < len(params) else None}
            break
    else:
        for name, a in call_kwargs.items():
            if isinstance(a, torch.Tensor) and list(a.shape) == shape:
                where = {"position": None, "name": name}
                break
    if isinstance(output, torch.Tensor):
        returns = {"kind": "tensor"}
    elif isinstance(output, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in output):
        at = next(i for i, o in enumerate(output) if isinstance(o, torch.Tensor))
        returns = {"kind": "tuple", "length": len(output), "at": at}
    else:
        returns = {"kind": "unsupported", "type": type(output).__name__}
    return {"input": where, "output": returns}


def site_problem(region: Region) -> str | None:
    """Why a new operator cannot be plugged in at this region, or None."""
    if not region.cover:
        return "it is computed inline in its block's forward, with no module boundary to plug into"
    site = region.attrs.get("site")
    if site is None:
        return "its module was never called in the traced forward"
    if site["input"] is None:
        return f"no argument of {region.cover[0]} has the region's input shape {region.input_shape}"
    if site["output"]["kind"] == "unsupported":
        return f"{region.cover[0]} returns a {site['output']['type']}, not a tensor or tuple"
    return None


class Site(torch.nn.Module):
    """Calls `operator` on the hidden state wherever the replaced module received it, and returns the result
    in the replaced module's output structure (other tuple entries, e.g. attention weights, become None)."""

    def __init__(self, operator: torch.nn.Module, site: dict):
        super().__init__()
        self.operator = operator
        self.position, self.name = site["input"]["position"], site["input"]["name"]
        self.returns = site["output"]

    def forward(self, *args, **kwargs):
        if self.name is not None and self.name in kwargs:
            x = kwargs[self.name]
        elif self.position is not None and self.position < len(args):
            x = args[self.position]
        else:
            raise GraftError(f"{type(self.operator).__name__}: called without its input "
                             f"(expected argument {self.name or self.position})")
        y = self.operator(x)
        if self.returns["kind"] == "tensor":
            return y
        return tuple(y if i == self.returns["at"] else None for i in range(self.returns["length"]))

    def extra_repr(self) -> str:
        return f"input={self.name or self.position}, returns={self.returns['kind']}"
