"""Hyena gated short conv: Triton kernels and the compiled CPU path against the naive reference.

Error measure: relative RMS error rms(a - b) / rms(b) against the reference evaluated in float64.
Bounds: fp32 paths < 1e-5 (far above a few fp32 roundings per output); bf16 < 1e-2 (8-bit mantissa).
Without a GPU the Triton kernels run in the interpreter (fp32 only, slow per op and program): shapes stay
small and the launch config uses 128 x 128 tiles, so L = 300 and D = 160 leave partial tiles in both dims.
"""
import os

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are jitted: on their first call

from graftc.kernels.family import HAS_TRITON, only  # noqa: E402
from graftc.kernels.hyena import hyena_conv, hyena_conv_op, shifted  # noqa: E402
from graftc.kernels.hyena.naive import hyena_reference  # noqa: E402

hyena_conv_triton, hyena_conv_cpu = only("triton", hyena_conv), only("torch", hyena_conv)

DEVICE = "cuda" if CUDA else "cpu"
FP32_BOUND = 1e-5
BF16_BOUND = 1e-2
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

VARIANTS = {  # name: (featurizer, inner filter)
    "X": (True, False),
    "Y": (False, True),
    "SE": (True, True),
    "plain": (False, False),
}

PARTIAL_TILES = (1, 300, 160, 4, 4)  # batch, length, width D (u has 3D channels), featurizer taps, inner taps
SHAPES = [
    pytest.param(PARTIAL_TILES, id="B1-L300-D160-K4"),  # partial tiles in L and D; backward walks 2 chunks
    pytest.param((2, 3, 16, 4, 4), id="B2-L3-D16-K4"),  # L < K: every output sees the zero padding
    pytest.param((1, 128, 128, 1, 1), id="B1-L128-D128-K1"),  # K = 1 (no halo), whole tiles
    pytest.param((1, 50, 24, 2, 3), id="B1-L50-D24-KF2-KI3"),  # featurizer and inner filter of different lengths
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: intra-op threads cost more than they save, and on a busy machine far more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(variant, batch, length, width, feat_taps, inner_taps, dtype=torch.float32, device=DEVICE, seed=0):
    """u, feat_weight, feat_bias, inner_weight (None where the variant has no such conv), as grad leaves."""
    featurize, inner = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    u = leaf(batch, length, 3 * width)
    feat_weight = leaf(3 * width, feat_taps, scale=feat_taps**-0.5) if featurize else None
    feat_bias = leaf(3 * width, scale=0.5) if featurize else None
    inner_weight = leaf(width, inner_taps, scale=inner_taps**-0.5) if inner else None
    return u, feat_weight, feat_bias, inner_weight


def assert_matches_reference(fn, inputs, bound):
    """Forward and the gradient of every input of fn against the float64 reference."""
    present = [x for x in inputs if x is not None]
    as_double = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    expected = hyena_reference(*as_double)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(expected.device)
    expected_grads = torch.autograd.grad(expected, [x for x in as_double if x is not None], grad)

    out = fn(*inputs)
    assert out.dtype == inputs[0].dtype and out.shape == expected.shape
    grads = torch.autograd.grad(out, present, grad.to(out.device, out.dtype))
    names = [name for name, x in zip(("u", "feat_weight", "feat_bias", "inner_weight"), inputs) if x is not None]
    assert rel_rms(out, expected) < bound, f"forward: {rel_rms(out, expected):.2e}"
    for name, leaf, got, want in zip(names, present, grads, expected_grads):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert rel_rms(got, want) < bound, f"d {name}: {rel_rms(got, want):.2e}"


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_matches_reference(variant, shape):
    assert_matches_reference(hyena_conv_triton, make_inputs(variant, *shape), FP32_BOUND)


@pytest.mark.skipif(not CUDA, reason="the Triton interpreter has no bf16 arithmetic")
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_bf16(variant):
    assert_matches_reference(hyena_conv_triton, make_inputs(variant, *PARTIAL_TILES, torch.bfloat16), BF16_BOUND)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_path_matches_reference(variant, shape):
    """The CPU path's shifted multiply-add maths on every shape, run eagerly (compiling each takes seconds)."""
    with torch.compiler.set_stance("force_eager"):
        assert_matches_reference(hyena_conv_cpu, make_inputs(variant, *shape, device="cpu"), FP32_BOUND)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_path_bf16(variant):
    with torch.compiler.set_stance("force_eager"):
        inputs = make_inputs(variant, *PARTIAL_TILES, torch.bfloat16, "cpu")
        assert_matches_reference(hyena_conv_cpu, inputs, BF16_BOUND)


def test_cpu_path_compiled():
    """Compiled, on the variant with both convs and the bias (slow: Inductor builds C++ code)."""
    assert_matches_reference(hyena_conv_cpu, make_inputs("SE", *PARTIAL_TILES, device="cpu"), FP32_BOUND)
    assert not shifted.compiled_forward.failed and not shifted.compiled_backward.failed


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(hyena_reference, id="reference"),
        pytest.param(hyena_conv_triton, id="triton", marks=needs_triton),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant, path):
    """Changing u after position t leaves y up to t untouched (and does change what comes after)."""
    u, feat_weight, feat_bias, inner_weight = make_inputs(variant, 1, 40, 16, 4, 4)
    t = 17
    changed = u.detach().clone()
    changed[:, t + 1 :] += 1.0
    with torch.no_grad():
        before = path(u, feat_weight, feat_bias, inner_weight)
        after = path(changed, feat_weight, feat_bias, inner_weight)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


