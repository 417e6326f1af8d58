"""Artifacts verify themselves (format version, sha256 of the manifest and of model.safetensors; `graftc verify`),
and only one `graftc compile` at a time writes a given OUT (a lock beside it)."""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graftc
from graftc import artifact
from graftc.cli import main
from graftc.errors import GraftError
from tests import zoo
from tests.helpers import run

PLAN = "version: 1\ngraft:\n  - select: {kind: attention, layers: [1]}\n    replace: {op: swa, window: 2}\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small artifact (2-block Llama, one attention layer replaced) and the loaded base model."""
    root = tmp_path_factory.mktemp("verify")
    spec = zoo.llama(root / "llama", depth=2)
    (root / "plan.yaml").write_text(PLAN)
    out = root / "art"
    assert main(["compile", spec, str(root / "plan.yaml"), "-o", str(out)]) == 0
    return out, graftc.load_model(spec)


def _copy(out: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


def _cli_verify(path: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["verify", str(path)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(path: Path, capsys, *fragments: str) -> str:
    rc, out, err = _cli_verify(path, capsys)
    lines = err.splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("graftc: error: "), (rc, out, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_manifest_records_the_weights_hash_and_verify_reports_it(built, capsys):
    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    expected = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["format"] == artifact.FORMAT == 2 and manifest["model_sha256"] == expected
    rc, printed, err = _cli_verify(out, capsys)
    assert rc == 0 and err == "" and expected in printed and "ok" in printed


def test_flipped_weight_byte_is_refused_unless_verify_is_off(built, tmp_path, capsys):
    out, loaded = built
    copy_ = _copy(out, tmp_path)
    raw = bytearray((copy_ / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data: safetensors itself reads the file without complaint
    (copy_ / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(GraftError, match="sha256 .* does not match .* recorded in manifest.json") as info:
        graftc.load(copy_, model=copy.deepcopy(loaded.model))
    assert str(copy_ / "model.safetensors") in str(info.value) and "\n" not in str(info.value)
    _one_line_error(copy_, capsys, str(copy_ / "model.safetensors"), "does not match")
    # verify=False loads the damaged file: exactly one value differs from the good artifact
    good = graftc.load(out, model=copy.deepcopy(loaded.model)).state_dict()
    bad = graftc.load(copy_, model=copy.deepcopy(loaded.model), verify=False).state_dict()
    changed = sum(int((good[k] != bad[k]).sum()) for k in good)
    assert changed == 1


def test_newer_format_names_both_versions(built, tmp_path, capsys):
    out, loaded = built
    copy_ = _copy(out, tmp_path)
    manifest = json.loads((copy_ / "manifest.json").read_text())
    manifest.update(format=3, graftc_version="9.0.0")
    (copy_ / "manifest.json").write_text(json.dumps(manifest))
    for check in (lambda: graftc.load(copy_, model=copy.deepcopy(loaded.model)),
                  lambda: graftc.load(copy_, model=copy.deepcopy(loaded.model), verify=False)):
        with pytest.raises(GraftError) as info:
            check()
        message = str(info.value)
        assert "format 3" in message and "9.0.0" in message and "format 2" in message and graftc.__version__ in message
    _one_line_error(copy_, capsys, "format 3", "format 2", "upgrade graftc")


def test_edited_manifest_is_refused(built, tmp_path, capsys):
    """A changed operator setting would load a different model silently: the manifest's own digest catches it."""
    out, loaded = built
    copy_ = _copy(out, tmp_path)
    manifest = json.loads((copy_ / "manifest.json").read_text())
    manifest["rewrites"][0]["config"]["window"] = 3
    (copy_ / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(GraftError, match="manifest_sha256"):
        graftc.load(copy_, model=copy.deepcopy(loaded.model))
    _one_line_error(copy_, capsys, "manifest.json", "manifest_sha256")
    different = graftc.load(copy_, model=copy.deepcopy(loaded.model), verify=False)  # really another model
    good = graftc.load(out, model=copy.deepcopy(loaded.model))
    assert not torch.equal(run(good, loaded)[0], run(different, loaded)[0])
    # whitespace and key order are not content: a reformatted manifest still verifies
    (copy_ / "manifest.json").write_text(json.dumps(json.loads((out / "manifest.json").read_text()), sort_keys=True))
    assert _cli_verify(copy_, capsys)[0] == 0


def test_format_1_artifacts_still_load_but_cannot_be_verified(built, tmp_path, capsys):
    out, loaded = built
    copy_ = _copy(out, tmp_path)
    manifest = json.loads((copy_ / "manifest.json").read_text())
    for key in ("model_sha256", "manifest_sha256"):
        del manifest[key]
    manifest["format"] = 1
    (copy_ / "manifest.json").write_text(json.dumps(manifest))
    good = run(graftc.load(out, model=copy.deepcopy(loaded.model)), loaded)
    assert torch.equal(good[0], run(graftc.load(copy_, model=copy.deepcopy(loaded.model)), loaded)[0])
    _one_line_error(copy_, capsys, "format 1", "cannot be verified")


def test_verify_on_a_folder_that_is_no_artifact(tmp_path, capsys):
    _one_line_error(tmp_path, capsys, "not a graftc artifact")


# ---------------------------------------------------------------- one compile per OUT at a time
def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_compile_into_a_locked_out_exits_2_and_leaves_it_alone(built, tmp_path, capsys):
    _, loaded = built
    spec = str(Path(built[0]).parent / "llama")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "deep" / "out"
    with artifact.out_lock(out) as lock:  # as another run holds it (flock: a second open file is refused)
        assert lock.is_file() and lock.read_text().strip() == str(os.getpid())
        capsys.readouterr()
        assert main(["compile", spec, str(plan), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "being written by another graftc run" in err and f"pid {os.getpid()}" in err
        assert not out.exists() and _siblings(out) == [".out.lock"]
    assert not (tmp_path / "deep").exists()  # the folder made for the lock went with it
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    assert _siblings(out) == [] and artifact.verify_artifact(out)["format"] == 2


def test_stale_lock_file_of_a_dead_run_is_taken_over(built, tmp_path):
    spec = str(Path(built[0]).parent / "llama")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999\n")  # left by a run killed with -9: no process holds its flock
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file() and _siblings(out) == []


def test_lock_is_exclusive_across_processes(tmp_path):
    out = tmp_path / "out"
    with artifact.out_lock(out) as lock:
        probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert not lock.exists()
    fd = os.open(tmp_path / "free", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the probe itself can take a free lock
    os.close(fd)


def test_two_concurrent_compiles_into_one_out(built, tmp_path):
    """Started together: exactly one writes a complete artifact; the other exits 2 with one line (the OUT is being
    written, or, if the first already finished, it already exists); nothing is left beside OUT."""
    spec = str(Path(built[0]).parent / "llama")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "graftc.cli", "compile", spec, str(plan), "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    _, _, err = next(r for r in results if r[0] == 2)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "being written by another graftc run" in err or "already exists" in err, err
    assert sorted(p.name for p in out.iterdir()) == sorted(artifact.FILES)
    assert artifact.verify_artifact(out)["format"] == 2 and _siblings(out) == []
