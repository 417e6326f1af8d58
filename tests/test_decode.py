"""A grafted LLM or encoder computes the same thing every way it can be called (the call contract).

For every operator that replaces attention in a decoder, on Llama and Qwen3 (grouped-query attention), from the
teacher and from random weights: greedy `generate()` with the cache == without the cache == the argmax of one
full forward over the final sequence, and each cached step's logits equal the full forward's at that position.
A padded batch gives each sequence what it gets alone (left padding in decoders, right padding in encoders).
A full-window `swa` reproduces a RoPE teacher exactly, with the teacher's parameter count; decode state does
not grow with the context; an operator that cannot honour the call is refused at compile time.
"""
from __future__ import annotations

import copy

import pytest
import torch

import graftc
from graftc.errors import GraftError
from graftc.passes import rules_by_op
from graftc.site import Site
from tests import zoo
from tests.helpers import perturb, plan_of, save_and_load

# past_key_values= (not 5.24's new cache=) works on transformers 5.17 as well, the GPU machine's version
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated")

RULES = rules_by_op()
# Every attention operator in the registry that fits any model (so decoders), at its example config, or at these:
DECODER_VARIANTS = {
    "swa": {"swa-w3": {"window": 3},  # shorter than the prompts: the sliding cache drops tokens
            "swa-w64": {"window": 64}},  # covers everything
    "linear": {"linear": {}, "linear-elu": {"feature_map": "elu"}},
}
DECODING = [op for op, rule in RULES.items() if rule.plugs_in and rule.kinds[0] == "attention" and not rule.needs]
DECODER_OPS = {name: {"op": op, **fields} for op in DECODING
               for name, fields in DECODER_VARIANTS.get(op, {op: RULES[op].example}).items()}
RANDOM_ONLY = {op for op, rule in RULES.items() if rule.inits == ("random",)}
# One operator per pass module (its last: Hyena-SE keeps both of Hyena's conv states), for the slower checks
ONE_PER_MODULE = [next(iter(DECODER_VARIANTS.get(op, {op: None})))
                  for op in {RULES[op].build.__module__: op for op in DECODING}.values()]
FAMILIES = {"llama": lambda depth: zoo.make_llama(depth=depth, heads=4, kv_heads=2),
            "qwen3": lambda depth: zoo.make_qwen3(depth=depth, heads=4, kv_heads=2)}


def _graft(family: str, op: dict, layers, init: str, depth: int = 3):
    teacher = FAMILIES[family](depth)
    replace = dict(op) if op["op"] in RANDOM_ONLY else {**op, "init": init}
    ids = torch.randint(0, zoo.VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(1))
    result = graftc.compile(copy.deepcopy(teacher), plan_of(({"kind": "attention", "layers": layers}, replace)),
                            {"input_ids": ids, "use_cache": False})
    if init == "random":  # every operator weight off its identity start, so each one really mixes tokens
        for module in result.model.modules():
            if isinstance(module, Site):
                perturb(module.operator, scale=0.2, seed=3)
    return teacher, result.model.eval()


