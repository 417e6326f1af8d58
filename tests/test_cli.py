"""The CLI's success paths: inspect --json contract, compile writes the artifact, --emit-code."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

import graftc
from graftc.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_inspect_json_contract(capsys):
    assert main(["inspect", "demo:tiny-dit", "--json"]) == 0
    regions = json.loads(capsys.readouterr().out)
    for kind in ("attention", "mlp", "block"):
        of_kind = [r for r in regions if r["kind"] == kind]
        assert [r["index"] for r in of_kind] == list(range(6))
        assert all(r["fqn"] and r["params"] > 0 for r in of_kind)
    assert [r["fqn"] for r in regions if r["kind"] == "attention"] == [f"blocks.{i}.attn" for i in range(6)]


def test_compile_writes_artifact(tmp_path, capsys):
    out = tmp_path / "graft"
    assert main(["compile", "demo:tiny-dit", str(EXAMPLES / "attn50-mlp100.yaml"), "-o", str(out), "--emit-code"]) == 0
    printed = capsys.readouterr().out
    assert "forward of blocks.1.attn" in printed and "rewrote 9 regions" in printed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "plan.yaml", "report.md",
                                                     "samples.png"]  # an image model: teacher and graft samples
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["spec"] == "demo:tiny-dit" and len(manifest["base"]["weights_sha256"]) == 64
    assert [r["fqn"] for r in manifest["rewrites"]][:2] == ["blocks.1.attn", "blocks.3.attn"]
    assert yaml.safe_load((out / "plan.yaml").read_text())["graft"][1]["replace"]["init"] == "teacher"
    assert "| graft[1]:mlp |" in (out / "report.md").read_text()
    model = graftc.load(out)
    assert model.blocks[0].mlp.fc1.out_features == 3 * 128
