"""graftc eval: the metrics against independent computations, and the CLI on the demo model and an artifact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from graftc import evaluate
from graftc.cli import main
from graftc.families.dit import sample_quality
from graftc.models.demo import frechet_distance

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def scipy_fd(mu1, s1, mu2, s2):
    """The usual FID formula (pytorch-fid): sqrtm of s1 s2, with an epsilon on the diagonal if it fails."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.5, size=(150, 16)) @ rng.normal(size=(16, 16))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert evaluate.fd_of_features(a, b) == pytest.approx(want, rel=1e-8)
    assert evaluate.fd_of_features(a, (mu2, s2)) == pytest.approx(want, rel=1e-8)
    assert evaluate.fd_of_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_matches_scipy_near_singular():
    rng = np.random.default_rng(1)
    # rank-3 covariances in 12 dimensions, plus a tiny ridge: condition numbers around 1e9
    a = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 12))
    b = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 12)) + 0.5
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False) + 1e-8 * np.eye(12)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False) + 1e-8 * np.eye(12)
    assert np.linalg.cond(s1) > 1e6 and np.linalg.cond(s2) > 1e6
    want = scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # exactly singular: fewer samples than dimensions
    a, b = rng.normal(size=(6, 12)), rng.normal(size=(8, 12)) * 2
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert evaluate.fd_of_features(a, b) == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-4)


def test_fd_of_few_rows_in_many_dimensions():
    # fewer rows than dimensions (Inception features of a few samples) take the low-rank route: same distance
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 300)), rng.normal(0.2, 1.3, size=(30, 300)) @ rng.normal(size=(300, 300)) / 17
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert evaluate.fd_of_features(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert evaluate.fd_of_features(a, a.copy()) == pytest.approx(0.0, abs=1e-9)


def test_inception_score_uniform_and_one_hot():
    k = 10
    assert evaluate.inception_score(np.zeros((50, k))) == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(60) % k]
    assert evaluate.inception_score(one_hot, probs=True) == pytest.approx(k)
    assert evaluate.inception_score(one_hot * 100.0) == pytest.approx(k, rel=1e-6)  # confident logits
    assert evaluate.inception_score(np.eye(k)[np.zeros(20, int)], probs=True) == pytest.approx(1.0)  # one class
    # general logits: exp of the mean KL(p(y|x) || p(y)), computed here with scipy
    from scipy.special import rel_entr, softmax

    logits = np.random.default_rng(4).normal(scale=2.0, size=(40, k))
    p_yx = softmax(logits, axis=1)
    want = np.exp(rel_entr(p_yx, p_yx.mean(0, keepdims=True)).sum(1).mean())
    assert evaluate.inception_score(logits) == pytest.approx(want, rel=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8))
    assert evaluate.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert evaluate.precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)
    # fakes covering only part of the real manifold: high precision, lower recall
    p, r = evaluate.precision_recall(x, x[x[:, 0] > 0.5] * 0.5 + np.array([0.5] + [0] * 7) * 0.5, k=3)
    assert p > 0.9 and r < 0.6


