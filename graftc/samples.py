"""What a graft's outputs look like beside its teacher's, from identical inputs.

* Image-generating models (graftc's DiT, diffusers denoisers): :class:`Grid`. Every model draws its samples
  with the distillation task's own sampler (graftc.diffusion's DDIM for graftc's DiT, the pipeline's scheduler
  for diffusers models) from the same starting noise and the same class labels or prompt embeddings, so the
  differences between rows are the graft's alone. Latents are decoded with the pipeline's VAE where the model
  came with one. Written as ``samples.png``: one row per model, one column per class or prompt.
* Causal language models: :class:`Continuations`, the greedy continuations of a few fixed prompts
  (``model.generate`` without sampling, as ``graftc chat`` decodes), as a table for ``report.md``.

Both keep their rows as tensors (``save``/``load``), so a resumed distillation still shows the row it drew
after stage 1.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from graftc.distill.data import DiffusionTask, generator
from graftc.errors import GraftError, read_json
from graftc.families import family, make_task
from graftc.families.transformers import is_causal_lm, text_tokenizer
from graftc.files import write_atomic
from graftc.plan import load_plan, parse_plan

MAX_COLUMNS = 64
DEFAULT_COLUMNS = 10  # a class or prompt per column, at most this many unless asked for more
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, there was a")
NEW_TOKENS = 16


def parse_columns(value) -> int:
    """`--grid N`: a whole number of columns from 1 to MAX_COLUMNS."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or not 1 <= n <= MAX_COLUMNS:
        raise GraftError(f"--grid: expected a whole number of columns from 1 to {MAX_COLUMNS} (got {value!r})")
    return n


def applies(loaded) -> bool:
    """Whether `preview` may have something for this model (checked before a rewrite changes it)."""
    return family(loaded.family).MAKES_IMAGES or is_causal_lm(loaded.model)


def preview(loaded, data, seed: int, columns: int | None = None, log=print):
    """The preview that fits the model: a Grid for image-generating models, Continuations for causal LMs, else
    None. A text-to-image model without the prompt embeddings it is distilled on gets `Skipped` (its reason goes
    into report.md; nothing is printed, so that a later error stays the only line)."""
    if is_causal_lm(loaded.model):
        return Continuations(loaded, seed, log=log)
    try:
        task = image_task(loaded, data, seed)
    except GraftError as exc:
        return Skipped(str(exc))
    return Grid(task, columns, log=log) if task is not None else None


def eval_grid(loaded, target: Path, columns: int, steps: int, cfg: float, seed: int, log=print) -> "Grid":
    """`graftc eval --grid N`: the grid of an artifact (`target`, with the conditions of its plan's data) or a
    MODEL spec, sampled with eval's `steps` and `cfg`. A model that makes no images is a GraftError."""
    plan = Path(target) / "plan.yaml"
    data = load_plan(plan).data if plan.is_file() else parse_plan({"version": 1}).data
    data = data.model_copy(update={"sampler_steps": steps, "cfg_scale": cfg})
    try:
        task = image_task(loaded, data, seed)
    except GraftError as exc:
        raise GraftError(f"--grid: {exc}") from None
    if task is None:
        raise GraftError(f"--grid: {loaded.spec} does not generate images ({type(loaded.model).__name__}); the grid "
                         "is for graftc's DiT and diffusers denoisers")
    return Grid(task, columns, log=log)


def image_task(loaded, data, seed: int):
    """The diffusion task of an image-generating model (None for other models) with a noise stream of its own,
    so that the grid's samples are not the training samples. A GraftError where its conditions are missing."""
    if not family(loaded.family).MAKES_IMAGES:
        return None
    task = make_task(loaded, data, seed)
    if not isinstance(task, DiffusionTask):
        return None
    task = copy.copy(task)
    task.seed = (seed, "grid")  # the task's sampler seeds its noise from (seed, "samples", first row)
    return task


class Skipped:
    """An image model with no grid (its conditions are missing): every call is a no-op but the report's note."""

    def __init__(self, reason: str):
        self.reason, self.seconds = reason, 0.0

    def add(self, name, model) -> None:
        pass

    def save(self, path) -> None:
        pass

    def load(self, path) -> None:
        pass

    def files(self, folder) -> dict:
        return {}

    def markdown(self) -> list[str]:
        return ["## Samples", "", f"No samples.png: {self.reason}"]


class _Rows:
    """Rows of outputs by model name, kept as tensors so that a resumed run can reload them."""

    rows: dict[str, torch.Tensor]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)  # atomic like the checkpoints it sits beside
        rows = {k: v.contiguous() for k, v in self.rows.items()}
        write_atomic(Path(path), lambda tmp: save_file(rows, str(tmp)))

    def load(self, path: Path) -> None:
        """Rows saved by `save` that are not drawn yet."""
        from safetensors.torch import load_file

        if Path(path).is_file():
            for name, value in load_file(str(path)).items():
                self.rows.setdefault(name, value)


