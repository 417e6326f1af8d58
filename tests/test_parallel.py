"""Depth->width (`parallel` over `block_pair` regions): pairs found by dataflow in every family, unpairable blocks
refused or skipped with a reason, the block starts as x + u_0(x) + u_1(x), the fused width-doubled DiT block agrees
with the unfused composition (and its Triton kernels with their references), DiT-XL/2 grows to ~712M parameters,
artifacts round-trip, stage 1 regresses a pair onto the pair's output."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import yaml
from torch import nn

import graftc
from graftc.cli import main
from graftc.errors import GraftError
from graftc.kernels import parallel as kp
from graftc.kernels.parallel import aten, naive
from graftc.kernels.parallel import triton as kp_triton
from graftc.models.dit import DiTBlock, build_dit, example_inputs
from graftc.passes.parallel import PairedAway, ParallelBlocks, ParallelDiTBlock
from graftc.spec import load_model
from tests import zoo
from tests.helpers import graft, leaves, max_diff, perturb, plan_of, run, save_and_load, zoo_family_fixture

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # kernel tests: Triton on the GPU, or interpreted on the CPU (tests/conftest.py)
PARALLEL = plan_of(({"kind": "block_pair", "layers": "all"}, {"op": "parallel"}))
FAMILIES = ["graftc-dit", "diffusers-dit", "pixart-sigma", "qwen3-gqa", "llama", "bert"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


family = zoo_family_fixture(FAMILIES)


# ---------------------------------------------------------------- regions
def test_every_family_pairs_its_blocks(family):
    _, _, loaded = family
    regions = graftc.inspect_regions(loaded.model, loaded.example)
    blocks = [r for r in regions if r.kind == "block"]
    pairs = [r for r in regions if r.kind == "block_pair"]
    assert len(blocks) in (zoo.FAMILY_DEPTH, 6) and len(pairs) == len(blocks) // 2  # dit:tiny has 6 blocks
    for p, pair in enumerate(pairs):
        assert pair.index == p and pair.cover == [blocks[2 * p].fqn, blocks[2 * p + 1].fqn]
        assert pair.fqn == blocks[2 * p].fqn
        assert pair.params == blocks[2 * p].params + blocks[2 * p + 1].params
        assert pair.attrs["unpaired"] == [] and pair.attrs["site"]["input"] is not None
        assert pair.input_shape == pair.output_shape == blocks[0].input_shape


class _Tangled(nn.Module):
    """Four DiT blocks wired so that only blocks 2 and 3 can pair."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(6))
        perturb(self)

    def forward(self, x, c):
        h0 = self.blocks[0](x, c)
        h1 = self.blocks[1](h0, c)
        h1 = h1 * 0.5  # something between blocks 1 and 2: not adjacent in the dataflow
        h3 = self.blocks[3](self.blocks[2](h1, c), c)
        h4 = self.blocks[4](h3, c)
        h5 = self.blocks[5](h4, 2 * c)  # conditioned unlike block 4
        return h5 + h0  # block 0's output is read again here: a side read


def test_unpairable_blocks_get_reasons():
    model = _Tangled()
    regions = graftc.inspect_regions(model, (torch.randn(1, 8, 32), torch.randn(1, 32)))
    pairs = [r for r in regions if r.kind == "block_pair"]
    assert [p.cover for p in pairs] == [["blocks.2", "blocks.3"]]
    reasons = {u["fqn"]: u["reason"] for u in pairs[0].attrs["unpaired"]}
    assert set(reasons) == {"blocks.0", "blocks.1", "blocks.4", "blocks.5"}
    assert "also read outside blocks.1" in reasons["blocks.0"] and "the top level" in reasons["blocks.0"]
    assert "not adjacent" in reasons["blocks.1"]
    assert "not conditioned alike" in reasons["blocks.4"]
    assert "last block" in reasons["blocks.5"]
    blocks = {r.fqn: r for r in regions if r.kind == "block"}
    assert blocks["blocks.2"].attrs["pair"] == 0 and "unpaired" in blocks["blocks.1"].attrs


