"""What a loaded MODEL spec is (`Loaded`), and the loader helpers the model families share.

graftc.spec reads a MODEL spec and hands it to the family that loads it (graftc.families); the families build on
this module, never on graftc.spec, so that the dependency runs one way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from graftc.errors import GraftError, one_line

# Real text for the example inputs of models that come with a tokenizer (a few tokens: they are traced).
EXAMPLE_TEXT = "The capital of France is Paris."


@dataclass
class Loaded:
    spec: str
    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    family: str = ""  # which module of graftc.families knows the model (its data, its quality figure)
    tokenizer: Any = None  # the model's tokenizer where the spec has one (demo:smollm2, demo:minilm, .gguf)

    @property
    def example(self):
        """The example inputs as graftc.compile takes them: kwargs if any, else positional args."""
        return self.kwargs or self.args


def parse_options(options: str, where: str) -> dict:
    """`k=v,k2=v2` constructor arguments, each value read as YAML (numbers, booleans, lists)."""
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise GraftError(f"{where}: constructor arguments are key=value pairs separated by commas (got {item!r})")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def from_pretrained(cls, path: Path, **kw):
    """`cls.from_pretrained` on a local folder (safetensors where it has them); a failure is one GraftError line."""
    try:
        return cls.from_pretrained(str(path), use_safetensors=_has_safetensors(path), **kw)
    except Exception as exc:
        raise GraftError(f"{path}: cannot load {cls.__name__}: {one_line(exc)}") from None
