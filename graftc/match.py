"""Find regions (attention, mlp, block) in a traced graph.

Pipeline: match pattern graphs (graftc.patterns) looking through layout ops -> complete each match into a
region (projections, the exact node set, shapes, params, FLOPs) -> place it on the smallest set of user
modules that compute exactly that region (its *cover*), which is where rewrites happen.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import fx

from graftc.patterns import PATTERNS, Pattern
from graftc.region import Region
from graftc.site import probe
from graftc.trace import Traced, _clean_fqn, split_inputs, trace

# Ops that move or re-type data without mixing it: the matcher looks through them.
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias", "expand",
    "unsqueeze", "squeeze", "flatten", "unflatten", "to", "_to_copy", "type_as", "dropout", "detach",
    "lift_fresh_copy", "_assert_tensor_metadata", "unbind", "select", "getitem",
}
ACTIVATIONS = {"gelu", "silu", "relu", "sigmoid", "tanh", "mish", "hardswish", "elu", "leaky_relu", "quick_gelu"}
GEMMS = {"linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "scaled_dot_product_attention", "conv1d",
         "conv2d", "conv3d", "convolution", "einsum"}
ALIASES = {"bmm": "matmul", "mm": "matmul", "_softmax": "softmax", "_safe_softmax": "softmax"}
COMMUTATIVE = {"mul", "add"}


def op_name(node) -> str:
    """Canonical op of a node: aten overload packet name with aliases folded, activations as 'act'."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return ""
    target = node.target
    name = getattr(getattr(target, "_overloadpacket", None), "__name__", None) or getattr(target, "__name__", str(target))
    name = ALIASES.get(name.rstrip("_") if name.endswith("_") and name != "_" else name, name)
    return "act" if name in ACTIVATIONS else name


def is_look_through(node) -> bool:
    name = op_name(node)
    if name in LAYOUT_OPS:
        return True
    # scaling by a Python number (attention scale, GELU constants) changes no structure
    return name in ("mul", "div") and len(node.args) == 2 and not isinstance(node.args[1], fx.Node)


def resolve(node):
    while isinstance(node, fx.Node) and is_look_through(node):
        node = node.args[0]
    return node


def _match(p: fx.Node, t, binds: dict) -> bool:
    if p.op == "placeholder":
        role = p.meta["binds"]
        if role in binds:
            return binds[role] is t
        binds[role] = t
        return True
    if not isinstance(t, fx.Node) or op_name(p) != op_name(t):
        return False
    orders = [tuple(t.args)]
    if op_name(p) in COMMUTATIVE and len(t.args) >= 2:
        orders.append((t.args[1], t.args[0], *t.args[2:]))
    for targs in orders:
        trial = dict(binds)
        if len(targs) >= len(p.args) and all(
            not isinstance(pa, fx.Node) or _match(resolve(pa), resolve(ta), trial) for pa, ta in zip(p.args, targs)
        ):
            binds.update(trial)
            return True
    return False


def match_pattern(pattern: Pattern, traced: Traced) -> list[tuple[fx.Node, dict]]:
    """All (anchor, bindings) where the pattern's output computation occurs in the traced graph."""
    out = next(n for n in pattern.graph.nodes if n.op == "output")
    anchor = resolve(out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0])
    found = []
    for node in traced.graph.nodes:
        binds: dict = {}
        if op_name(node) == op_name(anchor) and _match(anchor, node, binds):
            found.append((node, binds))
    return found


def _shape(node) -> list[int]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return [int(s) for s in getattr(val, "shape", [])]


