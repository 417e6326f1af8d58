"""Local attention kernels (1D sliding window, 2D neighborhood) against their dense references.

Every comparison is a relative RMS error, rms(a - b) / rms(b), on the output and on the gradient of q, k and v,
with BOUND = 1e-5 in fp32 (far above fp32's rounding of these sums). Without a GPU the Triton kernels run in Triton's
interpreter, which this module switches on before importing graftc (triton must not be imported before it).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graftc.kernels import local_attention as la  # noqa: E402
from graftc.kernels.family import only  # noqa: E402
from graftc.kernels.local_attention import naive  # noqa: E402
from graftc.kernels.local_attention.blocked import Blocked, tiling_of  # noqa: E402
from graftc.kernels.local_attention.triton import Triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = 1e-5
has_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="the blocked path is the CPU path")


def window_attention_blocked(q, k, v, window, causal=False, block=None):
    """The blocked CPU path, `block` queries per tile (default: tuned)."""
    return only(Blocked((1, block) if block else None), la.window_attention)(q, k, v, window, causal)


def neighborhood_attention_blocked(q, k, v, grid, kernel, tile=None):
    """The blocked CPU path, tile[0] x tile[1] queries per tile (default: tuned)."""
    return only(Blocked(tuple(tile) if tile else None), la.neighborhood_attention)(q, k, v, grid, kernel)


def window_attention_triton(q, k, v, window, causal=False, block=64):
    """The Triton kernels, `block` queries per program and `block` keys per step (a power of 2)."""
    return only(Triton((1, block), (1, block)), la.window_attention)(q, k, v, window, causal)


def neighborhood_attention_triton(q, k, v, grid, kernel, tile=(8, 8), visit=(4, 16)):
    """The Triton kernels: programs own tile rectangles, step over halos in visit rectangles (power-of-2 areas)."""
    return only(Triton(tuple(tile), tuple(visit)), la.neighborhood_attention)(q, k, v, grid, kernel)


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return rms(actual.double() - expected.double()) / rms(expected)


def qkv(batch, heads, tokens, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
            for _ in range(3)]


def assert_matches(attend, reference, q, k, v, bound=BOUND, zero_qk_grads=False):
    """attend vs reference: output and the gradients of q, k, v under one random output gradient."""
    out, expected = attend(q, k, v), reference(q, k, v)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert rel_rms(out, expected) < bound, f"out: {rel_rms(out, expected):.2e}"
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        if zero_qk_grads and name in "qk":  # each query sees only itself: softmax is constant, the gradient is 0
            assert rms(g) < bound * rms(want[2]), f"d{name} should vanish: {rms(g):.2e}"
            continue
        assert rel_rms(g, w) < bound, f"d{name}: {rel_rms(g, w):.2e}"


# (batch, heads, tokens, head_dim, window, causal, block)
WINDOW_CASES = [
    pytest.param(2, 3, 100, 16, 4, False, 32, id="N100-w4-b32"),  # N not a multiple of the block
    pytest.param(2, 3, 100, 16, 4, True, 32, id="N100-w4-b32-causal"),
    pytest.param(1, 2, 37, 16, 100, False, 16, id="N37-w100-b16-wider-than-seq"),
    pytest.param(1, 2, 37, 16, 100, True, 16, id="N37-w100-b16-causal-wider-than-seq"),
    pytest.param(1, 2, 50, 8, 0, False, 16, id="N50-w0-b16"),
    pytest.param(1, 2, 50, 8, 0, True, 16, id="N50-w0-b16-causal"),
    pytest.param(1, 2, 64, 24, 7, True, 64, id="N64-w7-b64-causal-one-block"),
    pytest.param(2, 2, 300, 72, 64, False, None, id="N300-w64-default-block-dh72"),
    pytest.param(1, 1, 1, 8, 3, False, None, id="N1-w3-single-token"),
]

# (batch, heads, height, width, head_dim, kernel, tile)
NEIGHBORHOOD_CASES = [
    pytest.param(2, 2, 5, 12, 16, 3, (4, 8), id="5x12-k3-t4x8-non-square"),
    pytest.param(1, 2, 6, 6, 8, 7, (4, 4), id="6x6-k7-t4x4"),
    pytest.param(1, 2, 4, 4, 8, 9, (4, 4), id="4x4-k9-kernel-larger-than-grid"),
    pytest.param(1, 2, 7, 9, 8, 1, (2, 4), id="7x9-k1-t2x4"),
    pytest.param(1, 3, 9, 13, 16, 5, None, id="9x13-k5-default-tile"),
    pytest.param(2, 2, 16, 16, 72, 9, None, id="16x16-k9-default-tile-dh72"),
    pytest.param(1, 2, 1, 10, 8, 3, (1, 4), id="1x10-k3-one-row"),
]


# The references are written out here, independent of the kernels' window geometry: dense softmax attention
# under an explicit boolean mask, differentiated by autograd.
def masked_attention(q, k, v, mask, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask.to(q.device), float("-inf"))
    return scores.softmax(-1) @ v


def window_mask(tokens, window, causal):
    """Query i sees key j when |i - j| <= window; causal: only j <= i."""
    i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    return ((i - j).abs() <= window) & ((j <= i) if causal else True)


def neighborhood_mask(height, width, kernel):
    """Query (y, x) sees key (y', x') when |y - y'| <= kernel // 2 and |x - x'| <= kernel // 2 (raster order)."""
    r = kernel // 2
    y, x = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    return ((y[:, None] - y[None, :]).abs() <= r) & ((x[:, None] - x[None, :]).abs() <= r)


