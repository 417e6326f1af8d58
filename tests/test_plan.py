"""Plan schema: round trip, schema export, selection semantics."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from graftc.match import Region
from graftc.plan import dump_plan, json_schema, parse_plan, select_regions
from graftc.passes import rules_by_op


def regions(n, kind="attention"):
    return [Region(kind, i, f"blocks.{i}.attn", [f"blocks.{i}.attn"]) for i in range(n)]


def pick(n, **select):
    plan = parse_plan({"version": 1, "graft": [{"select": {"kind": "attention", **select}, "replace": {"op": "self"}}]})
    return [r.index for r in select_regions(plan.graft[0].select, regions(n), "test")]


def test_interleaved_half_of_28_is_the_odd_layers():
    assert pick(28, ratio=0.5) == list(range(1, 28, 2))


@pytest.mark.parametrize("ratio,strategy,expected", [
    (0.25, "first", [0, 1]), (0.25, "last", [6, 7]), (1.0, "interleaved", list(range(8))),
    (0.75, "interleaved", [1, 2, 3, 5, 6, 7]),
], ids=["first-quarter", "last-quarter", "all", "three-quarters"])
def test_ratio_strategies(ratio, strategy, expected):
    assert pick(8, ratio=ratio, strategy=strategy) == expected


@pytest.mark.parametrize("layers,expected", [("1::2", [1, 3, 5]), ("all", list(range(6))), ([0, -1], [0, 5]),
                                             (":2", [0, 1])], ids=["slice", "all", "list-negative", "prefix"])
def test_layers(layers, expected):
    assert pick(6, layers=layers) == expected


def test_fqn_regex():
    assert pick(6, fqn="re:blocks\\.[24]\\.") == [2, 4]


def test_resolved_plan_round_trips_with_defaults_filled():
    plan = parse_plan({"version": 1, "graft": [{"select": {"kind": "mlp", "layers": "all"},
                                                "replace": {"op": "mlp", "ratio": 3}}]})
    text = dump_plan(plan)
    data = yaml.safe_load(text)
    assert data["graft"][0]["replace"] == {"op": "mlp", "init": "teacher", "ratio": 3.0}
    assert data["graft"][0]["select"]["strategy"] == "interleaved"
    assert parse_plan(data) == plan


def test_schema_lists_every_registered_op():
    text = json.dumps(json_schema())
    for op in rules_by_op():
        assert f'"{op}"' in text


def test_plan_schema_cli():
    out = subprocess.run([sys.executable, "-m", "graftc.cli", "plan-schema"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["title"] == "Plan"
