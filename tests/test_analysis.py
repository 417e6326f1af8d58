"""graftc analyze: band mass / window mass / distances against dense attention maps, and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import yaml
import torch
import torch.nn.functional as F
from torch import nn

from graftc.analysis import analyze, attention_stats, layer_order, parse_ks
from graftc.cli import main
from graftc.errors import GraftError


def dense_stats(q, k, ks, grid=None, windows=(3, 5)):
    """Reference: the full attention map at once, averaged over batch, heads and query rows."""
    a = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # [B, H, N, N]
    n = q.shape[2]
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).abs()
    rows = a.shape[0] * a.shape[1] * n
    out = {"band": {kk: float((a * (d <= kk)).sum()) / rows for kk in ks}, "distance": float((a * d).sum()) / rows}
    if grid:
        w = grid[1]
        dy, dx = (i[:, None] // w - i[None, :] // w).abs(), (i[:, None] % w - i[None, :] % w).abs()
        cheb = torch.maximum(dy, dx)
        out["window"] = {s: float((a * (cheb <= (s - 1) // 2)).sum()) / rows for s in windows}
        out["distance_2d"] = float((a * torch.sqrt((dy * dy + dx * dx).double())).sum()) / rows
    return out


def test_attention_stats_match_dense_and_blocking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 12, 8, generator=g) * 2, torch.randn(2, 3, 12, 8, generator=g) * 2
    ks = [0, 1, 2, 4, 11, 20]
    ref = dense_stats(q, k, ks, (3, 4))
    for block in (12, 5, 1):
        s = attention_stats(q, k, ks, (3, 4), (3, 5), block=block)
        rows = s["rows"]
        assert rows == 2 * 3 * 12
        for kk in ks:
            assert abs(s["band"][kk] / rows - ref["band"][kk]) < 1e-5
        assert abs(s["distance"] / rows - ref["distance"]) < 1e-5
        for w in (3, 5):
            assert abs(s["window"][w] / rows - ref["window"][w]) < 1e-5
        assert abs(s["distance_2d"] / rows - ref["distance_2d"]) < 1e-5
    band = [s["band"][kk] / rows for kk in ks]
    assert all(b1 <= b2 + 1e-12 for b1, b2 in zip(band, band[1:]))  # non-decreasing in k
    assert abs(band[-2] - 1) < 1e-6 and abs(band[-1] - 1) < 1e-6  # k >= N - 1: everything
    assert "window" not in attention_stats(q, k, ks, (5, 5))  # a grid that does not fit N is ignored


class GQAAttention(nn.Module):
    """Separate q/k/v/o projections, 4 query heads sharing 2 kv heads; keeps its q and k for the test."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.dh)
        self.k_proj = nn.Linear(dim, kv_heads * self.dh)
        self.v_proj = nn.Linear(dim, kv_heads * self.dh)
        self.o_proj = nn.Linear(heads * self.dh, dim)
        self.seen = []

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.dh).transpose(1, 2)
        k = k.repeat_interleave(self.heads // self.kv_heads, 1)
        v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        self.seen.append((q.detach(), k.detach()))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = GQAAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self, dim=32, depth=2, tokens=10):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def forward(self, x):
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return x


def test_analyze_handmade_gqa_model_matches_dense():
    torch.manual_seed(0)
    model = Tiny().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 10, 32, generator=g) for _ in range(2)]
    ks = [1, 2, 4, 9]
    result = analyze(model, [((x,), {}) for x in batches], ks, example=(batches[0],), block=3)
    assert [a["index"] for a in result["attention"]] == [0, 1]
    assert {(a["kind"], a["index"]) for a in result["activations"]} == {("attention", 0), ("attention", 1),
                                                                        ("mlp", 0), ("mlp", 1)}
    for a, block in zip(result["attention"], model.blocks):
        seen = block.attn.seen[-2:]  # the two analysis batches (earlier entries: region probing)
        q, k = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
        ref = dense_stats(q, k, ks)
        assert a["heads"] == 4 and a["tokens"] == 10
        for kk in ks:
            assert abs(a["band_mass"][str(kk)] - ref["band"][kk]) < 1e-5
        assert abs(a["band_mass"]["9"] - 1) < 1e-6
        assert abs(a["mean_distance"] - ref["distance"]) < 1e-5
    order = layer_order(result, 2)
    assert sorted(order) == [0, 1]
    l2 = {a["index"]: a["band_mass"]["2"] for a in result["attention"]}
    assert l2[order[0]] >= l2[order[1]]
    with pytest.raises(GraftError):
        layer_order(result, 3)
    for act in result["activations"]:
        assert act["std"] > 0 and act["loss"] in ("l1", "l2") and act["max_over_std"] >= 1


