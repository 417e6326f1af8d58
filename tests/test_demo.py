"""The shipped demo: the pretrained tiny DiT, the digit feature network, and the Frechet distance."""
import json

import numpy as np
import pytest
import torch

from graftc.errors import GraftError
from graftc.models import demo
from graftc.models.demo import (
    DigitFeatures, demo_fd, feature_stats, frechet_distance, load_demo_dit, load_feature_net, reference_stats,
)
from graftc.models.dit import DIT_CONFIGS, build_dit


@pytest.fixture(scope="module")
def teacher():
    return load_demo_dit()


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


def digits():
    return demo.load_digits_tensor()


# ------------------------------------------------------------------ weights


def test_committed_weights_load(teacher):
    assert not teacher.training and teacher.pos_embed.dtype == torch.float32
    assert (teacher.depth, teacher.hidden_size, teacher.patch_size, teacher.num_heads) == tuple(DIT_CONFIGS["tiny"])
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in build_dit("tiny").parameters())
    assert sum(p.numel() for p in teacher.parameters()) == 1_868_036
    # trained: the adaLN-Zero layers are no longer zero
    assert torch.count_nonzero(teacher.final_layer.linear.weight) > 0
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 300, 600, 999]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        out = teacher(x, t, y)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_weights_are_small_and_describe_themselves():
    files = list(demo.WEIGHTS_DIR.glob("*"))
    assert demo.DIT_WEIGHTS in files and demo.FEATURE_WEIGHTS in files
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    from safetensors import safe_open

    with safe_open(str(demo.DIT_WEIGHTS), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert {k: config[k] for k in DIT_CONFIGS["tiny"]._fields} == DIT_CONFIGS["tiny"]._asdict()
    assert (config["input_size"], config["in_channels"], config["num_classes"], config["learn_sigma"]) == (8, 1, 10, False)
    record = json.loads((demo.WEIGHTS_DIR / "tiny-dit.json").read_text())
    assert {"settings", "final_loss", "fd", "fd_noise_floor"} <= set(record)


def test_demo_spec_is_the_pretrained_model(teacher):
    from graftc.spec import load_model

    loaded = load_model("demo:tiny-dit")
    assert loaded.family == "dit" and not loaded.model.training
    reference = teacher.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    x, t, y = loaded.args
    assert x.shape == (1, 1, 8, 8) and t.shape == y.shape == (1,)


def test_missing_or_corrupt_weights_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DIT_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(GraftError, match="demo DiT weights not found.*train_demo.py") as e:
        load_demo_dit()
    assert "\n" not in str(e.value)
    from graftc.spec import load_model

    with pytest.raises(GraftError, match="not found"):
        load_model("demo:tiny-dit")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00not a safetensors file at all")
    monkeypatch.setattr(demo, "FEATURE_WEIGHTS", bad)
    with pytest.raises(GraftError, match="cannot read digit feature network weights"):
        reference_stats()


# ------------------------------------------------------------------ feature network


def test_feature_net_classifies_digits(net):
    images, labels = digits()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:600]
    with torch.no_grad():
        acc = (net(images[idx]).argmax(1) == labels[idx]).float().mean().item()
        feats = net.features(images[idx[:8]])
    assert acc > 0.9
    assert feats.shape == (8, DigitFeatures.feature_dim) == (8, 64)


def test_reference_stats_are_those_of_the_whole_dataset(net):
    mu, sigma = reference_stats()
    assert mu.shape == (64,) and sigma.shape == (64, 64) and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, sigma.T)
    images, _ = digits()
    assert images.shape == (1797, 1, 8, 8) and float(images.min()) == -1.0 and float(images.max()) == 1.0
    mu2, sigma2 = feature_stats(images, net)
    np.testing.assert_allclose(mu2, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-4, atol=1e-5)
    assert frechet_distance(mu2, sigma2, mu, sigma) < 1e-6


# ------------------------------------------------------------------ Frechet distance


def scipy_fd(mu1, s1, mu2, s2):
    """The usual independent formula, with scipy's general (non-symmetric) matrix square root."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_cov(rng, d, rank=None):
    b = rng.standard_normal((d, rank or 2 * d))
    return b @ b.T / b.shape[1]


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_distance_matches_scipy(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ours, float)
    assert ours == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_frechet_distance_with_rank_deficient_covariances():
    rng = np.random.default_rng(7)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1 = random_cov(rng, d, rank=10)  # rank 10 of 32: singular
    s2 = random_cov(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    # Both singular: scipy needs its epsilon fudge there; compare with a tiny ridge instead.
    s2 = random_cov(rng, d, rank=6)
    ridge = 1e-10 * np.eye(d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_fd(mu1, s1 + ridge, mu2, s2 + ridge), rel=1e-5)
    # Same rank-deficient statistics: distance ~0, and never negative.
    assert 0.0 <= frechet_distance(mu1, s1, mu1, s1) < 1e-6


def test_frechet_distance_of_identical_stats_is_zero():
    mu, sigma = reference_stats()
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)
    assert frechet_distance(mu + 1.0, sigma, mu, sigma) == pytest.approx(64.0, rel=1e-5)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(GraftError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(GraftError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
    with pytest.raises(GraftError, match=r"\[N, 1, 8, 8\]"):
        feature_stats(torch.zeros(4, 8, 8))


# ------------------------------------------------------------------ demo FD


def randomized_tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = build_dit("tiny").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:  # undo adaLN-Zero, which would predict eps = 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def test_demo_fd_of_the_teacher_is_far_below_a_random_dit(teacher, net):
    ref = reference_stats()
    pretrained = demo_fd(teacher, n=200, steps=10, cfg_scale=1.0, seed=0, net=net, ref=ref)
    again = demo_fd(teacher, n=200, steps=10, cfg_scale=1.0, seed=0, net=net, ref=ref)
    random = demo_fd(randomized_tiny_dit(), n=200, steps=10, cfg_scale=1.0, seed=0, net=net, ref=ref)
    assert np.isfinite(pretrained) and pretrained == again  # seeded: deterministic
    assert pretrained < 0.2 * random, (pretrained, random)