def _reach(starts: Iterable[fx.Node], step) -> set[fx.Node]:
    seen, todo = set(), list(starts)
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _forward(starts: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(starts, lambda n: n.users)


def _backward(ends: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(ends, lambda n: n.all_input_nodes)


def _feeding_linears(node: fx.Node, limit: int = 2) -> list[fx.Node] | None:
    """Linears reached walking back from `node` through non-GEMM ops; None if another GEMM is hit first."""
    found, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        name = op_name(n)
        if name == "linear":
            found.append(n)
            if len(found) > limit:
                return None
        elif name in GEMMS:
            if _positional(n):
                continue  # e.g. a rotary table's inv_freq @ positions (transformers 5.17): no activation in it
            return None
        else:
            todo.extend(n.all_input_nodes)
    return found


def _positional(gemm: fx.Node) -> bool:
    """A GEMM of a module buffer (reached through shape and dtype ops only) with something else: the position
    tables of rotary embeddings, not a product of activations."""
    for operand in gemm.all_input_nodes:
        n = operand
        while n.op == "call_function" and op_name(n) in ("expand", "float", "_to_copy", "to", "unsqueeze", "view",
                                                          "reshape", "clone", "contiguous", "slice", "select"):
            n = n.args[0]
        if n.op == "get_attr" or (n.op == "placeholder" and n.name.startswith("b_")):  # torch.export's buffers
            return True
    return False


def _next_linears(node: fx.Node) -> list[fx.Node]:
    found, seen, todo = [], set(), list(node.users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if op_name(n) == "linear":
            found.append(n)
        elif op_name(n) not in GEMMS:
            todo.extend(n.users)
    return found


def _gemm_flops(node: fx.Node) -> int:
    """Multiply-adds x2 of the GEMM-like ops, from traced shapes; elementwise work is ignored."""
    name = op_name(node)
    out = _shape(node)
    if not out:
        return 0
    numel = 1
    for s in out:
        numel *= s
    if name == "linear":
        return 2 * numel * _shape(node.args[0])[-1]
    if name == "matmul":
        return 2 * numel * _shape(node.args[0])[-1]
    if name == "scaled_dot_product_attention":
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 4 * numel // q[-1] * k[-2] * q[-1] if q and k else 0
    return 0


class _Builder:
    """Turns pattern matches into regions for one traced graph."""

    def __init__(self, traced: Traced):
        self.t = traced
        self.order = {n: i for i, n in enumerate(traced.graph.nodes)}
        self.members: dict[str, set[fx.Node]] = defaultdict(set)  # module fqn -> its nodes
        for n in traced.graph.nodes:
            for m in traced.stack(n):
                self.members[m].add(n)

    # -- completing a match into a region -------------------------------------------------------
    def attention(self, anchor: fx.Node, binds: dict, pattern: str) -> Region | None:
        proj = {}
        for role in ("q", "k", "v"):
            lin = _feeding_linears(binds[role], limit=1)
            if not lin or len(lin) != 1:
                return None
            proj[role] = lin[0]
        inputs = {proj[r].args[0] for r in "qkv"}
        if len(inputs) != 1:
            return None  # cross-attention (k/v from another stream) is not a self-attention region
        outs = _next_linears(anchor)
        if len(outs) != 1:
            return None
        proj["o"] = outs[0]
        out = _shape(anchor)  # [batch, heads, tokens, head_dim] for every core pattern
        heads, head_dim = (out[1], out[-1]) if len(out) == 4 else (1, out[-1])
        k_width = _shape(proj["k"])[-1]
        if proj["q"] is proj["k"]:  # fused qkv: q is heads*head_dim wide, k and v share the rest
            k_width = (k_width - heads * head_dim) // 2
        attrs = {"pattern": pattern, "heads": heads, "kv_heads": k_width // head_dim,
                 "head_dim": head_dim, "masked": "mask" in binds or len(anchor.args) > 3
                 or anchor.kwargs.get("attn_mask") is not None, "causal": bool(anchor.kwargs.get("is_causal", False))}
        if proj["q"] is proj["k"]:
            roles = {"qkv": self.t.module(proj["q"]), "o": self.t.module(proj["o"])}
        else:
            roles = {r: self.t.module(n) for r, n in proj.items()}
        return self._region("attention", proj["q"].args[0], proj["o"], roles, attrs)

    def mlp(self, anchor: fx.Node, binds: dict, pattern: str) -> Region | None:
        x = binds["x"]
        if len(_shape(x)) < 3:
            return None  # embedders on [batch, features] are not token-mixing MLP layers
        roles = {}
        for role, param in binds.items():
            if role.startswith("w_"):
                lin = next((u for u in param.users if op_name(u) == "linear" and u.args[1] is param), None)
                if lin is None:
                    return None
                roles[role] = self.t.module(lin)
        w_in = binds.get("w_in", binds.get("w_up"))
        attrs = {"pattern": pattern, "width": _shape(x)[-1], "hidden": _shape(w_in)[0]}
        return self._region("mlp", x, anchor, roles, attrs)

    def _region(self, kind, inp: fx.Node, out: fx.Node, roles, attrs) -> Region | None:
        live = _forward([inp])  # everything the region's input reaches
        nodes = (live & _backward([out])) | {out}
        nodes = {n for n in nodes if n.op == "call_function"}
        fqn = self._common_module(nodes)
        cover = self._cover(fqn, nodes, live) or []
        params = set()
        for n in nodes:
            for a in n.all_input_nodes:
                p = self.t.param_fqn(a)
                if p is not None:
                    params.add(a)
        numel = sum(_numel(p) for p in params)
        flops = sum(_gemm_flops(n) for n in nodes)
        region = Region(kind, -1, fqn, cover, roles, numel, flops, _shape(inp), _shape(out), attrs)
        region.attrs["first_node"] = min(self.order[n] for n in nodes)
        return region

    def _common_module(self, nodes) -> str:
        stacks = [self.t.stack(n) for n in nodes]
        common = min(stacks, key=len)
        for s in stacks:
            i = 0
            while i < len(common) and i < len(s) and common[i] == s[i]:
                i += 1
            common = common[:i]
        return common[-1]

    def _cover(self, module: str, part: set, live: set) -> list[str] | None:
        """Modules computing exactly `part`: `module` itself if nothing else it computes depends on the
        region's input (except identity ops on its output), else recurse into its children."""
        inside = self.members[module]
        if part <= inside and all(n in part or is_look_through(n) for n in inside & live):
            return [module]
        by_child: dict[str, set] = defaultdict(set)
        for n in part:
            stack = self.t.stack(n)
            depth = stack.index(module)
            if depth + 1 < len(stack):
                by_child[stack[depth + 1]].add(n)
            elif not is_look_through(n):
                return None  # real computation inline in `module`'s forward: no module boundary fits
        covers = []
        for child in sorted(by_child, key=lambda c: min(self.order[n] for n in by_child[c])):
            sub = self._cover(child, by_child[child], live)
            if sub is None:
                return None
            covers += sub
        return covers


def _numel(node: fx.Node) -> int:
    n = 1
    for s in _shape(node):
        n *= s
    return n


def find_regions(traced: Traced) -> list[Region]:
    """Every attention, mlp and block region, each kind indexed in execution order."""
    b = _Builder(traced)
    found: dict[str, dict[int, Region]] = {"attention": {}, "mlp": {}}
    for pattern in PATTERNS:
        complete = b.attention if pattern.kind == "attention" else b.mlp
        for anchor, binds in match_pattern(pattern, traced):
            region = complete(anchor, binds, pattern.name)
            if region is not None:
                found[pattern.kind].setdefault(b.order[anchor], region)
    attention = [found["attention"][k] for k in sorted(found["attention"])]
    mlps = [found["mlp"][k] for k in sorted(found["mlp"])]
    blocks = _blocks(attention, mlps, b)
    in_block = {m.fqn for blk in blocks for m in mlps if _within(m.fqn, blk.fqn)}
    mlps = [m for m in mlps if m.fqn in in_block]  # e.g. timestep or caption embedders are not layers
    pairs = _block_pairs(blocks, b)
    regions = []
    for kind, items in (("attention", attention), ("mlp", mlps), ("block", blocks), ("block_pair", pairs)):
        for i, r in enumerate(items):
            r.index = i
            r.attrs.pop("first_node", None)
            regions.append(r)
    return regions


def inspect_regions(model: torch.nn.Module, example_inputs: Any = ()) -> list[Region]:
    """The regions of `model` (traced on `example_inputs`), each with its call site recorded (graftc.site)."""
    args, kwargs = split_inputs(example_inputs)
    regions = find_regions(trace(model, args, kwargs))
    probe(model, args, kwargs, regions)
    return regions


def _within(fqn: str, module: str) -> bool:
    return module == "" or fqn == module or fqn.startswith(module + ".")


def _blocks(attention: list[Region], mlps: list[Region], b: _Builder) -> list[Region]:
    """A block is the smallest module holding exactly one attention region and at least one mlp region."""
    blocks = []
    for att in attention:
        parts = att.fqn.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            module = ".".join(parts[:depth])
            n_att = sum(_within(a.fqn, module) for a in attention)
            if n_att > 1:
                break
            inner = [m for m in mlps if _within(m.fqn, module)]
            if inner:
                members = {n for n in b.members[module] if n.op == "call_function"}
                params = {a for n in members for a in n.all_input_nodes if b.t.param_fqn(a) is not None}
                blocks.append(Region(
                    "block", -1, module, [module], {"attention": att.fqn, "mlp": inner[0].fqn},
                    params=sum(_numel(p) for p in params), flops=sum(_gemm_flops(n) for n in members),
                    input_shape=att.input_shape, output_shape=att.input_shape,
                    attrs={"first_node": min(b.order[n] for n in members)}))
                break
    return blocks


def _block_pairs(blocks: list[Region], b: _Builder) -> list[Region]:
    """Pairs of consecutive blocks (i, i+1) that depth->width can fuse, found from dataflow, greedily in order.

    The block-level graph (networkx) has one vertex per block and one for everything outside the blocks; an edge
    carries the values flowing between them. Blocks i and i+1 pair when i has exactly one output (its residual
    stream), only i+1 reads it, i+1 reads nothing else from any block, and the rest of what i+1 reads is what i
    reads besides its hidden state (conditioning such as timestep/class embeddings, text states, rotary tables:
    shared). Every block left out gets a reason: in its own attrs (`unpaired`) and, model-wide, in every pair's
    attrs (`unpaired`: [{block, fqn, reason}]), so a plan can refuse or skip them knowingly.
    """
    import networkx as nx

    owner: dict[fx.Node, int] = {}
    members: list[set] = []
    for i, blk in enumerate(blocks):
        inside = {n for n in b.members[blk.fqn] if n.op == "call_function"}
        members.append(inside)
        for n in inside:
            owner.setdefault(n, i)
    outside = "outside"
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(blocks)))
    graph.add_node(outside)
    reads: list[set] = []  # per block: the non-parameter values it reads from outside itself
    outputs: list[list] = []  # per block: its values read outside it
    for i, inside in enumerate(members):
        ext = {a for n in inside for a in n.all_input_nodes if a not in inside and b.t.param_fqn(a) is None}
        reads.append(ext)
        for a in ext:
            src = owner.get(a, outside)
            graph.add_edge(src, i)
            graph.edges[src, i].setdefault("values", set()).add(a)
        outs = sorted((n for n in inside if any(u not in inside for u in n.users)), key=b.order.__getitem__)
        outputs.append(outs)
        for n in outs:
            for u in n.users:
                if u not in inside:
                    dst = owner.get(u, outside)
                    graph.add_edge(i, dst)
                    graph.edges[i, dst].setdefault("values", set()).add(n)
                    graph.edges[i, dst].setdefault("readers", set()).add(u)

    def where(node: fx.Node) -> str:
        if node in owner:
            return blocks[owner[node]].fqn
        if node.op == "output":
            return "the model's outputs"
        return b.t.module(node) or "the top level"

    def problem(i: int) -> str | None:
        """Why blocks i and i+1 cannot pair, or None."""
        first, j = blocks[i], i + 1
        if j == len(blocks):
            return f"it is the last block and has no following block to pair with (odd depth {len(blocks)})"
        second = blocks[j]
        for k in (i, j):
            if len(outputs[k]) != 1:
                names = ", ".join(n.name for n in outputs[k][:3])
                return f"{blocks[k].fqn} has {len(outputs[k])} values read outside it ({names}): side outputs"
        out = outputs[i][0]
        later = [dst for dst in graph.successors(i) if dst != j]
        if later:
            readers = sorted(graph.edges[i, later[0]]["readers"], key=b.order.__getitem__)
            return (f"its output is also read outside {second.fqn} (by {op_name(readers[0]) or readers[0].op} in "
                    f"{where(readers[0])}), so the blocks are not adjacent in the dataflow")
        if j not in graph.successors(i):
            return f"{second.fqn} does not read its output"
        others = [src for src in graph.predecessors(j) if src not in (i, outside)]
        if others:
            return f"{second.fqn} also reads the output of {blocks[others[0]].fqn}"
        cond = reads[j] - {out}
        extra = sorted(cond - reads[i], key=b.order.__getitem__)
        if extra:
            return (f"{second.fqn} reads {extra[0].name} (from {where(extra[0])}), which {first.fqn} does not: "
                    "the two blocks are not conditioned alike")
        hidden = reads[i] - cond
        if len(hidden) != 1:
            return f"{first.fqn} reads {len(hidden)} values {second.fqn} does not; expected exactly one hidden state"
        x = next(iter(hidden))
        if _shape(x) != _shape(out):
            return f"its output {_shape(out)} does not have its input's shape {_shape(x)}: no residual stream"
        ca, cb = _module_class(b, first.fqn), _module_class(b, second.fqn)
        if ca != cb:
            return f"{first.fqn} ({ca}) and {second.fqn} ({cb}) are different module classes"
        return None

    pairs, unpaired, i = [], [], 0
    while i < len(blocks):
        reason = problem(i)
        if reason is None:
            first, second = blocks[i], blocks[i + 1]
            x = next(iter(reads[i] - (reads[i + 1] - {outputs[i][0]})))
            params = {a for n in members[i] | members[i + 1] for a in n.all_input_nodes if b.t.param_fqn(a) is not None}
            pairs.append(Region(
                "block_pair", -1, first.fqn, [first.fqn, second.fqn], {"first": first.fqn, "second": second.fqn},
                params=sum(_numel(p) for p in params), flops=first.flops + second.flops,
                input_shape=_shape(x), output_shape=_shape(outputs[i + 1][0]),
                attrs={"blocks": [i, i + 1], "conditioning": len(reads[i]) - 1}))
            first.attrs["pair"] = second.attrs["pair"] = len(pairs) - 1
            i += 2
        else:
            unpaired.append({"block": i, "fqn": blocks[i].fqn, "reason": reason})
            blocks[i].attrs["unpaired"] = reason
            i += 1
    for pair in pairs:
        pair.attrs["unpaired"] = unpaired
    return pairs


def _module_class(b: _Builder, fqn: str) -> str:
    for n in b.members[fqn]:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            if _clean_fqn(path) == fqn:
                return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return "?"
