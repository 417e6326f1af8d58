"""Models with no family of their own (python:MODULE:FUNCTION factories, timm models without a classifier head):
loading a factory, and random inputs shaped like the example inputs as distillation data; and what every family's
graftc eval shares (the held-out data settings, the note for models it does not sample)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from graftc.distill.data import Batch, Task
from graftc.errors import GraftError, one_line
from graftc.loaded import Loaded
from graftc.plan import parse_plan

MAKES_IMAGES = False


def load_python(rest: str) -> Loaded:
    """python:MODULE:FUNCTION: FUNCTION() returns (model, example_inputs), a tuple of args or a dict of kwargs."""
    module_name, _, func_name = rest.rpartition(":")
    if not module_name or not func_name:
        raise GraftError(f"python:{rest}: expected python:MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise GraftError(f"python: file not found: {module_name}")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except GraftError:
        raise
    except ImportError as exc:
        raise GraftError(f"python:{rest}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # SyntaxError or any error raised while the module runs
        raise GraftError(f"python:{rest}: cannot import {module_name!r}: {one_line(exc)}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise GraftError(f"python:{rest}: {module_name} has no function {func_name!r}")
    try:
        result = func()
    except Exception as exc:
        raise GraftError(f"python:{rest}: {func_name}() raised {one_line(exc)}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise GraftError(f"python:{rest}: {func_name}() must return (model, example_inputs), got {type(result).__name__}")
    model, example = result
    if isinstance(example, dict):
        return Loaded("", model, (), dict(example), family="python")
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, (tuple, list)):
        raise GraftError(f"python:{rest}: example_inputs must be a tuple of args or a dict of kwargs")
    return Loaded("", model, tuple(example), family="python")


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


def task(loaded, data, seed: int) -> ExampleTask:
    return ExampleTask(loaded, data, seed)


def no_sample_quality(run) -> None:
    """The note for a family that graftc eval does not sample (`run`: a graftc.evaluate.run.Evaluation)."""
    if run.extractor is not None:
        run.result["notes"].append("sample quality skipped: only graftc's DiT is sampled so far "
                                   f"(family {run.loaded.family!r})")


def evaluate(run) -> bool:
    """graftc eval's figures for a family with none of its own: only agreement on held-out task inputs."""
    no_sample_quality(run)
    return True


def eval_data(loaded, **update):
    """The plan's default data settings with `update`, text blocks no longer than the model can embed: the data of
    graftc eval's held-out measurements (agreement, perplexity)."""
    data = parse_plan({"version": 1}).data
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and 2 <= positions < data.seq_len:
        update["seq_len"] = positions
    return data.model_copy(update={"fd_samples": 0, **update})