def test_parse_ks():
    assert parse_ks("4,1, 2,2") == [1, 2, 4]
    for bad in ("", "a,b", "1,-2", "1.5"):
        with pytest.raises(GraftError):
            parse_ks(bad)


def test_cli_analyze_tiny_dit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAFTC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "analysis"
    assert main(["analyze", "demo:tiny-dit", "-o", str(out), "--batches", "1", "--batch-size", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["activations.png", "analysis.json", "locality_bars.png",
                                                      "locality_heatmap.png", "report.md"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".analysis.tmp")]
    data = json.loads((out / "analysis.json").read_text())
    att = data["attention"]
    assert [a["index"] for a in att] == list(range(6)) and all(a["tokens"] == 16 for a in att)
    assert all(a["grid"] == [4, 4] for a in att)
    for a in att:
        band = [a["band_mass"][str(k)] for k in data["ks"]]
        assert all(b1 <= b2 + 1e-9 for b1, b2 in zip(band, band[1:]))
        assert abs(a["band_mass"]["16"] - 1) < 1e-6 and abs(a["window_mass"]["7"] - 1) < 1e-6
        assert 0 < a["mean_distance"] < 15
    assert len({round(a["band_mass"]["2"], 6) for a in att}) > 1  # locality differs across layers
    assert len(data["activations"]) == 12 and all(a["loss"] in ("l1", "l2") for a in data["activations"])
    assert "Most-local-first order" in (out / "report.md").read_text()
    assert (out / "locality_bars.png").read_bytes()[:4] == b"\x89PNG"

    # bad input: one line on stderr, exit 2, nothing replaced
    assert main(["analyze", "demo:tiny-dit", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert main(["analyze", "demo:tiny-dit", "-o", str(tmp_path / "x"), "--ks", "1,two"]) == 2
    err = capsys.readouterr().err
    assert "--ks" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    assert main(["analyze", "demo:tiny-dit", "-o", str(tmp_path / "x"), "--windows", "4"]) == 2
    assert main(["analyze", "demo:tiny-dit", "-o", str(tmp_path / "x"), "--batches", "0"]) == 2
    capsys.readouterr()


def test_locality_strategies_select_by_measured_locality(tmp_path):
    import graftc
    from graftc import compile as graft

    ranking = {"k": 2, "order": [2, 0, 1, 5, 3, 4]}
    provider = lambda model, regions: ranking  # noqa: E731
    picked = {}
    for strategy in ("local-first", "nonlocal-first"):
        loaded = graftc.load_model("demo:tiny-dit")
        plan = {"version": 1, "graft": [{"select": {"kind": "attention", "ratio": 0.5, "strategy": strategy},
                                         "replace": {"op": "hyena_x"}}]}
        result = graft(loaded.model, plan, loaded.example, locality=provider)
        picked[strategy] = [r["index"] for r in result.rewrites]
        assert result.reports[-1].details["locality"] == ranking
    assert picked == {"local-first": [0, 1, 2], "nonlocal-first": [3, 4, 5]}


def test_locality_strategy_is_for_attention(tmp_path, capsys):

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ngraft:\n  - select: {kind: mlp, ratio: 0.5, strategy: local-first}\n"
                    "    replace: {op: mlp, ratio: 3}\n")
    assert main(["compile", "demo:tiny-dit", str(plan), "-o", str(tmp_path / "out")]) == 2
    assert "ranks attention layers" in capsys.readouterr().err


def test_emit_plan_from_the_analysis_compiles(tmp_path, capsys):

    plan = tmp_path / "emitted.yaml"
    assert main(["analyze", "demo:tiny-dit", "-o", str(tmp_path / "an"), "--batches", "1", "--samples", "8",
                 "--cache", str(tmp_path / "cache"), "--emit-plan", str(plan), "--op", "swa", "--ratio", "0.5",
                 "--strategy", "nonlocal-first"]) == 0
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    from graftc.analysis import default_k

    expected = sorted(layer_order(analysis, default_k(analysis))[::-1][:3])
    assert yaml.safe_load(plan.read_text())["graft"][0]["select"]["layers"] == expected
    assert main(["compile", "demo:tiny-dit", str(plan), "-o", str(tmp_path / "out")]) == 0


def test_least_sensitive_first_ranks_by_the_single_layer_graft(tmp_path):
    """A block whose attention branch is gated to zero cannot move the output whatever replaces its attention:
    its measured sensitivity is exactly 0 and least-sensitive-first takes it; the others move the output."""
    import graftc
    from graftc import rankings
    from graftc.plan import parse_plan

    loaded = graftc.load_model("demo:tiny-dit")
    width = loaded.model.hidden_size
    with torch.no_grad():  # adaLN chunks: shift, scale, gate of attention, then of the MLP
        gate = loaded.model.blocks[4].adaLN_modulation[-1]
        gate.weight[2 * width:3 * width].zero_()
        gate.bias[2 * width:3 * width].zero_()
    data = parse_plan({"version": 1, "data": {"samples": 16, "sampler_steps": 2, "fd_samples": 0,
                                              "cache": str(tmp_path / "cache")}}).data
    lines = []
    provider = rankings.sensitivity_on_data(loaded, data, seed=0, steps=3, log=lines.append)
    plan = {"version": 1, "graft": [{"select": {"kind": "attention", "ratio": 0.5, "strategy": "least-sensitive-first"},
                                     "replace": {"op": "hyena_x"}}]}
    result = graftc.compile(loaded.model, plan, loaded.example, sensitivity=provider)
    ranking = result.reports[-1].details["sensitivity"]
    assert ranking["output_mse"]["4"] == 0.0 and all(v > 0 for k, v in ranking["output_mse"].items() if k != "4")
    assert ranking["order"][0] == 4 and sorted(ranking["order"]) == list(range(6))
    assert [r["index"] for r in result.rewrites] == sorted(ranking["order"][:3])
    assert "after 3 stage-1 steps" in lines[0]
    assert provider(graftc.load_model("demo:tiny-dit").model, result.regions, result.plan.graft[0].replace) != ranking
    # the same weights and operator again: read from the cache
    lines.clear()
    again = graftc.load_model("demo:tiny-dit")
    with torch.no_grad():
        again.model.blocks[4].adaLN_modulation[-1].load_state_dict(gate.state_dict())
    assert provider(again.model, result.regions, result.plan.graft[0].replace) == ranking
    assert "using the cached measurement" in lines[-1]


def test_least_sensitive_first_needs_the_measurement(tmp_path):
    import graftc
    from graftc.errors import GraftError

    loaded = graftc.load_model("demo:tiny-dit")
    plan = {"version": 1, "graft": [{"select": {"kind": "attention", "ratio": 0.5, "strategy": "least-sensitive-first"},
                                     "replace": {"op": "hyena_x"}}]}
    with pytest.raises(GraftError, match="least-sensitive-first ranks attention layers by measured graft sensitivity"):
        graftc.compile(loaded.model, plan, loaded.example)
    # through the CLI the plan measures it, with no more stage-1 steps than the plan's own stage 1
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({**plan, "distill": {"stage1": {"steps": 2, "batch_size": 8}},
                                    "data": {"samples": 16, "sampler_steps": 2, "fd_samples": 0,
                                             "cache": str(tmp_path / "cache")}}))
    assert main(["compile", "demo:tiny-dit", str(path), "-o", str(tmp_path / "out")]) == 0
    [measured] = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "analysis").glob("sensitivity-*.json")]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert measured["steps"] == 2 and [r["index"] for r in manifest["rewrites"]] == sorted(measured["order"][:3])


