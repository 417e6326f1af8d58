"""Distillation: stage 1 per node from one teacher pass, stage 2 end to end, resume after kill -9, DDP, NaN."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from graftc.cli import main
from graftc.distill.data import Batch, make_task
from graftc.distill.stage2 import LoraLinear
from graftc.plan import parse_plan
from graftc.spec import load_model

ROOT = Path(__file__).resolve().parents[1]


def plan_file(tmp_path: Path, graft: list, stage1: dict | None = None, stage2: dict | None = None, **data) -> Path:
    distill = {"checkpoint_every": 5}
    if stage1 is not None:
        distill["stage1"] = {"batch_size": 8, "lr": 1e-3, "eval_every": 5, **stage1}
    if stage2 is not None:
        distill["stage2"] = {"batch_size": 8, "lr": 1e-4, "warmup": 2, **stage2}
    plan = {"version": 1, "graft": graft, "distill": distill,
            "data": {"samples": 24, "sampler_steps": 2, "fd_samples": 0, "cache": str(tmp_path / "cache"), **data}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


HYENA = [{"select": {"kind": "attention", "layers": "1::2"}, "replace": {"op": "hyena_x"}}]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_stage1_copy_graft_starts_at_zero_loss(tmp_path):
    """Teacher-input injection: an exact copy of each operator, fed the teacher's inputs, has zero loss."""
    graft = [{"select": {"kind": "attention", "layers": [0, 2]}, "replace": {"op": "self", "init": "copy"}},
             {"select": {"kind": "mlp", "layers": [1]}, "replace": {"op": "self", "init": "copy"}}]
    out = tmp_path / "out"
    assert main(["compile", "dit:tiny", str(plan_file(tmp_path, graft, {"steps": 2})), "-o", str(out)]) == 0
    nodes = manifest(out)["distill"]["stage1"]
    assert [n["loss"] for n in nodes] == ["l1", "l1", "l2"]  # auto: L1 attention, L2 mlp
    assert all(n["val_before"] == 0.0 for n in nodes)


