"""Bad input: exactly one line on stderr (`graftc: error: ...`), exit code 2, and OUT is never created.

Every case calls `graftc.cli.main` in-process on the small `demo:tiny-dit` (or a tiny `python:` model
written to tmp_path) and checks the message names what is wrong, where, and what is allowed.
"""
from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import graftc
from graftc.cli import main
from graftc.errors import GraftError

MODEL = "demo:tiny-dit"  # 6 attention and 6 mlp regions, loads in ~0.1 s
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

OK_PLAN = """\
version: 1
graft:
  - select: {kind: attention, layers: all}
    replace: {op: self}
"""


def _one_step(select: str, replace: str = "{op: self}") -> str:
    return f"version: 1\ngraft:\n  - select: {select}\n    replace: {replace}\n"


def _write_plan(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _temp_siblings(out: Path) -> list[str]:
    if not out.parent.is_dir():
        return []
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def assert_bad_input(argv: list[str], out: Path | None, capsys, *fragments: str) -> str:
    """Run the CLI on bad input and check the contract; returns the error line."""
    capsys.readouterr()  # drop anything a fixture printed
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, f"exit code {rc}, stderr: {captured.err!r}"
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be exactly one line, got: {captured.err!r}"
    line = lines[0]
    assert line.startswith("graftc: error: "), line
    assert len(line) > len("graftc: error: ") + 10, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert captured.out == "", f"nothing on stdout for bad input, got {captured.out!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert _temp_siblings(out) == [], f"temporary siblings left behind: {_temp_siblings(out)}"
    return line


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "artifact"


# ---------------------------------------------------------------- the plan (validated before the model loads)
PLAN_CASES = [
    pytest.param(_one_step("{kind: attention, layers: all}", "{op: slef}"),
                 ["graft[0].replace", "unknown op 'slef'", "did you mean 'self'?", "allowed:", "mlp"],
                 id="unknown-op-suggests-self"),
    pytest.param(_one_step("{kind: attention, layers: all}", "{init: copy}"),
                 ["graft[0].replace", "missing 'op'", "allowed:", "self"], id="missing-op"),
    pytest.param(_one_step("{kind: attention, ratio: 0}"),
                 ["graft[0].select.ratio", "greater than 0", "got 0"], id="ratio-zero"),
    pytest.param(_one_step("{kind: attention, ratio: 1.5}"),
                 ["graft[0].select.ratio", "less than or equal to 1", "1.5"], id="ratio-above-one"),
    pytest.param("version: 1\ngrafts: []\n",
                 ["unknown key 'grafts'", "did you mean 'graft'?", "allowed: version, graft, distill, data"],
                 id="unknown-top-level-key"),
    pytest.param(_one_step("{kind: attention, layerz: all}"),
                 ["graft[0].select", "unknown key 'layerz'", "did you mean 'layers'?", "allowed:"],
                 id="unknown-nested-key-layerz"),
    pytest.param(_one_step("{kind: attention, layers: all}", "{op: self, ratio: 2}"),
                 ["graft[0].replace", "unknown key 'ratio'", "allowed: op, init"], id="key-of-another-op"),
    pytest.param("version: 1\ndistill: {stage1: {stepz: 10}}\n",
                 ["distill.stage1", "unknown key 'stepz'", "did you mean 'steps'?"], id="unknown-key-in-distill"),
    pytest.param(_one_step("{kind: attention, ratio: half}"),
                 ["graft[0].select.ratio", "valid number", "'half'"], id="ratio-wrong-type"),
    pytest.param(_one_step("{kind: attention, layers: {a: 1}}"),
                 ["graft[0].select.layers", "list of indices", '"all"', "{'a': 1}"], id="layers-wrong-type-mapping"),
    pytest.param(_one_step("{kind: attention, layers: [true]}"),
                 ["graft[0].select.layers", "list of indices", "[True]"], id="layers-wrong-type-bool"),
    pytest.param(_one_step("{kind: attn, layers: all}"),
                 ["graft[0].select.kind", "'attention'", "'mlp'", "'attn'"], id="unknown-kind"),
    pytest.param(_one_step("{kind: attention, layers: all}", "{op: self, init: teacher}"),
                 ["graft[0].replace.init", "'copy' or 'random'", "'teacher'"], id="init-not-allowed-for-op"),
    pytest.param(_one_step("{kind: attention, layers: all, ratio: 0.5}"),
                 ["graft[0].select", "exactly one of layers, ratio or fqn", "got layers, ratio"],
                 id="two-selectors"),
    pytest.param(_one_step("{kind: attention}"),
                 ["graft[0].select", "exactly one of layers, ratio or fqn", "got none"], id="no-selector"),
    pytest.param(_one_step("{kind: attention, layers: '1:x'}"),
                 ["graft[0].select.layers", 'slice string like "1::2"', "'1:x'"], id="bad-slice-string"),
    pytest.param(_one_step("{kind: attention, layers: '::0'}"),
                 ["graft[0].select.layers", "'::0'", "step cannot be 0"], id="slice-step-zero"),
    pytest.param(_one_step("{kind: attention, layers: [1, 1]}"),
                 ["graft[0].select.layers", "index twice"], id="layer-listed-twice"),
    pytest.param(_one_step("{kind: attention, fqn: 're:blocks.(['}"),
                 ["graft[0].select.fqn", "invalid regular expression", "blocks.(["], id="invalid-fqn-regex"),
    pytest.param("graft: []\n", ["missing 'version'", "version 1"], id="version-missing"),
    pytest.param("version: 2\ngraft: []\n", ["unsupported plan version 2", "version 1"], id="version-2"),
    pytest.param("- version: 1\n- graft: []\n", ["a plan is a mapping", "version, graft, distill, data", "got list"],
                 id="plan-is-a-list"),
    pytest.param("", ["a plan is a mapping", "got NoneType"], id="plan-is-empty"),
    pytest.param("version: 1\ngraft: [\n  - {select\n", ["not valid YAML", "line "], id="invalid-yaml"),
    pytest.param("version: 1\ngraft:\n  - 3\n", ["graft[0]", "valid dictionary", "got 3"], id="step-not-a-mapping"),
    pytest.param("version: 1\ngraft: []\ndistill: {stage2: {objective: {distill: 0}}}\n",
                 ["distill.stage2.objective", "at least one > 0"], id="objective-weights-all-zero"),
    pytest.param("version: 1\ngraft: []\ndistill: {stage2: {objective: ddpm}}\n",
                 ["distill.stage2.objective", "'distill'", "'diffusion'", "'ddpm'"], id="objective-unknown"),
    pytest.param("version: 1\ngraft: []\ndistill: {stage1: {overrides: [{match: 're:(', lr: 1}]}}\n",
                 ["distill.stage1.overrides[0].match", "invalid regular expression"], id="override-bad-regex"),
    pytest.param("version: 1\ngraft: []\ndata: {samplez: 10}\n",
                 ["data", "unknown key 'samplez'", "did you mean 'samples'?"], id="unknown-key-in-data"),
    pytest.param("version: 1\ngraft: []\ndata: {text: 'corpus:wiki'}\n",
                 ["data.text", "unknown corpus 'corpus:wiki'", "known: corpus:pydoc, corpus:stdlib"],
                 id="unknown-corpus"),
    pytest.param(_one_step("{kind: mlp, layers: all}", "{op: mlp, ratio: 0}"),
                 ["graft[0].replace.ratio", "greater than 0", "got 0"], id="mlp-ratio-zero"),
    pytest.param(_one_step("{kind: mlp, layers: all}", "{op: mlp, ratio: -2}"),
                 ["graft[0].replace.ratio", "greater than 0", "got -2"], id="mlp-ratio-negative"),
]


@pytest.mark.parametrize("plan_text, fragments", PLAN_CASES)
def test_bad_plan(plan_text, fragments, tmp_path, out, capsys):
    plan = _write_plan(tmp_path, plan_text)
    line = assert_bad_input(["compile", MODEL, plan, "-o", out], out, capsys, *fragments)
    assert str(plan) in line, f"the message names the plan file: {line!r}"


def test_plan_file_missing(tmp_path, out, capsys):
    missing = tmp_path / "no-such-plan.yaml"
    assert_bad_input(["compile", MODEL, missing, "-o", out], out, capsys, "plan file not found", str(missing))


# ---------------------------------------------------------------- plan vs. the model (found while compiling)
RUNTIME_CASES = [
    pytest.param(_one_step("{kind: attention, layers: [9]}"),
                 ["graft[0].select", "layer index 9 out of range", "6 attention regions", "0..5"],
                 id="layer-index-out-of-range"),
    pytest.param(_one_step("{kind: attention, layers: [-7]}"),
                 ["graft[0].select", "layer index -7 out of range", "6 attention regions"],
                 id="negative-layer-index-out-of-range"),
    pytest.param(_one_step("{kind: attention, layers: '7:'}"),
                 ["graft[0].select", "'7:'", "selects none", "6 attention regions"], id="slice-selects-nothing"),
    pytest.param(_one_step("{kind: attention, fqn: 're:decoder'}"),
                 ["graft[0].select", "'re:decoder'", "matches no attention region", "blocks.0.attn"],
                 id="fqn-matches-nothing"),
    pytest.param(_one_step("{kind: attention, fqn: blocks.9.attn}"),
                 ["graft[0].select", "'blocks.9.attn'", "matches no attention region"], id="plain-fqn-matches-nothing"),
    pytest.param(_one_step("{kind: block_pair, layers: [3]}"),
                 ["graft[0].select", "layer index 3 out of range", "3 block_pair regions"], id="pair-index-out-of-range"),
    pytest.param(_one_step("{kind: attention, layers: all}", "{op: mlp, ratio: 2}"),
                 ["graft[0]", "op 'mlp' does not apply to attention regions", "it replaces: mlp"],
                 id="op-incompatible-with-region"),
    pytest.param("version: 1\ngraft:\n"
                 "  - select: {kind: attention, layers: [0]}\n    replace: {op: self}\n"
                 "  - select: {kind: attention, layers: [0, 1]}\n    replace: {op: self, init: random}\n",
                 ["graft[1]", "blocks.0.attn", "already rewritten", "op 'self'"], id="same-region-rewritten-twice"),
]


@pytest.mark.parametrize("plan_text, fragments", RUNTIME_CASES)
def test_plan_does_not_fit_model(plan_text, fragments, tmp_path, out, capsys):
    plan = _write_plan(tmp_path, plan_text)
    assert_bad_input(["compile", MODEL, plan, "-o", out], out, capsys, *fragments)


# ---------------------------------------------------------------- the MODEL spec
PY_MODELS = '''
import torch


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class DataDependentNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


def data_dependent():
    return DataDependentNet(), (torch.randn(2, 4),)


def returns_int():
    return 42


def returns_module_only():
    return Small()


def returns_bad_inputs():
    return Small(), 5


def raises():
    raise RuntimeError("kaboom in the factory")


not_a_function = 3
'''


def _py(tmp_path: Path, fn: str) -> str:
    path = tmp_path / "err_models.py"
    path.write_text(PY_MODELS)
    return f"python:{path}:{fn}"


def _syntax_error(tmp_path: Path) -> str:
    path = tmp_path / "broken_syntax.py"
    path.write_text("def build(:\n    pass\n")
    return f"python:{path}:build"


def _import_error(tmp_path: Path) -> str:
    path = tmp_path / "bad_import.py"
    path.write_text("import graftc_no_such_dependency_xyz\n")
    return f"python:{path}:build"


def _garbage_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(512))
    return path