@pytest.mark.parametrize("make", ["make_qwen3", "make_llama", "make_bert"])
@pytest.mark.parametrize("padded", [True, False])
def test_locality_is_measured_on_the_map_the_layer_computes(make, padded):
    """Band mass and mean distance equal those of the attention weights the model itself returns (eager attention,
    output_attentions): with Qwen3's q/k norms, RoPE (Llama, Qwen3), the causal mask of the decoders (which SDPA
    decoders get as no mask at all when nothing is padded) and a padded batch, where padding rows count for
    nothing. Dropping RoPE, the norms, the causal triangle or the padding rows changes the figures."""
    from tests import zoo

    model = getattr(zoo, make)()
    torch.manual_seed(1)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (3, 20))
    mask = torch.ones_like(ids)
    if padded and make == "make_bert":
        mask[1, 13:] = 0  # right padding
    elif padded:
        mask[1, :6] = 0  # left padding, as generate() pads
    ks = [1, 2, 4, 8]
    analysis = analyze(model, [{"input_ids": ids, "attention_mask": mask, "use_cache": False}], ks=ks)
    model.config._attn_implementation = "eager"  # the reference: the weights the model's own attention computes
    with torch.no_grad():
        maps = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(analysis["attention"]) == len(maps) == 2
    distance = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs().double()
    rows = mask.bool()[:, None, :, None].expand(-1, maps[0].shape[1], -1, 20)  # real query rows
    for measured, a in zip(analysis["attention"], maps):
        a = a.double().where(rows, 0)
        count = rows[..., 0].sum()
        for k in ks:
            assert measured["band_mass"][str(k)] == pytest.approx(float((a * (distance <= k)).sum() / count), abs=1e-6)
        assert measured["mean_distance"] == pytest.approx(float((a * distance).sum() / count), rel=1e-6)