def test_stage1_and_stage2_recover_and_report(tmp_path):
    out = tmp_path / "out"
    plan = plan_file(tmp_path, HYENA, {"steps": 15}, {"steps": 6, "objective": {"distill": 1, "diffusion": 0.5}})
    assert main(["compile", "dit:tiny", str(plan), "-o", str(out)]) == 0
    m = manifest(out)
    nodes = m["distill"]["stage1"]
    assert [n["fqn"] for n in nodes] == ["blocks.1.attn", "blocks.3.attn", "blocks.5.attn"]
    for n in nodes:  # every node learned from the shared teacher pass
        assert n["status"] == "done" and n["steps_run"] == 15 and n["best_val"] < 0.8 * n["val_before"]
    assert m["distill"]["stage2"]["steps_run"] == 6
    report = (out / "report.md").read_text()
    assert "Stage 1: activation distillation" in report and "blocks.3.attn" in report and "Stage 2" in report
    assert (out / "losses.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert not (tmp_path / ".out.graftc-run").exists()  # the work folder goes once the artifact is complete
    # the artifact loads back into the distilled model
    from graftc.artifact import load

    model = load(out)
    x = load_model("dit:tiny").args
    assert torch.isfinite(model(*x)).all()


EVERY_OP = {
    "hyena_x": ("attention", {}), "hyena_y": ("attention", {}), "hyena_se": ("attention", {}),
    "swa": ("attention", {"window": 2}), "swa2d": ("attention", {"kernel": 3}), "linear": ("attention", {}),
    "mamba2": ("attention", {"init": "random"}), "self": ("mlp", {"init": "random"}), "mlp": ("mlp", {"ratio": 3}),
    "mlp_hyena_x": ("mlp", {"init": "random"}), "parallel": ("block_pair", {}),
}


@pytest.mark.parametrize("op", list(EVERY_OP))
def test_every_operator_distills(tmp_path, op):
    kind, fields = EVERY_OP[op]
    graft = [{"select": {"kind": kind, "layers": [1]}, "replace": {"op": op, **fields}}]
    out = tmp_path / "out"
    assert main(["compile", "dit:tiny", str(plan_file(tmp_path, graft, {"steps": 2}, {"steps": 1})), "-o", str(out)]) == 0
    node = manifest(out)["distill"]["stage1"][0]
    assert node["op"] == op and node["steps_run"] == 2 and node["status"] == "done"
    assert node["best_val"] is not None and node["best_val"] <= node["val_before"]


def test_data_cache_is_reused(tmp_path, capsys):
    plan = plan_file(tmp_path, HYENA, {"steps": 1})
    assert main(["compile", "dit:tiny", str(plan), "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["compile", "dit:tiny", str(plan), "-o", str(tmp_path / "b")]) == 0
    assert "using cached samples" in capsys.readouterr().out
    shards = list((tmp_path / "cache" / "samples").glob("*/shard-*.safetensors"))
    assert len(shards) == 1 and load_file(str(shards[0]))["x0"].shape == (24, 1, 8, 8)


def _task(spec: str, tmp_path: Path, **data):
    loaded = load_model(spec)
    cfg = parse_plan({"version": 1, "data": {"fd_samples": 0, "cache": str(tmp_path / "cache"), **data}}).data
    return loaded, make_task(loaded, cfg, seed=0)


def test_real_images_replace_teacher_samples(tmp_path):
    """data.images: a safetensors file of real (x0, y), checked against the model, shuffled by the seed; the
    diffusion objective then trains on real data (the demo ships its own: demo:digits)."""
    from safetensors.torch import save_file

    x0, y = torch.rand(20, 1, 8, 8) * 2 - 1, torch.arange(20) % 10
    save_file({"x0": x0, "y": y}, str(tmp_path / "real.safetensors"))
    loaded, task = _task("dit:tiny", tmp_path, images=str(tmp_path / "real.safetensors"), val_fraction=0.25)
    lines = []
    task.prepare(loaded.model, lines.append)
    assert lines == [f"data: 20 real images from {tmp_path / 'real.safetensors'}"]
    assert not (tmp_path / "cache").exists()  # nothing generated, nothing cached
    got = task.samples
    order = [int(torch.nonzero((x0 == row).all(dim=(1, 2, 3)))[0]) for row in got["x0"]]
    assert sorted(order) == list(range(20)) and order != list(range(20))  # the same images, shuffled
    assert torch.equal(got["y"], y[order])  # labels follow their images
    batch = task.batch("stage2", 0, 4)
    assert batch.args[0].shape == (4, 1, 8, 8) and set(batch.args[2].tolist()) <= set(range(10))
    assert task.n_val == 5

    digits_loaded, digits = _task("demo:tiny-dit", tmp_path, images="demo:digits")
    digits.prepare(digits_loaded.model, lambda line: None)
    assert digits.samples["x0"].shape == (1797, 1, 8, 8) and int(digits.samples["y"].max()) == 9


@pytest.mark.parametrize("tensors, message", [
    ({"x0": torch.zeros(4, 3, 8, 8), "y": torch.zeros(4, dtype=torch.long)}, "do not fit the model's input [N, 1, 8, 8]"),
    ({"x0": torch.zeros(4, 1, 8, 8), "y": torch.full((4,), 10)}, "integer labels in [0, 10)"),
    ({"x0": torch.zeros(4, 1, 8, 8)}, "needs tensors x0 [N, C, H, W] and y [N]"),
    (None, "not a readable safetensors file"),
    ("missing", "file not found"),
], ids=["wrong-shape", "label-out-of-range", "no-labels", "garbage", "missing"])
def test_real_images_bad_input(tmp_path, capsys, tensors, message):
    from safetensors.torch import save_file

    path = tmp_path / "real.safetensors"
    if tensors is None:
        path.write_bytes(b"not safetensors")
    elif tensors != "missing":
        save_file(tensors, str(path))
    plan = plan_file(tmp_path, HYENA, {"steps": 1}, images=str(path))
    out = tmp_path / "out"
    assert main(["compile", "dit:tiny", str(plan), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"data.images: {path}" in err and message in err
    assert not out.exists()


def test_non_finite_node_stops_alone(tmp_path):
    """A node whose loss blows up stops with a message and keeps its best weights; the run completes."""
    stage1 = {"steps": 6, "overrides": [{"match": "blocks.3.attn", "lr": 1.0e30}]}
    out = tmp_path / "out"
    assert main(["compile", "dit:tiny", str(plan_file(tmp_path, HYENA, stage1)), "-o", str(out)]) == 0
    nodes = {n["fqn"]: n for n in manifest(out)["distill"]["stage1"]}
    bad = nodes["blocks.3.attn"]
    assert bad["status"] == "non-finite" and "kept its best weights" in bad["message"]
    assert nodes["blocks.1.attn"]["status"] == "done" and nodes["blocks.5.attn"]["status"] == "done"
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "non-finite" in (out / "report.md").read_text()


def test_per_node_overrides_and_losses(tmp_path):
    stage1 = {"steps": 2, "loss": "huber", "overrides": [{"match": "re:blocks\\.1\\.", "loss": "l2", "steps": 1, "lr": 5e-4}]}
    out = tmp_path / "out"
    assert main(["compile", "dit:tiny", str(plan_file(tmp_path, HYENA, stage1)), "-o", str(out)]) == 0
    nodes = {n["fqn"]: n for n in manifest(out)["distill"]["stage1"]}
    assert (nodes["blocks.1.attn"]["loss"], nodes["blocks.1.attn"]["steps_run"], nodes["blocks.1.attn"]["lr"]) == ("l2", 1, 5e-4)
    assert nodes["blocks.3.attn"]["loss"] == "huber" and nodes["blocks.3.attn"]["steps_run"] == 2


def test_batches_are_deterministic_and_shard_exactly():
    loaded = load_model("dit:tiny")
    plan = parse_plan({"version": 1, "data": {"samples": 16}})
    task = make_task(loaded, plan.data, seed=3)
    task.samples = {"x0": torch.randn(16, 1, 8, 8), "y": torch.arange(16) % 10}
    task._split()
    whole = task.batch("stage1", 7, 8)
    halves = [task.batch("stage1", 7, 8, rank, 2) for rank in (0, 1)]
    for i in range(3):
        torch.testing.assert_close(torch.cat([h.args[i] for h in halves]), whole.args[i], rtol=0, atol=0)
    assert not torch.equal(task.batch("stage1", 8, 8).args[0], whole.args[0])
    assert sum(b.size for b in task.val_batches(4)) == task.n_val == 2


def test_min_snr_weights_follow_the_noise_level():
    """min(1, gamma / SNR(t)): 1 where the sample is mostly noise, small near t = 0, never increasing as t falls;
    the weighted losses scale each sample's own mean error."""
    from graftc.distill.data import mse

    task = make_task(load_model("dit:tiny"), parse_plan({"version": 1}).data, seed=0)
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    batch = Batch((torch.zeros(6, 1, 8, 8), t, torch.zeros(6, dtype=torch.long)), {}, {"t": t})
    weights = task.sample_weights(batch, snr_gamma=5.0)
    a = task.alphas_cumprod[t]
    torch.testing.assert_close(weights.double(), (5 * (1 - a) / a).clamp(max=1), rtol=1e-6, atol=0)
    assert weights[0] < 1e-3 and weights[-1] == 1 and all(x <= y for x, y in zip(weights, weights[1:]))
    a, b = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    per_sample = (a - b).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mse(a, b, weights), (weights * per_sample).mean())
    torch.testing.assert_close(mse(a, b, torch.ones(6)), torch.nn.functional.mse_loss(a, b))


def test_lora_merge_matches_the_adapter():
    base = torch.nn.Linear(6, 5)
    lora = LoraLinear(base, rank=2, alpha=4.0)
    torch.nn.init.normal_(lora.lora_b)
    x = torch.randn(3, 6)
    expected = lora(x)
    torch.testing.assert_close(lora.merged()(x), expected)


def test_stage2_lora_trains_adapters_and_merges(tmp_path):
    out = tmp_path / "out"
    # a randomly initialized DiT predicts zero (adaLN-Zero): the diffusion loss, not distill, has gradients
    plan = plan_file(tmp_path, HYENA, None, {"steps": 3, "lora": {"rank": 4}, "ema": 0, "objective": "diffusion"})
    assert main(["compile", "dit:tiny", str(plan), "-o", str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # merged back into the model's own Linears
    teacher = load_model("dit:tiny").model.state_dict()
    changed = not torch.equal(weights["final_layer.linear.weight"], teacher["final_layer.linear.weight"])
    frozen = torch.equal(weights["pos_embed"], teacher["pos_embed"])
    assert changed and frozen


def test_objective_must_be_the_models_own(tmp_path, capsys):
    from tests import zoo

    spec = zoo.bert(tmp_path / "bert")
    (tmp_path / "text.txt").write_text("a cat on the red dog " * 50)
    zoo.tiny_t5_tokenizer().save_pretrained(spec)
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "swa"}}],
                     None, {"steps": 1, "objective": "lm"}, text=str(tmp_path / "text.txt"), seq_len=8)
    assert main(["compile", spec, str(plan), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "objective" in err and "'lm' is not this model's own loss" in err and not (tmp_path / "out").exists()
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "swa"}}],
                     {"steps": 1}, {"steps": 1, "snr_gamma": 5.0}, text=str(tmp_path / "text.txt"), seq_len=8)
    assert main(["compile", spec, str(plan), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "distill.stage2.snr_gamma" in err and "not a diffusion model" in err and not (tmp_path / "out").exists()
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "swa"}}],
                     {"steps": 1}, text=str(tmp_path / "text.txt"), seq_len=100)
    assert main(["compile", spec, str(plan), "-o", str(tmp_path / "out")]) == 2
    assert "data.seq_len: 100 tokens per sample is more than this model can embed (max_position_embeddings 64)" \
        in capsys.readouterr().err


