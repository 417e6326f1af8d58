"""Fuzzing: hostile plans and damaged artifacts never crash graftc, and random grafts of every zoo family hold up.

Plans: arbitrary bytes, arbitrary YAML documents and mutated example plans go through the plan parser
(`graftc.plan.plan_from_bytes`, what `graftc compile` reads a plan file with). The outcome is a plan or a
GraftError of one line, never another exception; a plan that parses re-parses from its resolved form unchanged.
A few of each class also go through the real CLI in a subprocess: exit 2, one stderr line, no traceback, and
neither OUT nor anything beside it is left behind.

Grafts: random (family, op, selection, init) over `tests.zoo.FAMILIES` (and DeiT) and every registered operator. Each
family is traced once (one real `graftc.compile`, checked to agree with the fast path); examples then rewrite
copies of the model from that trace's regions, as `graftc.load` replays an artifact. The grafted model keeps
the teacher's output shapes and dtypes, its outputs are finite, and save -> load gives it back bit for bit.

Example counts come from the hypothesis profile (tests/conftest.py): "ci" by default, `--hypothesis-profile=long`
for the nightly run. `pytest -s` prints how many inputs of each class were tried and how they ended.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import graftc
from graftc import artifact
from graftc.compiler import GraftResult, replay
from graftc.errors import GraftError
from graftc.plan import KINDS, _models_in, dump_plan, parse_plan, plan_from_bytes, plan_model, select_regions
from graftc.passes import rules_by_op
from graftc.spec import load_model
from tests import zoo
from tests.helpers import perturb, run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))}
TALLY = collections.Counter()  # (input class, outcome) -> count, printed when the module ends


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    yield
    if TALLY:
        print("\nfuzz tally: " + ", ".join(f"{k[0]} {k[1]}: {v}" for k, v in sorted(TALLY.items())))


# ---------------------------------------------------------------- the plan parser
def _vocabulary() -> list[str]:
    """Every key and enum word of the plan schema, so random documents reach deep into validation."""
    words, seen = set(KINDS) | set(rules_by_op()), set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            words.add(name)
            for sub in _models_in(field.annotation):
                walk(sub)

    walk(plan_model())
    words |= {"all", "1::2", "::0", "7:", "re:.*", "re:(", "interleaved", "first", "last", "local-first", "auto",
              "l1", "huber", "distill", "diffusion", "lm", "teacher", "random", "copy", "cosine", "bf16", "skip"}
    return sorted(words)


VOCAB = _vocabulary()
NUMBERS = st.one_of(st.integers(-3, 130), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 1e308, -0.0, 0.5, 1.0]))
UNICODE = st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), min_size=1, max_size=8)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), UNICODE, st.sampled_from(VOCAB))
KEYS = st.one_of(st.sampled_from(VOCAB), st.text(max_size=8), st.integers(-2, 2), st.booleans(), st.none())
ANY = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                   st.dictionaries(KEYS, kids, max_size=3)), max_leaves=12)


def _plan_outcome(raw: bytes, what: str):
    """The parser's contract: a plan that does something (and survives its own resolved form) or one GraftError line."""
    try:
        plan = plan_from_bytes(raw, "fuzz.yaml")
    except GraftError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml") and "\n" not in message and len(message) < 1000, message
        TALLY[(what, "clear error")] += 1
        return None
    assert plan.graft or plan.distill_only
    assert all(math.isfinite(x) for x in _numbers(plan.model_dump())), "an inf/NaN number was accepted"
    assert plan_from_bytes(dump_plan(plan).encode(), "fuzz.yaml") == plan  # what an artifact's plan.yaml holds
    TALLY[(what, "valid plan")] += 1
    return plan


def _numbers(node):
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [x for item in node for x in _numbers(item)]
    return [node] if isinstance(node, float) else []


YAML_TOKENS = ["version: 1\n", "version: 2\n", "graft:\n", "  - select: ", "{kind: attention, layers: all}\n",
               "    replace: ", "{op: self}\n", "{op: hyena_x, kernel: 999}\n", "distill: ", "{stage1: {lr: .nan}}\n",
               "data: ", "- ", "[", "]", "{", "}", ": ", ", ", "&a ", "*a ", "!!python/object:os.system ", "<<: ",
               "? ", "|\n", "\t", "'", '"', "#", "\n", "~", ".inf", "-.inf", "0x1F", "1e999", "é", "\u202e", "\x00",
               "\ufeff", "---\n", "...\n", "%YAML 1.1\n", "!!binary aGk=\n", "2001-12-14\n"]


