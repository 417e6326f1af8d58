"""graftc's command line. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import copy
import errno
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from graftc import analysis, artifact, evaluate, rankings, samples, sweep
from graftc.compiler import emit_code, graft
from graftc.distill import check_resume
from graftc.distill import run as run_distill
from graftc.distill.speed import compare
from graftc.errors import GraftError
from graftc.families import make_task
from graftc.families.transformers import is_causal_lm, text_tokenizer
from graftc.files import to_device, write_atomic_dir
from graftc.interrupt import Interrupted, interruptible
from graftc.match import inspect_regions
from graftc.plan import RANKED_STRATEGIES, dump_plan, json_schema, load_plan, parse_plan, ranked_layers
from graftc.report import artifact_report, human, regions_table
from graftc.spec import load_model, weights_hash


def _inspect(args) -> int:
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
    plan = load_plan(args.plan)  # validated before any model is loaded
    out = Path(args.output)
    with artifact.out_lock(out):  # a second compile into the same OUT meanwhile exits 2 at once
        return _compile_locked(args, plan, out)


def _compile_locked(args, plan, out) -> int:
    artifact.check_out_dir(out, args.force or args.resume)
    workdir = run_dir(out)
    start = time.perf_counter()
    loaded = load_model(args.model, seed=args.seed)
    base_hash = weights_hash(loaded.model)
    if args.resume and plan.distill is not None:  # a checkpoint of another plan or model: refused before any work
        check_resume(workdir, plan, args.seed, args.model, base_hash)
    note(f"loaded {args.model} ({type(loaded.model).__name__}) in {time.perf_counter() - start:.1f}s")
    # the rewrite is in place: the teacher is kept for distillation, and for samples.png / continuations
    teacher = copy.deepcopy(loaded.model) if plan.distill is not None or samples.applies(loaded) else None
    result = graft(loaded.model, plan, loaded.example, rankings.for_model(loaded, plan, args.seed, log=note),
                   progress=lambda name: note(f"  pass {name}"))
    if args.emit_code:
        print(emit_code(result.model, loaded.example, list(dict.fromkeys(r["fqn"] for r in result.rewrites))) + "\n")
    first, last = result.reports[0], result.reports[-1]
    print(f"rewrote {len(result.rewrites)} regions; params {human(first.params_before)} -> {human(last.params_after)}, "
          f"FLOPs {human(first.flops_before)} -> {human(last.flops_after)}")
    distill = quality = files = None
    preview = samples.preview(loaded, plan.data, args.seed, log=print)  # None for models with neither
    if plan.distill is not None:
        outcome = run_distill(teacher, result.model, result.rewrites, plan, loaded, make_task(loaded, plan.data, args.seed),
                              workdir, args.resume, args.seed, log=lambda line: print(line, flush=True),
                              base_hash=base_hash, preview=preview)
        if not outcome.main:  # under torchrun only rank 0 writes the artifact
            return 0
        distill, quality, files = outcome.summary, outcome.quality, outcome.files
        distill["speed"] = compare(teacher, result.model, loaded)
        _print_quality(quality, distill["speed"])
    elif preview is not None:
        preview.add("teacher", teacher)
        preview.add("graft", result.model)
        files = preview.files(workdir)
    report = artifact_report(args.model, result, distill, quality, preview.markdown() if preview else None)
    artifact.save(out, result, args.model, base_hash, report,
                  force=True, distill=distill, quality=quality, files=files)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def run_dir(out: Path) -> Path:
    """Where `graftc compile` keeps the checkpoints of an unfinished distillation into `out`."""
    return out.parent / f".{out.name}.graftc-run"


def _resume_hint(args) -> str:
    """After an interrupted compile with a checkpoint to continue from: the command that continues it."""
    if args.command != "compile" or not (run_dir(Path(args.output)) / "state.json").is_file():
        return ""
    command = ["graftc", "compile", args.model, args.plan, "-o", args.output, "--resume"]
    command += ["--seed", str(args.seed)] if args.seed else []
    return f"; to continue: {shlex.join(command)}"


def _print_quality(quality: dict, speed: dict) -> None:
    if "teacher_fd" in quality and "graft_fd" in quality:
        after1 = f", after stage 1 alone {quality['stage1_fd']:.4g}" if "stage1_fd" in quality else ""
        print(f"quality (FD, lower is better): teacher {quality['teacher_fd']:.4g}, graft {quality['graft_fd']:.4g}{after1}")
    print(f"speed ({speed['where']}): teacher {speed['teacher_ms']:.2f} ms, graft {speed['graft_ms']:.2f} ms "
          f"per forward ({speed['speedup']:.2f}x)")


def _sweep(args) -> int:
    ops = sweep.parse_list(args.ops, "--ops")
    ratios = sweep.parse_list(args.ratios, "--ratios", float)
    strategies = sweep.parse_list(args.strategies, "--strategies")
    data = {"samples": args.samples, "sampler_steps": args.sampler_steps, "cfg_scale": 1.0, "fd_samples": 0,
            "cache": args.cache, "text": args.text}
    for op in ops:  # every candidate is a valid plan before any model is loaded
        for ratio in ratios:
            for strategy in strategies:
                parse_plan(sweep.candidate_plan(op, ratio, strategy, args.steps, args.batch_size, data),
                           f"sweep candidate {op}/{ratio}/{strategy}")
    out = Path(args.output)
    artifact.check_out_dir(out, args.force)
    rows = sweep.sweep(args.model, ops, ratios, strategies, args.steps, args.batch_size, data, args.seed,
                       log=lambda line: print(line, flush=True))
    front = write_atomic_dir(out, lambda tmp: sweep.write_sweep(rows, tmp))
    print("Pareto front (fewer FLOPs, lower error): " + ", ".join(r["name"] for r in front))
    print(f"wrote {out}")
    return 0


def _verify(args) -> int:
    info = artifact.verify_artifact(args.artifact)
    print(f"{args.artifact}: ok (format {info['format']}; model.safetensors {info['bytes']} bytes, "
          f"sha256 {info['sha256']} as recorded)")
    return 0


def _plan_schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _analyze(args) -> int:
    ks = analysis.parse_ks(args.ks)  # validated before any model is loaded
    windows = analysis.parse_ks(args.windows, "--windows")
    if any(w < 1 or w % 2 == 0 for w in windows):
        raise GraftError(f"--windows: 2D window sizes must be odd positive integers like 3,5,7 (got {args.windows!r})")
    for name in ("batches", "batch_size", "samples", "block"):
        if getattr(args, name) < 1:
            raise GraftError(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(args, name)})")
    if args.samples < 2:
        raise GraftError(f"--samples: must be at least 2 (got {args.samples})")
    out = Path(args.output)
    artifact.check_out_dir(out, args.force)
    if args.emit_plan:  # the plan's op, ratio and strategy are checked before any model is loaded
        emit = emitted_plan(args.op, args.ratio, args.strategy, None)
        artifact.check_out_dir(Path(args.emit_plan), args.force)
    loaded = load_model(args.model, seed=args.seed)
    if args.device != "cpu":
        if args.device.startswith("cuda") and not torch_cuda():
            raise GraftError(f"--device {args.device}: no CUDA device is available")
        loaded.model.to(args.device)
    data = parse_plan({"version": 1}).data.model_copy(update={
        "samples": args.samples, "fd_samples": 0, "text": args.text, "seq_len": args.seq_len, "cache": args.cache})
    task = make_task(loaded, data, args.seed)
    task.prepare(loaded.model, log=note)
    regions = inspect_regions(loaded.model, to_device(loaded.example, next(loaded.model.parameters()).device))
    note(f"analyzing {args.model}: {args.batches} batch(es) of {args.batch_size}")
    result = analysis.analyze(loaded.model, task, ks, regions=regions, windows=windows, block=args.block,
                              n_batches=args.batches, batch_size=args.batch_size, progress=note)
    result = {"model": args.model, "family": loaded.family, "seed": args.seed, "batch_size": args.batch_size, **result}
    write_atomic_dir(out, lambda tmp: analysis.write_analysis(result, tmp))
    if result["attention"]:
        k = analysis.default_k(result)
        print(f"L_{k} per attention layer: " + ", ".join(f"{a['index']}: {a['band_mass'][str(k)]:.3f}"
                                                         for a in result["attention"]))
        print(f"most local first (k={k}): {analysis.layer_order(result, k)}")
    print(f"wrote {out}")
    if args.emit_plan:
        order = analysis.layer_order(result, analysis.default_k(result)) if result["attention"] else None
        emit = emitted_plan(args.op, args.ratio, args.strategy, order)
        artifact.write_text(Path(args.emit_plan), emit)
        print(f"wrote {args.emit_plan}")
    return 0


def emitted_plan(op: str, ratio: float, strategy: str, order: list[int] | None) -> str:
    """A plan replacing `ratio` of the attention layers by `op`. Locality strategies are resolved into explicit
    layer indices (so the plan stands on its own); the others stay as ratio + strategy. Validated here."""
    select = {"kind": "attention", "ratio": ratio, "strategy": strategy}
    if RANKED_STRATEGIES.get(strategy, ("",))[0] == "locality" and order is not None:
        select = {"kind": "attention", "layers": ranked_layers(strategy, order, max(1, round(ratio * len(order))))}
    plan = parse_plan({"version": 1, "graft": [{"select": select, "replace": {"op": op}}]}, "--emit-plan")
    header = f"# emitted by graftc analyze: {op} in {ratio:g} of the attention layers, {strategy}\n"
    return header + dump_plan(plan)


def _eval(args) -> int:
    # weights and reference are read and checked here, before any model is loaded
    extractor = evaluate.parse_features(args.features, reference=args.reference, cache=args.cache, log=note)
    if args.samples < 4:
        raise GraftError(f"--samples: must be at least 4 (got {args.samples})")
    if args.steps < 1:
        raise GraftError(f"--steps: must be at least 1 (got {args.steps})")
    if args.cfg < 0:
        raise GraftError(f"--cfg: must be at least 0 (got {args.cfg})")
    for name in ("context", "new_tokens", "sentences"):
        if getattr(args, name) < 1:
            raise GraftError(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(args, name)})")
    if args.output:
        artifact.check_parent(Path(args.output))
    columns = samples.parse_columns(args.grid) if args.grid is not None else None
    if columns:
        artifact.check_parent(Path(args.grid_out))
    target = Path(args.target)
    if target.is_dir() and (target / "manifest.json").is_file():  # an artifact: its base model is the teacher
        base = artifact.read_manifest(target).get("base", {}).get("spec", "")
        teacher_spec = args.teacher or base
        loaded = load_model(teacher_spec, seed=args.seed)
        graft = artifact.load(target, model=copy.deepcopy(loaded.model))  # the base, loaded once
        teacher = {"name": "teacher", "spec": teacher_spec, "model": loaded.model}
        student = {"name": "graft", "spec": str(target), "model": graft}
    elif args.teacher:
        loaded = load_model(args.target, seed=args.seed)
        teacher = {"name": "teacher", "spec": args.teacher, "model": load_model(args.teacher, seed=args.seed).model}
        student = {"name": "graft", "spec": args.target, "model": loaded.model}
    else:
        loaded = load_model(args.target, seed=args.seed)
        teacher, student = None, {"name": "teacher", "spec": args.target, "model": loaded.model}
    note(f"evaluating {args.target} ({loaded.family})")
    grid = samples.eval_grid(loaded, target, columns, args.steps, args.cfg, args.seed, log=note) if columns else None
    for entry in (teacher, student) if grid else ():
        grid.add(entry["name"], entry["model"])
    result = evaluate.evaluate(student, teacher, loaded, extractor, args.samples, args.steps, args.cfg, args.seed,
                               text=args.text, cache=args.cache, log=note, context=args.context,
                               new_tokens=args.new_tokens, sentences=args.sentences)
    result = {"target": args.target, "teacher": teacher["spec"] if teacher else None, "family": loaded.family, **result}
    if grid is not None:
        Path(args.grid_out).parent.mkdir(parents=True, exist_ok=True)
        if grid.write(Path(args.grid_out)):
            result["grid"] = args.grid_out
            note(f"wrote {args.grid_out}")
    if args.output:
        artifact.write_text(Path(args.output), json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else evaluate.table(result))
    return 0


def _chat(args) -> int:
    """Greedy answer of a causal LM (a MODEL spec or an artifact) to one prompt, with the tokenizer's chat
    template, streamed to stdout as it is decoded."""
    if not args.prompt.strip():
        raise GraftError("PROMPT: empty; give the text to answer")
    if args.max_new_tokens < 1:
        raise GraftError(f"--max-new-tokens: must be at least 1 (got {args.max_new_tokens})")
    target = Path(args.model)
    if target.is_dir() and (target / "manifest.json").is_file():  # an artifact: rebuilt on its base model
        loaded = load_model(artifact.read_manifest(target).get("base", {}).get("spec", ""), seed=args.seed)
        model = artifact.load(target, model=loaded.model)
    else:
        loaded = load_model(args.model, seed=args.seed)
        model = loaded.model
    if not is_causal_lm(model):
        raise GraftError(f"{args.model}: chat needs a causal language model (this is a {type(model).__name__})")
    tokenizer = text_tokenizer(loaded)
    if tokenizer is None:
        raise GraftError(f"{args.model}: the model has no tokenizer to chat with")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    else:  # a base model: continue the prompt
        note(f"{args.model}: the tokenizer has no chat template; continuing the prompt as plain text")
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    from transformers import TextStreamer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False,
                       pad_token_id=pad, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return 0


def torch_cuda() -> bool:
    return torch.cuda.is_available()


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
    a = sub.add_parser("analyze", help="measure attention locality (band mass L_k) and activation statistics")
    a.add_argument("model", help="MODEL spec (see inspect)")
    a.add_argument("-o", "--output", required=True, help="folder to create: analysis.json, PNG plots, report.md")
    a.add_argument("--force", action="store_true", help="replace OUT if it exists")
    a.add_argument("--batches", type=int, default=4, help="input batches to average over")
    a.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    a.add_argument("--ks", default="1,2,4,8,16,32", help="band half-widths k for L_k, comma-separated")
    a.add_argument("--windows", default="3,5,7,9", help="odd k x k window sizes on the token grid (image models)")
    a.add_argument("--samples", type=int, default=64, help="diffusion models: teacher samples to generate (cached)")
    a.add_argument("--text", help="language models and encoders: a text file, a folder of .txt files, or "
                                 "corpus:NAME (graftc.text: pydoc, the default, or stdlib)")
    a.add_argument("--seq-len", type=int, default=128, help="language models: tokens per sample")
    a.add_argument("--cache", help="sample cache folder (default: $GRAFTC_CACHE or ~/.cache/graftc)")
    a.add_argument("--block", type=int, default=256, help="query rows per attention block (memory bound)")
    a.add_argument("--device", default="cpu", help="torch device to run the model on (cpu, cuda, ...)")
    a.add_argument("--seed", type=int, default=0, help="seed for samples, timesteps and random inits")
    a.add_argument("--emit-plan", metavar="PLAN", help="also write a plan YAML choosing layers by --op/--ratio/--strategy")
    a.add_argument("--op", default="hyena_x", help="--emit-plan: the attention replacement (default hyena_x)")
    a.add_argument("--ratio", type=float, default=0.5, help="--emit-plan: share of attention layers (default 0.5)")
    a.add_argument("--strategy", default="local-first", help="--emit-plan: local-first | nonlocal-first | "
                                                             "least-sensitive-first | interleaved | first | last "
                                                             "(default local-first)")
    a.set_defaults(run=_analyze)
    e = sub.add_parser("eval", help="evaluate a model or artifact: FD/sFID/IS/precision/recall, agreement, cost")
    e.add_argument("target", help="an artifact directory (its base model is the teacher) or a MODEL spec")
    e.add_argument("--teacher", help="MODEL spec of the teacher (default: the artifact's base model)")
    e.add_argument("--samples", type=int, default=1000, help="diffusion models: samples to generate")
    e.add_argument("--steps", type=int, default=25, help="diffusion models: DDIM sampler steps")
    e.add_argument("--cfg", type=float, default=1.0, help="diffusion models: classifier-free guidance scale")
    e.add_argument("--seed", type=int, default=0, help="seed for samples, inputs and random inits")
    e.add_argument("--features", default="demo", help="feature extractor: demo (the digit network) | inception:PATH "
                                                       "(Inception-v3 from a local .safetensors/.pth weights file: "
                                                       "pytorch-fid's FID weights or torchvision's)")
    e.add_argument("--reference", metavar="REF.npz", help="diffusion models: reference data, an .npz holding mu/sigma "
                                                         "(FD), mu_s/sigma_s (sFID) and/or uint8 images arr_0 "
                                                         "[N, H, W, 3] (default: the digits, for the demo's 8x8 images)")
    e.add_argument("--text", help="language models and encoders: a text file or a folder of .txt files (agreement)")
    e.add_argument("--context", type=int, default=128, help="causal LMs: held-out prompt tokens before the "
                                                            "decode-speed measurement (default 128)")
    e.add_argument("--new-tokens", type=int, default=32, help="causal LMs: greedy tokens decoded with the cache, "
                                                              "timed (default 32)")
    e.add_argument("--sentences", type=int, default=512, help="encoders: held-out sentences for embedding cosine "
                                                              "and retrieval (default 512)")
    e.add_argument("--cache", help="cache folder: the agreement inputs (default: a temporary folder) and the digits' "
                                   "Inception features (default: $GRAFTC_CACHE or ~/.cache/graftc)")
    e.add_argument("--grid", metavar="N", help="image models: also write a grid of samples, teacher row above graft "
                                               "row from the same noise, N columns (one class or prompt each)")
    e.add_argument("--grid-out", metavar="PNG", default="samples.png", help="where --grid writes (default samples.png)")
    e.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    e.add_argument("-o", "--output", help="also write the JSON object to this file")
    e.set_defaults(run=_eval)
    h = sub.add_parser("chat", help="stream a causal LM's greedy answer to a prompt (the tokenizer's chat template)")
    h.add_argument("model", help="an artifact directory or a MODEL spec (a causal LM with a tokenizer)")
    h.add_argument("prompt", help="the user's message")
    h.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    h.add_argument("--seed", type=int, default=0, help="seed for randomly initialized models")
    h.set_defaults(run=_chat)
    w = sub.add_parser("sweep", help="short stage 1 for a grid of candidate plans; Pareto front of error vs FLOPs")
    w.add_argument("model", help="MODEL spec (see inspect)")
    w.add_argument("-o", "--output", required=True, help="folder to create: sweep.json, pareto.png, report.md, plans/")
    w.add_argument("--force", action="store_true", help="replace OUT if it exists")
    w.add_argument("--ops", default="hyena_x,hyena_y,swa,linear", help="attention replacements, comma-separated")
    w.add_argument("--ratios", default="0.25,0.5", help="shares of attention layers, comma-separated")
    w.add_argument("--strategies", default="interleaved,local-first", help="layer choices, comma-separated")
    w.add_argument("--steps", type=int, default=150, help="stage-1 steps per candidate")
    w.add_argument("--batch-size", type=int, default=32, help="stage-1 batch size")
    w.add_argument("--samples", type=int, default=256, help="diffusion models: teacher samples (cached, shared)")
    w.add_argument("--sampler-steps", type=int, default=25, help="diffusion models: sampler steps per sample")
    w.add_argument("--text", help="language models and encoders: a text file, a folder of .txt files, or "
                                 "corpus:NAME (graftc.text: pydoc, the default, or stdlib)")
    w.add_argument("--cache", help="data cache folder (default: $GRAFTC_CACHE or ~/.cache/graftc)")
    w.add_argument("--seed", type=int, default=0, help="seed")
    w.set_defaults(run=_sweep)
    v = sub.add_parser("verify", help="check an artifact: its format and the sha256 of its manifest and weights")
    v.add_argument("artifact", help="artifact directory (written by graftc compile)")
    v.set_defaults(run=_verify)
    sch = sub.add_parser("plan-schema", help="print the plan's JSON Schema")
    sch.set_defaults(run=_plan_schema)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        with interruptible():  # SIGTERM too unwinds (temporary files are removed) instead of killing the process
            return args.run(args)
    except GraftError as exc:
        print(f"graftc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk on a write path with no message of its own: still one line
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(f"graftc: error: cannot write {exc.filename or 'a file'}: {exc.strerror}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"graftc: {exc}{_resume_hint(args)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graftc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
