"""Linear attention: the chunked/two-matmul paths and the graftc::linear_attention op against the
quadratic reference; the feature maps."""
from __future__ import annotations

import operator

import pytest
import torch

from graftc.kernels.linear_attention import HedgehogFeatureMap, elu_plus_one, linear_attention, relu
from graftc.kernels.linear_attention.chunked import linear_attention_chunked
from graftc.kernels.linear_attention.naive import linear_attention_reference

NAMES = ("phi_q", "phi_k", "v")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = actual.double() - expected.double()
    return (diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


def assert_close(name, actual, expected, bound):
    error = rel_rms(actual, expected)
    assert error < bound, f"{name}: relative RMS error {error:.2e} >= {bound:.0e}"


def make_inputs(n, batch=2, heads=3, features=8, dv=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    phi_q = elu_plus_one(torch.randn(batch, heads, n, features, generator=gen))
    phi_k = elu_plus_one(torch.randn(batch, heads, n, features, generator=gen))
    v = torch.randn(batch, heads, n, dv, generator=gen)
    return [phi_q, phi_k, v]


# With a single key the output is v * s / (s + eps), and the phi_q, phi_k gradients are
# k (v - y) / (s + eps) with v - y = O(eps): a cancellation that fp32 cannot resolve for a small eps,
# in the reference as much as in the kernel. N=1 uses eps = 1 so that its gradients mean something.
CASES = [
    pytest.param(n, causal, chunk, 1.0 if n == 1 else 1e-6,
                 id=f"N{n}-{'causal' if causal else 'full'}-chunk{chunk}")
    for n in (1, 63, 64, 130) for causal in (False, True) for chunk in (16, 64)
]


@pytest.mark.parametrize("n, causal, chunk, eps", CASES)
def test_chunked_matches_reference(n, causal, chunk, eps):
    inputs = [t.requires_grad_() for t in make_inputs(n)]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y = linear_attention_chunked(*inputs, causal, eps, chunk)
    truth = linear_attention_reference(*truth_inputs, causal, eps)
    assert y.shape == truth.shape and y.dtype == torch.float32
    assert_close("y", y, truth, 1e-5)
    upstream = torch.randn_like(truth)
    got = torch.autograd.grad(y, inputs, upstream.float())
    want = torch.autograd.grad(truth, truth_inputs, upstream)
    for name, g, w in zip(NAMES, got, want):
        assert_close(f"grad {name}", g, w, 1e-5)


@pytest.mark.parametrize("step", [pytest.param(0, id="t0"), pytest.param(40, id="t40-mid-chunk"),
                                  pytest.param(64, id="t64-chunk-start")])
def test_causal(step):
    """Changing a token's query, key or value leaves every earlier output bit-for-bit unchanged."""
    inputs = make_inputs(130, seed=1)
    before = linear_attention_chunked(*inputs, True, chunk=32)
    changed = [t.clone() for t in inputs]
    for t in changed:
        t[:, :, step:] = torch.rand_like(t[:, :, step:]) + 1.0
    after = linear_attention_chunked(*changed, True, chunk=32)
    assert torch.equal(after[:, :, :step], before[:, :, :step])
    assert not torch.equal(after[:, :, step], before[:, :, step])


def test_non_causal_sees_the_future():
    inputs = make_inputs(20, seed=2)
    before = linear_attention_chunked(*inputs, False)
    inputs[2][:, :, -1] += 1.0
    assert not torch.equal(linear_attention_chunked(*inputs, False)[:, :, 0], before[:, :, 0])


@pytest.mark.parametrize("causal", [pytest.param(False, id="full"), pytest.param(True, id="causal")])
def test_op_follows_the_kernel_mode(monkeypatch, causal):
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    inputs = make_inputs(70, seed=3)
    assert torch.equal(linear_attention(*inputs, causal, chunk=16),
                       linear_attention_chunked(*inputs, causal, chunk=16))
    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    assert torch.equal(linear_attention(*inputs, causal, chunk=16), linear_attention_reference(*inputs, causal))


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_op_gradients(monkeypatch, mode):
    monkeypatch.setenv("GRAFTC_KERNELS", mode)
    inputs = [t.requires_grad_() for t in make_inputs(70, seed=4)]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y = linear_attention(*inputs, True, chunk=16)
    truth = linear_attention_reference(*truth_inputs, True)
    upstream = torch.randn_like(truth)
    got = torch.autograd.grad(y, inputs, upstream.float())
    want = torch.autograd.grad(truth, truth_inputs, upstream)
    for name, g, w in zip(NAMES, got, want):
        assert_close(f"grad {name}", g, w, 1e-5)


def test_opcheck():
    """Schema, fake (meta) kernel, autograd registration and AOT tracing of the op."""
    for causal in (False, True):
        torch.library.opcheck(torch.ops.graftc.linear_attention.default, (*make_inputs(20), causal, 1e-6, 8))


def test_export_shows_one_call():
    class Mixer(torch.nn.Module):
        def forward(self, phi_q, phi_k, v):
            return linear_attention(phi_q, phi_k, v, causal=True, chunk=16)

    graph = torch.export.export(Mixer(), tuple(make_inputs(40))).graph
    calls = [n.target for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert calls == [torch.ops.graftc.linear_attention.default]


def test_half_precision_accumulates_in_fp32():
    inputs = [t.bfloat16() for t in make_inputs(130, seed=5)]
    y = linear_attention_chunked(*inputs, True)
    assert y.dtype == torch.bfloat16
    truth = linear_attention_reference(*[t.double() for t in inputs], True)
    assert_close("y", y, truth, 1e-2)  # bf16 output rounding (2^-9) bounds this, not the accumulation


def test_rejects_mismatched_shapes():
    phi_q, phi_k, v = make_inputs(10)
    with pytest.raises(ValueError, match="must both be"):
        linear_attention(phi_q, phi_k[..., :4], v, True)
    with pytest.raises(ValueError, match="must be"):
        linear_attention(phi_q, phi_k, v[:, :, :5], False)
    with pytest.raises(ValueError, match="empty"):
        linear_attention(phi_q[:, :, :0], phi_k[:, :, :0], v[:, :, :0], True)


@pytest.mark.parametrize("feature_map", [elu_plus_one, relu, HedgehogFeatureMap(8, 3)],
                         ids=["elu_plus_one", "relu", "hedgehog"])
def test_feature_maps_are_non_negative(feature_map):
    x = 10 * torch.randn(2, 3, 50, 8)
    assert (feature_map(x) >= 0).all()


def test_hedgehog_starts_as_softmax_of_plus_minus_x():
    x = torch.randn(2, 3, 10, 8)
    features = HedgehogFeatureMap(8, 3)(x)
    assert features.shape == (2, 3, 10, 16)
    torch.testing.assert_close(features, torch.softmax(torch.cat([x, -x], -1), -1))


def test_hedgehog_learns_to_mimic_softmax_attention():
    """The map gets gradients through the op, and a few steps of distillation lower the error."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=gen) for _ in range(3))
    teacher = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    feature_map = HedgehogFeatureMap(8, 2)
    optimizer = torch.optim.Adam(feature_map.parameters(), lr=3e-2)

    def loss():
        return (linear_attention(feature_map(q), feature_map(k), v, causal=False) - teacher).pow(2).mean()

    first = loss()
    first.backward()
    assert feature_map.weight.grad.abs().sum() > 0 and feature_map.bias.grad.abs().sum() > 0
    optimizer.step()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * first.item()


@pytest.mark.parametrize("shape", [(2, 3, 10, 8), (1, 3, 7, 8), (3, 10, 8)], ids=["batch2", "batch1", "no-batch"])
def test_hedgehog_folds_the_scale_and_the_sign_into_one_gemm(shape):
    """phi(x, s) == softmax([z, -z]) with z = (x s) W + b: the form of the paper, with trained W and b."""
    gen = torch.Generator().manual_seed(7)
    feature_map = HedgehogFeatureMap(8, 3)
    with torch.no_grad():
        feature_map.weight.copy_(torch.randn(3, 8, 8, generator=gen))
        feature_map.bias.copy_(torch.randn(3, 8, generator=gen))
    x = torch.randn(*shape, generator=gen).requires_grad_()
    z = (x * 0.5) @ feature_map.weight + feature_map.bias[:, None, :]
    expected = torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)
    got = feature_map(x, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    upstream = torch.randn_like(got)
    params = [x, feature_map.weight, feature_map.bias]
    for g, w in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
