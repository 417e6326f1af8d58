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


def brute_force_front(rows: list[dict]) -> list[str]:
    """By definition: a row is on the front unless another row is no worse on both axes and better on one."""
    def dominates(o, r):
        return (o["gflops"], o["output_mse"]) != (r["gflops"], r["output_mse"]) \
            and o["gflops"] <= r["gflops"] and o["output_mse"] <= r["output_mse"]

    return sorted((r["name"] for r in rows if not any(dominates(o, r) for o in rows)))


def test_pareto_matches_the_definition_on_random_rows():
    import random

    rng = random.Random(0)
    for trial in range(300):  # few distinct values, so ties on one or both axes are common
        rows = [{"name": f"r{i}", "gflops": rng.choice([1.0, 2.0, 3.0, 4.0]), "output_mse": rng.choice([0.1, 0.2, 0.3])}
                for i in range(rng.randint(1, 8))]
        front = pareto(rows)
        assert sorted(r["name"] for r in front) == brute_force_front(rows), rows
        assert [r["gflops"] for r in front] == sorted(r["gflops"] for r in front)


def test_sweep_on_the_demo_writes_front_and_plans(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "demo:tiny-dit", "-o", str(out), "--ops", "hyena_x,swa", "--ratios", "0.5",
                 "--strategies", "interleaved,nonlocal-first", "--steps", "3", "--batch-size", "8", "--samples", "16",
                 "--sampler-steps", "2", "--cache", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["candidates"]) == 4
    assert sorted(result["front"]) == brute_force_front(result["candidates"])
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