@given(raw=st.one_of(st.binary(max_size=400),
                     st.lists(st.sampled_from(YAML_TOKENS), max_size=30).map(lambda t: "".join(t).encode()),
                     st.text(max_size=200).map(str.encode)))
def test_fuzzed_bytes_give_a_plan_or_one_clear_line(raw):
    _plan_outcome(raw, "fuzzed bytes")


_STEP = st.fixed_dictionaries({}, optional={
    "select": st.fixed_dictionaries({}, optional={
        "kind": st.one_of(st.sampled_from(KINDS), SCALARS),
        "layers": st.one_of(st.lists(st.integers(-8, 8), max_size=4), st.sampled_from(["all", "1::2", "::0", "7:", "x"]),
                            ANY),
        "ratio": NUMBERS, "strategy": SCALARS, "fqn": st.one_of(st.sampled_from(["re:(", "re:.*", "blocks.0.attn"]), ANY)}),
    "replace": st.builds(lambda op, fields: {**fields, "op": op}, st.one_of(st.sampled_from(sorted(rules_by_op())), SCALARS),
                         st.dictionaries(st.sampled_from(VOCAB), st.one_of(NUMBERS, SCALARS), max_size=4)),
})
PLAN_LIKE = st.builds(
    lambda version, graft, rest: {**rest, "version": version, **({"graft": graft} if graft is not None else {})},
    st.one_of(st.just(1), SCALARS), st.one_of(st.none(), st.lists(_STEP, max_size=3), ANY),
    st.dictionaries(st.sampled_from(["distill", "data", "distill_only"] + VOCAB[:10]),
                    st.one_of(st.dictionaries(st.sampled_from(VOCAB), st.one_of(ANY, st.dictionaries(
                        st.sampled_from(VOCAB), st.one_of(NUMBERS, SCALARS), max_size=4)), max_size=4), ANY),
                    max_size=3))


@given(doc=st.one_of(ANY, PLAN_LIKE))
def test_arbitrary_yaml_documents_give_a_plan_or_one_clear_line(doc):
    _plan_outcome(yaml.safe_dump(doc, allow_unicode=True).encode(), "YAML documents")


