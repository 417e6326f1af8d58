"""Stage 2: lightweight end-to-end fine-tuning of the whole grafted model.

Objectives: `distill` (match the frozen teacher's outputs; KL over next-token distributions for language
models), the model's own loss (`diffusion`: noise prediction; `lm`: next token), for text encoders `embedding`
(the cosine of the mean-pooled sentence embedding to the teacher's), or a weighted sum. AdamW with
linear warmup then a constant rate (the method's) or a cosine decay, gradient clipping, an EMA of the weights (the EMA is what is saved), bf16
autocast on CUDA. Full fine-tuning, or LoRA (peft): low-rank updates of the Linears outside the rewritten
nodes (the new operators train fully), merged back into the Linears at the end so the artifact keeps the
model's own structure. Under torchrun the model is wrapped in DistributedDataParallel and each rank takes its slice of
the batch.
"""
from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from graftc.distill import checkpoint as ckpt
from graftc.distill.data import Task, generator, real_tokens
from graftc.distill.parallel import World
from graftc.errors import GraftError
from graftc.metrics import mean_pool
from graftc.progress import Progress

# A tied LM head's update is merged into the matrix it shares with the embedding, so the two stay tied (the
# artifact stores the model's own structure); peft's warnings about tied layers do not apply.
warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True", module="peft")


def add_lora(model: nn.Module, keep_full: set[str], rank: int, alpha: float):
    """peft's LoRA on every Linear outside the `keep_full` module paths, which train fully; everything else is
    frozen. Returns peft's LoraModel (its `merge_and_unload` folds the updates back into the Linears), or None
    where every Linear is inside `keep_full`."""
    model.requires_grad_(False)
    targets = [fqn for fqn, module in model.named_modules() if isinstance(module, nn.Linear)
               and not any(fqn == k or fqn.startswith(k + ".") for k in keep_full)]
    lora = None
    if targets:
        from peft import LoraConfig, LoraModel  # imports transformers: only for a LoRA run

        # a pattern of the exact paths: peft's list form would also match any module whose path ends with one
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                            target_modules="|".join(re.escape(fqn) for fqn in targets))
        lora = LoraModel(model, config, "default")  # wraps the Linears in place; the model stays the same object
    for k in keep_full:
        model.get_submodule(k).requires_grad_(True)
    return lora


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """1 - cosine between the student's and the teacher's sentence embeddings (the mean of the last hidden state
    over each sentence's real tokens), averaged over the batch: what a sentence encoder is judged by."""
    pooled = [mean_pool(t.float(), mask) for t in (student, teacher)]
    return 1 - F.cosine_similarity(*pooled, dim=-1).mean()


class Stage2Trainer:
    def __init__(self, teacher: nn.Module, student: nn.Module, task: Task, cfg, world: World, new_modules: set[str],
                 trainable: set[str]):
        self.teacher, self.student, self.task, self.cfg, self.world = teacher, student, task, cfg, world
        self.weights = cfg.objective_weights()
        for name in self.weights:
            if name == "embedding" and not task.encoder:
                raise GraftError("distill.stage2.objective: 'embedding' matches the mean-pooled sentence embeddings "
                                 "of a text encoder, and this model is not one; use distill")
            if name not in ("distill", "embedding") and name != task.own_objective:
                own = task.own_objective or "none"
                raise GraftError(f"distill.stage2.objective: '{name}' is not this model's own loss (it has: {own}); "
                                 "use distill")
        self.lora = add_lora(student, new_modules, cfg.lora.rank, cfg.lora.alpha) if cfg.lora else None
        if not cfg.lora:  # full fine-tuning of what was trainable in the teacher (frozen tables stay frozen)
            for name, p in student.named_parameters():
                p.requires_grad_(name in trainable or any(name.startswith(m + ".") for m in new_modules))
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise GraftError("distill.stage2: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema else []
        self.curve: list = []
        self.skipped = 0
        self.message = ""
        self.model = student
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(student, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        cuda = world.device.type == "cuda"
        self.autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.schedule == "cosine":  # from the peak after warmup down to 0 at the last step
            progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr

    def loss(self, batch) -> torch.Tensor:
        with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.task.output(self.model(*batch.args, **batch.kwargs))
            weights = self.task.sample_weights(batch, self.cfg.snr_gamma) if self.cfg.snr_gamma else None
            total = 0.0
            mask = self.task.token_mask(batch)
            if self.weights.keys() & {"distill", "embedding"}:  # one teacher pass serves both
                with torch.no_grad():
                    target = self.task.output(self.teacher(*batch.args, **batch.kwargs))
            for name, weight in self.weights.items():
                if name == "distill":
                    part = self.task.distill_loss(*real_tokens(mask, out, target), weights)
                elif name == "embedding":
                    part = embedding_loss(out, target, mask)
                else:
                    part = self.task.own_loss(out, batch, weights)
                total = total + weight * part
        return total

    def run(self, start: int, checkpoint, scalars, progress: bool = True) -> None:
        self.student.train()
        shown = Progress("stage 2", self.cfg.steps, start, enabled=progress and self.world.main)
        for step in range(start, self.cfg.steps):
            checkpoint.stop_point(step)  # SIGINT/SIGTERM: save this step boundary, then stop
            torch.manual_seed(int(generator(self.task.seed, "stage2-rng", step).initial_seed()))  # dropout, resumable
            batch = self.task.batch("stage2", step, self.cfg.batch_size, self.world.rank,
                                    self.world.size).to(self.world.device)
            loss = self.loss(batch)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            value = loss.detach().float().reshape(1)
            self.world.average([value])
            if not (math.isfinite(float(value)) and math.isfinite(float(norm))):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped += 1
                if self.skipped >= 5:
                    self.message = f"stopped at step {step + 1}: 5 non-finite losses in a row; kept the last good weights"
                    break
                continue
            self.skipped = 0
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema:
                decay = min(self.cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(self.ema, self.params):
                        e.lerp_(p.detach(), 1 - decay)
            self.curve.append([step + 1, float(value)])
            scalars.add("stage2/loss", float(value), step + 1)
            shown.update(step + 1, loss=float(value))
            if (step + 1) % checkpoint.every == 0 and step + 1 < self.cfg.steps:
                checkpoint(step + 1)
        shown.close()
        self.finish()

    def finish(self) -> None:
        """Put the EMA into the weights, merge LoRA, back to eval mode."""
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                p.copy_(e)
        if self.lora is not None:
            self.lora.merge_and_unload()
            self.lora = None
        self.student.eval()

    # -- checkpoint state ----------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors = {f"s2.model.{k}": v for k, v in self.student.state_dict().items()}
        tensors.update({f"s2.ema.{i}": e for i, e in enumerate(self.ema)})
        tensors.update(ckpt.optimizer_tensors(self.optimizer, "s2.opt"))
        return tensors, {"curve": self.curve, "skipped": self.skipped}

    def restore(self, tensors: dict, state: dict) -> None:
        self.student.load_state_dict({k[len("s2.model."):]: v for k, v in tensors.items() if k.startswith("s2.model.")})
        with torch.no_grad():
            for i, e in enumerate(self.ema):
                e.copy_(tensors[f"s2.ema.{i}"])
        if any(k.startswith("s2.opt.") for k in tensors):
            ckpt.load_optimizer(self.optimizer, tensors, "s2.opt")
        self.curve, self.skipped = state.get("curve", []), state.get("skipped", 0)
