"""Distillation: stage 1 per node from one teacher pass, stage 2 end to end, resume after kill -9, DDP, NaN."""
from __future__ import annotations

import json
import math
import os
import shutil
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
from graftc.distill.data import Batch
from graftc.distill.stage2 import add_lora
from graftc.families import make_task
from graftc.passes import rules_by_op
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


# Every operator in the registry at its example config, on the first kind it replaces; `self` re-initialized in an
# MLP (a copy starts at the teacher: nothing to learn)
EVERY_OP = {op: (rule.kinds[0], dict(rule.example)) for op, rule in rules_by_op().items()} | {
    "self": ("mlp", {"init": "random"})}


@pytest.mark.parametrize("op", list(EVERY_OP))
def test_every_operator_distills(tmp_path, op):
    kind, fields = EVERY_OP[op]
    graft = [{"select": {"kind": kind, "layers": [1]}, "replace": {"op": op, **fields}}]
    out = tmp_path / "out"
    # the pretrained demo: on a fresh dit:tiny (adaLN-Zero) a block pair is exactly the identity and nothing to learn
    lr = 1e-4 if op == "parallel" else 1e-3  # the merged pair starts near its target: 1e-3 overshoots it
    plan = plan_file(tmp_path, graft, {"steps": 2, "lr": lr}, {"steps": 1})
    assert main(["compile", "demo:tiny-dit", str(plan), "-o", str(out)]) == 0
    node = manifest(out)["distill"]["stage1"][0]
    assert node["op"] == op and node["steps_run"] == 2 and node["status"] == "done"
    assert node["best_val"] is not None and node["best_val"] < node["val_before"]  # best_val counts step 0 too


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


@pytest.mark.parametrize("objective", ["diffusion", "distill"])
def test_min_snr_weights_scale_each_samples_stage2_loss(objective):
    """Stage 2 with snr_gamma: the loss is the mean over samples of min(1, gamma / SNR(t)) times the sample's own
    mean squared error; on a batch holding near-clean timesteps that differs from the unweighted loss."""
    from graftc.distill.parallel import World
    from graftc.distill.stage2 import Stage2Trainer
    from tests.helpers import perturb

    loaded = load_model("demo:tiny-dit")
    teacher = loaded.model
    student = perturb(load_model("demo:tiny-dit").model, scale=0.05, seed=1)
    task = make_task(loaded, parse_plan({"version": 1}).data, seed=0)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 3, 20, 80, 300, 999])
    x, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    batch = Batch((x, t, torch.arange(6)), {}, {"noise": noise, "t": t})
    cfg = parse_plan({"version": 1, "distill": {"stage2": {"objective": objective, "snr_gamma": 5.0}}}).distill.stage2
    names = {n for n, _ in student.named_parameters()}
    got = Stage2Trainer(teacher, student, task, cfg, World(), set(), names).loss(batch)
    with torch.no_grad():
        out = student(*batch.args)
        target = noise if objective == "diffusion" else teacher(*batch.args)
        per_sample = (out[:, :target.shape[1]] - target).pow(2).mean(dim=(1, 2, 3))
    a = task.alphas_cumprod[t]
    weights = torch.minimum(torch.ones(6, dtype=torch.float64), 5.0 * (1 - a) / a)
    want = (weights * per_sample.double()).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert abs(want - per_sample.double().mean()) > 0.1 * want  # the weights matter on this batch


def test_lora_merge_matches_the_adapter():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Sequential(torch.nn.Linear(5, 5)))
    lora = add_lora(model, {"1"}, rank=2, alpha=4.0)  # "1": a new node, trained fully
    torch.nn.init.normal_(model[0].lora_B["default"].weight)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"0.lora_A.default.weight", "0.lora_B.default.weight", "1.0.weight", "1.0.bias"}
    x = torch.randn(3, 6)
    expected = model(x)
    torch.testing.assert_close(lora.merge_and_unload()(x), expected)
    assert type(model[0]) is torch.nn.Linear  # the model's own structure again


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
# These run demo:tiny-dit (pretrained, so its outputs and the distillation gradients are not zero) with every
# other attention layer replaced by a randomly initialized one, so the losses start high and fall. Each also
# runs a deliberately broken graftc and asserts that the same comparison then fails: a check that a resume
# restoring no optimizer state, or DDP that never averages gradients, would still pass could not catch them.
BROKEN = {
    # resume: the Adam moments and step counts start over instead of continuing
    "optimizer-not-restored": "import graftc.distill.checkpoint as c\nc.load_optimizer = lambda *args, **kwargs: None",
    # torchrun: each rank steps on its own half batch (stage 1 averages only the loss; stage 2 without DDP)
    "no-gradient-all-reduce": "\n".join([
        "import torch.nn.parallel",
        "from graftc.distill.parallel import World",
        "average = World.average",
        "World.average = lambda self, tensors: average(self, tensors[-1:])",
        "torch.nn.parallel.DistributedDataParallel = lambda module, **kwargs: module"]),
}
RANDOM_ATTENTION = [{"select": {"kind": "attention", "layers": "1::2"}, "replace": {"op": "self", "init": "random"}}]