def _places(node, path=()):
    """Every (container path, key) in a document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield path, key
        yield from _places(value, path + (key,))


@st.composite
def mutated_examples(draw):
    doc = copy.deepcopy(EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))])
    for _ in range(draw(st.integers(1, 3))):
        places = list(_places(doc))
        if not places:
            break
        path, key = draw(st.sampled_from(places))
        parent = doc
        for part in path:
            parent = parent[part]
        how = draw(st.sampled_from(["delete", "rename", "wrong type", "number", "unicode", "duplicate"]))
        if how == "delete":
            del parent[key]
        elif how == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(st.sampled_from(VOCAB), st.just(f"{key}s"), st.just(str(key).upper()), UNICODE))
            parent[new] = parent.pop(key)
        elif how == "wrong type":
            parent[key] = draw(ANY)
        elif how == "number":
            parent[key] = draw(NUMBERS)
        elif how == "unicode":
            parent[key] = draw(UNICODE)
        elif how == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return doc


def test_every_example_plan_is_valid():
    for name, doc in EXAMPLES.items():
        assert _plan_outcome(yaml.safe_dump(doc).encode(), "example plans") is not None, name


@given(doc=mutated_examples())
def test_mutated_example_plans_give_a_plan_or_one_clear_line(doc):
    _plan_outcome(yaml.safe_dump(doc, allow_unicode=True).encode(), "mutated plans")


def test_empty_and_no_op_plans_are_errors_unless_distill_only():
    for text, fragment in [("version: 1\ngraft: []\n", "graft is empty"), ("version: 1\n", "graft is empty"),
                           ("version: 1\ndistill: {stage2: {steps: 2}}\n", "distill_only: true"),
                           ("version: 1\ndistill_only: true\n", "no distill section"),
                           ("version: 1\ngraft: [{select: {layers: []}, replace: {op: self}}]\n", "empty list"),
                           ("version: 1\ndistill_only: true\ndistill: {stage2: {steps: 2}}\n"
                            "graft: [{select: {layers: all}, replace: {op: self}}]\n", "lists 1 rewrite")]:
        with pytest.raises(GraftError, match=fragment):
            plan_from_bytes(text.encode(), "p.yaml")
    plan = plan_from_bytes(b"version: 1\ndistill_only: true\ndistill: {stage2: {steps: 2}}\n", "p.yaml")
    assert plan.distill_only and plan.graft == [] and plan.distill.stage2.steps == 2
    assert parse_plan({"version": 1}).data.samples == 512  # the schema alone still gives defaults


def test_distill_only_plan_compiles_without_rewrites(tmp_path):
    from graftc.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ndistill_only: true\ndistill: {stage2: {steps: 2, batch_size: 2, warmup: 0}}\n"
                    f"data: {{samples: 8, sampler_steps: 2, fd_samples: 0, cache: {tmp_path / 'cache'}}}\n")
    assert main(["compile", "demo:tiny-dit", str(plan), "-o", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rewrites"] == [] and manifest["distill"]["stage2"]["steps_run"] == 2
    assert artifact.verify_artifact(tmp_path / "out")["format"] == 2


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_refused(value):
    for doc in ({**EXAMPLES["hyena-x-50.yaml"], "distill": {"stage2": {"lr": value}}},
                {**EXAMPLES["attn50-mlp100.yaml"], "data": {"cfg_scale": value}},
                {"version": 1, "graft": [{"select": {"kind": "mlp", "ratio": 0.5}, "replace": {"op": "mlp", "ratio": value}}]}):
        with pytest.raises(GraftError, match="finite number|greater than|less than"):
            plan_from_bytes(yaml.safe_dump(doc).encode(), "p.yaml")


CLI_CASES = {
    "binary bytes": b"\xff\xfe\x00garbage",
    "empty graft": b"version: 1\ngraft: []\n",
    "NaN learning rate": yaml.safe_dump({**EXAMPLES["hyena-x-50.yaml"], "distill": {"stage1": {"lr": float("nan")}}}).encode(),
    "op as a list": b"version: 1\ngraft: [{select: {layers: all}, replace: {op: [self]}}]\n",
    "nested too deeply": b"version: 1\ngraft: " + b"[" * 5000 + b"\n",
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses_hostile_plans_cleanly(name, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(CLI_CASES[name])
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    proc = subprocess.run([sys.executable, "-m", "graftc.cli", "compile", "demo:tiny-dit", str(plan), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    TALLY[("CLI runs", f"exit {proc.returncode}")] += 1
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graftc: error: ") and str(plan) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(work.iterdir()) == []  # no OUT, no staging folder, no lock file


# ---------------------------------------------------------------- random grafts of every family
def _first_kind(op: str) -> str:
    return rules_by_op()[op].kinds[0]


def _op_config(draw, op: str) -> dict:
    """A random, small config for `op`: its init among those its schema allows, and small sizes."""
    config = {"op": op}
    init = rules_by_op()[op].config.model_fields["init"].annotation
    config["init"] = draw(st.sampled_from(list(init.__args__)))
    small = {"kernel": st.sampled_from([1, 3, 5]), "window": st.integers(0, 6), "feature_map":
             st.sampled_from(["hedgehog", "elu", "relu"]), "d_state": st.sampled_from([4, 8]),
             "head_dim": st.sampled_from([4, 8]), "chunk": st.integers(1, 8), "d_conv": st.integers(1, 4),
             "expand": st.sampled_from([1, 2]), "ratio": st.sampled_from([0.5, 1, 2.5, 4]),
             "fused": st.booleans()}
    for name in rules_by_op()[op].config.model_fields:
        if name in small and draw(st.booleans()):
            config[name] = draw(small[name])
    if op == "swa2d" and "kernel" not in config:
        config["kernel"] = 3
    return config


def _selection(draw, kind: str, regions) -> dict:
    n = sum(r.kind == kind for r in regions)
    how = draw(st.sampled_from(["layers", "ratio", "slice", "all", "fqn"]))
    if how == "ratio":
        return {"kind": kind, "ratio": draw(st.sampled_from([0.25, 0.5, 1.0])),
                "strategy": draw(st.sampled_from(["interleaved", "first", "last"]))}
    if how == "slice":
        return {"kind": kind, "layers": draw(st.sampled_from(["::2", "1::2", "0:1", "-1:"]))}
    if how == "all":
        return {"kind": kind, "layers": "all"}
    pool = [r.fqn for r in regions if r.kind == kind]
    if not pool:
        return {"kind": kind, "layers": "all"}  # refused by select_regions: the model has none
    if how == "fqn":
        return {"kind": kind, "fqn": draw(st.sampled_from(pool))}
    return {"kind": kind, "layers": sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(3, n))))}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each zoo family loaded once (every weight given signal) and traced once by a real graftc.compile, whose
    grafted model must equal the fast path's (replaying its rewrites on a copy of the model)."""
    built = {}
    for name, make in FAMILIES.items():
        spec = make(tmp_path_factory.mktemp(name))
        loaded = load_model(spec)
        perturb(loaded.model)
        plan = {"version": 1, "graft": [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "hyena_x"}},
                                        {"select": {"kind": "mlp", "layers": [1]}, "replace": {"op": "mlp", "ratio": 2}}]}
        result = graftc.compile(copy.deepcopy(loaded.model), plan, loaded.example)
        fast = replay(copy.deepcopy(loaded.model), copy.deepcopy(result.rewrites))
        assert all(torch.equal(a, b) for a, b in zip(run(result.model, loaded), run(fast, loaded))), name
        built[name] = (spec, loaded, result.regions, run(loaded.model, loaded))
    return built