def _prompt(length: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, zoo.VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cached_steps(model, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the prompt (one prefill) and then of each later token fed alone, through one DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = [model(tokens[:, :prompt], past_key_values=cache, use_cache=True).logits]
    for t in range(prompt, tokens.shape[1]):
        out.append(model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("op, init", [(op, init) for op in DECODER_OPS for init in ("teacher", "random")
                                      if init == "random" or DECODER_OPS[op]["op"] not in RANDOM_ONLY])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_uncached_and_full_forward(family, op, init):
    _, model = _graft(family, DECODER_OPS[op], [0, 2], init)  # layer 1 stays the teacher's full attention
    for prompt_length in (2, 6):  # shorter and longer than the window / kernel / chunk
        prompt = _prompt(prompt_length)
        with torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=7, do_sample=False)
            uncached = model.generate(prompt, max_new_tokens=7, do_sample=False, use_cache=False)
            full = model(cached, use_cache=False).logits
            steps = _cached_steps(model, cached, prompt_length)
        assert torch.equal(cached, uncached), (cached, uncached)
        assert torch.equal(full[0, prompt_length - 1:-1].argmax(-1), cached[0, prompt_length:])
        scale = full.abs().max()
        assert ((steps - full).abs().max() / scale) < 1e-4


@pytest.mark.parametrize("op", ONE_PER_MODULE)
def test_every_layer_grafted_decodes_without_any_kv_layer(op):
    """No layer keeps the teacher's KV: the cache's length comes from the grafted layers' own counts."""
    _, model = _graft("qwen3", DECODER_OPS[op], "all", "random", depth=2)
    prompt = _prompt(5)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        steps = _cached_steps(model, cached, 5)
        full = model(cached, use_cache=False).logits
    assert torch.equal(cached, uncached)
    assert ((steps - full).abs().max() / full.abs().max()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_full_window_swa_reproduces_gqa_rope_teacher_at_prefill_and_every_step(family):
    teacher, model = _graft(family, {"op": "swa", "window": 64}, "all", "teacher", depth=2)
    tokens = _prompt(12)
    with torch.no_grad():
        expected = teacher(tokens, use_cache=False).logits
        got = _cached_steps(model, tokens, 5)
        got_full = model(tokens, use_cache=False).logits
    scale = expected.abs().max()
    assert ((got - expected).abs().max() / scale) < 1e-4
    assert ((got_full - expected).abs().max() / scale) < 1e-4
    # K/V projected at the teacher's 2 KV heads (not repeated to 4): the same parameters as the teacher's attention
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.self_attn, Site)
        assert layer.self_attn.operator.kv_heads == 2
        assert (sum(p.numel() for p in layer.self_attn.parameters())
                == sum(p.numel() for p in teacher.model.layers[i].self_attn.parameters()))


@pytest.mark.parametrize("op", DECODER_OPS, ids=list(DECODER_OPS))
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generate_equals_each_prompt_alone(family, op):
    _, model = _graft(family, DECODER_OPS[op], [0, 2], "random")
    long, short = _prompt(7, seed=4), _prompt(3, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = [model.generate(p, max_new_tokens=6, do_sample=False) for p in (long, short)]
        # the padded full forward, with the positions generate() gives padded rows
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(batch, attention_mask=mask, position_ids=positions, use_cache=False).logits
        each = [model(p, use_cache=False).logits for p in (long, short)]
    for row, (single, start) in enumerate(zip(alone, (7, 3))):  # a prompt alone may stop early at EOS
        new = single[0, start:]
        assert torch.equal(together[row, 7:7 + len(new)], new)
    assert (padded[0] - each[0][0]).abs().max() < 1e-5
    assert (padded[1, 4:] - each[1][0]).abs().max() < 1e-5


ENCODER_VARIANTS = {"swa": {"swa-w2": {"window": 2}, "swa-w64": {"window": 64}},
                    "hyena_x": {"hyena_x": {}, "hyena_x-centred": {"kernel": 5, "causal": False}}}
ENCODER_OPS = {name: {"op": op, **fields} for op in DECODING
               for name, fields in ENCODER_VARIANTS.get(op, {op: RULES[op].example}).items()}


@pytest.mark.parametrize("op", ENCODER_OPS, ids=list(ENCODER_OPS))
def test_right_padded_encoder_batch_equals_each_sentence_alone(op):
    """BERT/MiniLM-shaped encoder: the shorter sentence's padding changes nothing for its real tokens."""
    teacher = zoo.make_bert(depth=2)
    ids = _prompt(6)
    result = graftc.compile(copy.deepcopy(teacher), plan_of(({"kind": "attention", "layers": "all"}, ENCODER_OPS[op])),
                            {"input_ids": ids})
    model = result.model
    for module in model.modules():
        if isinstance(module, Site):
            perturb(module.operator, scale=0.2, seed=3)
    long, short = _prompt(7, seed=6), _prompt(4, seed=7)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 4:] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).last_hidden_state
        each = [model(p).last_hidden_state for p in (long, short)]
    assert (padded[0] - each[0][0]).abs().max() < 1e-5
    assert (padded[1, :4] - each[1][0]).abs().max() < 1e-5


@pytest.mark.parametrize("op", ONE_PER_MODULE)
def test_static_cache_decodes_like_no_cache(op):
    """generate(cache_implementation="static"): the teacher's layers keep their static KV, the grafted ones
    their own state, and the masks still span the static slots."""
    _, model = _graft("llama", DECODER_OPS[op], [0, 2], "random")
    prompt = _prompt(5)
    with torch.no_grad():
        static = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(static, uncached)


def _state_bytes(cache, layer: int) -> int:
    entry = cache.layers[layer]
    tensors = [getattr(entry, name, None) for name in ("keys", "values", "valid")]
    for name in ("conv_states", "recurrent_states"):
        tensors += list(getattr(entry, name, {}).values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("op", ONE_PER_MODULE)
def test_grafted_layers_decode_state_does_not_grow_with_context(op):
    from transformers import DynamicCache

    _, model = _graft("llama", DECODER_OPS[op], [0], "random", depth=2)
    sizes = {}
    for length in (8, 24):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(_prompt(length), past_key_values=cache, use_cache=True)
            model(_prompt(1), past_key_values=cache, use_cache=True)
        sizes[length] = (_state_bytes(cache, 0), _state_bytes(cache, 1))
        assert cache.get_seq_length() == length + 1
    assert sizes[8][0] == sizes[24][0] > 0  # the grafted layer: constant
    assert sizes[24][1] > sizes[8][1]  # the teacher's full KV layer grows


def test_artifact_reloads_and_generates_identically_with_layer_types_in_config(tmp_path):
    from transformers import AutoConfig

    spec = zoo.qwen3(tmp_path / "teacher", depth=3)
    loaded = graftc.load_model(spec)
    plan = plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa", "window": 3}),
                   ({"kind": "attention", "layers": [1]}, {"op": "hyena_x", "init": "random"}),
                   ({"kind": "attention", "layers": [2]}, {"op": "mamba2", "d_state": 8, "head_dim": 8}))
    result = graftc.compile(copy.deepcopy(loaded.model), plan, loaded.example)
    perturb(result.model, scale=0.05, seed=5)
    reloaded = save_and_load(result, spec, tmp_path / "out")
    prompt = _prompt(5)
    with torch.no_grad():
        expected = result.model.generate(prompt, max_new_tokens=8, do_sample=False)
        got = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(expected, got)
    layers = reloaded.config.graftc_layers
    assert [layers[str(i)]["decode_state"] for i in range(3)] == ["sliding-window KV", "short-conv inputs",
                                                                 "conv + SSM state"]
    reloaded.save_pretrained(tmp_path / "hf")
    assert AutoConfig.from_pretrained(tmp_path / "hf").graftc_layers == layers


@pytest.mark.parametrize("replace", [  # every operator that can be made bidirectional
    {"op": op, **rule.example, "causal": False} for op, rule in RULES.items() if "causal" in rule.config.model_fields
], ids=lambda r: r["op"])
def test_bidirectional_operator_in_a_decoder_is_refused(replace):
    with pytest.raises(GraftError, match="decodes token by token with a cache"):
        graftc.compile(zoo.make_llama(), plan_of(({"kind": "attention", "layers": "all"}, replace)),
                       {"input_ids": _prompt(4), "use_cache": False})


def test_token_mixing_mlp_in_a_decoder_is_refused():
    with pytest.raises(GraftError, match="receives neither the padding mask nor the decode cache"):
        graftc.compile(zoo.make_llama(), plan_of(({"kind": "mlp", "layers": "all"}, {"op": "mlp_hyena_x"})),
                       {"input_ids": _prompt(4), "use_cache": False})


def test_cache_from_another_model_is_a_clear_error():
    """A cache that already holds the teacher's KV for a grafted layer cannot be continued by the graft."""
    from transformers import DynamicCache

    teacher, model = _graft("llama", DECODER_OPS["hyena_x"], [0], "random", depth=2)
    cache = DynamicCache(config=teacher.config)
    with torch.no_grad():
        teacher(_prompt(4), past_key_values=cache, use_cache=True)
        with pytest.raises(GraftError, match="already holds 4 tokens"):
            model(_prompt(1), past_key_values=cache, use_cache=True)


def test_partial_rotary_model_is_refused_for_operators_that_apply_rope():
    """Phi rotates only part of each head: swa/linear apply full-head RoPE, so they refuse it at compile time."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    for op in ("swa", "linear"):
        with pytest.raises(GraftError, match="partial rotary embeddings are not supported"):
            graftc.compile(copy.deepcopy(model), plan_of(({"kind": "attention", "layers": "all"}, {"op": op})),
                           {"input_ids": _prompt(6), "use_cache": False})