class TinyHyena(nn.Module):
    def __init__(self, width: int, taps: int = 4):
        super().__init__()
        self.in_proj = nn.Linear(width, 3 * width)
        self.feat_weight = nn.Parameter(torch.randn(3 * width, taps) * 0.5)
        self.feat_bias = nn.Parameter(torch.zeros(3 * width))
        self.inner_weight = nn.Parameter(torch.randn(width, taps) * 0.5)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        return self.out_proj(hyena_conv(self.in_proj(x), self.feat_weight, self.feat_bias, self.inner_weight))


def test_export_shows_one_op():
    model = TinyHyena(16).to(DEVICE)
    x = torch.randn(1, 24, 16, device=DEVICE)
    length = torch.export.Dim("length", min=2, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({1: length},), strict=False)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.graftc.hyena_conv.default) == 1
    assert torch.ops.aten.conv1d.default not in targets
    longer = torch.randn(1, 37, 16, device=DEVICE)  # another length: the fake impl propagated a symbolic L
    with torch.compiler.set_stance("force_eager"):  # the numbers, not the compiler, are checked here
        torch.testing.assert_close(program.module()(longer), model(longer))


def test_mode_switch(monkeypatch):
    """GRAFTC_KERNELS picks the implementation: spy on which forward runs."""
    inputs = make_inputs("SE", 1, 20, 8, 4, 4)
    used = []

    def spying(name, impl):
        def forward(*args):
            used.append(name)
            return impl.forward(*args)

        return impl._replace(forward=forward)

    for name, impl in list(hyena_conv_op.paths.items()):
        if impl is not None:
            monkeypatch.setitem(hyena_conv_op.paths, name, spying(name, impl))

    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    torch.testing.assert_close(hyena_conv(*inputs), hyena_reference(*inputs), rtol=0, atol=0)
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    with torch.compiler.set_stance("force_eager"):
        hyena_conv(*inputs)
    assert used == ["reference", "triton" if CUDA else "torch"]
    if HAS_TRITON:
        monkeypatch.setenv("GRAFTC_KERNELS", "triton")
        hyena_conv(*inputs)
        assert used[-1] == "triton"
    monkeypatch.setenv("GRAFTC_KERNELS", "fastest")
    with pytest.raises(ValueError, match="GRAFTC_KERNELS"):
        hyena_conv(*inputs)


def test_reference_mode_backward(monkeypatch):
    """GRAFTC_KERNELS=reference still differentiates through the op (its backward is the written-out one)."""
    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    assert_matches_reference(hyena_conv, make_inputs("SE", 1, 30, 8, 4, 4), FP32_BOUND)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(dict(u=(2, 10, 10)), id="channels-not-3D"),
        pytest.param(dict(feat_weight=(10, 4)), id="feat-weight-rows"),
        pytest.param(dict(feat_bias=(5,)), id="feat-bias-size"),
        pytest.param(dict(inner_weight=(12, 4)), id="inner-weight-rows"),
        pytest.param(dict(feat_weight=None), id="bias-without-weight"),
    ],
)
def test_rejects_bad_shapes(bad):
    shapes = dict(u=(2, 10, 12), feat_weight=(12, 4), feat_bias=(12,), inner_weight=(4, 4)) | bad
    names = ("u", "feat_weight", "feat_bias", "inner_weight")
    args = [None if shapes[name] is None else torch.randn(shapes[name]) for name in names]
    with pytest.raises(ValueError, match="hyena_conv"):
        hyena_conv(*args)
