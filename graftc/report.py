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


def report_markdown(spec: str, result) -> str:
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
    lines += ["", "## Distillation", "", "None: the plan asked for rewriting only."]
    return "\n".join(lines) + "\n"


def _pct(before: int, after: int) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "n/a"
