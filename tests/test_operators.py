"""Every new operator grafted into every model family: runs, keeps shapes, finite, trains only what is new,
round-trips through an artifact, starts from the teacher where it claims to, and is causal where it must be."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import graftc
from graftc.errors import GraftError
from graftc.compiler import apply_rewrite
from graftc.passes import rules_by_op
from graftc.region import Region
from graftc.spec import load_model
from tests import zoo
from tests.helpers import graft, leaves, max_diff, perturb, plan_of, run, save_and_load, zoo_family_fixture

RULES = rules_by_op()
# Every new operator in the registry (a rule that plugs in at an attention or MLP region) at its example config
# (small sizes keep the tiny zoo models fast), linear attention with a second feature map, and the centred Hyena-X.
OPS = {op: dict(rule.example) for op, rule in RULES.items()
       if rule.plugs_in and rule.kinds[0] in ("attention", "mlp")} | {"linear-elu": {"feature_map": "elu"},
                                                                      "hyena_x-centred": {"kernel": 5, "causal": False}}
IMAGE_FAMILIES = {"diffusers-dit", "pixart-sigma", "graftc-dit", "vit"}
DECODER_FAMILIES = {"qwen3-gqa", "llama"}  # decode with a KV cache: a token-mixing MLP is refused there
FAMILIES = [f for f in zoo.FAMILIES if f != "demo"]  # demo is graftc-dit at other weights
# A rule's needs (graftc.rules.NEEDS): the families that lack each, where its guard refuses with these words
REFUSED_WITHOUT = {"grid": (set(FAMILIES) - IMAGE_FAMILIES, "no token grid can be inferred"),
                   "no-cache": (DECODER_FAMILIES, "receives neither the padding mask nor the decode cache")}
LM_EXAMPLE = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False}


def rule_of(op_id: str):
    return RULES[op_id.split("-")[0]]


def replace(op_id: str, options: dict) -> dict:
    return {"op": op_id.split("-")[0], **options}


family = zoo_family_fixture(FAMILIES)


def _new_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".operator." in n}


def _check_trains_only_new(result, loaded):
    model = result.model.train()
    new = _new_parameters(model)
    assert new, "the rewrite added no parameters under a Site"
    for name, p in model.named_parameters():
        p.requires_grad_(name in new)
    loss = sum(x.float().pow(2).mean() for x in leaves(model(*loaded.args, **loaded.kwargs)) if x.is_floating_point())
    loss.backward()
    missing = [n for n, p in new.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    assert any(p.grad.abs().sum() > 0 for p in new.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in new)


@pytest.mark.parametrize("op_id", list(OPS))
def test_operator_grafts_into_family(family, op_id):
    name, spec, loaded = family
    rule = rule_of(op_id)
    plan = plan_of(({"kind": rule.kinds[0], "ratio": 0.5}, replace(op_id, OPS[op_id])))
    refusals = [REFUSED_WITHOUT[need][1] for need in rule.needs if name in REFUSED_WITHOUT[need][0]]
    if OPS[op_id].get("causal") is False and name in DECODER_FAMILIES:
        refusals.append("decodes token by token with a cache")
    if refusals:
        with pytest.raises(GraftError, match=refusals[0]):
            graft(loaded, plan)
        return
    teacher, result = graft(loaded, plan)
    assert len(result.rewrites) == zoo.FAMILY_DEPTH // 2
    out = run(result.model, loaded)
    assert [t.shape for t in teacher] == [o.shape for o in out]
    assert [t.dtype for t in teacher] == [o.dtype for o in out]
    assert all(torch.isfinite(o).all() for o in out if o.is_floating_point())
    assert max_diff(teacher, out) > 0  # it really is another operator
    _check_trains_only_new(result, loaded)


@pytest.fixture(scope="module")
def tiny_dit():
    loaded = load_model("dit:tiny")
    perturb(loaded.model)
    return loaded


@pytest.mark.parametrize("op_id", list(OPS))
def test_operator_round_trips_through_artifact(tiny_dit, op_id, tmp_path):
    plan = plan_of(({"kind": rule_of(op_id).kinds[0], "layers": [1, 3]}, replace(op_id, OPS[op_id])))
    _, result = graft(tiny_dit, plan)
    perturb(result.model, seed=1)  # as if distilled: the artifact must carry the new weights
    grafted = run(result.model, tiny_dit)
    reloaded = save_and_load(result, "dit:tiny", tmp_path / "out")
    assert max_diff(grafted, run(reloaded, tiny_dit)) == 0.0


# A window that covers every token is the teacher's own attention: checks the q/k/v/o copy (fused qkv in
# graftc's DiT, separate biased q/k/v in diffusers, BERT's chained cover) and the Site adapter.
FULL_WINDOWS = {"swa": {"op": "swa", "window": 10_000}, "swa2d": {"op": "swa2d", "kernel": 99}}


@pytest.mark.parametrize("spec_name, op", [  # swa2d needs a token grid: image families only
    (name, op) for name in ["graftc-dit", "diffusers-dit", "pixart-sigma", "bert"] for op in FULL_WINDOWS
    if op != "swa2d" or name in IMAGE_FAMILIES])
def test_full_window_from_teacher_reproduces_teacher(spec_name, op, tmp_path):
    replacement = FULL_WINDOWS[op]
    loaded = load_model(zoo.FAMILIES[spec_name](tmp_path))
    perturb(loaded.model)
    teacher, result = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, replacement)))
    assert max_diff(teacher, run(result.model, loaded)) <= 1e-5


@pytest.mark.parametrize("replacement", [  # every attention operator that fits any model, so decoders too
    replace(op, OPS[op]) for op, rule in RULES.items() if op in OPS and rule.kinds[0] == "attention" and not rule.needs
], ids=lambda r: r["op"])
def test_causal_operators_in_a_language_model_stay_causal(replacement):
    """Qwen3 is causal; grafted layers must keep logits at t independent of tokens after t."""
    model = perturb(zoo.make_qwen3(depth=2))
    graftc.compile(model, plan_of(({"kind": "attention", "layers": "all"}, replacement)),
                   LM_EXAMPLE)
    ids = torch.randint(0, zoo.VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % zoo.VOCAB_SIZE
    with torch.no_grad():
        a, b = model(input_ids=ids, use_cache=False).logits, model(input_ids=changed, use_cache=False).logits
    assert torch.equal(a[0, :7], b[0, :7])
    assert not torch.equal(a[0, 7:], b[0, 7:])


def test_bidirectional_window_in_an_image_model_sees_both_sides(tiny_dit):
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa", "window": 1})))
    attention = result.model.blocks[0].attn.operator
    assert not attention.causal
    x = torch.randn(1, 16, attention.qkv.in_features)
    later = x.clone()
    later[0, 9:] += 1.0
    with torch.no_grad():
        assert not torch.equal(attention(x)[0, 8], attention(later)[0, 8])


def test_swa2d_takes_an_explicit_grid_and_checks_it(tiny_dit):
    with pytest.raises(GraftError, match=r"grid 3x5 does not hold the region's 16 tokens"):
        graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "grid": [3, 5]})))
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "grid": [2, 8]})))
    assert result.model.blocks[0].attn.operator.grid == (2, 8)


def test_even_swa2d_kernel_is_refused(tiny_dit):
    with pytest.raises(GraftError, match="kernel must be odd"):
        graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "kernel": 4})))


def test_hyena_from_teacher_uses_teacher_projections(tiny_dit):
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "hyena_se"})))
    mixer = result.model.blocks[0].attn.operator
    teacher = tiny_dit.model.blocks[0].attn
    assert torch.equal(mixer.in_proj.weight, teacher.qkv.weight)
    assert torch.equal(mixer.out_proj.weight, teacher.proj.weight)
    assert torch.equal(mixer.inner_weight[:, -1], torch.ones(mixer.inner_weight.shape[0]))


def _two_sided_hyena_x(mixer, x: torch.Tensor) -> torch.Tensor:
    """Hyena-X with a centred featurizer, from its definition: out[t] = b + sum_j w[j] u[t - (K-1) + j + c] with
    c = (K-1)//2 (zeros outside the sequence), then q * k * v and the out projection."""
    taps, ahead = mixer.kernel, (mixer.kernel - 1) // 2
    u = torch.nn.functional.pad(mixer.in_proj(x).transpose(1, 2), (taps - 1 - ahead, ahead))
    a = torch.nn.functional.conv1d(u, mixer.feat_weight.unsqueeze(1), mixer.feat_bias, groups=u.shape[1])
    q, k, v = a.transpose(1, 2).chunk(3, dim=-1)
    return mixer.out_proj(q * k * v)


