"""The one verb behind `graftc.compile(model, plan, example_inputs)`: trace -> match -> rewrite, as passes.

Ranked strategies (local-first, least-sensitive-first, ...) read rankings handed in as data (graftc.rankings); the
compiler measures nothing itself."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import fx

from graftc.errors import GraftError
from graftc.manager import GraftState, Pass, PassReport, PassResult, run_passes
from graftc.match import find_regions
from graftc.passes import rules_by_op
from graftc.plan import RANKED_STRATEGIES, load_plan, parse_plan, select_regions
from graftc.region import Region
from graftc.rules import set_submodule
from graftc.site import probe, record_layers
from graftc.trace import split_inputs, trace


@dataclass
class GraftResult:
    model: torch.nn.Module
    regions: list[Region]
    rewrites: list[dict]
    reports: list[PassReport] = field(default_factory=list)
    plan: Any = None


def _trace_pass(state: GraftState) -> PassResult:
    state.traced = trace(state.model, state.args, state.kwargs)
    return PassResult(False, {"nodes": len(state.traced.graph.nodes)})


def _match_pass(state: GraftState) -> PassResult:
    state.regions = find_regions(state.traced)
    for name, ranking in state.rankings.items():  # the rankings measured once: now, on the untouched model
        if not ranking.per_step:
            state.ranked[name] = ranking(state.model, state.regions)
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
    reason = rule.check(region, config)
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
        name, ranking = _ranking_for(step, state)
        chosen = select_regions(step.select, state.regions, f"{where}.select", ranking["order"] if ranking else None)
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
        if ranking:
            details[name] = ranking  # what the selection was ranked by
        left = chosen[0].attrs.get("unpaired") if chosen else None
        if left:  # blocks the matcher could not pair (the rule's guard refused them unless told to skip)
            details["left_sequential"] = [f"{u['fqn']}: {u['reason']}" for u in left]
            warnings.warn(f"{where}: left {len(left)} block(s) sequential: " + "; ".join(details["left_sequential"]),
                          stacklevel=2)
        return PassResult(bool(chosen), details)

    return Pass(f"{where}:{step.replace.op}", run, frozenset({"regions"} | ({f"graft{step_index - 1}"} if step_index else set())),
                frozenset({f"graft{step_index}"}))


def _ranking_for(step, state: GraftState) -> tuple[str | None, dict | None]:
    """The ranking a step's ranked strategy selects by (name, ranking), if it has one and was handed in."""
    if step.select.ratio is None or step.select.strategy not in RANKED_STRATEGIES:
        return None, None
    name = RANKED_STRATEGIES[step.select.strategy][0]
    ranking = state.rankings.get(name)
    if ranking is not None and ranking.per_step:  # measured now, on the model as the earlier steps left it
        return name, ranking(state.model, state.regions, step.replace)
    return name, state.ranked.get(name)


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


def graft(model: torch.nn.Module, plan, example_inputs: Any = (), rankings: dict | None = None,
          progress=None) -> GraftResult:
    """Rewrite `model` in place by `plan` (a Plan, a dict, or a path to YAML). `example_inputs` is a tuple of
    positional args or a dict of keyword args, used to trace the model and check every rewrite. `rankings`:
    {name: graftc.rankings.Ranking} for the ranked strategies (plan.RANKED_STRATEGIES names the one each reads);
    a ranked step without its ranking is refused."""
    if not isinstance(plan, BaseModel):
        plan = parse_plan(plan) if isinstance(plan, dict) else load_plan(plan)
    state = GraftState(model.eval(), *split_inputs(example_inputs))
    used = {RANKED_STRATEGIES[step.select.strategy][0] for step in plan.graft
            if step.select.ratio is not None and step.select.strategy in RANKED_STRATEGIES}
    state.rankings = {name: ranking for name, ranking in (rankings or {}).items() if name in used}
    reports = run_passes(state, build_passes(plan), progress)
    record_layers(state.model)
    return GraftResult(state.model, state.regions, state.rewrites, reports, plan)


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
