"""Where distillation's inputs come from.

A `Task` knows one model family: how to make (and cache) the samples, how to turn a batch of samples into the
model's inputs, which tensor of the output to compare, and the model's own training loss. Batches are a pure
function of (seed, split, step): a resumed or sharded run sees exactly the data an uninterrupted single-process
run sees (each rank takes its slice of the same global batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from graftc import text
from graftc.diffusion import guided_eps
from graftc.errors import GraftError, one_line
from graftc.files import to_device, weights_hash, write_atomic

SHARD = 256  # samples per cache shard


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    target: dict = field(default_factory=dict)  # what the model's own loss needs (noise, token ids)

    def to(self, device) -> "Batch":
        return Batch(*to_device((self.args, self.kwargs, self.target), device))

    @property
    def size(self) -> int:
        first = next(t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor))
        return first.shape[0]


def generator(seed: int, *tags) -> torch.Generator:
    """A generator seeded by (seed, tags): the same batch on every rank and after every resume."""
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module or model output: a tensor, the first tensor of a tuple, or of a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    if hasattr(output, "to_tuple"):
        values = output.to_tuple()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise GraftError(f"cannot find a tensor in an output of type {type(output).__name__}")


def mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with weights [B], each sample's mean error scaled by its weight."""
    if weights is None:
        return F.mse_loss(a.float(), b.float())
    per_sample = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (weights.to(per_sample) * per_sample).mean()