def test_unpairable_error_or_skip():
    model = _Tangled()
    inputs = (torch.randn(1, 8, 32), torch.randn(1, 32))
    with pytest.raises(GraftError, match=r"block blocks\.0 cannot pair: .*and 3 more.*unpairable: skip"):
        graftc.compile(copy.deepcopy(model), PARALLEL, inputs)
    skip = plan_of(({"kind": "block_pair", "layers": "all"}, {"op": "parallel", "unpairable": "skip"}))
    with pytest.warns(UserWarning, match=r"left 4 block\(s\) sequential: blocks\.0: "):
        result = graftc.compile(model, skip, inputs)
    assert [r["region"]["cover"] for r in result.rewrites] == [["blocks.2", "blocks.3"]]
    assert len(result.reports[-1].details["left_sequential"]) == 4
    assert isinstance(model.blocks[2], ParallelDiTBlock) and isinstance(model.blocks[3], PairedAway)
    assert type(model.blocks[1]) is DiTBlock


def test_model_without_pairs_says_why():
    model = build_dit("tiny", depth=1)
    with pytest.raises(GraftError, match=r"no block_pair regions \(blocks\.0: it is the last block .*odd depth 1"):
        graftc.compile(model, PARALLEL, example_inputs(model, 1))


def test_pair_over_a_rewritten_block_is_refused():
    model = build_dit("tiny")
    plan = plan_of(({"kind": "attention", "layers": [2]}, {"op": "hyena_x"}),
                   ({"kind": "block_pair", "layers": [1]}, {"op": "parallel"}))
    with pytest.raises(GraftError, match=r"graft\[1\]: block_pair 1 at blocks\.2 overlaps blocks\.2\.attn, "
                                         r"already rewritten by op 'hyena_x'"):
        graftc.compile(model, plan, example_inputs(model, 1))


# ---------------------------------------------------------------- the rewrite, every family
def _pair_call(model, fqn, loaded):
    caught = {}
    hook = model.get_submodule(fqn).register_forward_pre_hook(
        lambda m, a, k: caught.setdefault("call", (a, k)), with_kwargs=True)
    run(model, loaded)
    hook.remove()
    return caught["call"]


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def test_parallel_starts_as_the_first_order_pair(family):
    """Merge [I | I]: the block computes x + (block_0(x) - x) + (block_1(x) - x) on the teacher's input x."""
    name, _, loaded = family
    teacher, result = graft(loaded, PARALLEL)
    out = run(result.model, loaded)
    assert [t.shape for t in teacher] == [o.shape for o in out] and all(torch.isfinite(o).all() for o in out)
    assert len(result.rewrites) == (6 if name == "graftc-dit" else zoo.FAMILY_DEPTH) // 2
    kind = ParallelDiTBlock if name == "graftc-dit" else ParallelBlocks
    for record in result.rewrites:
        first, second = record["region"]["cover"]
        assert isinstance(result.model.get_submodule(first), kind)
        assert isinstance(result.model.get_submodule(second), PairedAway)
        args, kwargs = _pair_call(loaded.model, first, loaded)
        x = args[0]
        with torch.no_grad():
            a = _first(loaded.model.get_submodule(first)(*args, **kwargs))
            b = _first(loaded.model.get_submodule(second)(*args, **kwargs))
            got = _first(result.model.get_submodule(first)(*args, **kwargs))
        assert rel(got, a + b - x) <= 1e-5
    added = sum(2 * r["region"]["input_shape"][-1] ** 2 + r["region"]["input_shape"][-1] for r in result.rewrites)
    assert result.reports[-1].params_after == result.reports[0].params_before + added


def test_parallel_trains_and_round_trips(family, tmp_path):
    _, spec, loaded = family
    _, result = graft(loaded, PARALLEL)
    perturb(result.model, seed=1)  # as if distilled: the artifact must carry the new weights
    grafted = run(result.model, loaded)
    reloaded = save_and_load(result, spec, tmp_path / "out")
    assert max_diff(grafted, run(reloaded, loaded)) == 0.0
    model = result.model.train()
    loss = sum(x.float().pow(2).mean() for x in leaves(model(*loaded.args, **loaded.kwargs)) if x.is_floating_point())
    loss.backward()
    blocks = [model.get_submodule(r["fqn"]) for r in result.rewrites]
    merges = [b.merge_w if isinstance(b, ParallelDiTBlock) else b.merge.weight for b in blocks]
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in merges)