def window_reference(window, causal):
    return lambda q, k, v: masked_attention(q, k, v, window_mask(q.shape[-2], window, causal))


def neighborhood_reference(grid, kernel, scale=None):
    return lambda q, k, v: masked_attention(q, k, v, neighborhood_mask(*grid, kernel), scale)


@pytest.mark.parametrize("case", ["window", "causal-window", "neighborhood"])
def test_library_references_match_the_explicit_masks(case):
    """graftc's own dense references (used by benchmarks and the GPU check) agree with the masks written here."""
    q, k, v = qkv(1, 2, 35, 8)
    if case == "neighborhood":
        ours = naive.neighborhood_attention_reference(q, k, v, (5, 7), 3)
        theirs = neighborhood_reference((5, 7), 3)(q, k, v)
    else:
        causal = case == "causal-window"
        ours, theirs = naive.window_attention_reference(q, k, v, 4, causal), window_reference(4, causal)(q, k, v)
    assert rel_rms(ours, theirs) < BOUND


# -- blocked CPU path ---------------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("batch, heads, tokens, head_dim, window, causal, block", WINDOW_CASES)
def test_window_blocked_matches_reference(batch, heads, tokens, head_dim, window, causal, block):
    q, k, v = qkv(batch, heads, tokens, head_dim)
    attend = lambda q, k, v: window_attention_blocked(q, k, v, window, causal, block=block)
    assert_matches(attend, window_reference(window, causal), q, k, v,
                   zero_qk_grads=min(window, tokens - 1) == 0)


@cpu_only
@pytest.mark.parametrize("batch, heads, height, width, head_dim, kernel, tile", NEIGHBORHOOD_CASES)
def test_neighborhood_blocked_matches_reference(batch, heads, height, width, head_dim, kernel, tile):
    q, k, v = qkv(batch, heads, height * width, head_dim)
    attend = lambda q, k, v: neighborhood_attention_blocked(q, k, v, (height, width), kernel, tile=tile)
    assert_matches(attend, neighborhood_reference((height, width), kernel), q, k, v, zero_qk_grads=kernel == 1)


@cpu_only
@pytest.mark.parametrize("dims", [pytest.param((1, 70, 5, False), id="1d-N70-w5"),
                                  pytest.param((7, 10, 3, False), id="2d-7x10-k3")])
def test_blocked_float64_is_exact(dims):
    """In float64 the blocked path agrees to 1e-12: the fp32 bound hides no algorithmic error."""
    height, width, size, _ = dims
    q, k, v = qkv(1, 2, height * width, 16, dtype=torch.float64)
    if height == 1:
        attend, reference = (lambda q, k, v: window_attention_blocked(q, k, v, size, block=16),
                             window_reference(size, False))
    else:
        attend, reference = (lambda q, k, v: neighborhood_attention_blocked(q, k, v, (height, width), size,
                                                                                tile=(4, 4)),
                             neighborhood_reference((height, width), size))
    assert_matches(attend, reference, q, k, v, bound=1e-12)


