"""Retention (RetNet): the kernel's three forms against the definition, and what only this operator claims.

The call contract (cached decode == uncached == full forward, padded batch == each alone, save -> load bit-exact,
causality, every model family) is checked by the generated matrices of test_operators, test_decode and test_fuzz,
which pick `retention` up from the registry like every other operator.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import graftc
from graftc.errors import GraftError
from graftc.kernels.family import only
from graftc.kernels.retention import (retention, retention_chunked, retention_continue, retention_reference,
                                      retention_state, retnet_log_decay)
from graftc.spec import load_model
from tests.helpers import graft, perturb, plan_of

GAMMAS = [1 - 2.0 ** (-5 - h) for h in range(4)]
LOG_DECAY = torch.tensor(GAMMAS, dtype=torch.float64).log()  # exact in float64, for comparisons at 1e-12


def _inputs(batch=2, heads=4, tokens=11, dk=4, dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, d, generator=g, dtype=dtype) for d in (dk, dk, dv)]


def _definition(q, k, v, gammas):
    """y_i = sum_{j <= i} gamma_h^(i - j) (q_i . k_j) v_j, one term at a time."""
    y = torch.zeros_like(v)
    for h, gamma in enumerate(gammas):
        for i in range(q.shape[2]):
            for j in range(i + 1):
                y[:, h, i] += gamma ** (i - j) * (q[:, h, i] * k[:, h, j]).sum(-1, keepdim=True) * v[:, h, j]
    return y


def _gamma_powers(power: int) -> torch.Tensor:
    return torch.tensor(GAMMAS, dtype=torch.float64) ** power


def test_retnet_decays():
    assert torch.allclose(retnet_log_decay(4).double().exp(), torch.tensor(GAMMAS, dtype=torch.float64), atol=1e-7)
    assert retnet_log_decay(16)[-1].item() == pytest.approx(math.log1p(-2.0 ** -20), rel=1e-6)  # not rounded to 0


@pytest.mark.parametrize("tokens, chunk", [(11, 4), (11, 1), (11, 11), (11, 64), (12, 3), (1, 4)])
def test_parallel_and_chunkwise_forms_are_the_definition(tokens, chunk):
    q, k, v = _inputs(tokens=tokens)
    log_decay = LOG_DECAY
    expected = _definition(q, k, v, GAMMAS)
    assert (retention_reference(q, k, v, log_decay) - expected).abs().max() < 1e-12
    out, state = retention_chunked(q, k, v, log_decay, chunk)
    assert (out - expected).abs().max() < 1e-12
    # the state after the last real token (a partial last chunk's padding must not decay it further)
    manual = sum(_gamma_powers(tokens - 1 - j)[None, :, None, None] * k[:, :, j, :, None] * v[:, :, j, None, :]
                 for j in range(tokens))
    assert (state - manual).abs().max() < 1e-12
    assert (retention_state(k, v, log_decay) - manual).abs().max() < 1e-12


def test_recurrent_form_token_by_token_and_in_pieces_is_the_definition():
    q, k, v = _inputs(tokens=9)
    log_decay = LOG_DECAY
    expected = _definition(q, k, v, GAMMAS)
    state, steps = None, []
    for t in range(9):
        out, state = retention_continue(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], log_decay, state)
        steps.append(out)
    assert (torch.cat(steps, 2) - expected).abs().max() < 1e-12
    first, state = retention_continue(q[:, :, :4], k[:, :, :4], v[:, :, :4], log_decay, None, chunk=3)
    rest, _ = retention_continue(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], log_decay, state, chunk=2)
    assert (torch.cat([first, rest], 2) - expected).abs().max() < 1e-12


def test_op_paths_agree_forward_and_backward_and_count_their_flops():
    q, k, v = (t.float().requires_grad_() for t in _inputs(tokens=10))
    log_decay = retnet_log_decay(4)
    results = {}
    for path in ("reference", "torch"):
        out = only(path, retention)(q, k, v, log_decay, 4)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        results[path] = (out, grads)
    (a, ga), (b, gb) = results["reference"], results["torch"]
    assert (a - b).abs().max() < 1e-5
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(ga, gb))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        retention(q, k, v, log_decay, 4)
    batch, heads, tokens, dk, dv = 2, 4, 10, 4, 5
    assert counter.get_total_flops() == 2 * batch * heads * tokens * (4 * (dk + dv) + 2 * dk * dv)


def test_bad_shapes_are_refused():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="one value per head"):
        retention(q, k, v, retnet_log_decay(3).double())
    with pytest.raises(ValueError, match="must be \\[B, H, N, dv\\]"):
        retention(q, k, v[:, :, :3], retnet_log_decay(4).double())


@pytest.fixture(scope="module")
def tiny_dit():
    loaded = load_model("dit:tiny")
    perturb(loaded.model)
    return loaded


def test_operator_is_retention_over_the_teachers_projections(tiny_dit):
    """init: teacher copies q | k | v and o; the output is out(rms_norm(retention(q / sqrt(d), k, v))) with RetNet's
    decay per head, head 0 the fastest: checked term by term on graftc's DiT (16 heads, no RoPE)."""
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": [0]}, {"op": "retention", "chunk": 4})))
    teacher, op = tiny_dit.model.blocks[0].attn, result.model.blocks[0].attn.operator
    assert torch.equal(op.qkv.weight, teacher.qkv.weight) and torch.equal(op.out.weight, teacher.proj.weight)
    with torch.no_grad():
        op.norm_weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 7, op.qkv.in_features, generator=torch.Generator().manual_seed(1))
        q, k, v = (t.unflatten(-1, (op.heads, op.head_dim)).transpose(1, 2).double() for t in op.qkv(x).chunk(3, -1))
        y = _definition(q / math.sqrt(op.head_dim), k, v, [1 - 2.0 ** (-5 - h) for h in range(op.heads)])
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * op.norm_weight.double()
        expected = op.out(y.transpose(1, 2).flatten(2).float())
        assert (op(x) - expected).abs().max() < 1e-4 * expected.abs().max()


def test_generated_code_calls_the_kernel(tiny_dit):
    _, result = graft(tiny_dit, plan_of(({"kind": "attention", "layers": [1]}, {"op": "retention"})))
    code = graftc.compiler.emit_code(result.model, tiny_dit.example, ["blocks.1.attn"])
    assert "torch.ops.graftc.retention.default(" in code


def test_partial_rotary_model_is_refused():
    """Retention rotates q and k with the teacher's tables over a whole head: Phi's partial rotary is refused."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    with pytest.raises(GraftError, match="partial rotary embeddings are not supported by retention"):
        graftc.compile(model, plan_of(({"kind": "attention", "layers": "all"}, {"op": "retention"})),
                       {"input_ids": torch.zeros(1, 6, dtype=torch.long), "use_cache": False})
