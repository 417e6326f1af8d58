"""graftc's command line. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import json
import sys
import time

from graftc.errors import GraftError


def _inspect(args) -> int:
    from graftc.compiler import inspect_regions
    from graftc.report import regions_table
    from graftc.spec import load_model

    loaded = load_model(args.model, seed=args.seed)
    regions = inspect_regions(loaded.model, loaded.example)
    if args.json:
        print(json.dumps([{"index": r.index, "kind": r.kind, "fqn": r.fqn, "params": r.params, "flops": r.flops,
                           "cover": r.cover, "roles": r.roles, **r.attrs} for r in regions], indent=2))
    else:
        print(regions_table(regions))
    return 0


def note(line: str) -> None:
    """Progress for a person watching: only on a terminal, so that on bad input stderr is the one error line."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        print(line, file=sys.stderr)


def _compile(args) -> int:
    import copy
    import shutil
    from pathlib import Path

    from graftc import artifact
    from graftc.compiler import compile as graft, emit_code
    from graftc.plan import load_plan
    from graftc.report import human, report_markdown
    from graftc.spec import load_model, weights_hash

    plan = load_plan(args.plan)  # validated before any model is loaded
    out = Path(args.output)
    artifact.check_out_dir(out, args.force or args.resume)
    workdir = out.parent / f".{out.name}.graftc-run"  # checkpoints of an unfinished distillation
    start = time.perf_counter()
    loaded = load_model(args.model, seed=args.seed)
    base_hash = weights_hash(loaded.model)
    note(f"loaded {args.model} ({type(loaded.model).__name__}) in {time.perf_counter() - start:.1f}s")
    teacher = copy.deepcopy(loaded.model) if plan.distill is not None else None
    result = graft(loaded.model, plan, loaded.example, progress=lambda name: note(f"  pass {name}"))
    if args.emit_code:
        print(emit_code(result.model, loaded.example, list(dict.fromkeys(r["fqn"] for r in result.rewrites))) + "\n")
    first, last = result.reports[0], result.reports[-1]
    print(f"rewrote {len(result.rewrites)} regions; params {human(first.params_before)} -> {human(last.params_after)}, "
          f"FLOPs {human(first.flops_before)} -> {human(last.flops_after)}")
    distill = quality = files = None
    if plan.distill is not None:
        from graftc.distill import run as run_distill
        from graftc.distill.speed import compare

        outcome = run_distill(teacher, result.model, result.rewrites, plan, loaded, workdir, args.resume, args.seed,
                              log=lambda line: print(line, flush=True))
        if not outcome.main:  # under torchrun only rank 0 writes the artifact
            return 0
        distill, quality, files = outcome.summary, outcome.quality, outcome.files
        distill["speed"] = compare(teacher, result.model, loaded)
        _print_quality(quality, distill["speed"])
    artifact.save(out, result, args.model, base_hash, report_markdown(args.model, result, distill, quality),
                  force=True, distill=distill, quality=quality, files=files)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def _print_quality(quality: dict, speed: dict) -> None:
    if "teacher_fd" in quality and "graft_fd" in quality:
        after1 = f", after stage 1 alone {quality['stage1_fd']:.4g}" if "stage1_fd" in quality else ""
        print(f"quality (FD, lower is better): teacher {quality['teacher_fd']:.4g}, graft {quality['graft_fd']:.4g}{after1}")
    print(f"speed ({speed['where']}): teacher {speed['teacher_ms']:.2f} ms, graft {speed['graft_ms']:.2f} ms "
          f"per forward ({speed['speedup']:.2f}x)")


def _plan_schema(args) -> int:
    from graftc.plan import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graftc", description="Graft new operators into pretrained transformers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("inspect", help="list the attention, mlp and block regions of a model")
    s.add_argument("model", help="MODEL spec: a save_pretrained dir, timm:NAME, python:MOD:FN, demo:NAME, dit:CFG[:CKPT]")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--seed", type=int, default=0, help="seed for randomly initialized models")
    s.set_defaults(run=_inspect)
    c = sub.add_parser("compile", help="apply a plan and write the artifact")
    c.add_argument("model", help="MODEL spec (see inspect)")
    c.add_argument("plan", help="plan YAML (see plan-schema)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to create")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT (for distillation; a rewrite-only compile is redone)")
    c.add_argument("--seed", type=int, default=0, help="seed for random inits")
    c.add_argument("--emit-code", action="store_true", help="print the traced forward of every rewritten module")
    c.set_defaults(run=_compile)
    sch = sub.add_parser("plan-schema", help="print the plan's JSON Schema")
    sch.set_defaults(run=_plan_schema)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except GraftError as exc:
        print(f"graftc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graftc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
