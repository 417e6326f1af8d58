"""Seeing a graft: samples.png (teacher and graft rows from identical noise), eval --grid, progress lines in logs,
readable loss curves, greedy continuations of language models in report.md."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import graftc
from graftc import samples
from graftc.cli import main
from graftc.distill.logs import ema, needs_log_scale
from graftc.plan import parse_plan
from graftc.progress import Progress
from graftc.spec import load_model

ROOT = Path(__file__).resolve().parents[1]
COPY = [{"select": {"kind": "attention", "layers": "all"}, "replace": {"op": "self", "init": "copy"}}]
RANDOM = [{"select": {"kind": "attention", "layers": [1]}, "replace": {"op": "self", "init": "random"}}]


def data(tmp_path, **update):
    return parse_plan({"version": 1}).data.model_copy(
        update={"sampler_steps": 3, "fd_samples": 0, "cache": str(tmp_path / "cache"), **update})


def grafted(teacher, graft, example):
    return graftc.compile(copy.deepcopy(teacher), {"version": 1, "graft": graft}, example).model


def first_inputs(model):
    """Records the first input tensor of every forward call (x_t of a DiT, hidden_states of a diffusers model)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# ------------------------------------------------------------------ the grid
def test_copy_graft_gives_the_teachers_tiles_and_a_changed_graft_does_not(tmp_path):
    loaded = load_model("demo:tiny-dit")
    teacher = loaded.model
    grid = samples.preview(loaded, data(tmp_path), seed=0, columns=5)
    assert isinstance(grid, samples.Grid) and grid.labels() == [f"class {i}" for i in range(5)]
    seen = {}
    for name, model in (("teacher", teacher), ("copy", grafted(teacher, COPY, loaded.example)),
                        ("random", grafted(teacher, RANDOM, loaded.example))):
        seen[name] = first_inputs(model)
        grid.add(name, model)
    tiles = {name: grid.tiles(name) for name in grid.rows}
    assert tiles["teacher"].shape == (5, 8, 8, 3) and tiles["teacher"].dtype == np.uint8
    assert len({t.tobytes() for t in tiles["teacher"]}) == 5  # five different samples, so equality below means much
    np.testing.assert_array_equal(tiles["copy"], tiles["teacher"])
    assert not np.array_equal(tiles["random"], tiles["teacher"])
    # every row started from the same noise: the first DDIM step of each model saw the same x_T
    assert len(seen["teacher"]) == 3  # one forward per DDIM step
    torch.testing.assert_close(seen["random"][0], seen["teacher"][0], rtol=0, atol=0)
    # ... which is the grid's own noise, not that of the training samples
    from graftc.families import make_task

    check = first_inputs(teacher)
    samples.image_task(loaded, data(tmp_path), 0).generate(teacher, torch.arange(5))  # the grid's sampler
    make_task(loaded, data(tmp_path), 0).generate(teacher, torch.arange(5))  # the training samples' sampler
    assert torch.equal(check[0], seen["teacher"][0]) and not torch.equal(check[3], seen["teacher"][0])
    png = tmp_path / "samples.png"
    assert grid.write(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diffusers_pipeline_grid_is_decoded_by_its_vae(tmp_path):
    from tests import zoo

    folder = tmp_path / "pipe"
    zoo.dit_pipeline(zoo.make_diffusers_dit()).save_pretrained(folder)
    loaded = load_model(str(folder))
    grid = samples.preview(loaded, data(tmp_path), seed=0, columns=3)
    assert grid.vae is not None
    teacher = loaded.model
    seen = {"teacher": first_inputs(teacher)}
    grid.add("teacher", teacher)
    graft = grafted(teacher, [{"select": {"kind": "attention", "layers": [0]}, "replace": {"op": "self", "init": "random"}}],
                    loaded.example)
    seen["graft"] = first_inputs(graft)
    grid.add("graft", graft)
    assert torch.equal(seen["teacher"][0], seen["graft"][0])
    # the pipeline's VAE decodes the 4x8x8 latents into 3x16x16 images, as the pipeline would
    latents = grid.rows["teacher"]
    assert latents.shape == (3, 4, 8, 8)
    vae = grid.vae
    expected = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(grid.images("teacher"), expected)
    tiles = grid.tiles("teacher")
    assert tiles.shape == (3, 16, 16, 3)
    assert not np.array_equal(grid.tiles("graft"), tiles)


def test_latents_without_vae_share_one_colour_mapping(tmp_path):
    loaded = load_model("demo:tiny-dit")
    grid = samples.preview(loaded, data(tmp_path), seed=0, columns=2)
    grid.rows = {"a": torch.randn(2, 4, 6, 6), "b": None}
    grid.rows["b"] = grid.rows["a"] * 2
    assert grid.latents_shown and grid.images("a") is None
    a, b = grid.tiles("a").astype(int), grid.tiles("b").astype(int)
    assert a.shape == (2, 6, 6, 3)
    # one mapping for every row: doubled latents land farther from mid-grey, not on the same pixels
    assert np.abs(b - 127.5).mean() > np.abs(a - 127.5).mean() + 10


# ------------------------------------------------------------------ compile writes it; progress lines in a log
def test_compile_in_a_log_prints_progress_lines_and_writes_samples_png(tmp_path):
    plan = {"version": 1, "graft": RANDOM,
            "distill": {"stage1": {"steps": 3, "batch_size": 4, "eval_every": 3},
                        "stage2": {"steps": 4, "batch_size": 4, "warmup": 1}, "checkpoint_every": 100},
            "data": {"samples": 16, "sampler_steps": 2, "fd_samples": 0, "cache": str(tmp_path / "cache")}}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "GRAFTC_PROGRESS_SECONDS"}  # the default interval
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "graftc.cli", "compile", "demo:tiny-dit", str(tmp_path / "plan.yaml"),
                           "-o", str(out)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    number = r"[-+.\deinaf]+"
    stage2 = [m for m in (re.fullmatch(rf"stage 2: step (\d+)/4 \(\d+%\), loss ({number}), ({number}) step/s, "
                                       rf"ETA (\d+h)?(\d+m)?\d+s", line) for line in lines) if m]
    # the first step and the last, at least (more only if a step took longer than the interval)
    assert [int(m.group(1)) for m in stage2][:1] == [1] and int(stage2[-1].group(1)) == 4, lines
    assert all(float(m.group(2)) > 0 and float(m.group(3)) > 0 for m in stage2)
    stage1 = [line for line in lines if line.startswith("stage 1 (1 nodes): step ")]
    assert stage1[0].startswith("stage 1 (1 nodes): step 1/3 ") and "step 3/3 (100%)" in stage1[-1], lines
    assert all("loss " in line and "ETA " in line for line in stage1)
    assert any(line.startswith("data: teacher samples: sample 16/16 (100%)") for line in lines), lines
    # the artifact: samples.png with three rows, named in report.md, beside the smoothed loss curves
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "losses.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Samples" in report and "Rows: teacher, after stage 1, final;" in report
    assert "![teacher and graft samples](samples.png)" in report
    assert "samples.png: row 'final'" in done.stdout


