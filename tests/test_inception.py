"""graftc's Inception-v3 (graftc.inception) and the inception:PATH feature extractor of graftc eval.

Random weights only (nothing is downloaded); batches of 1-4 images, since one 299x299 image costs ~6 GFLOPs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from graftc import evaluate
from graftc.cli import main
from graftc.errors import GraftError
from graftc.inception import EXPECTED, InceptionV3, load_inception

# torchvision's Inception3 without AuxLogits, 1000 classes; the FID network's fc has 8 more rows of 2048 + 1
TORCHVISION_PARAMS = 23_834_568


def random_net(num_classes: int = 1008, seed: int = 0) -> InceptionV3:
    """A network whose BatchNorm statistics and affine parameters are not the identity, so loading them matters."""
    torch.manual_seed(seed)
    net = InceptionV3(num_classes)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(1 + torch.randn(c, generator=g) * 0.1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return net.eval()


def images(n: int = 2, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The FID variant's weights as .pth (with AuxLogits and num_batches_tracked, as published files have them)
    and as .safetensors; plus the network they came from and its outputs on two 8x8 images."""
    folder = tmp_path_factory.mktemp("inception")
    net = random_net()
    state = net.state_dict()
    pth, st = folder / "pt_inception.pth", folder / "inception.safetensors"
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1008, 768), "AuxLogits.fc.bias": torch.zeros(1008)}, pth)
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(st))
    with torch.no_grad():
        out = net(images())
    return {"net": net, "state": state, "pth": pth, "safetensors": st, "out": out, "folder": folder}


