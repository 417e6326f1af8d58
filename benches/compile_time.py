"""Time to load, trace, match and rewrite a full-size DiT-XL/2 (28 blocks, width 1152, random weights)
with a 50% attention + 100% mlp plan. Prints a table and writes JSON.

    python benches/compile_time.py [--config DiT-XL/2] [--json benches/results/compile_time.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from graftc.compiler import build_passes
from graftc.manager import GraftState, run_passes
from graftc.plan import parse_plan
from graftc.spec import load_model

PLAN = {"version": 1, "graft": [
    {"select": {"kind": "attention", "ratio": 0.5}, "replace": {"op": "self", "init": "random"}},
    {"select": {"kind": "mlp", "layers": "all"}, "replace": {"op": "mlp", "ratio": 3}},
]}
TARGET_S = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="DiT-XL/2")
    ap.add_argument("--json", default="benches/results/compile_time.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    loaded = load_model(f"dit:{args.config}")
    load_s = time.perf_counter() - start
    state = GraftState(loaded.model, loaded.args, loaded.kwargs)
    start = time.perf_counter()
    reports = run_passes(state, build_passes(parse_plan(PLAN)))
    total_s = time.perf_counter() - start
    rows = [("load (excluded)", load_s)] + [(r.name, r.seconds) for r in reports]
    # run_passes also measures the model once before the first pass (params/FLOPs baseline)
    rows.append(("baseline measure + manager", total_s - sum(r.seconds for r in reports)))
    print(f"{args.config}: {reports[0].params_before / 1e6:.1f}M -> {reports[-1].params_after / 1e6:.1f}M params, "
          f"{len(state.rewrites)} rewrites, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'stage':<28}{'seconds':>10}")
    for name, sec in rows:
        print(f"{name:<28}{sec:>10.2f}")
    print(f"{'trace+match+rewrite':<28}{total_s:>10.2f}   target <= {TARGET_S:.0f} s: "
          f"{'met' if total_s <= TARGET_S else 'MISSED'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "stages": dict(rows), "trace_match_rewrite_s": total_s, "target_s": TARGET_S,
                               "rewrites": len(state.rewrites)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