def test_language_model_stays_causal_and_generates():
    model = perturb(zoo.make_qwen3(depth=4))
    graftc.compile(model, PARALLEL, {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False})
    ids = torch.randint(0, zoo.VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % zoo.VOCAB_SIZE
    with torch.no_grad():
        a, b = model(input_ids=ids, use_cache=False).logits, model(input_ids=changed, use_cache=False).logits
        assert torch.equal(a[0, :7], b[0, :7]) and not torch.equal(a[0, 7:], b[0, 7:])
        cached = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


# ---------------------------------------------------------------- graftc's DiT: fused vs unfused
@pytest.fixture(scope="module")
def tiny_dit():
    loaded = load_model("dit:tiny")
    perturb(loaded.model)
    return loaded


def test_fused_block_matches_the_two_modules_side_by_side(tiny_dit):
    """fused: true (stacked weights, width-doubled) == fused: false (the two DiTBlocks called), whole model."""
    _, fused = graft(tiny_dit, PARALLEL)
    _, apart = graft(tiny_dit, plan_of(({"kind": "block_pair", "layers": "all"}, {"op": "parallel", "fused": False})))
    assert isinstance(apart.model.blocks[0], ParallelBlocks)
    a, b = run(fused.model, tiny_dit), run(apart.model, tiny_dit)
    assert rel(a[0], b[0]) <= 1e-5


def test_generated_code_calls_the_fused_kernels(tiny_dit):
    _, result = graft(tiny_dit, plan_of(({"kind": "block_pair", "layers": [1]}, {"op": "parallel"})))
    code = graftc.compiler.emit_code(result.model, tiny_dit.example, ["blocks.2"])
    assert code.count("torch.ops.graftc.modulated_layer_norm.default(") == 2
    assert code.count("torch.ops.graftc.parallel_merge_input.default(") == 1
    assert code.count("torch.ops.aten.baddbmm.default(") == 4  # qkv, proj, fc1, fc2 of both branches at once
    assert code.count("torch.ops.aten.scaled_dot_product_attention.default(") == 1  # both branches' heads


def _weights(width: int, hidden: int, scale: float = 0.2, seed: int = 0, dtype=torch.float32, grad=False,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12 * width, width), (12 * width,), (2, width, 3 * width), (2, 1, 3 * width), (2, width, width),
              (2, 1, width), (2, width, hidden), (2, 1, hidden), (2, hidden, width), (2, 1, width), (2 * width, width),
              (width,)]
    return kp.PairWeights(*(torch.randn(s, generator=g).mul(scale).to(device, dtype).requires_grad_(grad)
                            for s in shapes))


SHAPES = {"b1-n16-d32-h2": (1, 16, 32, 2), "b3-n9-d48-h4": (3, 9, 48, 4), "b2-n64-d64-h8": (2, 64, 64, 8)}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fused_block_matches_reference_forward_and_backward(shape):
    batch, tokens, width, heads = shape
    w = _weights(width, 4 * width, grad=True, device=DEVICE)
    # x laid out [B, D, N] and transposed, as a patch embedding hands it over: not contiguous
    x = torch.randn(batch, width, tokens, device=DEVICE).transpose(1, 2).requires_grad_()
    c = torch.randn(batch, width, device=DEVICE, requires_grad=True)
    fused = kp.parallel_dit_block(x, c, w, heads)
    ref = naive.parallel_dit_block_reference(x, c, w, heads)
    assert rel(fused, ref) <= 1e-5
    grad = torch.randn_like(ref)
    inputs = [x, c, *w]
    got = torch.autograd.grad(fused, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip(["x", "c", *kp.PairWeights._fields], got, want):
        assert rel(a, b) <= 1e-5, name


def test_reference_mode_runs_the_unfused_composition(monkeypatch):
    w, x, c = _weights(32, 128), torch.randn(2, 8, 32), torch.randn(2, 32)
    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    assert torch.equal(kp.parallel_dit_block(x, c, w, 2), naive.parallel_dit_block_reference(x, c, w, 2))


def test_fused_block_is_the_teacher_pair_at_branch_level():
    """Each branch of the reference is exactly its DiTBlock: merge [I | 0] gives block_0(x)."""
    torch.manual_seed(0)
    a, b = perturb(DiTBlock(32, 2)), perturb(DiTBlock(32, 2), seed=1)
    block = ParallelDiTBlock.from_blocks(a, b)
    x, c = torch.randn(2, 8, 32), torch.randn(2, 32)
    assert torch.equal(block.qkv_w[1], b.attn.qkv.weight.t()) and torch.equal(block.fc2_b[0, 0], a.mlp.fc2.bias)
    with torch.no_grad():
        block.merge_w[32:] = 0  # merge [I | 0]
        assert rel(block(x, c), a(x, c)) <= 1e-6
        block.merge_w[:32] = 0
        block.merge_w[32:] = torch.eye(32)  # merge [0 | I]
        assert rel(block(x, c), b(x, c)) <= 1e-6


# ---------------------------------------------------------------- the two fused ops: Triton (interpreted on CPU)
def _modulation(batch: int, width: int, seed: int = 0, device="cpu"):
    """shift, scale, gate_attn, gate_mlp as the strided [2, B, D] views the block passes."""
    mod = torch.randn(batch, 2, 6, width, generator=torch.Generator().manual_seed(seed)).to(device).permute(2, 1, 0, 3)
    return mod[0], mod[1], mod[2], mod[5]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "per-branch-x"])
