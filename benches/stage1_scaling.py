"""Stage-1 wall time per step as the number of distilled nodes grows: one teacher pass serves every node.

For each model, a plan replaces 50% of the attention layers (interleaved) with Hyena-X; stage 1 then trains
the first k of those nodes, for k = 1, 2, 4 and all (k larger than the plan's node count is skipped). Every
step is one teacher forward with the nodes' forward+backward inside its hooks, plus each node's optimizer
step. The k's are timed side by side: each repetition runs one step of every k in turn and the median is
reported, so machine load hits them alike. The ideal ratio (all vs one) is (teacher + all nodes) /
(teacher + one node) in FLOPs, counted by FlopCounterMode with a node's forward+backward at 3x its forward.

    python benches/stage1_scaling.py                 # demo DiT and a DiT-XL/2-shaped model with 8 blocks
    python benches/stage1_scaling.py --reps 3 --models demo
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import graftc
from graftc.distill.data import Batch
from graftc.distill.parallel import World
from graftc.distill.stage1 import Stage1Trainer, build_nodes
from graftc.models.dit import build_dit, example_inputs
from graftc.plan import parse_plan

MODELS = {
    "demo": dict(name="tiny", batch=64),  # the demo DiT: 6 blocks, width 128, 16 tokens
    "dit-xl2-8blocks": dict(name="DiT-XL/2", depth=8, batch=2),  # width 1152, 16 heads, 256 tokens
}
PLAN = {"version": 1, "graft": [{"select": {"kind": "attention", "ratio": 0.5}, "replace": {"op": "hyena_x"}}],
        "distill": {"stage1": {"steps": 1000000, "batch_size": 1, "eval_every": 1000000}}}


class FixedTask:
    """One fixed batch: the benchmark measures compute, not data."""

    def __init__(self, batch: Batch):
        self.fixed = batch

    def val_batches(self, size):
        return []


def setup(spec: dict, k: int):
    torch.manual_seed(0)
    overrides = {key: v for key, v in spec.items() if key in ("depth",)}
    teacher = build_dit(spec["name"], **overrides).eval()
    for p in teacher.parameters():  # break adaLN-Zero's zero gates so every block does real work
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    student = copy.deepcopy(teacher)
    plan = parse_plan(PLAN)
    inputs = example_inputs(teacher, batch_size=spec["batch"])
    rewrites = graftc.compile(student, plan, inputs).rewrites
    nodes = build_nodes(student, rewrites[:k], plan.distill.stage1)
    runner = Stage1Trainer(teacher, student, nodes, FixedTask(Batch(inputs, {})), plan.distill.stage1, World())
    return runner, len(rewrites), inputs


def one_step(runner: Stage1Trainer, step: int) -> float:
    begin = time.perf_counter()
    for n in runner.nodes:
        n.pending = 0.0
    runner.teacher_pass(runner.task.fixed, runner.nodes, train=True)
    for n in runner.nodes:
        runner._step(n, step)
    return time.perf_counter() - begin


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bench(model: str, spec: dict, reps: int) -> list[dict]:
    _, total, inputs = setup(spec, 1)
    ks = sorted({k for k in (1, 2, 4) if k < total} | {total})
    runners = {k: setup(spec, k)[0] for k in ks}
    one = runners[ks[0]]
    with torch.no_grad():
        teacher_flops = flops_of(lambda: one.teacher(*inputs))
    node_flops = {}
    for k, r in runners.items():  # forward+backward of the nodes inside the hooks ~ 3x their forward
        with torch.no_grad():
            node_flops[k] = flops_of(lambda r=r: r.teacher_pass(Batch(inputs, {}), r.nodes, train=False)) - teacher_flops
    times = {k: [] for k in ks}
    for rep in range(reps + 1):
        for k in (ks if rep % 2 else ks[::-1]):
            t = one_step(runners[k], rep)
            if rep:  # the first round warms up
                times[k].append(t)
    base = statistics.median(times[ks[0]])
    rows = []
    for k in ks:
        med = statistics.median(times[k])
        ideal = (teacher_flops + 3 * node_flops[k]) / (teacher_flops + 3 * node_flops[ks[0]])
        rows.append({"model": model, "nodes": k, "of": total, "batch": spec["batch"], "s_per_step": round(med, 4),
                     "vs_one_node": round(med / base, 3), "flop_ideal_vs_one": round(ideal, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stage1_scaling_cpu.json"))
    args = parser.parse_args()
    rows = [row for m in args.models for row in bench(m, MODELS[m], args.reps)]
    header = f"{'model':<18}{'nodes':>8}{'batch':>7}{'s/step':>10}{'vs 1 node':>11}{'FLOP-ideal':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}{str(r['nodes']) + '/' + str(r['of']):>8}{r['batch']:>7}{r['s_per_step']:>10.4f}"
              f"{r['vs_one_node']:>10.2f}x{r['flop_ideal_vs_one']:>11.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