def _wrong_shapes(tmp_path: Path) -> str:
    from safetensors.torch import save_file

    from graftc.models.dit import build_dit

    other = build_dit("tiny", mlp_ratio=2.0)  # same keys, narrower MLPs
    path = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    return f"dit:tiny:{path}"


def _wrong_keys(tmp_path: Path) -> str:
    path = tmp_path / "train.pt"
    torch.save({"ema": {"not.a.dit.key": torch.zeros(2)}, "step": 3}, path)
    return f"dit:tiny:{path}"


MODEL_CASES = [
    pytest.param(lambda t: "./nope/", ["model path not found", "./nope/", "demo:NAME"], id="model-path-missing"),
    pytest.param(lambda t: "foo:bar", ["unknown model spec form 'foo:'", "timm:NAME", "dit:CONFIG"],
                 id="unknown-spec-form"),
    pytest.param(lambda t: "demo:huge-dit", ["unknown demo model 'huge-dit'", "available: tiny-dit"],
                 id="unknown-demo"),
    pytest.param(lambda t: "dit:DiT-Q/2", ["unknown DiT model 'DiT-Q/2'", "DiT-XL/2", "DiT-S/2"],
                 id="unknown-dit-config"),
    pytest.param(lambda t: "python:graftc_no_such_module_xyz:build",
                 ["cannot import 'graftc_no_such_module_xyz'", "No module named"], id="python-module-missing"),
    pytest.param(lambda t: f"python:{t / 'absent.py'}:build", ["python: file not found", "absent.py"],
                 id="python-file-missing"),
    pytest.param(_syntax_error, ["cannot import", "broken_syntax.py", "SyntaxError"], id="python-module-syntax-error"),
    pytest.param(_import_error, ["cannot import", "graftc_no_such_dependency_xyz"], id="python-module-import-fails"),
    pytest.param(lambda t: _py(t, "missing_fn"), ["has no function 'missing_fn'"], id="python-function-missing"),
    pytest.param(lambda t: _py(t, "not_a_function"), ["has no function 'not_a_function'"],
                 id="python-attribute-not-callable"),
    pytest.param(lambda t: _py(t, "returns_int"), ["returns_int() must return (model, example_inputs)", "got int"],
                 id="python-returns-int"),
    pytest.param(lambda t: _py(t, "returns_module_only"),
                 ["returns_module_only() must return (model, example_inputs)", "got Small"],
                 id="python-returns-module-only"),
    pytest.param(lambda t: _py(t, "returns_bad_inputs"), ["example_inputs must be a tuple of args or a dict"],
                 id="python-example-inputs-wrong-type"),
    pytest.param(lambda t: _py(t, "raises"), ["raises() raised RuntimeError", "kaboom in the factory"],
                 id="python-factory-raises"),
    pytest.param(lambda t: _py(t, "data_dependent"), ["cannot trace DataDependentNet", "if x.sum() > 0"],
                 id="untraceable-data-dependent-branch"),
    pytest.param(lambda t: f"dit:DiT-S/2:{_garbage_file(t, 'bad.safetensors')}",
                 ["cannot read DiT checkpoint", "bad.safetensors"], id="corrupt-safetensors-checkpoint"),
    pytest.param(lambda t: f"dit:tiny:{_garbage_file(t, 'bad.pt')}", ["cannot read DiT checkpoint", "bad.pt"],
                 id="corrupt-torch-checkpoint"),
    pytest.param(_wrong_shapes, ["does not fit the model", "shape mismatch", "mlp.fc1.weight"],
                 id="checkpoint-wrong-shapes"),
    pytest.param(_wrong_keys, ["does not fit the model", "missing keys", "unexpected keys not.a.dit.key"],
                 id="checkpoint-wrong-keys"),
    pytest.param(lambda t: f"dit:tiny:{t / 'absent.safetensors'}", ["DiT checkpoint", "no such file"],
                 id="checkpoint-missing"),
    pytest.param(lambda t: f"dit:tiny:{_garbage_file(t, 'weights.npz')}", ["unsupported file type '.npz'",
                                                                          ".safetensors"],
                 id="checkpoint-unsupported-suffix"),
]