@st.composite
def grafts(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    ops = sorted(rules_by_op())
    first = draw(st.sampled_from(ops))
    steps = [(first, _first_kind(first))]
    if _first_kind(first) == "attention" and draw(st.booleans()):  # an MLP rewrite beside it never overlaps
        mlp_op = draw(st.sampled_from([op for op in ops if _first_kind(op) == "mlp" or op == "self"]))
        steps.append((mlp_op, "mlp"))
    return family, [(op, kind, _op_config(draw, op)) for op, kind in steps], draw(st.data())


SHALLOW = {"diffusers-dit": zoo.diffusers_dit, "pixart-sigma": zoo.pixart, "qwen3-gqa": zoo.qwen3, "llama": zoo.llama,
           "bert": zoo.bert, "vit": zoo.vit,
           "deit": zoo.deit}  # built 2 blocks deep: tracing is most of the time, and 2 blocks make a block pair
FAMILIES = {name: (lambda d, build=SHALLOW[name]: build(d, depth=2)) if name in SHALLOW else make
            for name, make in {**zoo.FAMILIES, "deit": None}.items()  # DeiT: two tokens before the patch grid
            if name != "demo"}  # demo:tiny-dit is graftc's DiT (graftc-dit) with trained weights
def _graft_and_check(families, family: str, plan, tmp_path_factory) -> str:
    """Rewrite a copy of the family's model by `plan` from the once-traced regions (as graftc.load replays an
    artifact), then check the graft: runs, keeps output shapes and dtypes, finite, save -> load bit-exact.
    Returns "grafted", or "refused" where the rule's guard says the op does not fit (one line, named)."""
    spec, loaded, regions, teacher = families[family]
    rewrites = []
    for i, step in enumerate(plan.graft):
        try:
            chosen = select_regions(step.select, regions, f"graft[{i}].select")
        except GraftError as exc:  # e.g. a model without block pairs
            assert "\n" not in str(exc) and "regions" in str(exc), str(exc)
            return "refused"
        rewrites += [{"rule": step.replace.op, "fqn": r.fqn, "kind": r.kind, "index": r.index, "step": i,
                      "config": step.replace.model_dump(mode="json"), "region": r.to_json()} for r in chosen]
    try:
        model = replay(copy.deepcopy(loaded.model), copy.deepcopy(rewrites))
    except GraftError as exc:
        assert "\n" not in str(exc) and ("cannot replace" in str(exc) or "does not apply" in str(exc)), str(exc)
        return "refused"
    got = run(model, loaded)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in teacher]
    assert all(torch.isfinite(t).all() for t in got)
    out = tmp_path_factory.mktemp("art") / "out"
    artifact.save(out, GraftResult(model, regions, rewrites, [], plan), spec, "h", "report")
    reloaded = graftc.load(out, model=copy.deepcopy(loaded.model))
    assert all(torch.equal(a, b) for a, b in zip(got, run(reloaded, loaded)))
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    return "grafted"