def test_architecture_matches_the_public_weights():
    for classes in (1000, 1008):
        net = InceptionV3(classes)
        want = TORCHVISION_PARAMS + (classes - 1000) * 2049
        assert sum(p.numel() for p in net.parameters()) == want
    keys = net.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Conv2d_4a_3x3.bn.num_batches_tracked",
                "Mixed_5b.branch5x5_2.conv.weight", "Mixed_6a.branch3x3dbl_3.bn.bias",
                "Mixed_6e.branch7x7dbl_5.conv.weight",
                "Mixed_7a.branch7x7x3_4.bn.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_mean", "fc.weight", "fc.bias"):
        assert key in keys, key
    assert keys["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert keys["Mixed_7b.branch3x3_2b.conv.weight"].shape == (384, 384, 3, 1)
    assert not any(k.endswith("conv.bias") for k in keys)  # convs without bias
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_load_gives_the_same_network(weights, kind):
    net = load_inception(weights[kind])
    assert net.fid and net.num_classes == 1008 and not net.training
    assert all(p.dtype == torch.float32 for p in net.state_dict().values() if p.is_floating_point())
    with torch.no_grad():
        out = net(images())
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    for key, want in weights["out"].items():
        assert torch.equal(out[key], want), key
        assert torch.isfinite(want).all() and want.std() > 1e-3  # a random network still carries signal


def test_torchvision_variant_from_1000_classes(weights, tmp_path):
    state = {k: v for k, v in weights["state"].items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:1000].contiguous(), state["fc.bias"][:1000].contiguous()
    path = tmp_path / "inception_v3_imagenet.safetensors"
    save_file(state, str(path))
    net = load_inception(path)
    assert not net.fid and net.num_classes == 1000
    assert isinstance(net.Mixed_7c.pool, nn.AvgPool2d) and net.Mixed_5b.pool.count_include_pad
    with torch.no_grad():
        out = net(images(1))
    assert out["logits"].shape == (1, 1000)
    # same weights, other pools: the features differ
    assert not torch.allclose(out["pool"], weights["out"]["pool"][:1])


def test_variants_differ_where_their_pools_do():
    fid, tv = InceptionV3(1008, fid=True).eval(), InceptionV3(1008, fid=False).eval()
    tv.load_state_dict(fid.state_dict())
    assert isinstance(fid.Mixed_7c.pool, nn.MaxPool2d) and isinstance(fid.Mixed_7b.pool, nn.AvgPool2d)
    assert not fid.Mixed_5b.pool.count_include_pad and not fid.Mixed_6b.pool.count_include_pad
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # A block: an average that leaves out the padding differs at the border only
        x = torch.rand(1, 192, 9, 9, generator=g)
        a, b = fid.Mixed_5b(x), tv.Mixed_5b(x)
        assert torch.equal(a[:, :224], b[:, :224])  # the three conv branches
        pool_a, pool_b = a[:, 224:], b[:, 224:]
        assert torch.equal(pool_a[..., 1:-1, 1:-1], pool_b[..., 1:-1, 1:-1])
        assert not torch.allclose(pool_a[..., 0, :], pool_b[..., 0, :])
        # last E block: max pool instead of average, everywhere
        x = torch.rand(1, 2048, 4, 4, generator=g)
        a, b = fid.Mixed_7c(x), tv.Mixed_7c(x)
        assert torch.equal(a[:, :-192], b[:, :-192])
        assert not torch.allclose(a[:, -192:, 1:-1, 1:-1], b[:, -192:, 1:-1, 1:-1])


def test_inputs_one_channel_and_any_size(weights):
    net = weights["net"]
    gray = images(1, channels=1, size=8, seed=3)
    with torch.no_grad():
        one, three = net(gray), net(gray.repeat(1, 3, 1, 1))
        big = net(images(1, size=299))  # already 299x299: no resize
        odd = net(images(1, size=37).double())  # any size and dtype
    for key in one:
        assert torch.equal(one[key], three[key])
    assert big["pool"].shape == odd["pool"].shape == (1, 2048)
    with pytest.raises(GraftError, match=r"1 or 3"):
        net(images(1, channels=4))


class NotAWeight:
    """A class a pickle would have to import and build: weights_only must refuse it."""


def test_bad_weight_files(weights, tmp_path):
    def refused(path, *needles):
        with pytest.raises(GraftError) as info:
            load_inception(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
        for needle in needles:
            assert needle in message, message
        return message

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a weights file" * 10)
    refused(garbage, "cannot read", EXPECTED)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights["safetensors"].read_bytes()[:4096])
    refused(truncated, "cannot read")
    custom = tmp_path / "custom.pth"
    torch.save({"fc.weight": NotAWeight()}, custom)
    message = refused(custom, "cannot read", "weights_only=True refused it", "NotAWeight")
    assert "weights_only=False" not in message and "\x1b" not in message
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    refused(listed, "not a plain state dict")
    refused(tmp_path / "none.pth", "not found")
    other = tmp_path / "weights.ckpt"
    other.write_bytes(b"x")
    refused(other, "unsupported file type")

    state = {k: v for k, v in weights["state"].items() if not k.endswith("num_batches_tracked")}
    missing = dict(state)
    del missing["Mixed_6e.branch_pool.bn.running_var"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, str(path))
    refused(path, "1 missing keys (Mixed_6e.branch_pool.bn.running_var)", EXPECTED)
    wrong = {**state, "Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3), "extra.weight": torch.zeros(1)}
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))
    refused(path, "1 unexpected keys (extra.weight)",
            "1 shape mismatches (Mixed_5b.branch1x1.conv.weight [64, 192, 3, 3] (expected [64, 192, 1, 1]))")


# ------------------------------------------------------------------ the feature extractor and graftc eval


