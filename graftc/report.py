"""Human-readable summaries: the region table of `inspect` and the artifact's report.md."""
from __future__ import annotations


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def regions_table(regions) -> str:
    rows = [("kind", "index", "fqn", "params", "FLOPs", "cover / details")]
    for r in regions:
        detail = ", ".join(f"{k}={v}" for k, v in r.attrs.items() if k in ("pattern", "heads", "kv_heads", "hidden"))
        rows.append((r.kind, str(r.index), r.fqn, human(r.params), human(r.flops), detail or ", ".join(r.cover)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def artifact_report(spec: str, result, distill: dict | None = None, quality: dict | None = None,
                    preview: list[str] | None = None) -> str:
    """`preview`: markdown lines of graftc.samples (teacher and graft samples or greedy continuations)."""
    first, last = result.reports[0], result.reports[-1]
    lines = [f"# graftc report: {spec}", "",
             f"- parameters: {first.params_before:,} -> {last.params_after:,} "
             f"({_pct(first.params_before, last.params_after)})",
             f"- forward FLOPs at the example inputs: {human(first.flops_before)} -> {human(last.flops_after)} "
             f"({_pct(first.flops_before, last.flops_after)})", "",
             "## Rewrites", "", "| step | op | kind | index | module | config |", "|---|---|---|---|---|---|"]
    for r in result.rewrites:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "op")
        lines.append(f"| {r['step']} | {r['rule']} | {r['kind']} | {r['index']} | `{r['fqn']}` | {cfg} |")
    lines += ["", "## Passes", "", "| pass | s | params before | after | FLOPs before | after |", "|---|---|---|---|---|---|"]
    for p in result.reports:
        lines.append(f"| {p.name} | {p.seconds:.2f} | {p.params_before:,} | {p.params_after:,} | "
                     f"{human(p.flops_before)} | {human(p.flops_after)} |")
    lines += ["", "## Distillation", ""] + (distill_markdown(distill, quality) if distill else
                                            ["None: the plan asked for rewriting only."])
    if preview:
        lines += [""] + preview
    return "\n".join(lines) + "\n"


def distill_markdown(distill: dict, quality: dict | None) -> list[str]:
    lines = []
    if quality:
        names = {"teacher_fd": "teacher", "stage1_fd": "graft after stage 1", "graft_fd": "graft (final)"}
        lines += ["Sample quality (Fréchet distance to the data in the demo feature space, lower is better):", "",
                  "| model | FD |", "|---|---|"] + [f"| {names.get(k, k)} | {v:.4g} |" for k, v in quality.items()] + [""]
    if distill.get("stage1"):
        lines += ["### Stage 1: activation distillation", "",
                  "| node | module | loss | lr | steps | status | train loss | val before | best val (step) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
        for n in distill["stage1"]:
            status = n["status"] + (f": {n['message']}" if n["message"] else "")
            lines.append(f"| {n['name']} | `{n['fqn']}` | {n['loss']} | {n['lr']:.3g} | {n['steps_run']}/{n['steps']} | "
                         f"{status} | {fmt(n['train_loss'])} | {fmt(n['val_before'])} | {fmt(n['best_val'])} ({n['best_step']}) |")
        lines.append("")
    if distill.get("stage2"):
        s2 = distill["stage2"]
        objective = " + ".join(f"{w:g}·{k}" for k, w in s2["objective"].items())
        lines += ["### Stage 2: end-to-end fine-tuning", "",
                  f"- objective {objective}{' (LoRA)' if s2['lora'] else ''}; {s2['steps_run']}/{s2['steps']} steps; "
                  f"final loss {s2['final_loss']:.4g}" if s2["final_loss"] is not None else "- no step completed"]
        if s2.get("message"):
            lines.append(f"- {s2['message']}")
        lines.append("")
    if distill.get("seconds"):
        lines.append("Wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in distill["seconds"].items()))
        lines.append("")
    lines.append("![loss curves](losses.png)")
    return lines


def _pct(before: int, after: int) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "n/a"