def _cli(*args, broken: str | None = None) -> list[str]:
    if broken is None:
        return [sys.executable, "-m", "graftc.cli", *args]
    script = f"{BROKEN[broken]}\nimport sys\nfrom graftc.cli import main\nsys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", script, *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _mismatches(a: Path, b: Path) -> list[str]:
    """Tensors of artifact b that are not within the resume/DDP tolerance of artifact a."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.allclose(wb[k], wa[k], rtol=1e-4, atol=1e-5)]


def _stage2_losses(out: Path) -> list[float]:
    """The stage-2 training loss per step, from the artifact's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("stage2/loss")]


def _held_out_distill_loss(plan: Path, model: torch.nn.Module) -> float:
    """Mean distillation loss against demo:tiny-dit on the plan's validation split (fixed noise and timesteps):
    the training curve itself mixes timesteps from batch to batch, so it is too noisy to show a short run learn."""
    loaded = load_model("demo:tiny-dit")
    task = make_task(loaded, parse_plan(yaml.safe_load(plan.read_text())).data, seed=0)
    task.prepare(loaded.model, lambda line: None)  # the samples the run cached
    with torch.no_grad():
        total = sum(float(task.distill_loss(model(*b.args), loaded.model(*b.args))) * b.size
                    for b in task.val_batches(8))
    return total / task.n_val


def _assert_stage2_learns(plan: Path, out: Path, steps: int) -> None:
    """Non-zero losses (so gradients) at every step, and a held-out loss below the rewrite-only graft's."""
    import graftc

    losses = _stage2_losses(out)
    assert len(losses) == steps and min(losses) > 1e-4, losses
    loaded = load_model("demo:tiny-dit")
    rewritten = graftc.compile(loaded.model, {"version": 1, "graft": yaml.safe_load(plan.read_text())["graft"]},
                               loaded.example).model
    before, after = _held_out_distill_loss(plan, rewritten), _held_out_distill_loss(plan, graftc.load(out))
    assert after < 0.9 * before, (before, after)