@settings(max_examples=max(60, settings().max_examples // 3))  # each example saves and loads a model
@given(case=grafts())
def test_random_grafts_of_every_family_run_keep_shapes_and_round_trip(case, families, tmp_path_factory):
    family, steps, data = case
    regions = families[family][2]
    plan = parse_plan({"version": 1, "graft": [{"select": _selection(data.draw, kind, regions), "replace": config}
                                               for _, kind, config in steps]}, "fuzz")
    TALLY[("family grafts", _graft_and_check(families, family, plan, tmp_path_factory))] += 1


# The only misfits are the families that lack what a rule needs (graftc.rules.NEEDS): a token grid (image models),
# or no decode cache (an MLP-side token mixer gets none in a decoder).
LACKING = {"grid": {"qwen3-gqa", "llama", "bert"}, "no-cache": {"qwen3-gqa", "llama"}}
EXPECTED_REFUSALS = {op: set().union(*(LACKING[need] for need in rule.needs)) for op, rule in rules_by_op().items()}
COVERED = collections.defaultdict(dict)  # op -> family -> outcome


@pytest.mark.parametrize("op", sorted(rules_by_op()))
def test_every_operator_on_every_family(op, families, tmp_path_factory):
    """Every op on layer 0 of every family: it grafts (with the property's checks) or, only where expected, its
    guard refuses in one line."""
    kind = _first_kind(op)
    for family in FAMILIES:
        plan = parse_plan({"version": 1, "graft": [{"select": {"kind": kind, "layers": [0]},
                                                    "replace": {"op": op, **rules_by_op()[op].example}}]},
                          "every-op")
        COVERED[op][family] = _graft_and_check(families, family, plan, tmp_path_factory)
        TALLY[("every op x family", COVERED[op][family])] += 1
    print(f"\n{op}: " + ", ".join(f"{f} {o}" for f, o in COVERED[op].items()))
    refused = {f for f, outcome in COVERED[op].items() if outcome == "refused"}
    assert refused <= EXPECTED_REFUSALS.get(op, set()), refused  # no op lost a family it grafts


# ---------------------------------------------------------------- damaged artifacts
@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    spec = zoo.llama(tmp_path_factory.mktemp("llama"), depth=2)
    loaded = load_model(spec)
    result = graftc.compile(copy.deepcopy(loaded.model), {"version": 1, "graft": [
        {"select": {"kind": "attention", "layers": [1]}, "replace": {"op": "swa", "window": 2}}]}, loaded.example)
    out = tmp_path_factory.mktemp("small") / "art"
    artifact.save(out, result, spec, "h", "report")
    return out, loaded


@given(where=st.sampled_from(["model.safetensors", "manifest.json"]), data=st.data())
def test_damaged_artifacts_are_refused_in_one_line(where, data, small_artifact, tmp_path_factory):
    """A flipped, cut or extended model.safetensors is always refused; a damaged manifest is refused or, where
    the damage does not matter (a changed version string), loads: never another exception."""
    good, loaded = small_artifact
    path = tmp_path_factory.mktemp("bad") / "art"
    path.mkdir()
    for f in good.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    raw = bytearray((path / where).read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    (path / where).write_bytes(bytes(raw))
    try:
        model = graftc.load(path, model=copy.deepcopy(loaded.model) if data.draw(st.booleans()) else None)
    except GraftError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        TALLY[(f"damaged {where}", "clear error")] += 1
        return
    assert where == "manifest.json", f"{how} of model.safetensors loaded silently"
    expected = run(graftc.load(good, model=copy.deepcopy(loaded.model)), loaded)
    assert all(torch.equal(a, b) for a, b in zip(expected, run(model, loaded))), f"{how} of the manifest changed the model"
    TALLY[(f"damaged {where}", "loaded (harmless change)")] += 1
