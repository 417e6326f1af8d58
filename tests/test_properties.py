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


DECODE_OPS = st.one_of(
    st.fixed_dictionaries({"op": st.just("swa"), "window": st.integers(0, 8),
                           "init": st.sampled_from(["teacher", "random"])}),
    st.fixed_dictionaries({"op": st.just("linear"), "feature_map": st.sampled_from(["hedgehog", "elu", "relu"]),
                           "init": st.sampled_from(["teacher", "random"])}),
    st.fixed_dictionaries({"op": st.sampled_from(["hyena_x", "hyena_y", "hyena_se"]), "kernel": st.integers(1, 5),
                           "init": st.sampled_from(["teacher", "random"])}),
    st.fixed_dictionaries({"op": st.just("mamba2"), "d_state": st.sampled_from([4, 8]),
                           "head_dim": st.sampled_from([4, 8]), "chunk": st.integers(1, 6)}),
    st.fixed_dictionaries({"op": st.just("self"), "init": st.sampled_from(["copy", "random"])}),
)


@settings(max_examples=50, deadline=None, derandomize=True,  # with the test above: 150 examples, ~2 s each
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=configs(), attn_sel=selections("attention"), op=DECODE_OPS, prompt=st.integers(1, 9),
       new=st.integers(1, 6))
def test_random_grafted_decoders_decode_the_same_with_and_without_cache(cfg, attn_sel, op, prompt, new):
    """cached greedy decode == uncached == argmax of one full forward, for any decoder, plan and prompt length
    (shorter or longer than the window, kernel or chunk)."""
    from graftc.site import Site
    from tests.helpers import perturb

    model = _model({**cfg, "depth": max(cfg["depth"], 2)})  # every selection picks at least one layer
    example = {"input_ids": torch.randint(0, 64, (1, cfg["tokens"])), "use_cache": False}
    plan = {"version": 1, "graft": [{"select": attn_sel, "replace": op}]}
    grafted = graftc.compile(model, plan, example).model
    for module in grafted.modules():  # operators off their identity start, so they mix tokens
        if isinstance(module, Site):
            perturb(module.operator, scale=0.2, seed=1)
    ids = torch.randint(1, 64, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    settings_ = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = grafted.generate(ids, **settings_)
        uncached = grafted.generate(ids, use_cache=False, **settings_)
        full = grafted(cached, use_cache=False).logits
    assert torch.equal(cached, uncached)
    assert torch.equal(full[0, prompt - 1:-1].argmax(-1), cached[0, prompt:])
