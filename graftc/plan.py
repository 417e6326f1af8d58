"""The plan (YAML, version 1): which regions to rewrite with which operator, and how to recover quality.

Strict pydantic models: unknown keys are errors naming the key path and the closest allowed key; the whole
plan is validated before any model is loaded. Operator configs come from the rule registry, so a new rule
adds its op to the schema without touching this file.
"""
from __future__ import annotations

import difflib
import numbers
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from graftc.errors import GraftError
from graftc.match import Region
from graftc.rules import Strict

KINDS = ("attention", "mlp", "block", "block_pair")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*)?$")


class Select(Strict):
    kind: Literal["attention", "mlp", "block", "block_pair"] = Field("attention", description="region kind")
    layers: Union[list[int], str, None] = Field(None, description='indices, a slice string like "1::2", or "all"')
    ratio: float | None = Field(None, gt=0, le=1, description="fraction of the regions of this kind, in (0, 1]")
    strategy: Literal["interleaved", "first", "last"] = Field("interleaved", description="which regions `ratio` takes")
    fqn: str | None = Field(None, description='module path, or "re:<regex>" matched against region module paths')

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_type(cls, value):  # one clear message instead of pydantic's per-union-member errors
        if not (value is None or isinstance(value, str) or (isinstance(value, (list, tuple)) and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in value))):
            raise ValueError(f'layers must be a list of indices, a slice string like "1::2", or "all" (got {value!r})')
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, str) and value != "all" and not _SLICE.match(value):
            raise ValueError(f'layers must be a list of indices, a slice string like "1::2", or "all" (got {value!r})')
        step = _SLICE.match(value).group(4) if isinstance(value, str) and value != "all" else None
        if step is not None and int(step) == 0:
            raise ValueError(f"layers {value!r}: a slice step cannot be 0")
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"layers lists an index twice: {value}")
        return value

    @field_validator("fqn")
    @classmethod
    def _fqn(cls, value):
        if value is not None and value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value[3:]!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_selector(self):
        given = [k for k in ("layers", "ratio", "fqn") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of layers, ratio or fqn (got {', '.join(given) or 'none'})")
        return self


class Stage1(Strict):
    steps: int = Field(200, ge=1, description="optimizer steps per node")
    batch_size: int = Field(8, ge=1, description="samples per step")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    loss: Literal["auto", "l1", "l2", "huber"] = Field("auto", description="auto = L1 for attention, L2 for mlp")


class Stage2(Strict):
    steps: int = Field(500, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="samples per step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: int = Field(50, ge=0, description="linear warmup steps")
    objective: Literal["distill", "diffusion"] = Field("distill", description="match the teacher, or the model's own loss")


class Distill(Strict):
    stage1: Stage1 | None = Field(None, description="activation distillation of each rewritten node")
    stage2: Stage2 | None = Field(None, description="end-to-end fine-tuning")


def _op_union():
    from graftc.rules import rules_by_op

    configs = tuple(rule.config for rule in rules_by_op().values())
    return Annotated[Union[configs], Field(discriminator="op")] if len(configs) > 1 else configs[0]


@lru_cache(maxsize=None)
def plan_model() -> type[BaseModel]:
    """The Plan class, built once from the registry (so its `replace` union lists every registered op)."""
    op_union = _op_union()

    class GraftStep(Strict):
        select: Select = Field(description="which regions")
        replace: op_union = Field(description="the operator that replaces them")  # type: ignore[valid-type]

    class Plan(Strict):
        version: Literal[1] = Field(1, description="plan format version")
        graft: list[GraftStep] = Field(default_factory=list, description="rewrites, applied in order")
        distill: Distill | None = Field(None, description="quality recovery; absent = rewrite only")

    return Plan


def json_schema() -> dict:
    return plan_model().model_json_schema()


def parse_plan(data: Any, source: str = "plan") -> BaseModel:
    """Validate raw plan data. Every problem becomes one GraftError line naming the key path."""
    if not isinstance(data, dict):
        raise GraftError(f"{source}: a plan is a mapping with keys version, graft, distill (got {type(data).__name__})")
    if "version" not in data:
        raise GraftError(f"{source}: missing 'version' (this graftc reads version 1)")
    if data["version"] != 1:
        raise GraftError(f"{source}: unsupported plan version {data['version']!r} (this graftc reads version 1)")
    Plan = plan_model()
    _check_keys(data, Plan, source)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = _path(source, [p for p in err["loc"] if not (isinstance(p, str) and p in _op_names())])
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["type"] not in ("value_error", "missing") and not isinstance(err.get("input"), dict) else ""
        raise GraftError(f"{path}: {msg}{got}") from None


def load_plan(path: str | Path) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"plan file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GraftError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_plan(data, str(path))


def dump_plan(plan: BaseModel) -> str:
    """The resolved plan: every default filled in."""
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- strict keys with suggestions
def _op_names() -> list[str]:
    from graftc.rules import rules_by_op

    return list(rules_by_op())


def _path(source: str, loc) -> str:
    out = source
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _check_keys(data: Any, model: type[BaseModel], path: str) -> None:
    if not isinstance(data, dict):
        return  # pydantic reports the wrong type
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise GraftError(f"{path}: unknown key '{key}'{hint} (allowed: {', '.join(fields)})")
        candidates = _models_in(fields[key].annotation)
        if len(candidates) > 1 and isinstance(value, dict):  # the op union: pick the config by its op tag
            ops = {m.model_fields["op"].default: m for m in candidates if "op" in m.model_fields}
            op = value.get("op")
            if op not in ops:
                close = difflib.get_close_matches(str(op), list(ops), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                what = "missing 'op'" if op is None else f"unknown op '{op}'"
                raise GraftError(f"{path}.{key}: {what}{hint} (allowed: {', '.join(ops)})")
            candidates = [ops[op]]
        if len(candidates) == 1:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                sub = f"{path}.{key}[{i}]" if isinstance(value, list) else f"{path}.{key}"
                _check_keys(item, candidates[0], sub)


# ---------------------------------------------------------------- selection
def select_regions(select: Select, regions: list[Region], where: str) -> list[Region]:
    """The regions a `select` names, with errors that say what the model has."""
    pool = [r for r in regions if r.kind == select.kind]
    n = len(pool)
    if n == 0:
        raise GraftError(f"{where}: the model has no {select.kind} regions")
    if select.fqn is not None:
        if select.fqn.startswith("re:"):
            pattern = re.compile(select.fqn[3:])
            chosen = [r for r in pool if pattern.search(r.fqn)]
        else:
            chosen = [r for r in pool if r.fqn == select.fqn]
        if not chosen:
            examples = ", ".join(r.fqn for r in pool[:3])
            raise GraftError(f"{where}: fqn {select.fqn!r} matches no {select.kind} region (e.g. {examples})")
        return chosen
    if select.ratio is not None:
        k = max(1, round(select.ratio * n))
        if select.strategy == "first":
            idx = list(range(k))
        elif select.strategy == "last":
            idx = list(range(n - k, n))
        else:  # evenly spaced, ending at the last layer: 0.5 of 28 -> 1, 3, ..., 27
            idx = sorted({n - 1 - (i * n) // k for i in range(k)})
        return [pool[i] for i in idx]
    if select.layers == "all":
        return pool
    if isinstance(select.layers, str):
        parts = [int(p) if p.strip() else None for p in (select.layers.split(":") + [""])[:3]]
        chosen = pool[slice(*parts)]
        if not chosen:
            raise GraftError(f"{where}: layers {select.layers!r} selects none of the model's {n} {select.kind} regions")
        return chosen
    bad = [i for i in select.layers if not -n <= i < n]
    if bad:
        raise GraftError(f"{where}: layer index {bad[0]} out of range: the model has {n} {select.kind} regions (0..{n - 1})")
    return [pool[i] for i in select.layers]