def real_tokens(mask: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each [B, L, ...] tensor cut to the tokens where mask [B, L] is True ([N, ...]); all of them if mask is None
    or a tensor is not per-token (so padded samples' padding never enters a loss)."""
    if mask is None:
        return tensors
    return tuple(t[mask] if t.dim() >= 2 and t.shape[:2] == mask.shape else t for t in tensors)


def cache_root(setting: str | None) -> Path:
    return Path(setting or os.environ.get("GRAFTC_CACHE") or Path.home() / ".cache" / "graftc").expanduser()


class Task:
    """Base: samples in `self.samples` (a dict of tensors with the sample index first), split train/val."""

    name = "task"
    own_objective: str | None = None  # the model's own loss: "diffusion" or "lm"

    def __init__(self, loaded, data, seed: int):
        self.loaded, self.data, self.seed = loaded, data, seed
        self.samples: dict[str, torch.Tensor] = {}
        self.n_val = 0

    # -- samples ---------------------------------------------------------------
    def prepare(self, teacher: torch.nn.Module, log=print) -> None:
        """Make or load the samples (rank 0 makes them; the caller synchronizes ranks)."""

    def _split(self) -> None:
        n = next(iter(self.samples.values())).shape[0]
        self.n_val = max(1, int(round(n * self.data.val_fraction)))
        if n - self.n_val < 1:
            raise GraftError(f"data: {n} samples are too few to hold out a validation share")

    def _rows(self, split: str) -> range:
        n = next(iter(self.samples.values())).shape[0]
        return range(n - self.n_val, n) if split == "val" else range(0, n - self.n_val)

    # -- batches ---------------------------------------------------------------
    def batch(self, stage: str, step: int, size: int, rank: int = 0, world: int = 1) -> Batch:
        """Training batch `step` of `stage`: `size` samples drawn with replacement; this rank's slice."""
        g = generator(self.seed, stage, step)
        rows = self._rows("train")
        index = torch.tensor(list(rows))[torch.randint(len(rows), (size,), generator=g)]
        return self._slice(self.make(index, g), rank, world)

    def val_batches(self, size: int) -> list[Batch]:
        """The whole validation split in batches of `size`, with fixed noise: identical on every call and rank."""
        rows = torch.tensor(list(self._rows("val")))
        g = generator(self.seed, "val")
        full = self.make(rows, g)
        return [self._slice(full, 0, 1, start, min(start + size, len(rows))) for start in range(0, len(rows), size)]

    def make(self, index: torch.Tensor, g: torch.Generator) -> Batch:
        raise NotImplementedError

    @staticmethod
    def _slice(batch: Batch, rank: int, world: int, start: int | None = None, stop: int | None = None) -> Batch:
        n = batch.size
        if start is None:
            if n % world:
                raise GraftError(f"batch_size {n} is not divisible by the {world} processes")
            start, stop = rank * n // world, (rank + 1) * n // world
        cut = lambda v: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
        return Batch(tuple(cut(a) for a in batch.args), {k: cut(v) for k, v in batch.kwargs.items()},
                     {k: cut(v) for k, v in batch.target.items()})

    # -- outputs and losses ------------------------------------------------------
    def output(self, out) -> torch.Tensor:
        return first_tensor(out)

    def own_loss(self, output: torch.Tensor, batch: Batch, weights: torch.Tensor | None = None) -> torch.Tensor:
        raise GraftError(f"{self.name}: this model has no training objective of its own; use objective: distill")

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
        return mse(student, teacher, weights)

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """[B, L] True where a sample has a real token, for tasks whose samples are padded; else None."""
        return None

    # -- quality -------------------------------------------------------------------
    def quality(self, model: torch.nn.Module) -> float | None:
        """A sample-quality figure (lower is better) where the model family has one, else None."""
        return None

    # -- cache -----------------------------------------------------------------------
    def _cached(self, key: dict, rows: int, make, log) -> dict[str, torch.Tensor]:
        """The `rows` samples cached for `key`, in shards of SHARD rows; `make(todo, write)` generates the shards
        numbered in `todo`, handing each to `write(tensors, i)`.

        A shard is written to a temporary file and renamed, and meta.json, written last, records every shard's
        sha256: no run reads a half-written shard, an interrupted generation continues where it stopped, and a
        shard truncated or corrupted since is regenerated with a warning. Runs sharing the cache take turns on
        the folder (a lock), so the second one waits and then reads what the first made."""
        from safetensors.torch import save

        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_root(self.data.cache) / "samples" / f"{self.name}-{digest}"
        meta = folder / "meta.json"
        names = [f"shard-{i:05d}.safetensors" for i in range(-(-rows // SHARD))]
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder, log):
            recorded = _recorded(meta)
            shards, hashes, todo = {}, {}, []
            for i, name in enumerate(names):
                found = _read_shard(folder / name, recorded.get(name), min(SHARD, rows - i * SHARD))
                if found is None:
                    todo.append(i)
                else:
                    shards[i], hashes[name] = found
            if todo and recorded:  # the set was complete once: a shard was damaged or removed since
                log(f"data: warning: cached {', '.join(names[i] for i in todo)} in {folder} missing, truncated or "
                    "corrupt; regenerating")
            elif not todo:
                log(f"data: using cached samples in {folder}")

            def write(tensors: dict[str, torch.Tensor], i: int) -> None:
                data = save({k: v.contiguous() for k, v in tensors.items()})
                write_atomic(folder / names[i], lambda tmp: tmp.write_bytes(data))
                shards[i], hashes[names[i]] = _loads(data), hashlib.sha256(data).hexdigest()

            if todo:
                make(todo, write)
            if hashes != recorded:
                text = json.dumps({"key": key, "sha256": hashes}, indent=2)
                write_atomic(meta, lambda tmp: tmp.write_text(text))
        parts = [shards[i] for i in range(len(names))]
        return {k: torch.cat([s[k] for s in parts]) for k in parts[0]}


def _loads(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _recorded(meta: Path) -> dict[str, str]:
    """Shard name -> sha256 from a cache folder's meta.json; empty if there is none (or an older one without)."""
    try:
        recorded = json.loads(meta.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _read_shard(path: Path, sha256: str | None, rows: int) -> tuple[dict[str, torch.Tensor], str] | None:
    """A cached shard and its sha256, or None if it is missing, differs from the recorded hash, is not whole
    safetensors (the header's lengths are checked), or does not hold `rows` samples."""
    from safetensors import SafetensorError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        return None
    try:
        tensors = _loads(data)
    except SafetensorError:
        return None
    if not tensors or any(t.dim() == 0 or t.shape[0] != rows for t in tensors.values()):
        return None
    return tensors, digest


@contextlib.contextmanager
def _locked(folder: Path, log):
    """An exclusive lock on a cache folder, waited for (the kernel drops it when its holder ends, kill -9 too)."""
    try:
        import fcntl
    except ImportError:  # no flock here: the atomic renames alone still keep every shard whole
        yield
        return
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: another run is making the samples in {folder}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------ diffusion models
class DiffusionTask(Task):
    """Class- or text-conditional denoisers: teacher samples -> noisy latents x_t at random timesteps."""

    name = "diffusion"
    own_objective = "diffusion"
    alphas_cumprod: torch.Tensor  # the training schedule's a_t, indexed by timestep
    label_key = "y"  # where make() finds a sample's class label

    def sample_weights(self, batch, snr_gamma):
        """Min-SNR weights min(1, gamma / SNR(t)), SNR = a_t / (1 - a_t), for noise-prediction losses: near-clean
        timesteps, whose noise errors barely move a sample, stop dominating the loss."""
        a = self.alphas_cumprod.double()[batch.target["t"].cpu().long()]
        return (snr_gamma * (1 - a) / a).clamp(max=1.0).float()

    def prepare(self, teacher, log=print) -> None:
        if self.data.images:
            x0, y = self.real_images(teacher)
            self.samples = {"x0": x0, self.label_key: y}
            log(f"data: {len(y)} real images from {self.data.images}")
            self._split()
            return
        n = self.data.samples
        key = {"model": weights_hash(teacher), "family": self.name, "samples": n,
               "sampler_steps": self.data.sampler_steps, "cfg_scale": self.data.cfg_scale, "seed": self.seed,
               **self.key_extra()}

        def make(todo: list[int], write) -> None:
            from graftc.distill.logs import Progress

            counts = [min(SHARD, n - i * SHARD) for i in todo]
            done = n - sum(counts)
            shown = Progress("data: teacher samples", n, done, unit="sample")
            for i, count in zip(todo, counts):
                rows = torch.arange(i * SHARD, i * SHARD + count)
                write(self.generate(teacher, rows), i)
                done += count
                shown.update(done)
            shown.close()

        self.samples = self._cached(key, n, make, log)
        self._split()

    def key_extra(self) -> dict:
        return {}

    def generate(self, teacher, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_spec(self, teacher) -> tuple[tuple[int, int, int], int | None]:
        """(C, H, W) of the model's input and its number of classes (None: not class-conditional)."""
        raise NotImplementedError

    def real_images(self, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        """`data.images`, checked against the model and shuffled by the seed (so the held-out share mixes classes)."""
        source = self.data.images
        shape, classes = self.image_spec(teacher)
        where = f"data.images: {source}"
        if classes is None:
            raise GraftError(f"{where}: real images need a class-conditional model (this one is not; "
                             "leave data.images out to train on teacher samples)")
        if source == "demo:digits":
            from graftc.models.demo import load_digits_tensor

            x0, y = load_digits_tensor()
        elif source.startswith("demo:"):
            raise GraftError(f"{where}: unknown built-in data set (known: demo:digits)")
        else:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            if not Path(source).is_file():
                raise GraftError(f"{where}: file not found")
            try:
                tensors = load_file(source)
            except (SafetensorError, OSError) as e:
                raise GraftError(f"{where}: not a readable safetensors file ({e})") from None
            if set(tensors) < {"x0", "y"}:
                raise GraftError(f"{where}: needs tensors x0 [N, C, H, W] and y [N] (has {sorted(tensors)})")
            x0, y = tensors["x0"].float(), tensors["y"]
        if x0.dim() != 4 or tuple(x0.shape[1:]) != tuple(shape) or y.shape != (x0.shape[0],):
            raise GraftError(f"{where}: x0 {tuple(x0.shape)} and y {tuple(y.shape)} do not fit the model's input "
                             f"[N, {', '.join(map(str, shape))}] with one label per image")
        if y.is_floating_point() or len(y) < 2 or int(y.min()) < 0 or int(y.max()) >= classes:
            raise GraftError(f"{where}: y must hold at least 2 integer labels in [0, {classes})")
        if not torch.isfinite(x0).all():
            raise GraftError(f"{where}: x0 has non-finite values")
        order = torch.randperm(len(y), generator=generator(self.seed, "images"))
        return x0[order].contiguous(), y[order].long()

    def own_loss(self, output, batch, weights=None):
        noise = batch.target["noise"]
        return mse(output[:, : noise.shape[1]], noise, weights)


class DiTTask(DiffusionTask):
    """graftc's DiT (demo:tiny-dit, dit:CONFIG): graftc.diffusion's DDPM schedule and DDIM sampler."""

    name = "dit"

    def __init__(self, loaded, data, seed):
        from graftc.diffusion import Diffusion

        super().__init__(loaded, data, seed)
        self.diffusion = Diffusion()
        self.alphas_cumprod = self.diffusion.alphas_cumprod

    def image_spec(self, teacher):
        return (teacher.in_channels, teacher.input_size, teacher.input_size), teacher.num_classes

    def generate(self, teacher, rows):
        from graftc.diffusion import sample_dit

        labels = rows % teacher.num_classes
        x0 = sample_dit(teacher, labels, steps=self.data.sampler_steps, cfg_scale=self.data.cfg_scale,
                        generator=generator(self.seed, "samples", int(rows[0])))
        return {"x0": x0.float().cpu(), "y": labels}

    def make(self, index, g):
        x0, y = self.samples["x0"][index], self.samples["y"][index]
        t = torch.randint(self.diffusion.num_timesteps, (len(index),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.diffusion.add_noise(x0, noise, t)
        return Batch((x_t, t, y), {}, {"noise": noise, "t": t})

    def quality(self, model):
        if not self.loaded.spec.startswith("demo:") or not self.data.fd_samples:
            return None
        from graftc.models.demo import demo_fd

        return demo_fd(model, n=self.data.fd_samples, steps=self.data.sampler_steps, cfg_scale=self.data.cfg_scale,
                       seed=self.seed)


class DiffusersTask(DiffusionTask):
    """diffusers denoisers (DiTTransformer2DModel, PixArtTransformer2DModel, ...) with a diffusers scheduler:
    the pipeline's own scheduler config where the model came from a pipeline folder, else DDIM defaults."""

    name = "diffusers"

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        cfg = loaded.model.config
        self.channels = cfg.get("in_channels", 4)
        size = cfg.get("sample_size") or 8
        self.size = size if isinstance(size, int) else size[0]
        self.classes = cfg.get("num_embeds_ada_norm") if "class_labels" in loaded.kwargs else None
        self.text = "encoder_hidden_states" in loaded.kwargs
        self.prompts = self._prompts() if self.text else None
        self.scheduler = self._scheduler()
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    def _prompts(self) -> dict[str, torch.Tensor]:
        if not self.data.prompt_embeds:
            raise GraftError("data.prompt_embeds: this text-conditional model needs caption embeddings (a "
                             "safetensors file with prompt_embeds [P, L, C]); graftc does not run text encoders")
        from safetensors.torch import load_file

        path = Path(self.data.prompt_embeds)
        if not path.is_file():
            raise GraftError(f"data.prompt_embeds: file not found: {path}")
        embeds = load_file(str(path))
        if "prompt_embeds" not in embeds or embeds["prompt_embeds"].dim() != 3:
            raise GraftError(f"data.prompt_embeds: {path} must hold prompt_embeds [P, L, C] (has {sorted(embeds)})")
        return embeds

    def _scheduler(self):
        import diffusers

        spec = Path(self.loaded.spec)
        for folder in (spec / "scheduler", spec.parent / "scheduler"):
            if (folder / "scheduler_config.json").is_file():
                config = diffusers.DDIMScheduler.load_config(str(folder))
                cls = getattr(diffusers, config.get("_class_name", ""), diffusers.DDIMScheduler)
                return cls.from_config(config)
        return diffusers.DDIMScheduler()

    label_key = "rows"  # _condition takes the class label as rows % classes

    def key_extra(self):
        return {"scheduler": dict(self.scheduler.config), "prompts": self.data.prompt_embeds}

    def image_spec(self, teacher):
        return (self.channels, self.size, self.size), (None if self.text else self.classes)

    def _condition(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        cond = {}
        if self.classes:
            cond["class_labels"] = rows % self.classes
        if self.text:
            cond["encoder_hidden_states"] = self.prompts["prompt_embeds"][rows % len(self.prompts["prompt_embeds"])]
            if "prompt_mask" in self.prompts:
                cond["encoder_attention_mask"] = self.prompts["prompt_mask"][rows % len(self.prompts["prompt_mask"])]
        return cond

    def _inputs(self, x, t, cond) -> dict:
        kwargs = {**self.loaded.kwargs, "hidden_states": x, "timestep": t, **cond}
        extra = kwargs.get("added_cond_kwargs")
        if isinstance(extra, dict):  # PixArt's micro-conditions: one row per sample
            kwargs["added_cond_kwargs"] = {k: (v.expand(len(x), *v.shape[1:]) if isinstance(v, torch.Tensor) else v)
                                           for k, v in extra.items()}
        return kwargs

    @torch.no_grad()
    def generate(self, teacher, rows):
        import copy

        g = generator(self.seed, "samples", int(rows[0]))
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.data.sampler_steps)
        cond = self._condition(rows)
        guided = self.classes and self.data.cfg_scale != 1
        x = torch.randn(len(rows), self.channels, self.size, self.size, generator=g) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            tt = torch.full((len(rows),), int(t))
            if guided:  # class-conditional CFG: the null class is the extra embedding row
                eps = guided_eps(lambda x_, t_, y_: self.output(teacher(**self._inputs(x_, t_, {"class_labels": y_})))
                                 [:, : self.channels], inp, tt, cond["class_labels"], self.classes, self.data.cfg_scale)
            else:
                eps = self.output(teacher(**self._inputs(inp, tt, cond)))[:, : self.channels]
            x = scheduler.step(eps, t, x).prev_sample
        return {"x0": x.float(), "rows": rows}

    def make(self, index, g):
        x0, rows = self.samples["x0"][index], self.samples["rows"][index]
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(index),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return Batch((), self._inputs(x_t, t, self._condition(rows)), {"noise": noise, "t": t})


# ------------------------------------------------------------------------ language models and encoders
class TextTask(Task):
    """transformers models on a text file (or folder of .txt files), cut into blocks of seq_len tokens; without
    data.text, on graftc.text's train split of the pydoc_data topics (its held-out split is for evaluation)."""

    name = "text"

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        self._tokenizer = None
        if not data.text:  # the default text needs the model's tokenizer: without one, say so before anything runs
            self.tokenizer()
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and data.seq_len > positions:
            raise GraftError(f"data.seq_len: {data.seq_len} tokens per sample is more than this model can embed "
                             f"(max_position_embeddings {positions}); set seq_len to at most {positions}")
        self.causal = type(loaded.model).__name__.endswith("ForCausalLM")
        self.own_objective = "lm" if self.causal else None

    def prepare(self, teacher, log=print) -> None:
        if self.data.text:
            path = Path(self.data.text)
            files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
            if not path.exists() or not files:
                raise GraftError(f"data.text: {'no .txt files in' if path.exists() else 'not found:'} {path}")
            where, raw = str(path), "\n\n".join(f.read_text(errors="replace") for f in files)
        else:  # graftc.text's train split: real English, offline; its held-out split is never trained on
            where, raw = "pydoc_data topics (train split; data.text: a file or folder replaces it)", text.text("train")
        L = self.data.seq_len
        if self.data.text_unit == "sentence":
            self.samples = self._sentence_samples(raw, where)
            self._split()
            lengths = self.samples["attention_mask"].sum(1)
            log(f"data: {len(lengths)} sentences from {where}, {int(lengths.min())}-{int(lengths.max())} tokens "
                f"(median {int(lengths.median())}) with special tokens, padded to {L}")
            return
        ids = self.tokenizer()(raw, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < 2 * L:
            raise GraftError(f"data.text: {where} has {len(ids)} tokens, fewer than two samples of seq_len {L}")
        blocks = torch.tensor(ids[: len(ids) // L * L]).view(-1, L)
        self.samples = {"input_ids": blocks}
        self._split()
        log(f"data: {len(blocks)} samples of {L} tokens from {where}")

    def _sentence_samples(self, raw: str, where: str) -> dict[str, torch.Tensor]:
        found = text.sentences_in([raw])
        if len(found) < 2:
            raise GraftError(f"data.text: {where} has {len(found)} prose sentence(s) (6-40 words, capitalized, ending "
                             f"in a full stop); text_unit: sentence needs at least 2, or use text_unit: window")
        tokenizer = self.tokenizer()
        if tokenizer.pad_token_id is None:
            raise GraftError(f"data.text_unit: sentence pads samples to seq_len, and {self.loaded.spec}'s tokenizer "
                             f"has no padding token; use text_unit: window")
        coded = tokenizer(found, truncation=True, max_length=self.data.seq_len, padding="max_length",
                          return_tensors="pt", verbose=False)
        return {"input_ids": coded["input_ids"], "attention_mask": coded["attention_mask"]}

    def tokenizer(self):
        """The spec's own tokenizer (demo:smollm2, demo:minilm, .gguf folders), else the model folder's."""
        if self.loaded.tokenizer is not None:
            return self.loaded.tokenizer
        if self._tokenizer is not None:
            return self._tokenizer
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.loaded.spec)
            if len(tokenizer) < 2:  # transformers makes an empty one from a folder with a config and no vocabulary
                raise ValueError(f"it has {len(tokenizer)} token(s)")
        except Exception as exc:
            raise GraftError(f"{self.loaded.spec}: no usable tokenizer in the model folder to cut data.text into "
                             f"tokens ({one_line(exc, 120)})") from None
        try:
            rows = self.loaded.model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):
            rows = None
        if rows is not None and len(tokenizer) > rows:
            raise GraftError(f"{self.loaded.spec}: the tokenizer does not match the model: it has {len(tokenizer)} "
                             f"tokens, the model embeds {rows}")
        self._tokenizer = tokenizer
        return tokenizer

    def make(self, index, g):
        rows = {k: v[index] for k, v in self.samples.items()}  # input_ids, and attention_mask for sentences
        static = {k: v for k, v in self.loaded.kwargs.items() if not isinstance(v, torch.Tensor)}
        return Batch((), {**static, **rows}, rows)

    def token_mask(self, batch):
        mask = batch.target.get("attention_mask")
        return None if mask is None else mask.bool()

    def output(self, out):
        logits = getattr(out, "logits", None)
        return logits if logits is not None else first_tensor(out)

    def distill_loss(self, student, teacher, weights=None):
        if not self.causal:
            return super().distill_loss(student, teacher)
        # matching next-token distributions: KL(teacher || student), per token
        return F.kl_div(F.log_softmax(student.float(), -1).flatten(0, -2), F.log_softmax(teacher.float(), -1).flatten(0, -2),
                        log_target=True, reduction="batchmean")

    def own_loss(self, output, batch, weights=None):
        if not self.causal:
            return super().own_loss(output, batch)
        ids = batch.target["input_ids"]
        mask = self.token_mask(batch)
        labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # padding predicts nothing
        return F.cross_entropy(output[:, :-1].flatten(0, 1).float(), labels.flatten())


# ------------------------------------------------------------------------ anything else
class ExampleTask(Task):
    """Models with no known data (timm:, python:): random inputs shaped like the example inputs (Gaussian for
    float tensors, integers in the example's range for integer tensors). Enough to fit operators to the
    teacher's function; real data is better where the family has it."""

    name = "example"

    def prepare(self, teacher, log=print) -> None:
        self.samples = {"row": torch.arange(self.data.samples)}
        self._split()
        log("data: no data source for this model family; random inputs shaped like the example inputs")

    def make(self, index, g):
        def like(value):
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                return value
            shape = (len(index), *value.shape[1:])
            if value.is_floating_point():
                return torch.randn(shape, generator=g).to(value.dtype)
            high = int(value.max()) + 1 if value.numel() else 2
            return torch.randint(max(high, 2), shape, generator=g).to(value.dtype)

        return Batch(tuple(like(a) for a in self.loaded.args), {k: like(v) for k, v in self.loaded.kwargs.items()})


def make_task(loaded, data, seed: int) -> Task:
    """The task for a loaded model, by its family."""
    if loaded.family == "dit":
        return DiTTask(loaded, data, seed)
    if loaded.family == "diffusers" and "hidden_states" in loaded.kwargs and "timestep" in loaded.kwargs:
        return DiffusersTask(loaded, data, seed)
    if loaded.family == "transformers":
        return TextTask(loaded, data, seed)
    if loaded.family == "image-classifier":
        from graftc.distill.images import ImageTask

        return ImageTask(loaded, data, seed)
    return ExampleTask(loaded, data, seed)