@cpu_only
def test_blocked_in_head_chunks():
    """Heads split over several chunks (here one head each) give the same result and gradients."""
    q, k, v = qkv(2, 3, 7 * 10, 16)
    win = naive.Window(7, 10, 1, 1)
    attend = lambda q, k, v: only(Blocked((4, 8), chunk_bytes=1), la.neighborhood_attention)(q, k, v, (7, 10), 3, 0.25)
    reference = neighborhood_reference((7, 10), 3, scale=0.25)
    assert len(Blocked((4, 8), chunk_bytes=1).chunks(q, tiling_of(win, (4, 8)))) == 6
    assert_matches(attend, reference, q, k, v)


# -- Triton kernels -----------------------------------------------------------------------------------------------

TRITON_WINDOW_CASES = [
    pytest.param(1, 2, 100, 16, 4, False, 64, id="N100-w4-b64"),
    pytest.param(1, 2, 100, 16, 4, True, 64, id="N100-w4-b64-causal"),
    pytest.param(1, 1, 37, 16, 100, False, 16, id="N37-w100-b16-wider-than-seq"),
    pytest.param(1, 2, 40, 8, 0, False, 64, id="N40-w0-b64"),
    pytest.param(2, 1, 70, 72, 9, True, 32, id="N70-w9-b32-causal-dh72"),
]

TRITON_NEIGHBORHOOD_CASES = [
    pytest.param(1, 2, 5, 12, 16, 3, (4, 8), (4, 8), id="5x12-k3-own4x8-visit4x8"),
    pytest.param(1, 2, 6, 6, 8, 7, (4, 4), (2, 8), id="6x6-k7-own4x4-visit2x8"),
    pytest.param(1, 1, 4, 4, 8, 9, (4, 4), (4, 4), id="4x4-k9-kernel-larger-than-grid"),
    pytest.param(1, 1, 7, 9, 8, 1, (4, 8), (4, 8), id="7x9-k1"),
    pytest.param(1, 1, 9, 13, 24, 5, (4, 8), (4, 16), id="9x13-k5-own4x8-visit4x16"),
]


@has_triton
@pytest.mark.parametrize("batch, heads, tokens, head_dim, window, causal, block", TRITON_WINDOW_CASES)
def test_window_triton_matches_reference(batch, heads, tokens, head_dim, window, causal, block):
    q, k, v = qkv(batch, heads, tokens, head_dim)
    attend = lambda q, k, v: window_attention_triton(q, k, v, window, causal, block=block)
    assert_matches(attend, window_reference(window, causal), q, k, v,
                   zero_qk_grads=min(window, tokens - 1) == 0)


@has_triton
@pytest.mark.parametrize("batch, heads, height, width, head_dim, kernel, own, visit", TRITON_NEIGHBORHOOD_CASES)
def test_neighborhood_triton_matches_reference(batch, heads, height, width, head_dim, kernel, own, visit):
    q, k, v = qkv(batch, heads, height * width, head_dim)
    attend = lambda q, k, v: neighborhood_attention_triton(q, k, v, (height, width), kernel, tile=own,
                                                              visit=visit)
    assert_matches(attend, neighborhood_reference((height, width), kernel), q, k, v, zero_qk_grads=kernel == 1)


@has_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter computes only fp32")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_inputs(dtype):
    """16-bit inputs: fp32 accumulation inside, so only the inputs' and output's rounding shows."""
    q, k, v = qkv(1, 4, 1024, 72, dtype=dtype)
    out = neighborhood_attention_triton(q, k, v, (32, 32), 7)
    expected = neighborhood_reference((32, 32), 7)(q.float(), k.float(), v.float())
    assert out.dtype == dtype and rel_rms(out, expected) < 1e-2


# -- the ops: dispatch, masks, export -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "reference", pytest.param("triton", marks=has_triton)])
def test_ops_match_reference_in_every_mode(mode, monkeypatch):
    monkeypatch.setenv("GRAFTC_KERNELS", mode)
    q, k, v = qkv(1, 2, 45, 16)
    assert_matches(lambda q, k, v: la.window_attention(q, k, v, 6, causal=True), window_reference(6, True),
                   q, k, v)
    assert_matches(lambda q, k, v: la.neighborhood_attention(q, k, v, (5, 9), 5),
                   neighborhood_reference((5, 9), 5), q, k, v)


