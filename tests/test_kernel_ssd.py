"""Mamba-2 SSD: the chunked algorithm and the graftc::ssd op against the sequential reference."""
from __future__ import annotations

import math
import operator

import pytest
import torch

import graftc.kernels.ssd.rank_one as ssd_module
from graftc.kernels.ssd import ssd
from graftc.kernels.ssd.chunked import ssd_chunked
from graftc.kernels.ssd.naive import ssd_reference
from graftc.kernels.ssd.rank_one import ssd_fast

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
    assert torch.equal(ssd(*inputs, chunk=16), ssd_fast(*inputs, chunk=16))  # CPU forward: the fast path
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


# The rank-one fast path (the CPU forward of the op). Its error is the fp32 rounding of the products it forms;
# 1e-6 leaves room above it, far below the 1e-5 bound the chunked path is held to. Dt ranges: Mamba-2's, a strong one where every (chunk, head) decays past the
# rank-one range within a few steps (segment-sum form for most terms), and a middle one that mixes both.
FAST_DT = {"mamba2": (math.log(1e-3), math.log(0.1)), "strong": (math.log(2.0), math.log(8.0)),
           "mixed": (math.log(0.3), math.log(3.0))}
FAST_CASES = [
    pytest.param(length, chunk, groups, batch, dt, id=f"L{length}-chunk{chunk}-G{groups}-B{batch}-{dt}")
    for length in (1, 5, 63, 130) for chunk in (16, 64) for groups in (1, 2) for batch in (1, 3) for dt in FAST_DT
]


@pytest.mark.parametrize("length, chunk, groups, batch, dt", FAST_CASES)
@pytest.mark.parametrize("segment", [32, 1024], ids=["segments-of-32", "one-segment"])
def test_fast_matches_reference(monkeypatch, length, chunk, groups, batch, dt, segment):
    monkeypatch.setattr(ssd_module, "_SEGMENT_TOKENS", segment)  # small segments: several per sequence
    inputs = make_inputs(length, groups, batch=batch, log_dt=FAST_DT[dt], seed=length + chunk)
    initial = torch.randn(batch, 4, 16, 8, generator=torch.Generator().manual_seed(9))
    y, final = ssd_fast(*inputs, chunk=chunk, initial_state=initial, return_final_state=True)
    truth_y, truth_final = ssd_reference(*[t.double() for t in inputs], initial_state=initial.double(),
                                         return_final_state=True)
    assert y.shape == truth_y.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert_close("y", y, truth_y, 1e-6)
    assert_close("final state", final, truth_final, 1e-6)
    assert torch.equal(ssd_fast(*inputs, chunk=chunk), ssd_fast(*inputs, chunk=chunk, initial_state=None))


def test_fast_continues_from_its_final_state():
    inputs = make_inputs(130, groups=2, seed=10)
    whole = ssd_fast(*inputs, chunk=32)
    first, state = ssd_fast(*[t[:, :70] if t.dim() > 1 else t for t in inputs], chunk=32, return_final_state=True)
    second = ssd_fast(*[t[:, 70:] if t.dim() > 1 else t for t in inputs], chunk=32, initial_state=state)
    assert_close("y", torch.cat([first, second], dim=1), whole, 1e-6)


@pytest.mark.parametrize("dt", list(FAST_DT))
@pytest.mark.parametrize("step", [pytest.param(0, id="t0"), pytest.param(40, id="t40-mid-chunk"),
                                  pytest.param(64, id="t64-chunk-start")])
def test_fast_causal(step, dt):
    """Bit for bit, as for ssd_chunked: changing anything at step t leaves every output before t unchanged
    (no choice inside the fast path may depend on a later step, e.g. a chunk's total decay)."""
    inputs = make_inputs(130, groups=2, log_dt=FAST_DT[dt], seed=4)
    before = ssd_fast(*inputs, chunk=32)
    changed = [t.clone() for t in inputs]
    for index in (0, 1, 3, 4):  # x, dt, B, C
        changed[index][:, step:] = torch.rand_like(changed[index][:, step:]) + 1.0
    changed[1][:, step:] *= 20.0  # strong decay after t: pushes the rest of the chunk past the rank-one range
    after = ssd_fast(*changed, chunk=32)
    assert torch.equal(after[:, :step], before[:, :step])
    assert not torch.equal(after[:, step], before[:, step])


def test_fast_reads_strided_inputs_and_half_precision():
    """The mixer hands over x, B, C as views into one [B, L, channels] tensor, in bf16 for bf16 models."""
    x, dt, A, B, C, D = make_inputs(100, groups=2, seed=11)
    packed = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], dim=-1)
    views = (packed[..., :32].unflatten(-1, (4, 8)), packed[..., 32:64].unflatten(-1, (2, 16)),
             packed[..., 64:].unflatten(-1, (2, 16)))
    assert_close("y", ssd_fast(views[0], dt, A, views[1], views[2], D, chunk=16), ssd_reference(x, dt, A, B, C, D), 1e-6)
    y, final = ssd_fast(*[t.bfloat16() for t in (x, dt, A, B, C, D)], chunk=16, return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close("y", y, ssd_reference(*[t.bfloat16().double() for t in (x, dt, A, B, C, D)]), 1e-2)


def test_fast_keeps_subnormals_out():
    """Decay weights below 1e-20 are dropped (exactly 0): no subnormal number reaches the GEMMs."""
    seen = []
    real_bmm = torch.bmm

    def bmm(a, b, *, out=None):
        seen.extend(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).any().item() for t in (a, b))
        return real_bmm(a, b) if out is None else real_bmm(a, b, out=out)

    inputs = make_inputs(256, log_dt=FAST_DT["mixed"], seed=12)
    try:
        torch.bmm = bmm
        ssd_fast(*inputs, chunk=64)
    finally:
        torch.bmm = real_bmm
    assert seen and not any(seen)


def test_op_forward_is_fast_backward_is_chunked(monkeypatch):
    """The op's forward is the rank-one path; its gradients are the chunked path's, exact for A too."""
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    inputs = [t.requires_grad_() for t in make_inputs(130, groups=2, log_dt=FAST_DT["mixed"], seed=13)]
    y = ssd(*inputs, chunk=32)
    assert torch.equal(y.detach(), ssd_fast(*[t.detach() for t in inputs], chunk=32))
    upstream = torch.randn_like(y)
    got = grads(y, inputs, upstream)
    want = grads(ssd_chunked(*inputs, chunk=32), inputs, upstream)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_mamba2_mixer_inference_path_matches_training_path(monkeypatch, compiled):
    """Under no_grad on CPU the mixer takes its fused inference path; it computes the same function."""
    from graftc.passes import mamba2

    monkeypatch.setattr(mamba2, "_COMPILE_FROM", 0 if compiled else 1 << 62)
    torch.manual_seed(14)
    mixer = mamba2.Mamba2Mixer(32, 24, d_state=8, head_dim=8, chunk=16).eval()
    x = torch.randn(2, 45, 32)
    with torch.no_grad():
        fast = mixer(x)
    reference = mixer(x)  # autograd on: the reference path (F.conv1d, ssd's chunked backward available)
    assert reference.requires_grad
    assert_close("mixer output", fast, reference.detach(), 1e-6)
