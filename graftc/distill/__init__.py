"""Quality recovery after a rewrite: stage 1 (per-node activation distillation), then stage 2 (end-to-end).

`run` drives both stages for `graftc compile`: it makes the data, checkpoints atomically into a work folder
every `checkpoint_every` steps (and at the stage boundary), resumes from there, and measures quality where
the model family has a figure for it (FD for the demo DiT). Everything it returns is JSON for the manifest.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graftc import interrupt
from graftc.distill import checkpoint as ckpt
from graftc.distill.data import DiffusionTask
from graftc.distill.logs import Scalars, plot_losses
from graftc.distill.parallel import world as get_world
from graftc.distill.stage1 import Stage1Trainer, build_nodes
from graftc.distill.stage2 import Stage2Trainer
from graftc.errors import GraftError
from graftc.files import weights_hash
from graftc.plan import dump_plan


@dataclass
class Outcome:
    summary: dict  # manifest["distill"]: stage1 per node, stage2, timings
    quality: dict  # manifest["quality"]
    history: dict  # loss curves
    main: bool = True
    files: dict = field(default_factory=dict)  # artifact name -> path (plots, tensorboard folder)


class _Checkpoint:
    """Callable that saves the current stage's state with the run's summary so far."""

    def __init__(self, workdir: Path, every: int, fingerprint, world):
        self.workdir, self.every, self.fingerprint, self.world = workdir, every, fingerprint, world
        self.stage, self.runner, self.carry = None, None, {}

    def __call__(self, step: int) -> None:
        if not self.world.main:
            return
        tensors, state = self.runner.state()
        ckpt.save(self.workdir, f"ckpt-{self.stage}-{step:07d}", tensors,
                  {"fingerprint": self.fingerprint(), "stage": self.stage, "step": step, "state": state,
                   "carry": self.carry})

    def stop_point(self, step: int) -> None:
        """Called by the loops at each step boundary: after SIGINT/SIGTERM, save this step and stop."""
        signum = interrupt.take_pending()
        if signum is not None:
            self(step)
            raise interrupt.Interrupted(signum, f"{self.stage.replace('stage', 'stage ')} at step {step}")


def fingerprint(plan, seed: int, spec: str, weights: str) -> dict:
    """What a checkpoint is made from; --resume continues only a checkpoint made from the same."""
    return {"plan": hashlib.sha256(dump_plan(plan).encode()).hexdigest()[:16], "model": spec,
            "weights": weights[:16], "seed": seed}


def check_resume(workdir: Path, plan, seed: int, spec: str, base_hash: str) -> None:
    """Refuse a checkpoint in `workdir` made from another plan, model, weights or seed (a GraftError). The CLI
    calls it before the rewrite, so a wrong --resume costs nothing; `run` checks again."""
    state = ckpt.read_state(workdir)
    if state is not None:
        _check_fingerprint(state.get("fingerprint"), fingerprint(plan, seed, spec, base_hash), workdir)


def _check_fingerprint(made, now: dict, workdir: Path) -> None:
    what = {"plan": "plan (its sha256 prefix)", "model": "model", "weights": "model weights (their sha256 prefix)",
            "seed": "seed"}
    if not isinstance(made, dict):
        raise GraftError(f"--resume: the checkpoint in {workdir} does not record what it was made from (an older "
                         "graftc); run without --resume to start over")
    for key, label in what.items():
        if made.get(key) != now[key]:
            raise GraftError(f"--resume: the checkpoint in {workdir} was made with another {label}: "
                             f"{made.get(key)!r}, not {now[key]!r}; resume with the same plan, model and seed, "
                             "or run without --resume to start over")


def run(teacher: torch.nn.Module, student: torch.nn.Module, rewrites: list[dict], plan, loaded, task, workdir: Path,
        resume: bool, seed: int, log=print, base_hash: str | None = None, preview=None) -> Outcome:
    """`task`: the model's distillation task for `plan.data` and `seed` (graftc.families.make_task).
    `base_hash`: the teacher's weights_hash, if the caller has it already (it goes into the fingerprint).
    `preview` (graftc.samples.Grid or Continuations): drawn for the teacher, after stage 1 and at the end."""
    cfg = plan.distill
    w = get_world()
    teacher.to(w.device).eval().requires_grad_(False)
    student.to(w.device).eval()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    if cfg.stage2 is not None and cfg.stage2.snr_gamma and not isinstance(task, DiffusionTask):
        raise GraftError(f"distill.stage2.snr_gamma: {loaded.spec} is not a diffusion model, so its samples have no "
                         "noise level to weight by; remove snr_gamma")

    @functools.cache
    def made_from() -> dict:  # hashing the weights waits until a checkpoint needs it (sweeps may save none)
        return fingerprint(plan, seed, loaded.spec, base_hash or weights_hash(teacher))

    state = ckpt.load(workdir) if resume and w.main else None
    if resume and w.main and state is None:
        log(f"resume: no checkpoint in {workdir}; starting from the beginning")
    if state is not None:
        _check_fingerprint(state[0].get("fingerprint"), made_from(), workdir)
    if w.main and not resume and workdir.exists():
        shutil.rmtree(workdir)
    if w.size > 1:  # every rank resumes from what rank 0 found
        box = [state[0] if state else None]
        torch.distributed.broadcast_object_list(box)
        if box[0] is not None and not w.main:
            state = ckpt.load(workdir)
    meta, tensors = state if state else ({"stage": None, "carry": {}}, {})
    carry = meta.get("carry", {})
    quality = carry.get("quality", {})
    timings = carry.get("seconds", {})

    start = time.perf_counter()
    if w.main:
        task.prepare(teacher, log)
    w.barrier()
    if not w.main:
        task.prepare(teacher, lambda *_: None)
    timings.setdefault("data", round(time.perf_counter() - start, 2))
    scalars = Scalars(workdir / "tensorboard" if w.main else None)
    saver = _Checkpoint(workdir, cfg.checkpoint_every, made_from, w)
    # a single process stops at a step boundary on SIGINT/SIGTERM, with a checkpoint; under torchrun the ranks
    # could stop at different steps, so a signal there ends the run at once (the last periodic checkpoint stands)
    graceful = interrupt.deferred if w.size == 1 else contextlib.nullcontext
    if w.main and "teacher_fd" not in quality:
        _measure(task, teacher, quality, "teacher_fd", log)
    if w.main and preview is not None:
        preview.add("teacher", teacher)
        preview.load(workdir / "preview.safetensors")  # the row drawn after stage 1, on a resume in stage 2

    history = {"stage1": {}, "stage2": []}
    summary = {"stage1": carry.get("stage1"), "stage2": carry.get("stage2")}
    if cfg.stage1 is not None and meta["stage"] in (None, "stage1"):
        begin = time.perf_counter()
        nodes = build_nodes(student, rewrites, cfg.stage1)
        runner = Stage1Trainer(teacher, student, nodes, task, cfg.stage1, w)
        step = 0
        if meta["stage"] == "stage1":
            runner.restore(tensors, meta["state"])
            step = meta["step"]
            log(f"resume: stage 1 from step {step}")
        saver.stage, saver.runner, saver.carry = "stage1", runner, {"quality": quality, "seconds": timings}
        with graceful():
            runner.run(step, saver, scalars)
        summary["stage1"] = [n.summary() for n in nodes]
        history["stage1"] = {n.name: {"train": n.train, "val": n.val} for n in nodes}
        for n in nodes:
            if n.status == "non-finite":
                log(f"stage 1: node {n.name} ({n.record['fqn']}) stopped: {n.message}")
        timings["stage1"] = round(timings.get("stage1", 0) + time.perf_counter() - begin, 2)
        if w.main and cfg.stage2 is not None:
            _measure(task, student, quality, "stage1_fd", log)
            if preview is not None:
                preview.add("after stage 1", student)
                preview.save(workdir / "preview.safetensors")
        meta = {"stage": "stage1-done"}
    elif summary["stage1"]:
        history["stage1"] = carry.get("history1", {})
    if cfg.stage2 is not None:
        begin = time.perf_counter()
        new_modules = {fqn for r in rewrites for fqn in r["region"]["cover"]}
        student.requires_grad_(True)
        runner = Stage2Trainer(teacher, student, task, cfg.stage2, w, new_modules, trainable)
        saver.stage, saver.runner = "stage2", runner
        saver.carry = {"quality": quality, "seconds": timings, "stage1": summary["stage1"], "history1": history["stage1"]}
        step = 0
        if meta["stage"] == "stage2":
            runner.restore(tensors, meta["state"])
            step = meta["step"]
            log(f"resume: stage 2 from step {step}")
        else:
            saver(0)  # the stage boundary: a resume never repeats stage 1
        with graceful():
            runner.run(step, saver, scalars)
        summary["stage2"] = {"steps": cfg.stage2.steps, "steps_run": len(runner.curve) and runner.curve[-1][0],
                             "final_loss": runner.curve[-1][1] if runner.curve else None,
                             "objective": runner.weights, "lora": cfg.stage2.lora is not None,
                             "message": runner.message}
        history["stage2"] = runner.curve
        timings["stage2"] = round(timings.get("stage2", 0) + time.perf_counter() - begin, 2)
    student.requires_grad_(False).eval()
    scalars.close()
    if w.main:
        _measure(task, student, quality, "graft_fd", log)
        if cfg.stage2 is None and "graft_fd" in quality:  # the final model is the stage-1 model
            quality["stage1_fd"] = quality["graft_fd"]
    if w.main and preview is not None:
        preview.add("final", student)
        timings["samples"] = round(preview.seconds, 2)
    summary["seconds"] = timings
    files = {}
    if w.main:
        if preview is not None:
            files.update(preview.files(workdir))
        png = workdir / "losses.png"
        if plot_losses(history, png):
            files["losses.png"] = png
        if (workdir / "tensorboard").is_dir():
            files["tensorboard"] = workdir / "tensorboard"
    return Outcome(summary, quality, history, w.main, files)


def _measure(task, model, quality: dict, key: str, log) -> None:
    begin = time.perf_counter()
    model.eval()
    value = task.quality(model)
    if value is not None:
        quality[key] = round(float(value), 4)
        log(f"quality: {key} = {value:.4g} ({time.perf_counter() - begin:.1f}s)")
