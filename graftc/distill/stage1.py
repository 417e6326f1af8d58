"""Stage 1: activation distillation. Every rewritten node learns from the same teacher forward pass.

Hooks on the teacher capture each replaced module's input and output; the student's new module is called
on the *teacher's* input (teacher-input injection) and regressed onto the teacher's output, inside the hook,
so its graph is freed before the teacher moves on: no node holds more than its current batch. The rest of
the student is frozen. Each node has its own AdamW, learning-rate schedule, validation loss, best weights
and early stop; a node whose loss turns non-finite stops alone and keeps its best weights.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graftc.distill import checkpoint as ckpt
from graftc.distill.data import Batch, Task, first_tensor, real_tokens
from graftc.distill.parallel import World
from graftc.progress import Progress

LOSSES = {
    "l1": lambda a, b, delta: F.l1_loss(a, b),
    "l2": lambda a, b, delta: F.mse_loss(a, b),
    "huber": lambda a, b, delta: F.huber_loss(a, b, delta=delta),
}
AUTO_LOSS = {"attention": "l1", "mlp": "l2"}  # METHOD.md: attention outputs are heavy-tailed; blocks: l1 too


@dataclass
class Node:
    name: str
    record: dict
    pairs: list[tuple[str, str]]  # (teacher module whose input feeds the student, teacher module whose output is the target)
    modules: list[nn.Module]  # the student module called for each pair
    params: list[nn.Parameter]
    loss: str
    lr: float
    steps: int
    optimizer: torch.optim.Optimizer = None
    status: str = "running"  # running | done | early-stopped | non-finite
    message: str = ""
    steps_run: int = 0
    pending: float = 0.0  # this step's loss, summed over pairs
    train: list = field(default_factory=list)  # [step, loss]
    val: list = field(default_factory=list)
    best_val: float = math.inf
    best_step: int = 0
    best: list[torch.Tensor] = field(default_factory=list)
    bad_evals: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup over 5% of the node's steps, then cosine decay to 10% of the peak."""
        warm = max(1, self.steps // 20)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    def keep_best(self, value: float, step: int) -> None:
        self.best_val, self.best_step, self.bad_evals = value, step, 0
        self.best = [p.detach().clone() for p in self.params]

    def restore_best(self) -> None:
        with torch.no_grad():
            for p, b in zip(self.params, self.best):
                p.copy_(b)

    def summary(self) -> dict:
        recent = [v for _, v in self.train[-10:]]
        return {"name": self.name, "fqn": self.record["fqn"], "op": self.record["rule"], "kind": self.record["kind"],
                "loss": self.loss, "lr": self.lr, "steps": self.steps, "steps_run": self.steps_run,
                "status": self.status, "message": self.message,
                "train_loss": sum(recent) / len(recent) if recent else None,
                "val_before": self.val[0][1] if self.val else None,
                "best_val": None if math.isinf(self.best_val) else self.best_val, "best_step": self.best_step}


def _override(cfg, record: dict):
    for o in cfg.overrides:
        m = o.match
        if m == record["rule"] or m == record["fqn"] or (m.startswith("re:") and re.search(m[3:], record["fqn"])):
            return o
    return None


def build_nodes(student: nn.Module, rewrites: list[dict], cfg) -> list[Node]:
    student.requires_grad_(False)
    nodes = []
    for record in rewrites:
        cover = record["region"]["cover"]
        modules = [student.get_submodule(fqn) for fqn in cover]
        # A new operator plugged in at the cover's entry stands for the whole chain (the rest became Identity).
        if len(cover) > 1 and all(isinstance(m, nn.Identity) for m in modules[1:]):
            pairs = [(cover[0], cover[-1])]
        else:
            pairs = [(fqn, fqn) for fqn in cover]
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        for p in params:
            p.requires_grad_(True)
        o = _override(cfg, record)
        loss = (o and o.loss) or cfg.loss
        loss = AUTO_LOSS.get(record["kind"], "l1") if loss == "auto" else loss
        node = Node(f"{record['kind']}{record['index']}:{record['rule']}", record, pairs,
                    [student.get_submodule(a) for a, _ in pairs], params, loss, (o and o.lr) or cfg.lr,
                    (o and o.steps) or cfg.steps)
        node.optimizer = torch.optim.AdamW(params, lr=node.lr, weight_decay=0.0) if params else None
        if not params:
            node.status, node.message = "done", "no trainable parameters"
        nodes.append(node)
    return nodes


class Stage1Trainer:
    def __init__(self, teacher: nn.Module, student: nn.Module, nodes: list[Node], task: Task, cfg, world: World):
        self.teacher, self.student, self.nodes, self.task, self.cfg, self.world = teacher, student, nodes, task, cfg, world
        self.val = task.val_batches(cfg.batch_size)

    # -- one teacher pass serves every node --------------------------------------------
    def teacher_pass(self, batch: Batch, nodes: list[Node], train: bool) -> None:
        inputs: dict[str, tuple] = {}
        by_output: dict[str, list[tuple[Node, int]]] = {}
        for node in nodes:
            for i, (_, out_fqn) in enumerate(node.pairs):
                by_output.setdefault(out_fqn, []).append((node, i))
        wanted_inputs = {node.pairs[i][0] for users in by_output.values() for node, i in users}
        mask = self.task.token_mask(batch)

        def save_input(fqn):
            def hook(module, args, kwargs):
                inputs[fqn] = (args, kwargs)
            return hook

        def fit(users):
            def hook(module, args, kwargs, output):
                target, = real_tokens(mask, first_tensor(output).float())  # cut once for every node it serves
                for node, i in users:
                    a, kw = inputs[node.pairs[i][0]]
                    with torch.enable_grad() if train else torch.no_grad():
                        pred, = real_tokens(mask, first_tensor(node.modules[i](*a, **kw)).float())
                        loss = LOSSES[node.loss](pred, target, self.cfg.huber_delta) / len(node.pairs)
                        if train and torch.isfinite(loss):
                            loss.backward()
                    node.pending += float(loss)
            return hook

        handles = [self.teacher.get_submodule(f).register_forward_pre_hook(save_input(f), with_kwargs=True)
                   for f in wanted_inputs]
        handles += [self.teacher.get_submodule(f).register_forward_hook(fit(users), with_kwargs=True)
                    for f, users in by_output.items()]
        try:
            with torch.no_grad():
                self.teacher(*batch.args, **batch.kwargs)
        finally:
            for h in handles:
                h.remove()

    def evaluate(self, nodes: list[Node], step: int) -> None:
        """Validation loss of each node over the whole held-out split (the same on every rank)."""
        totals = {id(n): 0.0 for n in nodes}
        count = 0
        for batch in self.val:
            batch = batch.to(self.world.device)
            for n in nodes:
                n.pending = 0.0
            self.teacher_pass(batch, nodes, train=False)
            for n in nodes:
                totals[id(n)] += n.pending * batch.size
            count += batch.size
        for n in nodes:
            value = totals[id(n)] / count
            n.val.append([step, value])
            if not math.isfinite(value):
                continue
            if value < n.best_val:
                n.keep_best(value, step)
            else:
                n.bad_evals += 1
                if self.cfg.patience and n.bad_evals >= self.cfg.patience and n.status == "running":
                    n.status = "early-stopped"
                    n.message = f"no better validation loss in {n.bad_evals} evaluations; best at step {n.best_step}"

    # -- the loop ------------------------------------------------------------------
    def run(self, start: int, checkpoint, scalars, progress: bool = True) -> None:
        total = max((n.steps for n in self.nodes), default=0)
        if start == 0 and not any(n.val for n in self.nodes):  # the starting point (unless resumed at step 0):
            self.evaluate([n for n in self.nodes if n.status == "running"], 0)  # validation loss, first "best"
        shown = Progress(f"stage 1 ({len(self.nodes)} nodes)", total, start, enabled=progress and self.world.main)
        for step in range(start, total):
            checkpoint.stop_point(step)  # SIGINT/SIGTERM: save this step boundary, then stop
            active = [n for n in self.nodes if n.status == "running" and step < n.steps]
            if not active:
                break
            batch = self.task.batch("stage1", step, self.cfg.batch_size, self.world.rank,
                                    self.world.size).to(self.world.device)
            for n in active:
                n.pending = 0.0
            self.teacher_pass(batch, active, train=True)
            for n in active:
                self._step(n, step)
                scalars.add(f"stage1/{n.name}/train", n.train[-1][1] if n.train else math.nan, step + 1)
            finishing = [n for n in active if n.status == "running" and step + 1 == n.steps]
            if (step + 1) % self.cfg.eval_every == 0 or finishing:
                evaluated = [n for n in active if n.status == "running"]
                self.evaluate(evaluated, step + 1)
                for n in evaluated:
                    scalars.add(f"stage1/{n.name}/val", n.val[-1][1], step + 1)
            for n in finishing:
                if n.status == "running":
                    n.status = "done"
            shown.update(step + 1, loss=_mean_loss(active), training=f"{sum(n.status == 'running' for n in self.nodes)} nodes")
            if (step + 1) % checkpoint.every == 0:
                checkpoint(step + 1)
        shown.close()
        for n in self.nodes:
            if n.best:
                n.restore_best()
            if n.status == "running":
                n.status = "done"

    def _step(self, node: Node, step: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in node.params]
        loss = torch.tensor([node.pending], device=grads[0].device)
        self.world.average(grads + [loss])
        node.steps_run = step + 1
        value = float(loss)
        if not math.isfinite(value):
            node.status = "non-finite"
            node.message = (f"loss became {value} at step {step + 1}; kept its best weights "
                            f"(step {node.best_step}, validation loss {node.best_val:.4g})")
            node.optimizer.zero_grad(set_to_none=True)
            node.restore_best()
            return
        for p, g in zip(node.params, grads):
            p.grad = g
        for group in node.optimizer.param_groups:
            group["lr"] = node.lr_at(step)
        node.optimizer.step()
        node.optimizer.zero_grad(set_to_none=True)
        node.train.append([step + 1, value])

    # -- checkpoint state ----------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors, meta = {}, []
        for i, n in enumerate(self.nodes):
            for j, p in enumerate(n.params):
                tensors[f"s1.{i}.param.{j}"] = p
            for j, b in enumerate(n.best):
                tensors[f"s1.{i}.best.{j}"] = b
            if n.optimizer is not None:
                tensors.update(ckpt.optimizer_tensors(n.optimizer, f"s1.{i}.opt"))
            meta.append({k: getattr(n, k) for k in ("status", "message", "steps_run", "train", "val", "best_val",
                                                    "best_step", "bad_evals")})
        return tensors, {"nodes": meta}

    def restore(self, tensors: dict, state: dict) -> None:
        for i, (n, meta) in enumerate(zip(self.nodes, state["nodes"])):
            with torch.no_grad():
                for j, p in enumerate(n.params):
                    p.copy_(tensors[f"s1.{i}.param.{j}"])
            n.best = [tensors[f"s1.{i}.best.{j}"].to(p.device) for j, p in enumerate(n.params) if f"s1.{i}.best.{j}" in tensors]
            if n.optimizer is not None:
                ckpt.load_optimizer(n.optimizer, tensors, f"s1.{i}.opt")
            for k, v in meta.items():
                setattr(n, k, v)


def _mean_loss(nodes: list[Node]) -> float:
    """The mean of the nodes' latest train losses: stage 1's one number for a progress line."""
    values = [n.train[-1][1] for n in nodes if n.train]
    return sum(values) / len(values) if values else math.nan