@pytest.mark.parametrize("kernel", [2, 5, 8])
def test_centred_hyena_x_is_a_two_sided_convolution(tiny_dit, kernel):
    plan = plan_of(({"kind": "attention", "layers": [0]}, {"op": "hyena_x", "kernel": kernel, "causal": False}))
    _, result = graft(tiny_dit, plan)
    mixer = perturb(result.model.blocks[0].attn.operator, scale=0.1, seed=4)
    assert mixer.lookahead == (kernel - 1) // 2
    x = torch.randn(2, 11, mixer.in_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _two_sided_hyena_x(mixer, x)
        assert (mixer(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
        if mixer.lookahead:  # a token's output changes with the nearest tokens on both sides, not with those further
            later = x.clone()
            later[:, 6] += 1.0
            changed = (mixer(later) - mixer(x)).abs().amax((0, 2)) > 0
            ahead = mixer.lookahead
            assert changed.tolist() == [6 - ahead <= t <= 6 + kernel - 1 - ahead for t in range(11)]


def test_centred_hyena_x_from_the_teacher_starts_as_the_causal_one(tiny_dit):
    """With init: teacher both featurizers start as the identity, so both gate each token's own q, k and v."""
    outs = []
    for causal in (True, False):
        plan = plan_of(({"kind": "attention", "layers": "all"}, {"op": "hyena_x", "kernel": 7, "causal": causal}))
        outs.append(run(graft(tiny_dit, plan)[1].model, tiny_dit))
    assert max_diff(*outs) == 0.0


def test_gqa_teacher_kv_heads_are_kept_by_attention_and_repeated_by_hyena():
    """Qwen3 has 4 query heads over 2 kv heads. swa keeps the teacher's 2 K/V heads (its projection and cache are
    the teacher's size); Hyena gates q * k * v channel by channel, so each query head gets its kv head's rows."""
    model = perturb(zoo.make_qwen3(depth=2))
    teacher = copy.deepcopy(model.model.layers)
    graftc.compile(model, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa"}),
                                  ({"kind": "attention", "layers": [1]}, {"op": "hyena_x"})), LM_EXAMPLE)
    swa, hyena = model.model.layers[0].self_attn.operator, model.model.layers[1].self_attn.operator
    t0, t1 = teacher[0].self_attn, teacher[1].self_attn
    assert swa.kv_heads == 2
    assert torch.equal(swa.qkv.weight, torch.cat([t0.q_proj.weight, t0.k_proj.weight, t0.v_proj.weight]))
    assert torch.equal(swa.q_norm.weight, t0.q_norm.weight) and torch.equal(swa.k_norm.weight, t0.k_norm.weight)
    dh, width, heads = swa.head_dim, swa.qkv.in_features, swa.heads
    k = hyena.in_proj.weight[heads * dh: 2 * heads * dh].view(heads, dh, width)
    kv = t1.k_proj.weight.view(2, dh, width)
    for head in range(heads):
        assert torch.equal(k[head], kv[head // 2])


@pytest.mark.parametrize("op_id,kernel", [("hyena_x", "graftc.hyena_conv"), ("swa", "graftc.window_attention"),
                                          ("swa2d", "graftc.neighborhood_attention"),
                                          ("linear", "graftc.linear_attention"), ("mamba2", "graftc.ssd")])
def test_generated_code_calls_the_kernel(tiny_dit, op_id, kernel):
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": [1]}, replace(op_id, OPS[op_id]))))
    code = graftc.compiler.emit_code(result.model, tiny_dit.example, ["blocks.1.attn"])
    assert f"torch.ops.{kernel}.default(" in code


def test_local_attention_flops_count_only_the_window(tiny_dit):
    """The report's FLOPs come from FlopCounterMode: a 3x3 window on the 4x4 grid must cost less than full attention."""
    _, full = graft(tiny_dit, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 7})))
    _, local = graft(tiny_dit, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 3})))
    assert local.reports[-1].flops_after < full.reports[-1].flops_after