def test_progress_lines_follow_the_interval_and_never_repeat_the_last(capsys, monkeypatch):
    monkeypatch.setenv("GRAFTC_PROGRESS_SECONDS", "0")
    shown = Progress("demo", 3, tty=False)
    for i in range(3):
        shown.update(i + 1, loss=0.5 / (i + 1))
    shown.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["demo: step 1/3 (33%)", "demo: step 2/3 (67%)",
                                                      "demo: step 3/3 (100%)"]
    assert "loss 0.25" in lines[1] and lines[2].endswith("ETA 0s")
    monkeypatch.setenv("GRAFTC_PROGRESS_SECONDS", "3600")
    shown = Progress("demo", 10, initial=2, tty=False)
    for i in range(2, 6):
        shown.update(i + 1)
    shown.close()  # stopped early: the last count still gets its line
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["demo: step 3/10 (30%)", "demo: step 6/10 (60%)"]
    Progress("quiet", 5, enabled=False, tty=False).update(5)
    assert capsys.readouterr().err == ""


def test_loss_curve_helpers():
    assert ema([4.0], 9) == [4.0]  # bias-corrected: the first point is itself
    smooth = ema([1.0, 3.0] * 50, 19)
    assert abs(smooth[-1] - 2.0) < 0.15 and max(smooth[10:]) - min(smooth[10:]) < 0.5
    assert needs_log_scale([0.01, 1.0]) and not needs_log_scale([0.2, 1.0]) and not needs_log_scale([0.0, 1.0])


