"""`graftc sweep`: which graft to make. Every candidate plan (op x ratio x strategy) is rewritten and given a
short stage 1; candidates are ranked by how far the grafted model's output then is from the teacher's
(end-to-end validation MSE after stage 1; the per-node stage-1 validation losses are kept too) against their
FLOPs and latency, and the Pareto front (lower error and lower FLOPs) is drawn and its plans written out.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import yaml

from graftc import rankings
from graftc.distill.speed import compare
from graftc.errors import GraftError
from graftc.metrics import output_error
from graftc.plan import parse_plan
from graftc.trial import held_out, trial_graft, trial_plan
from graftc.spec import load_model

DEFAULT_OPS = ("hyena_x", "hyena_y", "swa", "linear")
DEFAULT_RATIOS = (0.25, 0.5)
DEFAULT_STRATEGIES = ("interleaved", "local-first")


def candidate_plan(op: str, ratio: float, strategy: str, steps: int, batch_size: int, data: dict) -> dict:
    return trial_plan([{"select": {"kind": "attention", "ratio": ratio, "strategy": strategy}, "replace": {"op": op}}],
                      steps, batch_size, data)


def pareto(rows: list[dict], x: str = "gflops", y: str = "output_mse") -> list[dict]:
    """Rows no other row beats on both x and y (lower is better), sorted by x."""
    front = [r for r in rows if not any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in rows)]
    return sorted(front, key=lambda r: r[x])


def sweep(spec: str, ops, ratios, strategies, steps: int, batch_size: int, data: dict, seed: int = 0,
          log=print) -> list[dict]:
    base = load_model(spec, seed=seed)
    task = None  # the validation inputs every candidate is judged on: made (or read from the cache) once
    rows = []
    for op in ops:
        for ratio in ratios:
            for strategy in strategies:
                name = f"{op}-{int(round(ratio * 100))}-{strategy}"
                raw = candidate_plan(op, ratio, strategy, steps, batch_size, data)
                plan = parse_plan(raw, name)
                trial = trial_graft(base, base.model, plan, seed, rankings.for_model(base, plan, seed, log))
                teacher, student, result = trial.teacher, trial.student, trial.result
                if task is None:
                    task = held_out(base, plan.data, seed, teacher)
                speed = compare(teacher, student, base)
                nodes = trial.outcome.summary["stage1"]
                row = {"name": name, "op": op, "ratio": ratio, "strategy": strategy,
                       "layers": [r["index"] for r in result.rewrites],
                       "output_mse": output_error(task, teacher, student, batch_size),
                       "stage1_val": sum(n["best_val"] for n in nodes),
                       "gflops": result.reports[-1].flops_after / 1e9,
                       "teacher_gflops": result.reports[0].flops_before / 1e9,
                       "latency_ms": speed["graft_ms"], "teacher_ms": speed["teacher_ms"],
                       "plan": raw}
                rows.append(row)
                log(f"{name}: layers {row['layers']}, output MSE {row['output_mse']:.4g}, "
                    f"stage-1 val {row['stage1_val']:.4g}, {row['gflops']:.4g} GFLOPs, {row['latency_ms']:.2f} ms")
    return rows


def write_sweep(rows: list[dict], folder: Path) -> list[dict]:
    """plans/ (the Pareto front's plans), sweep.json, pareto.png and report.md into `folder`; returns the front."""
    front = pareto(rows)
    (folder / "plans").mkdir(parents=True)
    for r in front:
        plan = {k: v for k, v in r["plan"].items() if k != "distill"}  # the chosen graft; distill to taste
        (folder / "plans" / f"{r['name']}.yaml").write_text(
            f"# graftc sweep: Pareto-optimal ({r['output_mse']:.4g} output MSE after a short stage 1, "
            f"{r['gflops']:.4g} GFLOPs)\n" + yaml.safe_dump(plan, sort_keys=False))
    (folder / "sweep.json").write_text(json.dumps({"candidates": rows, "front": [r["name"] for r in front]}, indent=2))
    _plot(rows, front, folder / "pareto.png")
    lines = ["# graftc sweep", "", "Each candidate: rewrite, then a short stage 1; error = mean squared difference of "
             "the model's output from the teacher's on held-out inputs. Front: no other candidate has both lower "
             "error and fewer FLOPs.", "", "| candidate | layers | output MSE | stage-1 val (sum) | GFLOPs | ms | front |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["output_mse"]):
        lines.append(f"| {r['name']} | {r['layers']} | {r['output_mse']:.4g} | {r['stage1_val']:.4g} | "
                     f"{r['gflops']:.4g} | {r['latency_ms']:.2f} | {'yes' if r in front else ''} |")
    lines += ["", "![Pareto front](pareto.png)"]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return front


def _plot(rows, front, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend: no display needed

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        ax.scatter([r["gflops"] for r in mine], [r["output_mse"] for r in mine], label=op, s=30)
    ax.plot([r["gflops"] for r in front], [r["output_mse"] for r in front], "k--", lw=1, label="Pareto front")
    for r in front:
        ax.annotate(r["name"], (r["gflops"], r["output_mse"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GFLOPs per forward (example inputs)")
    ax.set_ylabel("output MSE vs teacher after stage 1")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise GraftError(f"{what}: expected a comma-separated list (got {text!r})") from None
    if not values:
        raise GraftError(f"{what}: empty list")
    return values
