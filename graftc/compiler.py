"""`graftc.compile(model, plan, example_inputs)`: the one verb. Trace -> match -> rewrite, as passes."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import fx

from graftc.errors import GraftError
from graftc.manager import GraftState, Pass, PassReport, PassResult, run_passes
from graftc.match import Region, find_regions
from graftc.plan import LOCALITY_STRATEGIES, SENSITIVITY_STRATEGY, parse_plan, select_regions
from graftc.rules import rules_by_op, set_submodule
from graftc.site import probe, record_layers
from graftc.trace import trace


@dataclass
class GraftResult:
    model: torch.nn.Module
    regions: list[Region]
    rewrites: list[dict]
    reports: list[PassReport] = field(default_factory=list)
    plan: Any = None


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Example inputs are a tuple of positional args or a dict of keyword args."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def _trace_pass(state: GraftState) -> PassResult:
    state.traced = trace(state.model, state.args, state.kwargs)
    return PassResult(False, {"nodes": len(state.traced.graph.nodes)})


def _match_pass(state: GraftState) -> PassResult:
    state.regions = find_regions(state.traced)
    if state.locality is not None and callable(state.locality):  # ranked now, on the untouched model
        state.locality = state.locality(state.model, state.regions)
    counts = {k: sum(r.kind == k for r in state.regions) for k in ("attention", "mlp", "block", "block_pair")}
    return PassResult(False, counts)


def apply_rewrite(model: torch.nn.Module, region: Region, config: BaseModel, where: str) -> dict:
    """Check the rule fits the region, build its replacement, install it. Returns the manifest record."""
    rule = rules_by_op()[config.op]
    if region.kind not in rule.kinds:
        raise GraftError(f"{where}: op '{config.op}' does not apply to {region.kind} regions "
                         f"(it replaces: {', '.join(rule.kinds)})")
    if not region.cover:
        raise GraftError(f"{where}: {region.kind} {region.index} at {region.fqn} is computed inline, "
                         "with no module boundary to rewrite at")
    reason = rule.guard(region, config)
    if reason:
        raise GraftError(f"{where}: op '{config.op}' cannot replace {region.kind} {region.index} at {region.fqn}: {reason}")
    for fqn, module in rule.build(region, config, model).items():
        set_submodule(model, fqn, module)
    return {"rule": rule.op, "fqn": region.fqn, "kind": region.kind, "index": region.index,
            "config": config.model_dump(mode="json"), "region": region.to_json()}


def _rewrite_pass(step_index: int, step) -> Pass:
    where = f"graft[{step_index}]"

    def run(state: GraftState) -> PassResult:
        done = {r["fqn"]: r for r in state.rewrites}
        order = state.locality["order"] if isinstance(state.locality, dict) else None
        sensitivity = None
        if step.select.strategy == SENSITIVITY_STRATEGY and step.select.ratio is not None and state.sensitivity:
            # measured now, on the model as the earlier steps left it, for this step's operator
            sensitivity = state.sensitivity(state.model, state.regions, step.replace)
        chosen = select_regions(step.select, state.regions, f"{where}.select", order,
                                sensitivity["order"] if sensitivity else None)
        if rules_by_op()[step.replace.op].plugs_in and any("site" not in r.attrs for r in chosen):
            probe(state.model, state.args, state.kwargs, state.regions)  # one forward, only when a rule needs it
        for region in chosen:
            if region.fqn in done:
                raise GraftError(f"{where}: {region.kind} {region.index} at {region.fqn} was already rewritten "
                                 f"by op '{done[region.fqn]['rule']}'")
            clash = _overlap(region, state.rewrites)
            if clash:  # e.g. a block pair over a block whose attention was rewritten: one would undo the other
                raise GraftError(f"{where}: {region.kind} {region.index} at {region.fqn} overlaps {clash[0]}, "
                                 f"already rewritten by op '{clash[1]['rule']}'")
            record = apply_rewrite(state.model, region, step.replace, where)
            record["step"] = step_index
            state.rewrites.append(record)
        details = {"op": step.replace.op, "kind": step.select.kind, "rewritten": [r.fqn for r in chosen]}
        if order is not None and step.select.strategy in LOCALITY_STRATEGIES:
            details["locality"] = state.locality  # what the selection was ranked by
        if sensitivity:
            details["sensitivity"] = sensitivity
        left = chosen[0].attrs.get("unpaired") if chosen else None
        if left:  # blocks the matcher could not pair (the rule's guard refused them unless told to skip)
            details["left_sequential"] = [f"{u['fqn']}: {u['reason']}" for u in left]
            warnings.warn(f"{where}: left {len(left)} block(s) sequential: " + "; ".join(details["left_sequential"]),
                          stacklevel=2)
        return PassResult(bool(chosen), details)

    return Pass(f"{where}:{step.replace.op}", run, frozenset({"regions"} | ({f"graft{step_index - 1}"} if step_index else set())),
                frozenset({f"graft{step_index}"}))


def _overlap(region: Region, rewrites: list[dict]) -> tuple[str, dict] | None:
    """A module of an earlier rewrite's cover inside (or around) this region's cover, with its record."""
    for record in rewrites:
        for done in record["region"]["cover"]:
            for fqn in region.cover:
                if fqn == done or fqn.startswith(done + ".") or done.startswith(fqn + "."):
                    return done, record
    return None


def build_passes(plan) -> list[Pass]:
    passes = [Pass("trace", _trace_pass, frozenset(), frozenset({"graph"})),
              Pass("match", _match_pass, frozenset({"graph"}), frozenset({"regions"}))]
    return passes + [_rewrite_pass(i, step) for i, step in enumerate(plan.graft)]


def compile(model: torch.nn.Module, plan, example_inputs: Any = (), progress=None, locality=None,
            sensitivity=None) -> GraftResult:
    """Rewrite `model` in place by `plan` (a Plan, a dict, or a path to YAML). `example_inputs` is a tuple of
    positional args or a dict of keyword args, used to trace the model and check every rewrite.

    `locality(model, regions) -> {"order": [...], ...}` ranks attention layers for the local-first /
    nonlocal-first strategies (the CLI measures on the model's own data, cached); by default they are ranked on
    the example inputs. `sensitivity(model, regions, replace) -> {"order": [...], ...}` ranks them for
    least-sensitive-first (``graftc.sensitivity.provider``; it needs the model's data, so there is no default)."""
    if not isinstance(plan, BaseModel):
        from graftc.plan import load_plan

        plan = parse_plan(plan) if isinstance(plan, dict) else load_plan(plan)
    state = GraftState(model.eval(), *split_inputs(example_inputs))
    if any(step.select.strategy in LOCALITY_STRATEGIES and step.select.ratio is not None for step in plan.graft):
        state.locality = locality or (lambda m, regions: _example_locality(m, regions, state.args, state.kwargs))
    state.sensitivity = sensitivity
    reports = run_passes(state, build_passes(plan), progress)
    record_layers(state.model)
    return GraftResult(state.model, state.regions, state.rewrites, reports, plan)


def _example_locality(model, regions, args, kwargs) -> dict:
    from graftc.analysis import locality_ranking

    return locality_ranking(model, [(args, kwargs)], regions, n_batches=1)


def inspect_regions(model: torch.nn.Module, example_inputs: Any = ()) -> list[Region]:
    args, kwargs = split_inputs(example_inputs)
    regions = find_regions(trace(model, args, kwargs))
    probe(model, args, kwargs, regions)
    return regions


def replay(model: torch.nn.Module, rewrites: list[dict]) -> torch.nn.Module:
    """Redo recorded rewrites on a freshly loaded base model (the manifest holds regions, no re-trace)."""
    rules = rules_by_op()
    for i, record in enumerate(rewrites):
        rule = rules.get(record.get("rule"))
        if rule is None:
            raise GraftError(f"manifest rewrite {i}: unknown rule {record.get('rule')!r} (this graftc has: {', '.join(rules)})")
        config = rule.config.model_validate(record["config"])
        apply_rewrite(model, Region.from_json(record["region"]), config, f"manifest rewrite {i}")
    record_layers(model)
    return model


def emit_code(model: torch.nn.Module, example_inputs: Any, module_fqns: list[str]) -> str:
    """The traced forward of each rewritten module (its nodes only), as Python over aten ops. Traces once."""
    traced = trace(model, *split_inputs(example_inputs))
    return "\n\n".join(_module_code(traced, fqn, type(model.get_submodule(fqn)).__name__) for fqn in module_fqns)


def _module_code(traced, module_fqn: str, class_name: str) -> str:
    inside = [n for n in traced.graph.nodes if n.op == "call_function" and module_fqn in traced.stack(n)]
    graph, env = fx.Graph(), {}

    def arg(node):
        if node not in env:
            env[node] = graph.placeholder(node.name)
        return env[node]

    for node in inside:
        env[node] = graph.node_copy(node, arg)
    outputs = [env[n] for n in inside if any(u not in inside for u in n.users)]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return f"# forward of {module_fqn} ({class_name}), traced\n" + graph.python_code("self").src.strip()
