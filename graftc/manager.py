"""The pass manager: passes declare what they require and guarantee; the manager orders them, runs them,
lints the model and re-measures params/FLOPs (shape propagation on fake tensors) after each one."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch
from torch.utils._pytree import tree_flatten

from graftc.errors import GraftError, one_line
from graftc.region import Region
from graftc.trace import describe_failure


@dataclass
class GraftState:
    """Everything passes read and write. The model is the user's own object, rewritten in place."""

    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    traced: Any = None
    regions: list[Region] = field(default_factory=list)
    rewrites: list[dict] = field(default_factory=list)  # what was done: rule, fqn, resolved config, region
    signature: list = field(default_factory=list)  # output shapes/dtypes the model must keep
    rankings: dict = field(default_factory=dict)  # name -> graftc.rankings.Ranking, for the ranked strategies
    ranked: dict = field(default_factory=dict)  # name -> ranking measured once, on the untouched model


@dataclass
class PassResult:
    modified: bool
    report: dict = field(default_factory=dict)


@dataclass
class Pass:
    name: str
    run: Callable[[GraftState], PassResult]
    requires: frozenset = frozenset()
    guarantees: frozenset = frozenset()


@dataclass
class PassReport:
    name: str
    seconds: float
    modified: bool
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    details: dict = field(default_factory=dict)


def order_passes(passes: list[Pass]) -> list[Pass]:
    """Topological order by requires/guarantees, keeping the given order where there is a choice."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(passes)))
    for i, p in enumerate(passes):
        for need in p.requires:
            providers = [j for j, q in enumerate(passes) if need in q.guarantees]
            if not providers:
                raise GraftError(f"pass {p.name} requires '{need}', which no pass guarantees")
            graph.add_edges_from((j, i) for j in providers if j != i)
    try:
        return [passes[i] for i in nx.lexicographical_topological_sort(graph)]
    except nx.NetworkXUnfeasible:
        raise GraftError("passes require each other in a cycle") from None


def run_passes(state: GraftState, passes: list[Pass], progress: Callable[[str], None] | None = None) -> list[PassReport]:
    reports, done, established = [], [], set()
    cost = measure_cost(state)
    for p in order_passes(passes):
        missing = p.requires - established
        if missing:
            raise GraftError(f"pass {p.name} needs {sorted(missing)} (passes run: {', '.join(done) or 'none'})")
        if progress:
            progress(p.name)
        start = time.perf_counter()
        try:
            result = p.run(state)
        except GraftError as exc:
            after = f" [in pass {p.name}, after {', '.join(done)}]" if done else f" [in pass {p.name}]"
            raise GraftError(f"{exc}{after}") from None
        report = PassReport(p.name, 0.0, result.modified, cost[0], cost[0], cost[1], cost[1], result.report)
        if result.modified:
            cost = lint(state, p.name)
            report.params_after, report.flops_after = cost
        report.seconds = time.perf_counter() - start
        established |= p.guarantees
        done.append(p.name)
        reports.append(report)
    return reports


def fake_forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, int]:
    """One shape-only forward on fake tensors: (output, forward FLOPs). Hooks on the model still fire."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(*args, **kwargs)
    return out, counter.get_total_flops()


def _fake_forward(state: GraftState) -> tuple[list, int, int]:
    """Output signature, parameter count and forward FLOPs of the model as it is."""
    out, flops = fake_forward(state.model, state.args, state.kwargs)
    leaves = [(tuple(x.shape), x.dtype) for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    return leaves, sum(p.numel() for p in state.model.parameters()), flops


def measure_cost(state: GraftState) -> tuple[int, int]:
    """(parameters, forward FLOPs) of the model as it is; records the output signature it must keep."""
    try:
        signature, params, flops = _fake_forward(state)
    except GraftError:
        raise
    except Exception as exc:  # e.g. data-dependent control flow: the model cannot be traced either
        raise GraftError(f"cannot trace {type(state.model).__name__}: {describe_failure(exc)}") from None
    state.signature = signature
    return params, flops


def lint(state: GraftState, after: str) -> tuple[int, int]:
    """Re-propagate shapes through the whole rewritten model: it must run and keep its output signature."""
    for record in state.rewrites:
        for fqn in record["region"]["cover"]:
            try:
                state.model.get_submodule(fqn)
            except AttributeError:
                raise GraftError(f"lint after {after}: module {fqn} rewritten by rule {record['rule']} is gone") from None
    try:
        signature, params, flops = _fake_forward(state)
    except Exception as exc:
        raise GraftError(f"lint after {after}: the rewritten model no longer runs: {one_line(exc)}") from None
    if signature != state.signature:
        raise GraftError(f"lint after {after}: outputs changed from {state.signature} to {signature}")
    return params, flops
