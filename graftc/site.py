"""Where a new operator plugs in: the call of the module it replaces, and the token grid.

A new operator maps the region's input [B, N, D] to its output [B, N, D']. The user's code, however, calls the
cover's first module with its own signature and expects its own output structure: diffusers'
`Attention(hidden_states, encoder_hidden_states=None, ...) -> tensor`, Llama's
`self_attn(hidden_states, position_embeddings, attention_mask, cache, ...) -> (out, weights)`, BERT's
self-attention returning a tuple. `probe` watches one shape-only forward and writes what it saw into
`region.attrs["site"]` (JSON, so a saved artifact replays without probing); `Site` is the adapter built from that
record.

Besides the hidden state, the record says where the module receives the rest of its call (`context`): the
model's attention mask, its rotary position embeddings, its decode cache, and the module's layer index. `Site`
gathers them into a `Call` for every forward, so an operator honours padding, positions and cached decoding the way
the replaced attention did. Which of them an operator uses is its own business: nothing here knows any operator.

The same forward also records the token grid of image models (`region.attrs["grid"]`): the output of a 2D
convolution whose spatial size h x w equals the region's token count (the patch embedding of a DiT, PixArt or
ViT), which 2D operators need to know where a token's neighbours are. A ViT's sequence holds a few tokens before
its patches (class, distillation, register tokens): their number is recorded as `region.attrs["prefix"]` (absent
when 0), and they are taken to lead the sequence, as in transformers' ViT/DeiT/BEiT and timm's ViTs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from graftc.errors import GraftError
from graftc.manager import fake_forward
from graftc.region import Region

# Most tokens a sequence may hold before its patch grid (class, distillation and register tokens) for the grid to
# be taken as its token grid: ViTs with 4 registers have 5.
MAX_PREFIX = 8
# Where transformers' attention modules receive each part of their call (5.x names first, older ones after).
CONTEXT_NAMES = {
    "mask": ("attention_mask",),
    "positions": ("position_embeddings",),
    "cache": ("cache", "past_key_values", "past_key_value", "layer_past"),
}


def probe(model: torch.nn.Module, args: tuple, kwargs: dict, regions: list[Region]) -> None:
    """Record `site` (and `grid` where one exists) in the attrs of every region that has a cover and no record yet
    (an earlier probe's record stays: its module may have been rewritten since)."""
    recorded = [r.attrs["site"] for r in regions if "site" in r.attrs]
    entries = {r.cover[0]: r for r in regions
               if r.cover and r.kind in ("attention", "mlp", "block_pair") and "site" not in r.attrs}
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

    handles = []
    for fqn, region in list(entries.items()):
        try:
            module = model.get_submodule(fqn)
        except AttributeError:  # rewritten away by an earlier step (e.g. the second block of a parallel pair)
            del entries[fqn]
            continue
        handles.append(module.register_forward_hook(on_call(fqn, region), with_kwargs=True))
    handles += [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        fake_forward(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    # A model that hands its attention a decode cache decodes token by token: an operator that mixes tokens
    # where no cache reaches it (inside an MLP) would be wrong there, and its guard needs to know.
    decodes = any("cache" in s.get("context", {}) for s in [*seen.values(), *recorded])
    for fqn, region in entries.items():
        if fqn in seen:
            region.attrs["site"] = {**seen[fqn], "decodes": decodes}
        tokens = region.input_shape[-2] if len(region.input_shape) >= 2 else -1
        # the fewest tokens outside the grid: 0 for a DiT, 1 for a ViT's class token, 2 with DeiT's distillation token
        grid = sorted((tokens - g[0] * g[1], g) for g in grids if 0 <= tokens - g[0] * g[1] <= MAX_PREFIX)
        if grid:
            region.attrs["grid"] = list(grid[0][1])
            if grid[0][0]:
                region.attrs["prefix"] = grid[0][0]


def _where(params: list[str], call_kwargs: dict, names: tuple[str, ...]) -> dict | None:
    for name in names:
        if name in call_kwargs or name in params:
            return {"name": name, "position": params.index(name) if name in params else None}
    return None


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
    context = {role: w for role, names in CONTEXT_NAMES.items() if (w := _where(params, call_kwargs, names))}
    if "cache" in context and not (getattr(module, "is_causal", False) or region.attrs.get("causal")):
        del context["cache"]  # a bidirectional encoder (BERT) takes the parameter but never decodes
    bound = dict(zip(params, call_args)) | call_kwargs
    if "positions" in context:
        cos_sin = bound.get(context["positions"]["name"])
        if isinstance(cos_sin, (tuple, list)) and len(cos_sin) == 2 and isinstance(cos_sin[0], torch.Tensor):
            context["positions"]["dim"] = int(cos_sin[0].shape[-1])  # rotary width, checked against head_dim
        else:
            del context["positions"]  # the parameter exists but this model passes no rotary table
    if isinstance(getattr(module, "layer_idx", None), int):
        context["layer_idx"] = module.layer_idx
    return {"input": where, "output": returns, "context": context}


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
    context = site.get("context", {})
    if region.kind == "attention" and "cache" in context and "layer_idx" not in context:
        return f"{region.cover[0]} receives a decode cache but has no integer layer_idx to find its entry in it"
    return None


def attendable(mask: torch.Tensor) -> torch.Tensor:
    """A boolean or additive attention mask as booleans: True where attention may go."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@dataclass
class Call:
    """What the replaced module received besides its hidden state. Any field may be None: a diffusion model
    passes no mask, an encoder no cache, a model without RoPE no positions."""

    mask: Any = None  # the model's attention mask as the module got it: 4D boolean or additive, or None
    positions: Any = None  # (cos, sin) rotary tables, each [B, N, head_dim]
    cache: Any = None  # a transformers Cache (decoding), or None
    layer_idx: int | None = None

    def valid(self, tokens: int, past: int = 0) -> torch.Tensor | None:
        """Which of the `tokens` new tokens are real, [B or 1, tokens] bool, or None when all are.

        Read off the mask's diagonal: a padding token is a key nobody may attend to, itself included. The new
        tokens' key columns are `past + i` when the mask spans every position so far (a full or a static
        cache's mask) and the last `tokens` columns otherwise (a mask cut to a sliding window)."""
        mask = self.mask
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise GraftError(f"layer {self.layer_idx}: the model passed an attention mask of type "
                             f"{type(mask).__name__}; grafted operators read 4D boolean or additive masks "
                             "(attn_implementation 'sdpa' or 'eager')")
        width, steps = mask.shape[-1], torch.arange(tokens, device=mask.device)
        cols = past + steps if width >= past + tokens else width - tokens + steps
        rows = steps if mask.shape[-2] == tokens else torch.zeros_like(steps)  # [B, 1, 1, K] key-only masks
        valid = attendable(mask[:, 0, rows, cols])
        if is_fake(valid):  # a shape-only forward: take the padded path, whose shapes are the same
            return valid
        return None if bool(valid.all()) else valid

    def state(self, kind: type, make: Callable[[Any], Any]):
        """This layer's entry in the decode cache, made by `make(the entry it replaces)` the first time (a fresh
        cache holds the teacher's kind of layer there, e.g. a full KV layer), or None when the call carries no
        cache."""
        cache = self.cache
        if cache is None:
            return None
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            raise GraftError(f"layer {self.layer_idx}: grafted operators keep their decode state in a transformers "
                             f"Cache with per-layer entries, not in a {type(cache).__name__}")
        if len(layers) <= self.layer_idx:  # a DynamicCache built without a config grows its layers lazily
            from transformers.cache_utils import DynamicLayer

            layers.extend(DynamicLayer() for _ in range(self.layer_idx + 1 - len(layers)))
        layer = layers[self.layer_idx]
        if not isinstance(layer, kind):
            held = layer.get_seq_length() if hasattr(layer, "get_seq_length") else 0
            if held:
                raise GraftError(f"layer {self.layer_idx}: the cache already holds {held} tokens of another kind "
                                 f"of layer ({type(layer).__name__}); start decoding with a fresh cache")
            layer = layers[self.layer_idx] = make(layer)
        return layer


def argument(where: dict | None, args: tuple, kwargs: dict):
    """The argument a site record points at ({"name", "position"}), or None where the call lacks it."""
    if where is None:
        return None
    if where["name"] is not None and where["name"] in kwargs:
        return kwargs[where["name"]]
    if where["position"] is not None and where["position"] < len(args):
        return args[where["position"]]
    return None


def call_of(context: dict, args: tuple, kwargs: dict) -> Call:
    """The Call a module received, gathered by its site record's `context` from its arguments."""
    return Call(*(argument(context.get(role), args, kwargs) for role in CONTEXT_NAMES),
                layer_idx=context.get("layer_idx"))


class Site(torch.nn.Module):
    """Calls `operator(x, call)` on the hidden state wherever the replaced module received it, with the rest of
    the call gathered into a `Call`, and returns the result in the replaced module's output structure (other
    tuple entries, e.g. attention weights, become None)."""

    def __init__(self, operator: torch.nn.Module, site: dict):
        super().__init__()
        self.operator = operator
        self.position, self.name = site["input"]["position"], site["input"]["name"]
        self.returns = site["output"]
        self.context = site.get("context", {})

    def forward(self, *args, **kwargs):
        x = argument({"name": self.name, "position": self.position}, args, kwargs)
        if x is None:
            raise GraftError(f"{type(self.operator).__name__}: called without its input "
                             f"(expected argument {self.name or self.position})")
        y = self.operator(x, call_of(self.context, args, kwargs))
        if self.returns["kind"] == "tensor":
            return y
        return tuple(y if i == self.returns["at"] else None for i in range(self.returns["length"]))

    def extra_repr(self) -> str:
        return f"input={self.name or self.position}, returns={self.returns['kind']}, context={sorted(self.context)}"


def record_layers(model: torch.nn.Module) -> None:
    """Write `config.graftc_layers` ({layer index: operator and its decode state}) from the model's grafted sites,
    so the config says which layer is which and `save_pretrained` keeps it."""
    config = getattr(model, "config", None)
    if config is None:
        return
    layers = {}
    for module in model.modules():
        if isinstance(module, Site) and "layer_idx" in module.context:
            state = getattr(module.operator, "decode_state", None)
            if state is not None:
                layers[str(module.context["layer_idx"])] = {"operator": type(module.operator).__name__,
                                                            "decode_state": state}
    if layers:
        config.graftc_layers = dict(sorted(layers.items(), key=lambda kv: int(kv[0])))
