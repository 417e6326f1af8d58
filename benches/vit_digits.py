"""A ViT grafted with swa2d, distilled on real images, judged by top-1 agreement with its teacher.

The teacher is the test zoo's ViT (tests/zoo.py: image 16, patch 4 -> a class token + 4 x 4 patches, width 32)
at --depth layers, trained here on the digits' training images (graftc.families.images: scikit-learn's digits
scaled to 16 x 16; the held-out fifth is never trained on) and saved with save_pretrained. Then, through the CLI
as a user would run it, the plan below is compiled three ways — rewrite only, stage 1, stage 1 + stage 2 — and
each artifact goes through `graftc eval` (top-1 agreement, logits MSE and each model's digit accuracy on the
held-out images).

    python benches/vit_digits.py                  # depth 6, 50% swa2d kernel 3 (interleaved)
    python benches/vit_digits.py --kernel 1 --depth 2 --teacher-steps 300
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import graftc  # noqa: E402,F401  (before transformers: graftc.kernels must be importable first)
from graftc.cli import main  # noqa: E402
from graftc.families import make_task  # noqa: E402
from graftc.plan import parse_plan  # noqa: E402
from graftc.spec import load_model  # noqa: E402
from tests import zoo  # noqa: E402


def train_teacher(folder: Path, depth: int, steps: int) -> float:
    """Train the zoo ViT on the digits' training images; returns the final training loss."""
    model = zoo.make_vit(depth=depth).train()
    zoo._save(model, folder)  # the config, so the task sees the model's image size
    task = make_task(load_model(str(folder)), parse_plan({"version": 1}).data, seed=0)
    task.prepare(None, log=lambda line: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        batch = task.batch("teacher", step, 64)
        loss = F.cross_entropy(model(**batch.kwargs).logits, batch.target["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    zoo._save(model.eval(), folder)
    return loss.item()


def run_cli(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    if code != 0:
        raise SystemExit(f"graftc {' '.join(args)} exited {code}")
    return out.getvalue()


def main_(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--stage1", type=int, default=200)
    parser.add_argument("--stage2", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", default=str(ROOT / "benches" / "results" / "vit_digits.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="graftc-vit-bench-"))
    try:
        teacher = work / "teacher"
        begin = time.perf_counter()
        loss = train_teacher(teacher, args.depth, args.teacher_steps)
        print(f"teacher: depth {args.depth}, {args.teacher_steps} steps, final loss {loss:.3f} "
              f"({time.perf_counter() - begin:.0f}s)")
        graft = [{"select": {"kind": "attention", "ratio": args.ratio},
                  "replace": {"op": "swa2d", "kernel": args.kernel}}]
        stage1 = {"steps": args.stage1, "batch_size": 32, "lr": 3e-3}
        stage2 = {"steps": args.stage2, "batch_size": 32, "lr": 1e-3, "warmup": 20}
        variants = {"rewrite only": {}, f"stage 1 ({args.stage1})": {"distill": {"stage1": stage1}},
                    f"stage 1 + stage 2 ({args.stage2})": {"distill": {"stage1": stage1, "stage2": stage2}}}
        rows = []
        for name, extra in variants.items():
            plan, out = work / "plan.json", work / "out"
            plan.write_text(json.dumps({"version": 1, "graft": graft, **extra}))
            shutil.rmtree(out, ignore_errors=True)
            begin = time.perf_counter()
            run_cli(["compile", str(teacher), str(plan), "-o", str(out)])
            seconds = time.perf_counter() - begin
            result = json.loads(run_cli(["eval", str(out), "--json"]))
            a, models = result["agreement"], result["models"]
            rows.append({"variant": name, "top1_agreement": a["top1_agreement"], "logits_mse": a["mse"],
                         "cosine": a["cosine"], "teacher_accuracy": models["teacher"].get("top1_accuracy"),
                         "graft_accuracy": models["graft"].get("top1_accuracy"), "images": a["inputs"],
                         "rewritten": [r["fqn"] for r in json.loads((out / "manifest.json").read_text())["rewrites"]],
                         "compile_s": round(seconds, 1)})
        print(f"{'variant':32} {'top-1 agreement':>16} {'logits MSE':>11} {'teacher acc':>12} {'graft acc':>10}")
        for r in rows:
            print(f"{r['variant']:32} {r['top1_agreement']:16.2%} {r['logits_mse']:11.4g} "
                  f"{r['teacher_accuracy']:12.2%} {r['graft_accuracy']:10.2%}")
        print(f"on {rows[0]['images']} held-out digits; rewritten: {', '.join(rows[0]['rewritten'])}")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_()