class Grid(_Rows):
    """Samples of several models, one row each, from one set of starting noise and conditions."""

    def __init__(self, task, columns: int | None = None, log=lambda line: None):
        self.task, self.log = task, log
        prompts = getattr(task, "prompts", None)
        if prompts:
            conditions = len(prompts["prompt_embeds"])
        elif task.name == "dit":
            conditions = int(task.loaded.model.num_classes)
        else:
            conditions = getattr(task, "classes", None)
        self.conditions = conditions or None
        self.kind = "prompt" if prompts else "class" if self.conditions else "sample"
        self.columns = columns or min(DEFAULT_COLUMNS, self.conditions or 8)
        self.rows: dict[str, torch.Tensor] = {}  # name -> the sampler's output [N, C, H, W], float32, CPU
        self.seconds = 0.0
        self.vae = _find_vae(task)

    # -- sampling --------------------------------------------------------------------
    @torch.no_grad()
    def add(self, name: str, model: torch.nn.Module) -> None:
        """Draw the row of `model` (teacher, graft, ...) from the grid's noise and conditions."""
        begin = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            self.rows[name] = self.task.generate(model, torch.arange(self.columns))["x0"].float().cpu()
        finally:
            model.train(was_training)
        took = time.perf_counter() - begin
        self.seconds += took
        self.log(f"samples.png: row {name!r}, {self.columns} samples in {took:.1f}s")

    def labels(self) -> list[str]:
        """Column titles: the class or prompt (embedding row) each column is conditioned on."""
        if self.kind == "sample":
            return [str(i) for i in range(self.columns)]
        return [f"{self.kind} {i % self.conditions}" for i in range(self.columns)]

    # -- pixels ----------------------------------------------------------------------
    @property
    def latents_shown(self) -> bool:
        """True where the samples are latents with no VAE to decode them (not 1- or 3-channel images)."""
        return self.vae is None and next(iter(self.rows.values())).shape[1] not in (1, 3)

    @torch.no_grad()
    def images(self, name: str) -> torch.Tensor | None:
        """Row `name` as images [N, C, H, W] in [-1, 1]: VAE-decoded latents, or the samples themselves where the
        model makes 1- or 3-channel images; None for latents without a VAE."""
        x = self.rows[name]
        if self.vae is not None:
            scale = getattr(self.vae.config, "scaling_factor", None) or 1.0
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return self.vae.decode(x / scale + shift).sample.float()
        return None if self.latents_shown else x

    def tiles(self, name: str) -> np.ndarray:
        """Row `name` as uint8 RGB tiles [N, H, W, 3]. Latents without a VAE show their first three channels,
        scaled by the first row's per-channel mean and spread, so every row shares one colour mapping."""
        images = self.images(name)
        if images is None:
            first = self.rows[next(iter(self.rows))][:, :3]
            mean, std = first.mean(dim=(0, 2, 3), keepdim=True), first.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
            images = (self.rows[name][:, :3] - mean) / (3 * std)
        rgb = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if rgb.shape[1] == 1:
            rgb = rgb.expand(-1, 3, -1, -1)
        return rgb.permute(0, 2, 3, 1).contiguous().numpy()

    def canvas(self, gap: int = 2) -> np.ndarray:
        """All rows' tiles on one white uint8 image, `gap` pixels apart."""
        tiles = [self.tiles(name) for name in self.rows]
        h, w = tiles[0].shape[1:3]
        out = np.full((len(tiles) * (h + gap) + gap, self.columns * (w + gap) + gap, 3), 255, np.uint8)
        for r, row in enumerate(tiles):
            for c, tile in enumerate(row):
                y, x = gap + r * (h + gap), gap + c * (w + gap)
                out[y:y + h, x:x + w] = tile
        return out

    def write(self, path: Path) -> bool:
        """samples.png: the canvas with the row names on the left and the column conditions on top (needs
        matplotlib; False without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        if not self.rows:
            return False
        gap = 2
        image = self.canvas(gap)
        h = (image.shape[0] - gap) // len(self.rows) - gap
        w = (image.shape[1] - gap) // self.columns - gap
        inches = max(0.75, min(1.6, 12 / self.columns))  # per tile
        fig, ax = plt.subplots(figsize=(1.6 + inches * self.columns, 0.9 + inches * len(self.rows)))
        ax.imshow(image, interpolation="nearest")
        ax.set_yticks([gap + r * (h + gap) + h / 2 for r in range(len(self.rows))], list(self.rows))
        ax.set_xticks([gap + c * (w + gap) + w / 2 for c in range(self.columns)], self.labels(),
                      rotation=45 if self.columns > 12 else 0, fontsize=8)
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        what = "VAE-decoded " if self.vae is not None else "latents (channels 0-2) of " if self.latents_shown else ""
        ax.set_xlabel(f"{what}samples from the same noise and {self.kind} per column", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True

    # -- artifact --------------------------------------------------------------------
    def files(self, folder: Path) -> dict:
        path = Path(folder) / "samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return {"samples.png": path} if self.write(path) else {}

    def markdown(self) -> list[str]:
        rows = ", ".join(self.rows)
        return ["## Samples", "", f"Rows: {rows}; one {self.kind} per column, every row from the same starting "
                f"noise ({len(self.rows)} x {self.columns} samples, {self.seconds:.1f}s).", "",
                "![teacher and graft samples](samples.png)"]


def _find_vae(task):
    """The pipeline's VAE (a diffusers model folder `vae/` beside the denoiser's), loaded on the CPU, where its
    latent channels fit the model's; else None."""
    if task.name != "diffusers":
        return None
    spec = Path(task.loaded.spec)
    for folder in (spec / "vae", spec.parent / "vae"):
        if (folder / "config.json").is_file():
            import diffusers

            config = read_json(folder / "config.json")
            cls = getattr(diffusers, config.get("_class_name", ""), None)
            if cls is None or config.get("latent_channels", task.channels) != task.channels:
                return None
            return cls.from_pretrained(str(folder)).eval()
    return None


