"""Where distillation's inputs come from: the family-independent parts.

A `Task` knows one model family: how to make (and cache) the samples, how to turn a batch of samples into the
model's inputs, which tensor of the output to compare, and the model's own training loss. Each family's tasks
live in its module of graftc.families (`graftc.families.make_task` picks one by `Loaded.family`); here are the
base, batches, the sample cache, the losses and the base of the two diffusion families' tasks. Batches are a pure
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
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from graftc.errors import GraftError
from graftc.files import to_device, weights_hash, write_atomic
from graftc.models.demo import load_digits_tensor
from graftc.progress import Progress

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


def read_tensors(path: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file the user named (`where` says which setting named it)."""
    if not Path(path).is_file():
        raise GraftError(f"{where}: file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise GraftError(f"{where}: not a readable safetensors file ({e})") from None


def cache_root(setting: str | None) -> Path:
    return Path(setting or os.environ.get("GRAFTC_CACHE") or Path.home() / ".cache" / "graftc").expanduser()


class Task:
    """Base: samples in `self.samples` (a dict of tensors with the sample index first), split train/val."""

    name = "task"
    own_objective: str | None = None  # the model's own loss: "diffusion" or "lm"
    classifies = False  # outputs are class logits: evaluation reports top-1 agreement
    encoder = False  # outputs are a text encoder's: evaluation compares sentence embeddings too

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
                data = save_bytes({k: v.contiguous() for k, v in tensors.items()})
                write_atomic(folder / names[i], lambda tmp: tmp.write_bytes(data))
                shards[i], hashes[names[i]] = load_bytes(data), hashlib.sha256(data).hexdigest()

            if todo:
                make(todo, write)
            if hashes != recorded:
                text = json.dumps({"key": key, "sha256": hashes}, indent=2)
                write_atomic(meta, lambda tmp: tmp.write_text(text))
        parts = [shards[i] for i in range(len(names))]
        return {k: torch.cat([s[k] for s in parts]) for k in parts[0]}


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        return None
    try:
        tensors = load_bytes(data)
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
            x0, y = load_digits_tensor()
        elif source.startswith("demo:"):
            raise GraftError(f"{where}: unknown built-in data set (known: demo:digits)")
        else:
            tensors = read_tensors(source, where)
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
