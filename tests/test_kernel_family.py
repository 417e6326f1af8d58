"""kernels/family.py: which path a family's op runs (by GRAFTC_KERNELS and device, forced by `only`, in the forward
and in the backward), `recompute`'s gradients, and the op's registrations (fake, autograd, FLOP formula)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graftc.kernels.family import HAS_TRITON, Family, only, recompute

RAN: list[str] = []


def path(name: str, scale: float = 1.0):
    """y = cumsum(x * w) * s over dim 1: every path the same maths, each recording that it ran."""
    def run(x, w, s):
        RAN.append(name)
        return (x * w).cumsum(1) * (s * scale)
    return run


def backward_path(name: str):
    def run(grad, x, w, s):
        RAN.append(name)
        g = grad.flip(1).cumsum(1).flip(1) * s
        return g * w, g * x
    return run


SCAN = Family("test_family_scan", "(Tensor x, Tensor w, float s) -> Tensor",
              reference=path("reference"), torch=path("torch"), cpu=path("cpu"), triton=path("triton"),
              fake=lambda x, w, s: torch.empty_like(x), flops=lambda x, w, s, **kwargs: 2 * x[0] * x[1],
              backward=recompute)
SCAN_BACKWARD = Family("test_family_scan_backward", "(Tensor grad, Tensor x, Tensor w, float s) -> (Tensor, Tensor)",
                       reference=backward_path("reference backward"), torch=backward_path("torch backward"),
                       fake=lambda grad, x, w, s: (torch.empty_like(x), torch.empty_like(w)))
SCAN_OWN_BACKWARD = Family(
    "test_family_scan_own_backward", "(Tensor x, Tensor w, float s) -> Tensor",
    reference=path("reference"), torch=path("torch"), fake=lambda x, w, s: torch.empty_like(x),
    backward=lambda family, inputs, outputs, grad: (*SCAN_BACKWARD(grad, *inputs), None))


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    RAN.clear()


def inputs(grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, generator=gen, dtype=torch.float64).requires_grad_(grad) for _ in range(2)]


@pytest.mark.parametrize("mode, expected", [("auto", "cpu"), ("reference", "reference"),
                                            pytest.param("triton", "triton", marks=pytest.mark.skipif(
                                                not HAS_TRITON, reason="triton is not installed"))])
def test_dispatch_by_mode_on_cpu(monkeypatch, mode, expected):
    monkeypatch.setenv("GRAFTC_KERNELS", mode)
    x, w = inputs()
    SCAN(x, w, 0.5)
    assert RAN == [expected]


def test_gradients_recompute_through_the_torch_path_not_the_cpu_one():
    """The cpu path is forward-only: the forward runs it, the backward recomputes through `torch`."""
    x, w = inputs(grad=True)
    y = SCAN(x, w, 0.5)
    assert RAN == ["cpu"]
    got = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert RAN == ["cpu", "torch"]
    want = torch.autograd.grad((x * w).cumsum(1) * 0.5, (x, w), torch.ones_like(y))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    with torch.no_grad():
        SCAN(x, w, 0.5)
    assert RAN[-1] == "cpu"


def test_only_forces_forward_and_backward():
    x, w = inputs(grad=True)
    y = only("reference", SCAN_OWN_BACKWARD)(x, w, 0.5)
    assert RAN == ["reference"]
    torch.autograd.grad(y.sum(), (x, w))  # outside `only`: the backward still runs the forced path
    assert RAN == ["reference", "reference backward"]
    y = SCAN_OWN_BACKWARD(x, w, 0.5)
    torch.autograd.grad(y.sum(), (x, w))
    assert RAN[2:] == ["torch", "torch backward"]
    only("cpu", SCAN_OWN_BACKWARD)(x.detach(), w.detach(), 0.5)  # a family without that path dispatches as usual
    assert RAN[-1] == "torch"


def test_op_registrations():
    """One op call where something watches (FlopCounterMode counts its formula), opcheck's schema, fake and
    autograd checks, and the same numbers from the eager shortcut and from the op."""
    x, w = inputs()
    with FlopCounterMode(display=False) as counter:
        through_op = SCAN(x, w, 0.5)
    assert counter.get_total_flops() == 2 * 2 * 5
    assert torch.equal(through_op, SCAN(x, w, 0.5))
    torch.library.opcheck(SCAN.op, (*inputs(grad=True), 0.5))