def test_ops_pick_the_blocked_path_on_cpu(monkeypatch):
    monkeypatch.setenv("GRAFTC_KERNELS", "auto")
    q, k, v = (x.detach().cpu() for x in qkv(1, 2, 45, 16))
    assert isinstance(la.window_attention_op.pick(q), Blocked)
    monkeypatch.setenv("GRAFTC_KERNELS", "reference")
    assert isinstance(la.window_attention_op.pick(q), naive.Reference)
    monkeypatch.setenv("GRAFTC_KERNELS", "triton")
    assert isinstance(la.window_attention_op.pick(q), Triton)


@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=has_triton)])
def test_causal_window_ignores_the_future(path):
    q, k, v = qkv(1, 2, 80, 16)
    attend = (la.window_attention if path == "op" else window_attention_triton)
    cut = 37
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, cut + 1:] += 5.0
    v2[:, :, cut + 1:] -= 3.0
    out, changed = attend(q, k, v, 8, True), attend(q, k2, v2, 8, True)
    assert torch.equal(out[:, :, :cut + 1], changed[:, :, :cut + 1])
    assert not torch.allclose(out[:, :, cut + 1:], changed[:, :, cut + 1:])
    dk, dv = torch.autograd.grad(out[:, :, :cut + 1].sum(), (k, v))
    assert dk[:, :, cut + 1:].abs().max() == 0 and dv[:, :, cut + 1:].abs().max() == 0


def test_neighborhood_sees_only_its_window():
    """Changing one key's value moves exactly the outputs of the queries within r of it (rows and columns)."""
    height, width, kernel = 9, 11, 5
    q, k, v = (x.detach() for x in qkv(1, 1, height * width, 8))
    y, x = 2, 8
    v2 = v.clone()
    v2[:, :, y * width + x] += 1.0
    moved = (la.neighborhood_attention(q, k, v2, (height, width), kernel)
             - la.neighborhood_attention(q, k, v, (height, width), kernel)).abs().amax(-1)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    near = ((rows - y).abs() <= kernel // 2) & ((cols - x).abs() <= kernel // 2)
    assert torch.equal(moved.reshape(height, width).cpu() > 0, near)


def test_bad_arguments_raise():
    q, k, v = (x.detach() for x in qkv(1, 1, 12, 8))
    with pytest.raises(ValueError, match="odd"):
        la.neighborhood_attention(q, k, v, (3, 4), 4)
    with pytest.raises(ValueError, match="does not hold"):
        la.neighborhood_attention(q, k, v, (3, 5), 3)
    with pytest.raises(ValueError, match="window"):
        la.window_attention(q, k, v, -1)
    with pytest.raises(ValueError, match="shape"):
        la.window_attention(q, k[:, :, :6], v, 2)


class _TinyLocal(torch.nn.Module):
    def forward(self, q, k, v):
        return la.window_attention(q, k, v, 2) + la.neighborhood_attention(q, k, v, (3, 4), 3)


def test_export_shows_one_call_per_op():
    q, k, v = (x.detach() for x in qkv(1, 2, 12, 8))
    exported = torch.export.export(_TinyLocal(), (q, k, v), strict=False)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("graftc.window_attention.default") == 1
    assert targets.count("graftc.neighborhood_attention.default") == 1
    torch.testing.assert_close(exported.module()(q, k, v), _TinyLocal()(q, k, v))


def test_fake_tensors_propagate_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 20, 8)
        out, lse = torch.ops.graftc.neighborhood_attention(q, q, q, 4, 5, 3, 0.5)
        assert out.shape == q.shape and lse.shape == (2, 3, 20) and lse.dtype == torch.float32
        out, lse = torch.ops.graftc.window_attention(q, q, q, 3, True, 0.5)
        assert out.shape == q.shape and lse.shape == (2, 3, 20)


@cpu_only
def test_opcheck_registrations():
    """torch.library.opcheck: schema, fake kernel and autograd registration agree with the real kernel."""
    q, k, v = qkv(1, 2, 12, 8)
    torch.library.opcheck(torch.ops.graftc.window_attention.default, (q, k, v, 2, False, 0.3))
    torch.library.opcheck(torch.ops.graftc.neighborhood_attention.default, (q, k, v, 3, 4, 3, 0.3))
