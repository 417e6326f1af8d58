"""graftc.diffusion: DiT's DDPM schedule, the DDIM sampler and the DiT eps function (with CFG)."""
import pytest
import torch

from graftc.diffusion import Diffusion, dit_eps, sample_dit
from graftc.errors import GraftError
from graftc.models.dit import build_dit


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion()


def small_random_dit(seed=0, **kw):
    """A 2-block tiny DiT whose zero-initialised (adaLN-Zero) layers are re-drawn, so it predicts non-zero eps."""
    torch.manual_seed(seed)
    model = build_dit("tiny", depth=2, hidden_size=32, num_heads=2, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_schedule_is_dits(diffusion):
    assert diffusion.num_timesteps == 1000 and diffusion.alphas_cumprod.dtype == torch.float64
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(diffusion.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert diffusion.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    assert float(diffusion.alphas_cumprod[-1]) < 1e-4  # x_T is (almost) pure noise


def test_add_noise_formula(diffusion):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    out = diffusion.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        a = float(diffusion.alphas_cumprod[ti])
        torch.testing.assert_close(out[i], a**0.5 * x0[i] + (1 - a) ** 0.5 * noise[i])
    with pytest.raises(GraftError, match=r"\[0, 1000\)"):
        diffusion.add_noise(x0, noise, torch.tensor([0, 1, 2, 1000]))


def test_sample_timesteps_range_and_seed(diffusion):
    t = diffusion.sample_timesteps(5000, torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) == 999 and int(t.min()) == 0
    assert torch.equal(t, diffusion.sample_timesteps(5000, torch.Generator().manual_seed(1)))


def test_loss_of_the_oracle_is_zero_and_is_seeded(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1

    def oracle(x_t, t):  # knows x0, so it can recover the exact noise
        a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    assert float(diffusion.loss(oracle, x0, torch.Generator().manual_seed(3))) < 1e-8
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    l1 = diffusion.loss(zero, x0, torch.Generator().manual_seed(3))
    assert float(l1) == pytest.approx(1.0, abs=0.15)  # E[noise^2] = 1
    assert torch.equal(l1, diffusion.loss(zero, x0, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_ddim_with_an_oracle_returns_x0(diffusion, steps):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    seen = []

    def oracle(x_t, t):
        seen.append(int(t[0]))
        assert t.dtype == torch.int64 and t.shape == (6,)
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = diffusion.sample(oracle, noise, steps=steps)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    assert len(seen) == steps and seen[0] == 999 and seen == sorted(seen, reverse=True)
    assert steps == 1 or seen[-1] == 0


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_ddim_steps_follow_the_closed_form(diffusion, steps):
    """With a noise prediction that is not the oracle's, every step must be DDIM's (eta = 0) update, written here
    in its ODE form: x_prev / sqrt(a_prev) = x_t / sqrt(a_t) + (sigma_prev - sigma_t) eps, sigma = sqrt((1 - a) / a),
    from T-1 down to a_prev = 1 after the last visited timestep."""
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)

    def eps_fn(x_t, t):  # depends on x_t and t, like a network, and recovers no x0
        return 0.5 * torch.tanh(x_t) + bias * (t.view(-1, 1, 1, 1).double() + 1) / 1000

    a = diffusion.alphas_cumprod
    visited = [round(999 - i * 999 / (steps - 1)) for i in range(steps)] if steps > 1 else [999]
    x = noise.clone()
    for i, t in enumerate(visited):
        a_t, a_prev = float(a[t]), float(a[visited[i + 1]]) if i + 1 < steps else 1.0
        eps = eps_fn(x, torch.full((3,), t))
        sigma_t, sigma_prev = ((1 - a_t) / a_t) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5
        x = (x / a_t**0.5 + (sigma_prev - sigma_t) * eps) * a_prev**0.5
    torch.testing.assert_close(diffusion.sample(eps_fn, noise, steps=steps), x, rtol=1e-9, atol=1e-9)


def test_ddim_timesteps_are_evenly_spaced(diffusion):
    assert diffusion.ddim_timesteps(4) == [999, 666, 333, 0]
    assert len(set(diffusion.ddim_timesteps(1000))) == 1000
    with pytest.raises(GraftError, match="steps"):
        diffusion.ddim_timesteps(0)


def test_dit_eps_shapes_and_cfg():
    model = small_random_dit()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([999, 500, 1])
    labels = torch.tensor([0, 4, 9])
    calls = []
    hook = model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        plain = dit_eps(model, labels, 1.0)(x, t)
        guided = dit_eps(model, labels, 3.0)(x, t)
        cond = model(x, t, labels)
        uncond = model(x, t, torch.full_like(labels, 10))
    hook.remove()
    assert calls[:2] == [3, 6]  # cfg: cond and uncond halves in one batch
    assert plain.shape == guided.shape == (3, 1, 8, 8)
    torch.testing.assert_close(plain, cond)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, guided)
    with pytest.raises(GraftError, match="labels"):
        dit_eps(model, torch.tensor([10]))


def test_dit_eps_keeps_only_the_eps_channels_of_learn_sigma_models():
    model = small_random_dit(learn_sigma=True)
    assert model.out_channels == 2
    with torch.no_grad():
        eps = dit_eps(model, torch.tensor([1, 2]), 2.0)(torch.randn(2, 1, 8, 8), torch.tensor([10, 10]))
    assert eps.shape == (2, 1, 8, 8)


def test_sample_dit_is_deterministic_and_batch_independent():
    model = small_random_dit()
    labels = torch.arange(5) % 10
    a = sample_dit(model, labels, steps=4, cfg_scale=1.5, generator=torch.Generator().manual_seed(0), batch_size=5)
    b = sample_dit(model, labels, steps=4, cfg_scale=1.5, generator=torch.Generator().manual_seed(0), batch_size=2)
    c = sample_dit(model, labels, steps=4, cfg_scale=1.5, generator=torch.Generator().manual_seed(1), batch_size=5)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not model.training


def test_sample_dit_follows_the_model_dtype():
    model = small_random_dit().double()
    out = sample_dit(model, [1, 2], steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and out.shape == (2, 1, 8, 8)