def test_language_model_on_a_text_file(tmp_path):
    from tests import zoo

    spec = zoo.qwen3(tmp_path / "qwen3")
    zoo.tiny_t5_tokenizer().save_pretrained(spec)
    (tmp_path / "text.txt").write_text("the photo of a cat on the red dog in a blue photo " * 40)
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [1]}, "replace": {"op": "swa", "window": 2}}],
                     {"steps": 4}, {"steps": 2, "objective": {"distill": 1, "lm": 1}}, text=str(tmp_path / "text.txt"), seq_len=8)
    out = tmp_path / "out"
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    m = manifest(out)
    assert m["distill"]["stage1"][0]["steps_run"] == 4 and m["distill"]["stage2"]["objective"] == {"distill": 1.0, "lm": 1.0}


def test_text_data_is_required_for_language_models(tmp_path, capsys):
    from tests import zoo

    spec = zoo.qwen3(tmp_path / "qwen3")
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [1]}, "replace": {"op": "swa"}}], {"steps": 1})
    assert main(["compile", spec, str(plan), "-o", str(tmp_path / "out")]) == 2
    assert "data.text" in capsys.readouterr().err


def test_diffusers_dit_pipeline_folder(tmp_path):
    from tests import zoo

    folder = tmp_path / "pipe"
    zoo.dit_pipeline(zoo.make_diffusers_dit()).save_pretrained(folder)
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [1]}, "replace": {"op": "hyena_x"}}],
                     {"steps": 3}, {"steps": 2, "objective": "diffusion", "snr_gamma": 5.0})
    out = tmp_path / "out"
    assert main(["compile", str(folder), str(plan), "-o", str(out)]) == 0
    m = manifest(out)
    assert m["distill"]["stage1"][0]["steps_run"] == 3  # and stage 2 ran Min-SNR-weighted on the scheduler's a_t
    assert m["distill"]["stage2"]["steps_run"] == 2 and math.isfinite(m["distill"]["stage2"]["final_loss"])