class Continuations(_Rows):
    """Greedy continuations of fixed prompts: PROMPTS through the model's tokenizer, or, for a model without one,
    three fixed rows of token ids (from the seed). Each row is NEW_TOKENS new tokens per prompt."""

    def __init__(self, loaded, seed: int = 0, new_tokens: int = NEW_TOKENS, log=lambda line: None):
        self.tokenizer = text_tokenizer(loaded)
        self.new_tokens, self.log = new_tokens, log
        if self.tokenizer is not None:
            self.prompts = [self.tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
        else:
            vocab = loaded.model.get_input_embeddings().num_embeddings
            ids = torch.randint(vocab, (len(PROMPTS), 8), generator=generator(seed, "continuation prompts"))
            self.prompts = [row[None] for row in ids]
        self.rows: dict[str, torch.Tensor] = {}  # name -> new token ids [prompts, new_tokens] (-1: stopped early)
        self.seconds = 0.0

    @torch.no_grad()
    def add(self, name: str, model: torch.nn.Module) -> None:
        begin = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None)
        rows = torch.full((len(self.prompts), self.new_tokens), -1, dtype=torch.int64)
        try:
            for i, ids in enumerate(self.prompts):
                ids = ids.to(device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new_tokens,
                                     min_new_tokens=0, do_sample=False, pad_token_id=pad if pad is not None else 0)
                new = out[0, ids.shape[1]:].cpu()
                rows[i, :len(new)] = new
        finally:
            model.train(was_training)
        self.rows[name] = rows
        took = time.perf_counter() - begin
        self.seconds += took
        self.log(f"continuations: {name!r}, {len(self.prompts)} prompts x {self.new_tokens} tokens in {took:.1f}s")

    def text(self, ids: torch.Tensor) -> str:
        ids = [int(t) for t in ids if int(t) >= 0]
        if self.tokenizer is None:
            return "ids " + " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def markdown(self) -> list[str]:
        names = list(self.rows)
        if not names:
            return []
        how = "text" if self.tokenizer is not None else "token ids (the model has no tokenizer)"
        lines = ["## Greedy continuations", "",
                 f"{self.new_tokens} new tokens per prompt, greedy, as {how}; the last column counts the leading "
                 f"tokens where the {names[-1]} model agrees with the {names[0]} ({self.seconds:.1f}s).", "",
                 "| prompt | " + " | ".join(names) + " | same tokens |", "|---" * (len(names) + 2) + "|"]
        first, last = self.rows[names[0]], self.rows[names[-1]]
        for i, ids in enumerate(self.prompts):
            same = 0
            while same < self.new_tokens and first[i, same] == last[i, same] and first[i, same] >= 0:
                same += 1
            cells = [self.text(ids[0])] + [self.text(self.rows[n][i]) for n in names]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | {same}/{int((first[i] >= 0).sum())} |")
        return lines

    def files(self, folder: Path) -> dict:
        return {}


def _cell(text: str) -> str:
    """Text for one markdown table cell: pipes escaped, line breaks shown as ⏎."""
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "⏎")
    return f"`{text}`" if text.strip() and "`" not in text else text or "(nothing)"
