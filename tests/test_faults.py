"""Faults a real run meets: SIGINT/SIGTERM in either stage, a full disk under a checkpoint, the sample cache or
the artifact, two runs sharing one sample cache, a damaged cache shard. Every outcome is checked for what it
leaves behind: no traceback, no temporary file, the previous checkpoint and OUT intact, and a resumed run that
ends with the weights of the uninterrupted one (the tolerance of test_distill's kill -9 tests)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from graftc.families import make_task
from graftc.plan import parse_plan
from graftc.spec import load_model

ROOT = Path(__file__).resolve().parents[1]
GRAFT = [{"select": {"kind": "mlp", "layers": [1]}, "replace": {"op": "mlp", "ratio": 3}}]
# stage 2 with the model's own loss too (dit:tiny's zero-initialized output layer makes pure distillation a
# no-op), and without EMA, so the saved weights are the trained ones and a wrong resume cannot hide behind it
DISTILL = {"checkpoint_every": 4,
           "stage1": {"batch_size": 8, "lr": 1e-3, "eval_every": 4, "steps": 20},
           "stage2": {"batch_size": 8, "lr": 1e-4, "warmup": 2, "steps": 20, "ema": 0,
                      "objective": {"distill": 1, "diffusion": 0.5}}}
# a child that runs the CLI with every file it writes limited to LIMIT bytes: a write beyond fails with EFBIG,
# as on a full disk (SIGXFSZ, which would kill it instead, is ignored)
LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
           "sys.argv[0] = 'graftc'; runpy.run_module('graftc.cli', run_name='__main__')")


def plan_file(path: Path, cache: Path, distill: dict | None = DISTILL, **data) -> Path:
    plan = {"version": 1, "graft": GRAFT,
            "data": {"samples": 24, "sampler_steps": 2, "fd_samples": 0, "cache": str(cache), **data}}
    if distill is not None:
        plan["distill"] = distill
    path.write_text(yaml.safe_dump(plan))
    return path


def cli(*args, limit: int | None = None) -> list[str]:
    if limit is not None:
        return [sys.executable, "-c", LIMITED, str(limit), *map(str, args)]
    return [sys.executable, "-m", "graftc.cli", *map(str, args)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)


def last_line(proc) -> str:
    """The one line graftc itself writes on stderr (progress lines may come before it); never a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("graftc: ")]
    assert len(ours) == 1, proc.stderr[-3000:]
    return ours[0]


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders anywhere under root (checkpoint, cache shard, artifact staging; OUT's lock)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or p.name == ".out.lock")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_files(workdir: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(workdir).items() if not k.startswith("tensorboard")}


def state_of(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (it also fills the sample cache the interrupted runs share)."""
    root = tmp_path_factory.mktemp("reference")
    plan = plan_file(root / "plan.yaml", root / "cache")
    out = root / "ref"
    done = run(cli("compile", "dit:tiny", plan, "-o", out))
    assert done.returncode == 0, done.stderr[-3000:]
    stage2 = json.loads((out / "manifest.json").read_text())["distill"]["stage2"]
    assert stage2["steps_run"] == 20 and stage2["final_loss"] > 0  # stage 2 really trains
    return plan, out


def interrupt(command: list[str], workdir: Path, stage: str, sig: int, logs: Path):
    """Start a compile, send `sig` once its checkpoint shows it in `stage` (at step 4 or later), wait for it."""
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(command, env=env(), stdout=out, stderr=err)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            seen = state_of(workdir)
            if seen.get("stage") == stage and seen.get("step", 0) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def check_interrupted(proc, sig: int, stage: str, workdir: Path, out: Path) -> list[str]:
    """The run stopped with a checkpoint of the stage it was in and said how to continue: that command."""
    assert proc.returncode == 128 + sig, proc.stderr[-3000:]  # 130 for SIGINT, 143 for SIGTERM
    line = last_line(proc)
    found = re.fullmatch(rf"graftc: interrupted by {signal.Signals(sig).name} in stage (\d) at step (\d+); "
                         r"checkpoint saved; to continue: (.+)", line)
    assert found, line
    state = state_of(workdir)
    assert f"stage{found[1]}" == stage == state["stage"] and int(found[2]) == state["step"]
    load_file(str(workdir / state["tensors"]))  # a whole checkpoint
    assert not out.exists() and leftovers(workdir.parent) == []
    command = shlex.split(found[3])
    assert command[:2] == ["graftc", "compile"] and command[-1] == "--resume"
    return cli(*command[1:])


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)],
                         ids=["SIGINT-then-SIGTERM", "SIGTERM-then-SIGINT"])
def test_signals_checkpoint_and_resume_to_the_uninterrupted_result(tmp_path, reference, first, second):
    """Interrupted in stage 1, refused resumes and a full disk in between, interrupted again in stage 2,
    resumed to the end: the weights of the uninterrupted run."""
    plan, ref = reference
    out, workdir = tmp_path / "out", tmp_path / ".out.graftc-run"
    proc = interrupt(cli("compile", "dit:tiny", plan, "-o", out), workdir, "stage1", first, tmp_path)
    resume = check_interrupted(proc, first, "stage1", workdir, out)
    kept = checkpoint_files(workdir)

    if first == signal.SIGINT:  # resuming with another plan, or another model, is refused; the checkpoint stays
        other = plan_file(tmp_path / "other.yaml", plan.parent / "cache",
                          {**DISTILL, "stage1": {**DISTILL["stage1"], "lr": 2e-3}})
        refused = run(cli("compile", "dit:tiny", other, "-o", out, "--resume"))
        assert refused.returncode == 2
        assert "was made with another plan" in last_line(refused)
        refused = run(cli("compile", "demo:tiny-dit", plan, "-o", out, "--resume"))
        assert refused.returncode == 2
        assert "was made with another model: 'dit:tiny', not 'demo:tiny-dit'" in last_line(refused)
        assert checkpoint_files(workdir) == kept
        # a full disk at the next stage-1 checkpoint (1.5 MB): the previous checkpoint is left as it was
        full = run(cli(*resume[3:], limit=64 << 10))
        where = "stage1"
    else:  # a full disk at stage 2's first checkpoint (30 MB; stage 1's fit): stage 1's last one stands
        full = run(cli(*resume[3:], limit=4 << 20))
        where = "stage2"
    assert full.returncode == 2
    assert re.fullmatch(rf"graftc: error: cannot write {re.escape(str(workdir))}/ckpt-{where}-\d+\.safetensors: "
                        "File too large", last_line(full))
    state = state_of(workdir)
    if where == "stage1":
        assert checkpoint_files(workdir) == kept
    else:
        assert state["stage"] == "stage1" and state["step"] == 20
    load_file(str(workdir / state["tensors"]))
    assert leftovers(tmp_path) == [] and not out.exists()

    proc = interrupt(resume, workdir, "stage2", second, tmp_path)
    resume = check_interrupted(proc, second, "stage2", workdir, out)
    step = state_of(workdir)["step"]
    done = run(resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume: stage 2 from step {step}" in done.stdout
    assert_same_weights(ref, out)
    a, b = (json.loads((d / "manifest.json").read_text())["distill"] for d in (ref, out))
    assert [n["best_val"] for n in b["stage1"]] == pytest.approx([n["best_val"] for n in a["stage1"]], rel=1e-4)
    assert b["stage2"]["final_loss"] == pytest.approx(a["stage2"]["final_loss"], rel=1e-4)
    assert not workdir.exists() and leftovers(tmp_path) == []


def test_full_disk_under_the_artifact_leaves_out_as_it_was(tmp_path):
    plan = plan_file(tmp_path / "plan.yaml", tmp_path / "cache", distill=None)  # a rewrite: the artifact is the write
    out = tmp_path / "out"
    assert run(cli("compile", "dit:tiny", plan, "-o", out)).returncode == 0
    before = snapshot(out)
    full = run(cli("compile", "dit:tiny", plan, "-o", out, "--force", limit=1 << 20))  # model.safetensors: 7.5 MB
    assert full.returncode == 2
    line = last_line(full)
    assert line == f"graftc: error: cannot write {out}: File too large"
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_full_disk_under_the_sample_cache(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    full = run(cli("compile", "dit:tiny", plan_file(tmp_path / "plan.yaml", cache), "-o", out, limit=4096))
    assert full.returncode == 2  # the shard (6.4 kB) does not fit
    line = last_line(full)
    assert re.fullmatch(rf"graftc: error: cannot write {re.escape(str(cache))}/samples/dit-\w+/shard-00000"
                        r"\.safetensors: File too large", line), line
    assert [p.name for p in cache.rglob("*") if p.is_file()] == [".lock"]  # no shard, no meta.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "plan.yaml"]  # no OUT, no checkpoint folder


# ------------------------------------------------------------------------ the sample cache
def _task(cache: Path, samples: int = 300):
    loaded = load_model("dit:tiny")
    data = parse_plan({"version": 1, "data": {"samples": samples, "sampler_steps": 2, "fd_samples": 0,
                                              "cache": str(cache)}}).data
    return loaded, make_task(loaded, data, seed=0)


def test_damaged_cache_shards_are_regenerated(tmp_path):
    loaded, first = _task(tmp_path)
    first.prepare(loaded.model, log=lambda line: None)
    folder = next((tmp_path / "samples").iterdir())
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 2  # 256 + 44 samples
    original = {p: p.read_bytes() for p in shards}

    def flip(p):  # one bit of a sample: still valid safetensors, only the recorded sha256 tells
        data = bytearray(p.read_bytes())
        data[-7] ^= 0x10
        p.write_bytes(bytes(data))

    damages = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]), "bit flip": flip,
               "emptied": lambda p: p.write_bytes(b""), "removed": lambda p: p.unlink()}
    for name, damage in damages.items():
        damage(shards[1])
        logs = []
        _, task = _task(tmp_path)
        task.prepare(loaded.model, log=logs.append)
        assert any("regenerating" in line and shards[1].name in line for line in logs), (name, logs)
        for key, value in first.samples.items():
            assert torch.equal(task.samples[key], value), (name, key)
        assert {p: p.read_bytes() for p in shards} == original, name
    logs = []
    _task(tmp_path)[1].prepare(loaded.model, log=logs.append)
    assert any("using cached samples" in line for line in logs) and not any("regenerating" in x for x in logs)


CONCURRENT = """
import sys, time
from pathlib import Path
from safetensors.torch import save_file
from graftc.families import make_task
from graftc.plan import parse_plan
from graftc.spec import load_model
me, go = Path(sys.argv[1]), Path(sys.argv[2])
loaded = load_model("dit:tiny")
data = parse_plan({"version": 1, "data": {"samples": 600, "sampler_steps": 2, "fd_samples": 0}}).data
task = make_task(loaded, data, seed=0)
me.with_suffix(".ready").touch()
while not go.exists():
    time.sleep(0.005)
task.prepare(loaded.model, log=lambda line: print(line, flush=True))
save_file(task.samples, str(me))
"""


def test_two_runs_share_one_sample_cache(tmp_path):
    """Both start generating into one $GRAFTC_CACHE at the same moment: one makes the samples, the other waits
    and reads them; both end with the samples a run alone makes."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path / f"{i}.safetensors"), str(go)],
                              env={**env(), "GRAFTC_CACHE": str(tmp_path / "shared")}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 300
    while not all((tmp_path / f"{i}.ready").exists() for i in range(2)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all("Traceback" not in err for _, err in results)
    said = [out for out, _ in results]
    assert sum("waiting for it" in s for s in said) == 1 and sum("using cached samples" in s for s in said) == 1
    loaded, alone = _task(tmp_path / "alone", samples=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children: the same reduction order, the same bits
    try:
        alone.prepare(loaded.model, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    for i in range(2):
        got = load_file(str(tmp_path / f"{i}.safetensors"))
        assert got.keys() == alone.samples.keys()
        for key, value in alone.samples.items():
            assert torch.equal(got[key], value), key
    folder = next((tmp_path / "shared" / "samples").iterdir())
    meta = json.loads((folder / "meta.json").read_text())
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("shard-*")} == meta["sha256"]
    assert leftovers(tmp_path / "shared") == []