@pytest.mark.parametrize("shape", [(2, 16, 48), (1, 7, 1152)], ids=["b2-n16-d48", "b1-n7-d1152"])
def test_modulated_layer_norm_triton_matches_reference(shape, shared):
    batch, tokens, width = shape
    x = torch.randn(1 if shared else 2, batch, tokens, width, device=DEVICE)
    shift, scale, _, _ = _modulation(batch, width, device=DEVICE)
    ref = naive.modulated_layer_norm_reference(x, shift, scale)
    assert rel(kp_triton.modulated_layer_norm(x, shift, scale, 1e-6), ref) <= 1e-6
    assert rel(aten.modulated_layer_norm(x, shift, scale, 1e-6), ref) <= 1e-6


@pytest.mark.parametrize("shape", [(2, 16, 48), (1, 7, 1152)], ids=["b2-n16-d48", "b1-n7-d1152"])
def test_merge_input_triton_matches_reference(shape):
    batch, tokens, width = shape
    attn, mlp = (torch.randn(2, batch * tokens, width, device=DEVICE) for _ in range(2))
    x, bias = torch.randn(batch * tokens, width, device=DEVICE), torch.randn(width, device=DEVICE)
    _, _, gate_attn, gate_mlp = _modulation(batch, width, device=DEVICE)
    ref = naive.parallel_merge_input_reference(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
    for impl in (kp_triton.merge_input, aten.merge_input):
        got = impl(attn, gate_attn, mlp, gate_mlp, x, bias, tokens)
        assert all(rel(a, b) <= 1e-6 for a, b in zip(got, ref))


def test_whole_block_on_triton_matches_reference(monkeypatch):
    w = _weights(48, 192, device=DEVICE)
    x, c = torch.randn(2, 9, 48, device=DEVICE), torch.randn(2, 48, device=DEVICE)
    ref = naive.parallel_dit_block_reference(x, c, w, 4)
    monkeypatch.setenv("GRAFTC_KERNELS", "triton")
    assert rel(kp.parallel_dit_block(x, c, w, 4), ref) <= 1e-5


@pytest.mark.skipif(not CUDA, reason="bf16 kernels run on a GPU (the interpreter has no bf16 arithmetic)")
def test_whole_block_bf16_on_gpu_matches_fp32_reference():
    w = _weights(1152, 4608, scale=0.02, device="cuda")
    x, c = torch.randn(1, 256, 1152, device="cuda"), torch.randn(1, 1152, device="cuda")
    ref = naive.parallel_dit_block_reference(x, c, w, 16)
    half = kp.PairWeights(*(t.bfloat16() for t in w))
    got = kp.parallel_dit_block(x.bfloat16(), c.bfloat16(), half, 16)
    ref_half = naive.parallel_dit_block_reference(x.bfloat16(), c.bfloat16(), half, 16)
    assert rel(got.float(), ref) <= 2 * rel(ref_half.float(), ref) + 1e-3  # no worse than bf16 itself


@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "per-branch-x"])
def test_fused_op_gradients(shared):
    """The written-out backward of both ops against autograd's numerical gradient (float64)."""
    batch, tokens, width = 2, 3, 5
    shift, scale, gate_attn, gate_mlp = (t.double().requires_grad_() for t in _modulation(batch, width))
    x = torch.randn(1 if shared else 2, batch, tokens, width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: kp.modulated_layer_norm(*a, 1e-6), (x, shift, scale))
    attn, mlp = (torch.randn(2, batch * tokens, width, dtype=torch.float64, requires_grad=True) for _ in range(2))
    xr = torch.randn(batch * tokens, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: kp.parallel_merge_input(*a, tokens),
                                    (attn, gate_attn, mlp, gate_mlp, xr, bias))