# ------------------------------------------------------------------ eval --grid
@pytest.mark.parametrize("value", ["0", "65", "many", "2.5"])
def test_bad_grid_is_one_clear_line(tmp_path, capsys, value):
    png = tmp_path / "grid.png"
    rc = main(["eval", "demo:tiny-dit", "--grid", value, "--grid-out", str(png)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"graftc: error: --grid: expected a whole number of columns from 1 to 64 "
                                         f"(got {value!r})"]
    assert not png.exists()


def test_grid_of_a_model_without_images_is_refused(tmp_path, capsys):
    from tests import zoo

    png = tmp_path / "grid.png"
    rc = main(["eval", zoo.llama(tmp_path / "llama"), "--grid", "3", "--grid-out", str(png)])
    assert rc == 2 and not png.exists()
    assert "--grid:" in capsys.readouterr().err.splitlines()[-1]


def test_eval_grid_draws_the_artifacts_teacher_and_graft(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "graft": COPY}))
    art = tmp_path / "art"
    assert main(["compile", "demo:tiny-dit", str(plan), "-o", str(art)]) == 0
    assert (art / "samples.png").is_file() and "Rows: teacher, graft;" in (art / "report.md").read_text()
    png = tmp_path / "grids" / "eval.png"
    assert main(["eval", str(art), "--grid", "4", "--grid-out", str(png), "--samples", "4", "--steps", "2",
                 "-o", str(tmp_path / "eval.json")]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    assert json.loads((tmp_path / "eval.json").read_text())["grid"] == str(png)


# ------------------------------------------------------------------ language models: continuations in report.md
def greedy_ids(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding without a cache: each new token is the argmax after the whole sequence so far."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ids, out = prompt, []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def table_rows(report: str) -> list[list[str]]:
    section = report.split("## Greedy continuations", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip().strip("`") for c in row.strip("|").split(" | ")] for row in rows[1:]]


@pytest.mark.parametrize("graft, same", [(COPY, True), (RANDOM, False)])
def test_lm_report_shows_teacher_and_graft_continuations(tmp_path, graft, same):
    from tests import zoo

    spec = zoo.llama(tmp_path / "llama")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "graft": graft}))
    out = tmp_path / "out"
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| prompt | teacher | graft | same tokens |" in report
    rows = table_rows(report)
    assert len(rows) == len(samples.PROMPTS)
    teacher = load_model(spec).model
    for prompt, ours, theirs, count in rows:
        ids = torch.tensor([[int(t) for t in prompt.removeprefix("ids ").split()]])
        # the teacher's cell is the teacher's greedy continuation, decoded again here without a cache
        assert ours == "ids " + " ".join(map(str, greedy_ids(teacher, ids, samples.NEW_TOKENS)))
        n_same, n_teacher = map(int, count.split("/"))
        assert n_teacher == len(ours.split()) - 1
        if same:
            assert theirs == ours and n_same == n_teacher
    if not same:
        assert any(theirs != ours for _, ours, theirs, _ in rows)
        assert any(int(c.split("/")[0]) < int(c.split("/")[1]) for *_, c in rows)


def test_text_to_image_model_without_prompt_embeddings_says_why_it_has_no_grid(tmp_path):
    from tests import zoo

    spec = zoo.pixart(tmp_path / "pixart")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "graft": COPY}))
    out = tmp_path / "out"
    assert main(["compile", spec, str(plan), "-o", str(out)]) == 0
    assert not (out / "samples.png").exists()
    assert "No samples.png: data.prompt_embeds:" in (out / "report.md").read_text()