def digit_images(n: int) -> np.ndarray:
    from graftc.models.demo import load_digits_tensor

    digits = load_digits_tensor()[0][:n, 0]
    return ((digits + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # [n, 8, 8] uint8


def test_extractor_one_pass_and_fits(weights):
    ex = evaluate.parse_features(f"inception:{weights['safetensors']}")
    assert isinstance(ex, evaluate.InceptionExtractor) and ex.name == "inception"
    x = images()
    feats = ex.features(x)
    calls = []
    ex.net.register_forward_hook(lambda *a: calls.append(1))
    spatial, logits = ex.spatial(x), ex.logits(x)  # the same images: no second forward pass
    assert not calls and feats.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    # the extractor runs on the GPU where there is one: equal up to float32 rounding
    assert feats.dtype == np.float64
    assert np.allclose(feats, weights["out"]["pool"].double().numpy(), rtol=1e-4, atol=1e-5)

    class Model:
        in_channels, input_size = 1, 8

    assert ex.fits(Model()) is None  # the demo's digits are the reference
    Model.in_channels, Model.input_size = 4, 32
    assert "VAE" in ex.fits(Model())
    Model.in_channels = 3
    assert "--reference" in ex.fits(Model())


def test_digits_reference_is_cached(weights, tmp_path, monkeypatch):
    import graftc.models.demo as demo

    few = demo.load_digits_tensor()[0][:3], None
    monkeypatch.setattr(demo, "load_digits_tensor", lambda: few)
    ex = evaluate.InceptionExtractor(weights["safetensors"], cache=str(tmp_path))
    ref = ex.reference()
    assert ref["features"].shape == (3, 2048) and ref["spatial"].shape == (3, 2023)
    [cached] = (tmp_path / "inception").glob("digits-*.npz")
    ex._ref = ex._last = None
    ex.net = None  # a cached reference runs no network
    again = ex.reference()
    assert np.array_equal(again["features"], ref["features"]) and np.array_equal(again["spatial"], ref["spatial"])


def test_read_reference(tmp_path):
    class Dims(evaluate.FeatureExtractor):
        name, feature_dim, spatial_dim = "test", 4, 3

    def write(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    eye = lambda d: np.eye(d)  # noqa: E731
    ref = evaluate.read_reference(write("ok.npz", mu=np.zeros(4), sigma=eye(4), mu_s=np.ones(3, np.float32),
                                        sigma_s=eye(3), arr_0=np.zeros((5, 6, 6), np.uint8)), Dims())
    assert ref["mu_s"].dtype == np.float64 and ref["images"].shape == (5, 6, 6, 1)
    bad = {"a.npz": dict(mu=np.zeros(4)),
           "b.npz": dict(mu=np.zeros(5), sigma=eye(5)),
           "c.npz": dict(mu=np.zeros(4), sigma=eye(3)),
           "d.npz": dict(arr_0=np.zeros((5, 6, 6, 3), np.float32)),
           "e.npz": dict(other=np.zeros(3)),
           "f.npz": dict(mu=np.array([object(), 1, 2, 3], dtype=object), sigma=eye(4)),
           "g.npz": dict(mu=np.full(4, np.nan), sigma=eye(4))}
    for name, arrays in bad.items():
        with pytest.raises(GraftError, match="--reference"):
            evaluate.read_reference(write(name, **arrays), Dims())
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("not an archive")
    for name in ("single.npy", "text.npz", "missing.npz"):
        with pytest.raises(GraftError, match="--reference"):
            evaluate.read_reference(tmp_path / name, Dims())


def test_eval_with_inception_features(weights, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=digit_images(8))
    argv = ["eval", "demo:tiny-dit", "--features", f"inception:{weights['safetensors']}", "--reference", str(ref),
            "--samples", "8", "--steps", "2", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["features"] == "inception" and result["settings"]["reference"] == str(ref)
    assert not result["notes"]
    teacher = result["models"]["teacher"]
    assert teacher["fd"] > 0 and teacher["sfid"] > 0 and 1 <= teacher["is"] <= 1008
    assert 0 <= teacher["precision"] <= 1 and 0 <= teacher["recall"] <= 1


def test_eval_inception_bad_input(weights, tmp_path, capsys):
    bad_weights = tmp_path / "bad.pth"
    bad_weights.write_bytes(b"\x80\x02garbage")
    bad_ref = tmp_path / "bad.npz"
    np.savez(bad_ref, mu=np.zeros(7), sigma=np.eye(7))
    for argv in (["eval", "demo:tiny-dit", "--features", f"inception:{bad_weights}"],
                 ["eval", "demo:tiny-dit", "--features", "inception:"],
                 ["eval", "demo:tiny-dit", "--features", f"inception:{weights['pth']}", "--reference", str(bad_ref)],
                 ["eval", "demo:tiny-dit", "--features", f"inception:{weights['pth']}", "--reference", "/no/ref.npz"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("graftc: error: ") and err.count("\n") == 1, err