def test_fused_ops_reject_bad_shapes():
    with pytest.raises(ValueError, match="modulated_layer_norm: shift/scale"):
        kp.modulated_layer_norm(torch.randn(1, 2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="parallel_merge_input: gates"):
        kp.parallel_merge_input(torch.randn(2, 6, 4), torch.randn(2, 4, 4), torch.randn(2, 6, 4),
                                torch.randn(2, 4, 4), torch.randn(6, 4), torch.randn(4), 3)


# ---------------------------------------------------------------- DiT-XL/2: depth 14, ~712M parameters
def test_dit_xl_becomes_depth_14_with_712m_parameters():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    before = sum(p.numel() for p in model.parameters())
    graftc.compile(model, PARALLEL, example_inputs(model, 1))
    after = sum(p.numel() for p in model.parameters())
    assert before == 675_129_632
    assert sum(isinstance(b, ParallelDiTBlock) for b in model.blocks) == 14
    assert sum(isinstance(b, PairedAway) for b in model.blocks) == 14
    assert abs(after - 712e6) / 712e6 < 0.01
    assert after == before + 14 * (2 * 1152 * 1152 + 1152)  # the merge projections, nothing else


# ---------------------------------------------------------------- plan, CLI, stage 1
def test_plan_options_are_strict(tmp_path):
    bad = plan_of(({"kind": "block_pair", "layers": "all"}, {"op": "parallel", "unpairable": "ignore"}))
    with pytest.raises(GraftError, match="unpairable"):
        graftc.compile(build_dit("tiny"), bad, ())
    wrong_kind = plan_of(({"kind": "block", "layers": "all"}, {"op": "parallel"}))
    model = build_dit("tiny")
    with pytest.raises(GraftError, match="op 'parallel' does not apply to block regions .*it replaces: block_pair"):
        graftc.compile(model, wrong_kind, example_inputs(model, 1))


def test_ratio_selects_interleaved_pairs():
    model = build_dit("tiny")
    result = graftc.compile(model, plan_of(({"kind": "block_pair", "ratio": 0.5}, {"op": "parallel"})),
                            example_inputs(model, 1))
    assert [r["region"]["cover"] for r in result.rewrites] == [["blocks.2", "blocks.3"], ["blocks.4", "blocks.5"]]
    assert [type(b).__name__ for b in model.blocks] == ["DiTBlock"] * 2 + ["ParallelDiTBlock", "PairedAway"] * 2


ODD_MODEL = '''
import torch

from graftc.models.dit import build_dit, example_inputs


def odd():
    model = build_dit("tiny", depth=5)
    return model, example_inputs(model, batch_size=1)


def signal():
    """dit:tiny with every weight nudged: adaLN-Zero blocks start as the identity, which would make stage 1 trivial."""
    model = build_dit("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, example_inputs(model, batch_size=1)
'''


def test_cli_inspect_lists_pairs_and_refuses_odd_depth(tmp_path, capsys):
    assert main(["inspect", "dit:tiny", "--json"]) == 0
    pairs = [r for r in json.loads(capsys.readouterr().out) if r["kind"] == "block_pair"]
    assert [(p["index"], p["fqn"], p["cover"]) for p in pairs] == [
        (i, f"blocks.{2 * i}", [f"blocks.{2 * i}", f"blocks.{2 * i + 1}"]) for i in range(3)]
    (tmp_path / "odd.py").write_text(ODD_MODEL)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PARALLEL))
    out = tmp_path / "out"
    rc = main(["compile", f"python:{tmp_path / 'odd.py'}:odd", str(plan), "-o", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists()
    assert "block blocks.4 cannot pair: it is the last block" in err[0] and "unpairable: skip" in err[0]
    plan.write_text(yaml.safe_dump(plan_of(({"kind": "block_pair", "layers": "all"},
                                            {"op": "parallel", "unpairable": "skip"}))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compile", f"python:{tmp_path / 'odd.py'}:odd", str(plan), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["fqn"] for r in manifest["rewrites"]] == ["blocks.0", "blocks.2"]
    assert manifest["rewrites"][0]["region"]["attrs"]["unpaired"][0]["fqn"] == "blocks.4"


def test_stage1_regresses_the_pair_onto_the_pairs_output(tmp_path):
    plan = {"version": 1, "graft": PARALLEL["graft"],
            "distill": {"stage1": {"steps": 8, "batch_size": 8, "lr": 1e-4, "eval_every": 4},
                        "stage2": {"steps": 2, "batch_size": 8, "warmup": 1}, "checkpoint_every": 50},
            "data": {"samples": 24, "sampler_steps": 2, "fd_samples": 0, "cache": str(tmp_path / "cache")}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    (tmp_path / "models.py").write_text(ODD_MODEL)
    out, spec = tmp_path / "out", f"python:{tmp_path / 'models.py'}:signal"
    assert main(["compile", spec, str(path), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    nodes = manifest["distill"]["stage1"]
    assert [n["name"] for n in nodes] == ["block_pair0:parallel", "block_pair1:parallel", "block_pair2:parallel"]
    assert [n["fqn"] for n in nodes] == ["blocks.0", "blocks.2", "blocks.4"]
    assert all(n["loss"] == "l1" and n["steps_run"] == 8 for n in nodes)  # loss auto: L1 for block pairs
    assert all(n["val_before"] > 0 and n["best_val"] < n["val_before"] for n in nodes)
    assert manifest["distill"]["stage2"]["steps_run"] == 2
    model = graftc.load(out, allow_python=True)
    assert isinstance(model.blocks[0], ParallelDiTBlock) and isinstance(model.blocks[1], PairedAway)


# |parallel - pair| / |pair update| at the start, and the same for dropping each pair's second block
GAPS, DROPS = [0.2801, 0.3036, 0.2563], [0.2230, 0.5616, 0.7203]


def test_start_gap_on_demo():
    """How far the [I | I] merge starts from the sequential pair on the pretrained demo DiT (reported, bounded)."""
    loaded = load_model("demo:tiny-dit")  # ships inside graftc
    teacher = loaded.model
    student = copy.deepcopy(teacher)
    graftc.compile(student, PARALLEL, loaded.example)
    args = example_inputs(teacher, batch_size=32, seed=1)
    caught = {}
    hooks = [teacher.blocks[2 * p].register_forward_pre_hook(lambda m, a, p=p: caught.setdefault(p, a))
             for p in range(3)]
    with torch.no_grad():
        teacher(*args)
        gaps, drops = [], []
        for p in range(3):
            x, c = caught[p]
            pair = teacher.blocks[2 * p + 1](teacher.blocks[2 * p](x, c), c)
            dropped = teacher.blocks[2 * p](x, c)  # the naive depth-halving: drop the second block
            merged = student.blocks[2 * p](x, c)
            # the start by its definition, from the teacher's two blocks: x + u_0(x) + u_1(x), u_i(x) = block_i(x) - x
            by_definition = x + (teacher.blocks[2 * p](x, c) - x) + (teacher.blocks[2 * p + 1](x, c) - x)
            assert (merged - by_definition).norm() <= 1e-5 * by_definition.norm()
            gaps.append(((merged - pair).norm() / (pair - x).norm()).item())
            drops.append(((dropped - pair).norm() / (pair - x).norm()).item())
    for h in hooks:
        h.remove()
    print("start gap |parallel - pair| / |pair update| per pair:", [f"{g:.4f}" for g in gaps],
          "dropping the second block:", [f"{g:.4f}" for g in drops])
    # measured on the shipped demo weights (fixed inputs): every pair's gap to within 0.002
    assert gaps == pytest.approx(GAPS, abs=2e-3) and drops == pytest.approx(DROPS, abs=2e-3)
    assert gaps[1] < drops[1] and gaps[2] < drops[2]  # where the merge beats the naive halving
