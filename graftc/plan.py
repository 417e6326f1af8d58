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

from graftc import text
from graftc.errors import GraftError
from graftc.passes import rules_by_op
from graftc.region import Region
from graftc.rules import Strict

KINDS = ("attention", "mlp", "block", "block_pair")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*)?$")


def _valid_regex(value: str | None) -> str | None:
    if value is not None and value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value[3:]!r}: {exc}") from None
    return value


class Select(Strict):
    kind: Literal["attention", "mlp", "block", "block_pair"] = Field("attention", description="region kind")
    layers: Union[list[int], str, None] = Field(None, description='indices, a slice string like "1::2", or "all"')
    ratio: float | None = Field(None, gt=0, le=1, description="fraction of the regions of this kind, in (0, 1]")
    strategy: Literal["interleaved", "first", "last", "local-first", "nonlocal-first", "least-sensitive-first"] = Field(
        "interleaved", description="which regions `ratio` takes; local-first / nonlocal-first rank attention layers "
                                   "by measured attention locality (graftc analyze), most / least local first; "
                                   "least-sensitive-first by how little the model's output moves when the layer "
                                   "alone is grafted and given a short stage 1 (graftc.sensitivity)")
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
        if isinstance(value, list) and not value:
            raise ValueError('layers is an empty list, which selects nothing (give indices, a slice string like '
                             '"1::2", or "all")')
        return value

    @field_validator("fqn")
    @classmethod
    def _fqn(cls, value):
        return _valid_regex(value)

    @model_validator(mode="after")
    def _one_selector(self):
        given = [k for k in ("layers", "ratio", "fqn") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of layers, ratio or fqn (got {', '.join(given) or 'none'})")
        return self


class NodeOverride(Strict):
    match: str = Field(description='an op name (e.g. "hyena_x") or a module path, or "re:<regex>" over module paths')
    loss: Literal["auto", "l1", "l2", "huber"] | None = Field(None, description="this node's loss")
    lr: float | None = Field(None, gt=0, description="this node's learning rate")
    steps: int | None = Field(None, ge=1, description="this node's optimizer steps")

    @field_validator("match")
    @classmethod
    def _match(cls, value):
        return _valid_regex(value)


class Stage1(Strict):
    steps: int = Field(200, ge=1, description="optimizer steps per node")
    batch_size: int = Field(8, ge=1, description="samples per step (over all ranks)")
    lr: float = Field(1e-4, gt=0, description="learning rate (AdamW, cosine decay to 10%)")
    loss: Literal["auto", "l1", "l2", "huber"] = Field("auto", description="auto = L1 for attention, L2 for mlp")
    huber_delta: float = Field(1.0, gt=0, description="delta of the huber loss")
    eval_every: int = Field(25, ge=1, description="steps between validation losses")
    patience: int = Field(0, ge=0, description="stop a node after this many evaluations without a better "
                                              "validation loss (0 = never stop early)")
    overrides: list[NodeOverride] = Field(default_factory=list, description="per-node loss/lr/steps, first match wins")


class Lora(Strict):
    rank: int = Field(8, ge=1, description="rank of the low-rank update of every Linear")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")


Objective = Literal["distill", "diffusion", "lm", "embedding"]


class Stage2(Strict):
    steps: int = Field(500, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="samples per step (over all ranks)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: int = Field(50, ge=0, description="linear warmup steps")
    schedule: Literal["constant", "cosine"] = Field("constant", description="after warmup: constant (the method's) "
                                                                          "or cosine decay to 0 at the last step")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(10.0, gt=0, description="clip the gradient norm to this")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights that are saved (0 = no EMA)")
    objective: Union[Objective, dict[Objective, float]] = Field(
        "distill", description="match the teacher's outputs (distill), the model's own loss (diffusion: noise "
                               "prediction; lm: next token), text encoders: the teacher's sentence embeddings "
                               "(embedding: 1 - cosine of the mean-pooled last hidden states), or a weighted sum "
                               "such as {distill: 1, diffusion: 0.5}")
    snr_gamma: float | None = Field(None, gt=0, description="diffusion models: weight each sample's loss by "
                                    "min(1, gamma / SNR(t)) (Min-SNR), so near-clean timesteps stop dominating")
    lora: Lora | None = Field(None, description="train low-rank updates of the Linears instead of all weights")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")

    @field_validator("objective")
    @classmethod
    def _objective(cls, value):
        if isinstance(value, dict) and (not value or any(w < 0 for w in value.values()) or not any(value.values())):
            raise ValueError(f"objective weights must be >= 0 with at least one > 0 (got {value})")
        return value

    def objective_weights(self) -> dict[str, float]:
        return {self.objective: 1.0} if isinstance(self.objective, str) else {k: w for k, w in self.objective.items() if w}


class Distill(Strict):
    stage1: Stage1 | None = Field(None, description="activation distillation of each rewritten node")
    stage2: Stage2 | None = Field(None, description="end-to-end fine-tuning")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (--resume continues from the last)")


class Data(Strict):
    samples: int = Field(512, ge=2, description="diffusion models: teacher samples to generate and cache")
    sampler_steps: int = Field(25, ge=1, description="diffusion models: sampler steps per sample")
    cfg_scale: float = Field(1.5, ge=0, description="diffusion models: classifier-free guidance scale")
    text: str | None = Field(None, description="language models and encoders: a text file, a folder of .txt files, "
                                               "or a built-in corpus: 'corpus:pydoc' (the default: the train split of "
                                               "the pydoc_data topics) or 'corpus:stdlib' (those and the standard "
                                               "library's docstrings, ~12x the sentences)")
    seq_len: int = Field(128, ge=2, description="language models and encoders: tokens per sample")
    text_unit: Literal["window", "sentence"] = Field(
        "window", description="language models and encoders: 'window' cuts the text into blocks of seq_len tokens; "
                              "'sentence' makes each prose sentence one sample, with the tokenizer's special tokens, "
                              "padded to seq_len (what a sentence encoder embeds); padding never enters a loss")
    prompt_embeds: str | None = Field(None, description="text-to-image models: a safetensors file with "
                                                        "prompt_embeds [P, L, C] (and optionally prompt_mask [P, L])")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the samples held out for validation")
    cache: str | None = Field(None, description="cache folder (default: $GRAFTC_CACHE or ~/.cache/graftc)")
    fd_samples: int = Field(1000, ge=0, description="demo models: samples for the FD quality figures (0 = skip)")
    images: str | None = Field(None, description="class-conditional diffusion models: train on real data instead of "
                                                 "teacher samples: a safetensors file with x0 [N, C, H, W] (the "
                                                 "model's input space, latents already scaled) and y [N] labels; "
                                                 "'demo:digits' = the demo DiT's own training data; image "
                                                 "classifiers: x0 in the model's input space, y optional "
                                                 "(default: the digits, scaled to the model's image size)")

    @field_validator("text")
    @classmethod
    def _known_corpus(cls, value):
        text.corpus_name(value)  # raises on an unknown corpus
        return value


def _op_union():
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
        data: Data = Field(default_factory=Data, description="where distillation gets its inputs")
        distill_only: bool = Field(False, description="true: the plan rewrites nothing and only distills (graft "
                                                      "empty, distill given); otherwise an empty graft is an error")

        @model_validator(mode="after")
        def _distill_only(self):
            if self.distill_only and self.graft:
                raise ValueError(f"distill_only is true but graft lists {len(self.graft)} rewrite(s); "
                                 "remove them or drop distill_only")
            if self.distill_only and self.distill is None:
                raise ValueError("distill_only is true but there is no distill section, so the plan does nothing")
            return self

    return Plan


def json_schema() -> dict:
    return plan_model().model_json_schema()


def _short(value: Any, limit: int = 60) -> str:
    """repr of a user value, cut so that one error line stays readable however big the value is."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_plan(data: Any, source: str = "plan") -> BaseModel:
    """Validate raw plan data. Every problem becomes one GraftError line naming the key path.

    Only the schema is checked here (so `parse_plan({"version": 1})` gives the defaults); `check_does_work`
    refuses a plan that would change nothing, and `load_plan` does both."""
    if not isinstance(data, dict):
        raise GraftError(f"{source}: a plan is a mapping with keys version, graft, distill, data (got {type(data).__name__})")
    if "version" not in data:
        raise GraftError(f"{source}: missing 'version' (this graftc reads version 1)")
    if type(data["version"]) is not int or data["version"] != 1:  # not True, not 1.0
        raise GraftError(f"{source}: unsupported plan version {_short(data['version'])} (this graftc reads version 1)")
    Plan = plan_model()
    _check_keys(data, Plan, source)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        # a union reports one error per member: the deepest is the one about the value the user wrote
        located = [([p for p in e["loc"] if not _union_tag(p)], e) for e in exc.errors()]
        loc, err = max(located, key=lambda item: len(item[0]))
        path = _path(source, loc)
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {_short(err['input'])})" if err["type"] not in ("value_error", "missing") and not isinstance(err.get("input"), dict) else ""
        raise GraftError(f"{path}: {msg}{got}") from None


def check_does_work(plan: BaseModel, source: str = "plan") -> BaseModel:
    """A plan that would change nothing is a mistake (a typo'd or emptied graft list), unless it says it only
    distills."""
    if not plan.graft and not plan.distill_only:
        raise GraftError(f"{source}: graft is empty, so the plan changes nothing; list at least one rewrite, or "
                         "set distill_only: true (with a distill section) to only fine-tune the model")
    return plan


def plan_from_bytes(raw: bytes, source: str = "plan") -> BaseModel:
    """A plan file's bytes -> a validated plan that does something; every problem is one GraftError line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GraftError(f"{source}: not a text file (byte 0x{raw[exc.start]:02x} at offset {exc.start} is not "
                         "UTF-8); a plan is a YAML document") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GraftError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise GraftError(f"{source}: nested too deeply to be a plan") from None
    return check_does_work(parse_plan(data, source), source)


def load_plan(path: str | Path) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"plan file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GraftError(f"{path}: cannot read the plan: {exc.strerror or exc}") from None
    return plan_from_bytes(raw, str(path))


def dump_plan(plan: BaseModel) -> str:
    """The resolved plan: every default filled in."""
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- strict keys with suggestions
def _op_names() -> list[str]:
    return list(rules_by_op())


_TYPE_TAG = re.compile(r"^([a-z-]+\[.*\]|str|int|float|bool|none)$")


def _union_tag(part) -> bool:
    """A loc entry naming a union member (an op name, "dict[...]", "str"), not a key the user wrote."""
    return isinstance(part, str) and (part in _op_names() or bool(_TYPE_TAG.match(part)))


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
            raise GraftError(f"{path}: unknown key {_short(str(key))}{hint} (allowed: {', '.join(fields)})")
        candidates = _models_in(fields[key].annotation)
        if len(candidates) > 1 and isinstance(value, dict):  # the op union: pick the config by its op tag
            ops = {m.model_fields["op"].default: m for m in candidates if "op" in m.model_fields}
            op = value.get("op")
            if not isinstance(op, str) or op not in ops:  # a list or mapping as op is not hashable
                close = difflib.get_close_matches(str(op), list(ops), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                what = "missing 'op'" if op is None else f"unknown op {_short(op)}"
                raise GraftError(f"{path}.{key}: {what}{hint} (allowed: {', '.join(ops)})")
            candidates = [ops[op]]
        if len(candidates) == 1:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                sub = f"{path}.{key}[{i}]" if isinstance(value, list) else f"{path}.{key}"
                _check_keys(item, candidates[0], sub)


# ---------------------------------------------------------------- selection
# The ranked strategies: the ranking (graftc.rankings) each takes attention layers from, and whether it takes them
# from the ranking's end instead of its front.
RANKED_STRATEGIES = {"local-first": ("locality", False), "nonlocal-first": ("locality", True),
                     "least-sensitive-first": ("sensitivity", False)}
_RANKED_BY = {"locality": "measured locality; it needs kind: attention and the locality analysis",
              "sensitivity": "measured graft sensitivity; it needs kind: attention and the measurement (graftc compile "
                             "makes it)"}


def ranked_layers(strategy: str, order: list[int], k: int) -> list[int]:
    """The `k` attention indices a ranked strategy takes from `order` (the ranking's order), sorted."""
    ranked = order[::-1] if RANKED_STRATEGIES[strategy][1] else order
    return sorted(ranked[:k])


def select_regions(select: Select, regions: list[Region], where: str, order: list[int] | None = None) -> list[Region]:
    """The regions a `select` names, with errors that say what the model has. `order`: the attention indices in
    the order of the ranking a ranked strategy reads (RANKED_STRATEGIES)."""
    pool = [r for r in regions if r.kind == select.kind]
    n = len(pool)
    if n == 0:
        why = [f"{r.fqn}: {r.attrs['unpaired']}" for r in regions if r.kind == "block" and "unpaired" in r.attrs]
        raise GraftError(f"{where}: the model has no {select.kind} regions" + (f" ({'; '.join(why[:2])})" if why else ""))
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
        if select.strategy in RANKED_STRATEGIES:
            if select.kind != "attention" or order is None:
                by = _RANKED_BY[RANKED_STRATEGIES[select.strategy][0]]
                raise GraftError(f"{where}: strategy {select.strategy} ranks attention layers by {by}")
            idx = ranked_layers(select.strategy, order, k)
        elif select.strategy == "first":
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