# stage 2 keeps no EMA here: the saved weights are the trained ones, so a broken resume cannot hide behind it
RESUME_STAGES = {"stage1": (HYENA, {"steps": 12}, None), "stage2": (RANDOM_ATTENTION, None, {"steps": 12, "ema": 0})}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, stage):
    graft, stage1, stage2 = RESUME_STAGES[stage]
    plan = plan_file(tmp_path, graft, stage1, stage2, samples=48)
    compile_ = ("compile", "demo:tiny-dit", str(plan), "-o")
    ref = tmp_path / "ref"
    subprocess.run(_cli(*compile_, str(ref)), env=_env(), check=True, capture_output=True)
    if stage == "stage2":
        _assert_stage2_learns(plan, ref, 12)
    else:
        assert all(n["best_val"] < 0.95 * n["val_before"] for n in manifest(ref)["distill"]["stage1"])
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(*compile_, str(out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = tmp_path / ".out.graftc-run"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (work / "state.json").is_file():
            try:
                seen = json.loads((work / "state.json").read_text())
            except json.JSONDecodeError:
                seen = {}
            if seen.get("stage") == stage and seen.get("step", 0) >= 5:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    shutil.copytree(work, tmp_path / ".broken.graftc-run")  # the same checkpoint, for the broken resume below
    for target, broken in ((out, None), (tmp_path / "broken", "optimizer-not-restored")):
        done = subprocess.run(_cli(*compile_, str(target), "--resume", broken=broken), env=_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"resume: {stage.replace('stage', 'stage ')} from step" in done.stdout
    assert _mismatches(ref, out) == []
    assert _mismatches(ref, tmp_path / "broken"), "a resume without the optimizer state passed the same check"


def _torchrun(plan: Path, out: Path, broken: str | None = None) -> None:
    script = ["-m", "graftc.cli"]
    if broken is not None:
        path = out.parent / f"{broken}.py"
        path.write_text(f"{BROKEN[broken]}\nimport sys\nfrom graftc.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        script = [str(path)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), *script, "compile", "demo:tiny-dit", str(plan), "-o", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


def test_torchrun_two_processes_match_one(tmp_path):
    plan = plan_file(tmp_path, RANDOM_ATTENTION, {"steps": 4}, {"steps": 6, "ema": 0})
    one = tmp_path / "one"
    subprocess.run(_cli("compile", "demo:tiny-dit", str(plan), "-o", str(one)), env=_env(), check=True,
                   capture_output=True)
    losses = _stage2_losses(one)
    assert len(losses) == 6 and min(losses) > 1e-4, losses  # non-zero losses, so gradients for DDP to average
    two, broken = tmp_path / "two", tmp_path / "broken"
    _torchrun(plan, two)
    assert _mismatches(one, two) == []
    for n1, n2 in zip(manifest(one)["distill"]["stage1"], manifest(two)["distill"]["stage1"]):
        assert n1["best_val"] < n1["val_before"] and n1["best_val"] == pytest.approx(n2["best_val"], rel=1e-4)
    _torchrun(plan, broken, "no-gradient-all-reduce")
    assert _mismatches(one, broken), "ranks that never averaged their gradients passed the same check"


def test_every_example_plan_is_valid():
    from graftc.plan import load_plan

    plans = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(plans) >= 10
    for path in plans:
        load_plan(path)  # raises on any problem


def test_stage2_schedules():
    """Linear warmup, then constant (the method's) or a cosine decay reaching 0 at the last step."""
    from types import SimpleNamespace

    from graftc.distill.stage2 import Stage2Trainer

    def lrs(**fields):
        cfg = parse_plan({"version": 1, "distill": {"stage2": {"steps": 11, "lr": 1.0, "warmup": 2, **fields}}}).distill.stage2
        return [Stage2Trainer.lr_at(SimpleNamespace(cfg=cfg), step) for step in range(11)]

    assert lrs() == [0.5, 1.0] + [1.0] * 9
    cosine = lrs(schedule="cosine")
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert cosine[6] == pytest.approx(0.5) and all(a > b for a, b in zip(cosine[2:], cosine[3:]))


def test_embedding_objective_is_one_minus_the_cosine_of_mean_pooled_sentences():
    from graftc.distill.stage2 import embedding_loss
    from graftc.metrics import sentence_embedding

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    by_hand = [float(torch.nn.functional.cosine_similarity(student[i, :n].mean(0), teacher[i, :n].mean(0), dim=0))
               for i, n in enumerate((5, 3, 2))]
    assert float(embedding_loss(student, teacher, mask.bool())) == pytest.approx(1 - sum(by_hand) / 3, abs=1e-6)
    # the evaluation's pooling gives the same number
    pooled = [sentence_embedding(type("Out", (), {"last_hidden_state": t})(), mask) for t in (student, teacher)]
    assert float(embedding_loss(student, teacher, mask.bool())) == pytest.approx(
        float(1 - torch.nn.functional.cosine_similarity(*pooled).mean()), abs=1e-6)
    moved = student.clone()
    moved[1, 3:] += 100.0  # padding never enters the loss
    assert float(embedding_loss(moved, teacher, mask.bool())) == pytest.approx(float(embedding_loss(student, teacher, mask.bool())))
    assert float(embedding_loss(teacher * 3.0, teacher, mask.bool())) == pytest.approx(0.0, abs=1e-6)  # scale-free


SENTENCES = " ".join(f"The {a} cat sat on the {b} mat near the {c} dog today." for a in ("red", "blue", "old")
                     for b in ("green", "small", "new") for c in ("big", "kind", "shy"))


def test_embedding_objective_trains_an_encoder_and_is_refused_elsewhere(tmp_path, capsys):
    import graftc
    from graftc.families.transformers import embedding_quality
    from graftc.text import sentences_in
    from tests import zoo
    from transformers import AutoTokenizer

    spec = zoo.bert(tmp_path / "bert")
    zoo.tiny_t5_tokenizer().save_pretrained(spec)
    (tmp_path / "text.txt").write_text(SENTENCES)
    graft = [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "hyena_x", "causal": False, "init": "random"}}]
    plan = plan_file(tmp_path, graft, None, {"steps": 12, "lr": 3e-3, "ema": 0, "objective": "embedding"},
                     text=str(tmp_path / "text.txt"), seq_len=16, text_unit="sentence")
    out, rewrite = tmp_path / "out", tmp_path / "rewrite"
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    assert manifest(out)["distill"]["stage2"]["objective"] == {"embedding": 1.0}
    (tmp_path / "rewrite.yaml").write_text(yaml.safe_dump({"version": 1, "graft": graft}))
    assert main(["compile", spec, str(tmp_path / "rewrite.yaml"), "-o", str(rewrite)]) == 0
    # stage 2 brings the sentence embeddings closer to the teacher's than the rewrite alone
    teacher, tokenizer = load_model(spec).model.eval(), AutoTokenizer.from_pretrained(spec)
    found = sentences_in([SENTENCES])
    cosine = {p.name: embedding_quality(teacher, graftc.load(str(p)).eval(), tokenizer, found)["embedding_cosine"]
              for p in (out, rewrite)}
    assert cosine["out"] > cosine["rewrite"] + 0.01, cosine
    qwen = zoo.qwen3(tmp_path / "qwen3")
    zoo.tiny_t5_tokenizer().save_pretrained(qwen)
    plan = plan_file(tmp_path, [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "swa"}}],
                     None, {"steps": 1, "objective": "embedding"}, text=str(tmp_path / "text.txt"), seq_len=8)
    assert main(["compile", qwen, str(plan), "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "distill.stage2.objective: 'embedding'" in err and "not one" in err and not (tmp_path / "refused").exists()