def test_text_to_image_model_takes_prompt_embeddings(tmp_path, capsys):
    from safetensors.torch import save_file

    from tests import zoo

    folder = tmp_path / "pixart"
    spec = zoo.pixart(folder)
    graft = [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "swa", "window": 2}}]
    assert main(["compile", spec, str(plan_file(tmp_path, graft, {"steps": 1})), "-o", str(tmp_path / "x")]) == 2
    assert "data.prompt_embeds" in capsys.readouterr().err
    width = load_model(spec).kwargs["encoder_hidden_states"].shape[-1]
    save_file({"prompt_embeds": torch.randn(3, 5, width)}, str(tmp_path / "prompts.safetensors"))
    plan = plan_file(tmp_path, graft, {"steps": 2}, {"steps": 1}, prompt_embeds=str(tmp_path / "prompts.safetensors"))
    out = tmp_path / "out"
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    assert manifest(out)["distill"]["stage1"][0]["best_val"] is not None


# ------------------------------------------------------------------ real processes: kill -9, torchrun
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "graftc.cli", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


RESUME_STAGES = {"stage1": {"steps": 12}, "stage2": {"steps": 12}}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, stage):
    plan = plan_file(tmp_path, HYENA, **RESUME_STAGES)
    ref = tmp_path / "ref"
    subprocess.run(_cli("compile", "dit:tiny", str(plan), "-o", str(ref)), env=_env(), check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("compile", "dit:tiny", str(plan), "-o", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".out.graftc-run" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                seen = json.loads(state.read_text())
            except json.JSONDecodeError:
                seen = {}
            if seen.get("stage") == stage and seen.get("step", 0) >= 5:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(_cli("compile", "dit:tiny", str(plan), "-o", str(out), "--resume"), env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resume: {stage.replace('stage', 'stage ')} from step" in done.stdout
    a, b = _weights(ref), _weights(out)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_two_processes_match_one(tmp_path):
    plan = plan_file(tmp_path, HYENA, {"steps": 4}, {"steps": 3})
    one = tmp_path / "one"
    subprocess.run(_cli("compile", "dit:tiny", str(plan), "-o", str(one)), env=_env(), check=True, capture_output=True)
    two = tmp_path / "two"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "graftc.cli", "compile", "dit:tiny", str(plan), "-o", str(two)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    m1, m2 = manifest(one)["distill"]["stage1"], manifest(two)["distill"]["stage1"]
    for n1, n2 in zip(m1, m2):
        assert n1["best_val"] == pytest.approx(n2["best_val"], rel=1e-4)


def test_every_example_plan_is_valid():
    from graftc.plan import load_plan

    plans = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(plans) >= 10
    for path in plans:
        load_plan(path)  # raises on any problem


def test_stage2_schedules():
    """Linear warmup, then constant (the method's) or a cosine decay reaching 0 at the last step."""
    from types import SimpleNamespace

    from graftc.distill.stage2 import Stage2

    def lrs(**fields):
        cfg = parse_plan({"version": 1, "distill": {"stage2": {"steps": 11, "lr": 1.0, "warmup": 2, **fields}}}).distill.stage2
        return [Stage2.lr_at(SimpleNamespace(cfg=cfg), step) for step in range(11)]

    assert lrs() == [0.5, 1.0] + [1.0] * 9
    cosine = lrs(schedule="cosine")
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert cosine[6] == pytest.approx(0.5) and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