def test_mamba2_shape_mismatch_is_refused(tiny_dit):
    with pytest.raises(GraftError, match=r"head_dim 7 does not divide the inner width 256"):
        graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "mamba2", "head_dim": 7})))
    with pytest.raises(GraftError, match=r"groups 3 does not divide the 16 heads"):
        graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "mamba2", "groups": 3})))


SITE_PROBLEMS = [  # a call-site record (graftc.site) an operator cannot be plugged in at, and why
    (None, "its module was never called in the traced forward"),
    ({"input": None}, "no argument of blocks.0.attn has the region's input shape"),
    ({"input": {"position": 0}, "output": {"kind": "unsupported", "type": "dict"}},
     "blocks.0.attn returns a dict, not a tensor or tuple"),
]


@pytest.mark.parametrize("site, problem", SITE_PROBLEMS, ids=["unprobed", "no-input", "output"])
@pytest.mark.parametrize("op", [op for op, rule in RULES.items() if rule.plugs_in])
def test_every_rule_that_plugs_in_is_refused_where_its_call_site_is_unusable(op, site, problem):
    """The registry checks the site for every rule that plugs in, before (and without) the rule's own guard."""
    rule = RULES[op]
    cover = ["blocks.0.attn", "blocks.1.attn"] if rule.kinds[0] == "block_pair" else ["blocks.0.attn"]
    region = Region(rule.kinds[0], 0, cover[0], cover, input_shape=[1, 4, 8], output_shape=[1, 4, 8],
                    attrs={} if site is None else {"site": site})
    config = rule.config.model_validate({"op": op, **rule.example})
    with pytest.raises(GraftError, match=f"op '{op}' cannot replace {rule.kinds[0]} 0 at blocks.0.attn: {problem}"):
        apply_rewrite(torch.nn.Module(), region, config, "graft[0]")
    assert not RULES["self"].plugs_in and RULES["self"].check(region, RULES["self"].config(op="self")) is None


def test_readme_operator_table_is_the_registry_rendered():
    """README's table is generated (scripts/operator_table.py); a rule changed without rerunning it fails here."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "operator_table.py"
    spec = importlib.util.spec_from_file_location("operator_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, table, _ = module.split(module.README.read_text())
    assert table == module.rendered()
    assert [row.split("`")[1] for row in table.splitlines()[2:]] == list(RULES)  # one row per rule, in order