def test_bad_features_and_target(capsys):
    for argv in (["eval", "demo:tiny-dit", "--features", "bogus"], ["eval", "demo:tiny-dit", "--features", "inception:/no/such.pth"],
                 ["eval", "/no/such/artifact"], ["eval", "demo:tiny-dit", "--samples", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("graftc: error: ") and err.count("\n") == 1, err


def test_eval_demo(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "demo:tiny-dit", "--samples", "50", "--steps", "5", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FD (lower is better)" in printed and "teacher" in printed
    result = json.loads(out.read_text())
    teacher = result["models"]["teacher"]
    assert list(result["models"]) == ["teacher"] and "agreement" not in result
    # fixed-seed regression values (measured; precision and recall may move by one sample of 50)
    assert teacher["fd"] == pytest.approx(49.6177, rel=1e-3) and teacher["sfid"] == pytest.approx(120.060, rel=1e-3)
    assert teacher["is"] == pytest.approx(9.7765, rel=1e-3)
    assert teacher["precision"] == pytest.approx(0.98, abs=0.021)
    assert teacher["recall"] == pytest.approx(0.6717, abs=0.021)
    assert teacher["params"] == 1868036 and teacher["flops"] > 1e7 and result["latency"]["teacher_ms"] > 0


def test_eval_artifact(tmp_path, capsys):
    art = tmp_path / "graft"
    assert main(["compile", "demo:tiny-dit", str(EXAMPLES / "attn50-mlp100.yaml"), "-o", str(art)]) == 0
    capsys.readouterr()
    assert main(["eval", str(art), "--samples", "40", "--steps", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["teacher"] == "demo:tiny-dit"
    teacher, graft = result["models"]["teacher"], result["models"]["graft"]
    assert teacher["fd"] > 0 and graft["fd"] > 0 and "is" in graft and "precision" in graft
    assert graft["params"] < teacher["params"] and graft["flops"] < teacher["flops"]
    agree = result["agreement"]
    assert agree["inputs"] > 0 and agree["mse"] > 0 and -1 <= agree["cosine"] < 1
    speed = result["latency"]
    assert speed["teacher_ms"] > 0 and speed["graft_ms"] > 0 and speed["speedup"] > 0
    # a student evaluated against itself as teacher agrees exactly
    assert main(["eval", "demo:tiny-dit", "--teacher", "demo:tiny-dit", "--samples", "8", "--steps", "2", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["agreement"]
    assert same["mse"] == 0 and same["cosine"] == pytest.approx(1.0)


class _Pixels(evaluate.FeatureExtractor):
    """A stand-in extractor: raw pixels as features, no spatial features or logits."""

    name = "pixels"
    image_shape = (1, 8, 8)

    def features(self, images):
        return images.double().flatten(1).numpy()

    def reference(self):
        from graftc.models.demo import load_digits_tensor

        return {"features": self.features(load_digits_tensor()[0])}


def test_pluggable_extractor():
    from graftc.diffusion import sample_dit
    from graftc.models.demo import load_demo_dit

    out = sample_quality(load_demo_dit(), _Pixels(), n=20, steps=3, cfg=1.0, seed=0)
    assert set(out) == {"fd", "precision", "recall"}
    # FD recomputed on the same features: the same samples drawn here, scipy's sqrtm on their statistics
    images = sample_dit(load_demo_dit(), torch.arange(20) % 10, steps=3, cfg_scale=1.0,
                        generator=torch.Generator().manual_seed(0)).float().clamp(-1, 1)
    a, b = _Pixels().features(images), _Pixels().reference()["features"]
    want = scipy_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert out["fd"] == pytest.approx(want, rel=1e-6)
    # fixed-seed regression values (measured)
    assert out["fd"] == pytest.approx(5.72190, rel=1e-4)
    assert out["precision"] == pytest.approx(0.9) and out["recall"] == pytest.approx(0.75626, rel=1e-4)


class _PixelsWithStats(_Pixels):
    """Spatial features too, and a reference of statistics only (as an .npz of mu/sigma/mu_s/sigma_s gives)."""

    def spatial(self, images):
        return images.double()[:, :, ::2, ::2].flatten(1).numpy()

    def reference(self):
        from graftc.models.demo import load_digits_tensor

        digits = load_digits_tensor()[0]
        f, s = self.features(digits), self.spatial(digits)
        return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False),
                "mu_s": s.mean(0), "sigma_s": np.cov(s, rowvar=False)}


def test_statistics_only_reference_gives_fd_and_sfid():
    from graftc.models.demo import load_demo_dit

    out = sample_quality(load_demo_dit(), _PixelsWithStats(), n=20, steps=3, cfg=1.0, seed=0)
    assert set(out) == {"fd", "sfid"} and out["fd"] > 0 and out["sfid"] > 0  # no reference rows: no precision/recall
    assert out == sample_quality(load_demo_dit(), _PixelsWithStats(), n=20, steps=3, cfg=1.0, seed=0)


def test_encoder_embedding_cosine(tmp_path, capsys):
    import copy

    import graftc
    from graftc.spec import load_model
    from tests import zoo
    from tests.helpers import plan_of

    spec = zoo.bert(tmp_path / "bert")
    zoo.tiny_t5_tokenizer().save_pretrained(spec)
    text = tmp_path / "text.txt"
    text.write_text("the photo of a cat on the red dog in a blue photo " * 40)
    loaded = load_model(spec)

    def agreement(op: dict) -> dict:
        graft = graftc.compile(copy.deepcopy(loaded.model), plan_of(({"kind": "attention", "layers": [0]}, op)),
                               loaded.example).model
        return evaluate.agreement(loaded.model, graft, loaded, samples=8, steps=1, cfg=1.0, seed=0, text=str(text))

    same = agreement({"op": "self", "init": "copy"})
    assert same["embedding_cosine"] == pytest.approx(1.0, abs=1e-6) and same["inputs"] > 0
    other = agreement({"op": "self", "init": "random"})
    assert other["embedding_cosine"] < 1 - 1e-4
    # pooling: the attention-mask-weighted mean over the tokens
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    emb = evaluate.sentence_embedding(type("Out", (), {"last_hidden_state": hidden})(), mask)
    assert torch.allclose(emb[0], hidden[0, :3].double().mean(0)) and torch.allclose(emb[1], hidden[1].double().mean(0))
    # shown by the table
    result = {"settings": {"samples": 8, "steps": 1, "cfg": 1.0, "seed": 0, "features": None},
              "models": {"teacher": {}, "graft": {}}, "notes": [], "agreement": other,
              "latency": {"where": "cpu", "teacher_ms": 1.0, "graft_ms": 1.0, "speedup": 1.0}}
    assert "sentence-embedding cosine" in evaluate.table(result)


def test_perplexity_of_a_language_model_and_its_graft(tmp_path, capsys):
    import json as _json
    import math as _math

    from graftc.cli import main as cli
    from tests import zoo

    spec = zoo.qwen3(tmp_path / "qwen3")
    zoo.tiny_t5_tokenizer().save_pretrained(spec)
    text = tmp_path / "text.txt"
    text.write_text("the photo of a cat on the red dog in a blue photo " * 80)
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ngraft:\n  - select: {kind: attention, layers: [1]}\n    replace: {op: swa, window: 2}\n")
    assert cli(["compile", spec, str(plan), "-o", str(tmp_path / "graft")]) == 0
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "graft"), "--text", str(text), "--json", "--samples", "8"]) == 0
    result = _json.loads(capsys.readouterr().out)
    ppl = {name: m["perplexity"] for name, m in result["models"].items()}
    assert len(ppl) == 2 and all(_math.isfinite(v) and v > 1 for v in ppl.values())
    assert len(set(ppl.values())) == 2  # the graft changed the model
    assert "agreement" in result and "embedding_cosine" not in result["agreement"]  # a causal LM, not an encoder


def test_output_error_is_the_mean_squared_difference_of_the_task_outputs():
    """The one output MSE (eval's agreement, sweep, sensitivity): over every value of the task's outputs in every
    batch, batches of any size; `each` sees every batch with its outputs."""
    from types import SimpleNamespace

    from graftc.distill.data import Batch

    torch.manual_seed(0)
    xs = [torch.randn(3, 4), torch.randn(1, 4)]
    task = SimpleNamespace(val_batches=lambda size: [Batch((x,), {}) for x in xs], output=lambda out: out[:, :2])
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    seen = []
    got = evaluate.output_error(task, teacher, student, 3, each=lambda b, t_out, s_out, t, s: seen.append(t.shape))
    with torch.no_grad():
        want = torch.cat([student(x)[:, :2].double() - teacher(x)[:, :2].double() for x in xs]).pow(2).mean()
    assert got == pytest.approx(float(want), rel=1e-9) and seen == [(3, 2), (1, 2)]