@pytest.mark.parametrize("make_spec, fragments", MODEL_CASES)
def test_bad_model(make_spec, fragments, tmp_path, out, capsys):
    plan = _write_plan(tmp_path, OK_PLAN)
    spec = make_spec(tmp_path)
    assert_bad_input(["compile", spec, plan, "-o", out], out, capsys, *fragments)


@pytest.mark.parametrize("make_spec, fragments", [
    pytest.param(lambda t: "foo:bar", ["unknown model spec form 'foo:'"], id="unknown-spec-form"),
    pytest.param(lambda t: _py(t, "data_dependent"), ["cannot trace DataDependentNet", "if x.sum() > 0"],
                 id="untraceable-data-dependent-branch"),
])
def test_inspect_bad_model(make_spec, fragments, tmp_path, capsys):
    assert_bad_input(["inspect", make_spec(tmp_path)], None, capsys, *fragments)


# ---------------------------------------------------------------- OUT
def test_out_exists_without_force_is_left_untouched(tmp_path, out, capsys):
    plan = _write_plan(tmp_path, OK_PLAN)
    out.mkdir()
    (out / "marker.txt").write_text("keep me")
    rc = main(["compile", MODEL, str(plan), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graftc: error: "), captured.err
    assert str(out) in lines[0] and "already exists" in lines[0] and "--force" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"]
    assert (out / "marker.txt").read_text() == "keep me"
    assert _temp_siblings(out) == []


def test_out_parents_are_made_only_for_a_real_output(tmp_path, capsys):
    """`-o runs/demo` on a fresh clone: missing parents are made when the artifact is written, not on bad input;
    a file standing where a parent folder should be is bad input."""
    out = tmp_path / "no" / "such" / "dir"
    assert_bad_input(["compile", MODEL, _write_plan(tmp_path, "version: 1\ngraft: 3\n"), "-o", out], out, capsys, "graft")
    assert not (tmp_path / "no").exists()
    assert main(["compile", MODEL, str(_write_plan(tmp_path, OK_PLAN)), "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file() and _temp_siblings(out) == []
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "out"
    assert_bad_input(["compile", MODEL, _write_plan(tmp_path, OK_PLAN), "-o", blocked], blocked, capsys,
                     str(tmp_path / "file"), "is a file")


def test_bad_input_with_existing_out_and_force_keeps_old_out(tmp_path, out, capsys):
    """--force replaces OUT only once the new artifact is complete: a failing compile leaves the old one."""
    plan = _write_plan(tmp_path, _one_step("{kind: attention, layers: [9]}"))
    out.mkdir()
    (out / "marker.txt").write_text("old artifact")
    rc = main(["compile", MODEL, str(plan), "-o", str(out), "--force"])
    captured = capsys.readouterr()
    assert rc == 2 and len(captured.err.splitlines()) == 1, captured.err
    assert "layer index 9 out of range" in captured.err
    assert (out / "marker.txt").read_text() == "old artifact"
    assert _temp_siblings(out) == []


# ---------------------------------------------------------------- Python API: graftc.load
@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("valid") / "self-50"
    assert main(["compile", MODEL, str(EXAMPLES / "self-50.yaml"), "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(artifact, dest)
    return dest


def _load_error(path: Path) -> str:
    with pytest.raises(GraftError) as info:
        graftc.load(path)
    message = str(info.value)
    assert message.strip() and "\n" not in message, f"one line: {message!r}"
    return message


def test_valid_artifact_loads(artifact):
    model = graftc.load(artifact)
    assert isinstance(model, torch.nn.Module)


def test_load_directory_without_manifest(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _load_error(tmp_path)
    assert "not a graftc artifact" in message and "manifest.json" in message and str(tmp_path) in message


def test_load_missing_directory(tmp_path):
    message = _load_error(tmp_path / "nowhere")
    assert "manifest.json" in message


def test_load_garbage_weights(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    (copy / "model.safetensors").write_bytes(os.urandom(4096))
    message = _load_error(copy)
    assert "model.safetensors" in message and "cannot read weights" in message


def test_load_truncated_weights(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _load_error(copy)
    assert "model.safetensors" in message


def test_load_weights_missing(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    (copy / "model.safetensors").unlink()
    message = _load_error(copy)
    assert "model.safetensors is missing" in message


def test_load_manifest_not_json(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    (copy / "manifest.json").write_text("{not json")
    message = _load_error(copy)
    assert "manifest.json" in message and "not valid JSON" in message


def test_load_manifest_unknown_rule(artifact, tmp_path):
    import json

    copy = _copy(artifact, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["rewrites"][0]["rule"] = "warp_drive"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    message = _load_error(copy)
    assert "unknown rule 'warp_drive'" in message and "self" in message
