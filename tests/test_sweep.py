"""graftc sweep: candidates get a short stage 1, the Pareto front of error vs FLOPs is drawn and written out."""
from __future__ import annotations

import json

import yaml

from graftc.cli import main
from graftc.sweep import pareto


def test_pareto_keeps_only_undominated_rows():
    rows = [{"name": n, "gflops": f, "output_mse": e} for n, f, e in
            [("a", 1.0, 0.5), ("b", 2.0, 0.1), ("c", 2.0, 0.4), ("d", 3.0, 0.1), ("e", 0.5, 0.9)]]
    assert [r["name"] for r in pareto(rows)] == ["e", "a", "b"]


def test_sweep_on_the_demo_writes_front_and_plans(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "demo:tiny-dit", "-o", str(out), "--ops", "hyena_x,swa", "--ratios", "0.5",
                 "--strategies", "interleaved,nonlocal-first", "--steps", "3", "--batch-size", "8", "--samples", "16",
                 "--sampler-steps", "2", "--cache", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["candidates"]) == 4 and result["front"]
    assert {tuple(c["layers"]) for c in result["candidates"] if c["strategy"] == "interleaved"} == {(1, 3, 5)}
    assert all(c["output_mse"] > 0 and c["gflops"] > 0 for c in result["candidates"])
    assert (out / "pareto.png").stat().st_size > 1000
    for name in result["front"]:  # the chosen plans are valid plans
        from graftc.plan import parse_plan

        parse_plan(yaml.safe_load((out / "plans" / f"{name}.yaml").read_text()))
    assert "Pareto front" in capsys.readouterr().out


def test_sweep_rejects_a_bad_grid_before_loading(tmp_path, capsys):
    assert main(["sweep", "demo:tiny-dit", "-o", str(tmp_path / "s"), "--ops", "hyena_z"]) == 2
    assert "unknown op 'hyena_z'" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main(["sweep", "demo:tiny-dit", "-o", str(tmp_path / "s"), "--ratios", "half"]) == 2
