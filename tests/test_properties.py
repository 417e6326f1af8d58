"""Property tests: random small transformer configs x random valid plans."""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graftc
from graftc.artifact import save
from graftc.report import report_markdown
from tests.helpers import leaves

OPS = st.one_of(
    st.fixed_dictionaries({"op": st.just("self"), "init": st.sampled_from(["copy", "random"])}),
    st.fixed_dictionaries({"op": st.just("mlp"), "ratio": st.sampled_from([0.5, 1, 2.5, 4, 6]),
                           "init": st.sampled_from(["teacher", "random"])}),
)


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return {"family": draw(st.sampled_from(["llama", "qwen3"])), "depth": draw(st.integers(1, 4)), "heads": heads,
            "kv_heads": draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),  # GQA or not
            "head_dim": draw(st.sampled_from([4, 8])), "hidden_mult": draw(st.sampled_from([2, 3, 4])),
            "tokens": draw(st.integers(2, 9))}


@st.composite
def selections(draw, kind):
    how = draw(st.sampled_from(["layers", "ratio", "slice", "all", "fqn"]))
    if how == "ratio":
        return {"kind": kind, "ratio": draw(st.sampled_from([0.25, 0.5, 0.75, 1.0])),
                "strategy": draw(st.sampled_from(["interleaved", "first", "last"]))}
    if how == "slice":
        return {"kind": kind, "layers": draw(st.sampled_from(["::2", "1::2", "0:1", "-1:"]))}
    if how == "fqn":
        return {"kind": kind, "fqn": "re:layers\\.0\\."}
    if how == "all":
        return {"kind": kind, "layers": "all"}
    return {"kind": kind, "layers": [0]}


def _model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    width = cfg["heads"] * cfg["head_dim"]
    common = dict(vocab_size=64, hidden_size=width, intermediate_size=cfg["hidden_mult"] * width,
                  num_hidden_layers=cfg["depth"], num_attention_heads=cfg["heads"],
                  num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], max_position_embeddings=32)
    torch.manual_seed(0)
    if cfg["family"] == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**common)).eval()


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=configs(), attn_sel=selections("attention"), mlp_sel=selections("mlp"), mlp_op=OPS,
       data=st.data())
def test_random_plans_run_and_round_trip(cfg, attn_sel, mlp_sel, mlp_op, data, tmp_path_factory):
    model = _model(cfg)
    example = {"input_ids": torch.randint(0, 64, (2, cfg["tokens"])), "use_cache": False}
    with torch.no_grad():
        expected = leaves(model(**example))
    attn_op = data.draw(st.fixed_dictionaries({"op": st.just("self"), "init": st.sampled_from(["copy", "random"])}))
    plan = {"version": 1, "graft": [{"select": attn_sel, "replace": attn_op}, {"select": mlp_sel, "replace": mlp_op}]}
    result = graftc.compile(copy.deepcopy(model), plan, example)
    with torch.no_grad():
        got = leaves(result.model(**example))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]
    assert all(torch.isfinite(t).all() for t in got)
    out = save(tmp_path_factory.mktemp("art") / "out", result, "python:unused", "h", report_markdown("x", result))
    with torch.no_grad():
        reloaded = leaves(graftc.load(out, model=_model(cfg))(**example))
    assert all(torch.equal(a, b) for a, b in zip(got, reloaded))
