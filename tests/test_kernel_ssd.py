"""Mamba-2 SSD: the chunked algorithm and the graftc::ssd op against the sequential reference."""
from __future__ import annotations

import math
import operator

import pytest
import torch

from graftc.kernels.ssd import ssd, ssd_chunked, ssd_reference

NAMES = ("x", "dt", "A", "B", "C", "D")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = actual.double() - expected.double()
    return (diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


def make_inputs(length, groups=1, heads=4, head_dim=8, state=16, batch=1, log_dt=(math.log(1e-3), math.log(0.1)),
                seed=0):
    """Mamba-2's ranges: dt log-uniform in [1e-3, 0.1], A in [-16, -1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=gen)
    dt = torch.empty(batch, length, heads).uniform_(*log_dt, generator=gen).exp()
    A = -torch.empty(heads).uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(batch, length, groups, state, generator=gen)
    C = torch.randn(batch, length, groups, state, generator=gen)
    D = torch.randn(heads, generator=gen)
    return [x, dt, A, B, C, D]


def grads(output, inputs, upstream):
    return torch.autograd.grad(output, inputs, upstream)


def assert_close(name, actual, expected, bound):
    if not expected.any():  # e.g. grad A at L=1 from a zero state: nothing to compare relative to
        assert not actual.any(), f"{name}: expected exact zeros"
        return
    error = rel_rms(actual, expected)
    assert error < bound, f"{name}: relative RMS error {error:.2e} >= {bound:.0e}"


CASES = [
    pytest.param(length, chunk, groups, id=f"L{length}-chunk{chunk}-G{groups}")
    for length in (1, 63, 64, 130) for chunk in (16, 64) for groups in (1, 2)
]


@pytest.mark.parametrize("length, chunk, groups", CASES)
def test_chunked_matches_reference(length, chunk, groups):
    inputs = [t.requires_grad_() for t in make_inputs(length, groups)]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y = ssd_chunked(*inputs, chunk=chunk)
    truth = ssd_reference(*truth_inputs)
    assert y.shape == truth.shape and y.dtype == torch.float32
    assert_close("y", y, truth, 1e-5)
    upstream = torch.randn_like(truth)
    for name, got, want in zip(NAMES, grads(y, inputs, upstream.float()), grads(truth, truth_inputs, upstream)):
        assert_close(f"grad {name}", got, want, 1e-5)


@pytest.mark.parametrize("length, chunk", [pytest.param(1, 64, id="L1-chunk64"),
                                           pytest.param(130, 64, id="L130-chunk64"),
                                           pytest.param(100, 16, id="L100-chunk16")])
def test_initial_and_final_state(length, chunk):
    inputs = make_inputs(length, groups=2, seed=1)
    initial = torch.randn(1, 4, 16, 8)
    inputs = [t.requires_grad_() for t in inputs + [initial]]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y, final = ssd_chunked(*inputs[:6], chunk=chunk, initial_state=inputs[6], return_final_state=True)
    truth_y, truth_final = ssd_reference(*truth_inputs[:6], initial_state=truth_inputs[6], return_final_state=True)
    assert_close("y", y, truth_y, 1e-5)
    assert_close("final state", final, truth_final, 1e-5)
    up_y, up_final = torch.randn_like(truth_y), torch.randn_like(truth_final)
    got = grads((y, final), inputs, (up_y.float(), up_final.float()))
    want = grads((truth_y, truth_final), truth_inputs, (up_y, up_final))
    for name, g, w in zip(NAMES + ("initial_state",), got, want):
        assert_close(f"grad {name}", g, w, 1e-5)


def test_split_sequence_continues_from_final_state():
    """Running two halves, the second from the first's final state, equals one run over the whole."""
    inputs = make_inputs(130, groups=2, seed=2)
    whole = ssd_chunked(*inputs, chunk=32)
    first, state = ssd_chunked(*[t[:, :70] if t.dim() > 1 else t for t in inputs], chunk=32,
                               return_final_state=True)
    second = ssd_chunked(*[t[:, 70:] if t.dim() > 1 else t for t in inputs], chunk=32, initial_state=state)
    assert_close("y", torch.cat([first, second], dim=1), whole, 1e-5)


def test_strong_decay_stays_finite_and_exact():
    """dt * A near -100 per step: exp underflows across a chunk, but nothing may turn into inf or NaN."""
    inputs = [t.requires_grad_() for t in make_inputs(130, log_dt=(math.log(2.0), math.log(8.0)), seed=3)]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y, truth = ssd_chunked(*inputs, chunk=64), ssd_reference(*truth_inputs)
    assert_close("y", y, truth, 1e-5)
    upstream = torch.randn_like(truth)
    for name, got, want in zip(NAMES, grads(y, inputs, upstream.float()), grads(truth, truth_inputs, upstream)):
        assert torch.isfinite(got).all(), f"grad {name} is not finite"
        assert_close(f"grad {name}", got, want, 1e-5)


@pytest.mark.parametrize("step", [pytest.param(0, id="t0"), pytest.param(40, id="t40-mid-chunk"),
                                  pytest.param(64, id="t64-chunk-start")])
def test_causal(step):
    """Changing anything at step t leaves every output before t bit-for-bit unchanged."""
    inputs = make_inputs(130, groups=2, seed=4)
    before = ssd_chunked(*inputs, chunk=32)
    changed = [t.clone() for t in inputs]
    for index in (0, 1, 3, 4):  # x, dt, B, C: the inputs that vary along the sequence
        changed[index][:, step:] = torch.rand_like(changed[index][:, step:]) + 1.0
    after = ssd_chunked(*changed, chunk=32)
    assert torch.equal(after[:, :step], before[:, :step])
    assert not torch.equal(after[:, step], before[:, step])


def test_op_follows_the_kernel_mode(monkeypatch):
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    inputs = make_inputs(70, groups=2, seed=5)
    assert torch.equal(ssd(*inputs, chunk=16), ssd_chunked(*inputs, chunk=16))
    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    assert torch.equal(ssd(*inputs, chunk=16), ssd_reference(*inputs))


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_op_gradients(monkeypatch, mode):
    monkeypatch.setenv("GRAFTC_KERNELS", mode)
    inputs = make_inputs(70, groups=2, seed=6) + [torch.randn(1, 4, 16, 8)]
    inputs = [t.requires_grad_() for t in inputs]
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y, final = ssd(*inputs[:6], chunk=16, initial_state=inputs[6], return_final_state=True)
    truth_y, truth_final = ssd_reference(*truth_inputs[:6], initial_state=truth_inputs[6], return_final_state=True)
    up_y, up_final = torch.randn_like(truth_y), torch.randn_like(truth_final)
    got = grads((y, final), inputs, (up_y.float(), up_final.float()))
    want = grads((truth_y, truth_final), truth_inputs, (up_y, up_final))
    for name, g, w in zip(NAMES + ("initial_state",), got, want):
        assert_close(f"grad {name}", g, w, 1e-5)


def test_opcheck():
    """Schema, fake (meta) kernel, autograd registration and AOT tracing of torch.ops.graftc.ssd."""
    inputs = make_inputs(20, groups=2, seed=7)
    torch.library.opcheck(torch.ops.graftc.ssd.default, (*inputs, 8, None))
    torch.library.opcheck(torch.ops.graftc.ssd.default, (*inputs, 8, torch.randn(1, 4, 16, 8)))


def test_export_shows_one_call():
    class Mixer(torch.nn.Module):
        def forward(self, x, dt, A, B, C, D):
            return ssd(x, dt, A, B, C, D, chunk=16)

    graph = torch.export.export(Mixer(), tuple(make_inputs(40, groups=2))).graph
    calls = [n.target for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert calls == [torch.ops.graftc.ssd.default]


def test_half_precision_accumulates_in_fp32():
    inputs = make_inputs(130, groups=2, seed=8)
    y, final = ssd_chunked(*[t.bfloat16() for t in inputs], chunk=64, return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    truth = ssd_reference(*[t.bfloat16().double() for t in inputs])
    assert_close("y", y, truth, 1e-2)  # bf16 output rounding (2^-9) bounds this, not the accumulation


def test_rejects_mismatched_shapes():
    x, dt, A, B, C, D = make_inputs(10, groups=2)
    three_groups = torch.randn(1, 10, 3, 16)  # 4 heads do not split into 3 groups
    with pytest.raises(ValueError, match="do not split"):
        ssd(x, dt, A, three_groups, three_groups, D)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd(x, dt[:, :-1], A, B, C, D)
    with pytest.raises(ValueError, match="C has shape"):
        ssd(x, dt, A, B, C[..., :8], D)
    with pytest.raises(ValueError, match="initial_state has shape"):
        ssd(x, dt, A, B, C, D, initial_state=torch.zeros(1, 4, 8, 16))
    with pytest.raises(ValueError, match="empty"):
        ssd(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D)
