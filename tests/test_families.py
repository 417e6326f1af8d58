"""Every supported model family: regions found, exact self-graft, mlp resize, artifact round trip."""
from __future__ import annotations

import copy

import pytest
import torch

import graftc
from graftc.spec import load_model
from tests import zoo
from tests.helpers import graft, max_diff, perturb, plan_of, run, save_and_load

DEPTH = zoo.FAMILY_DEPTH
FAMILIES = zoo.FAMILIES
SELF_50 = plan_of(({"kind": "attention", "ratio": 0.5}, {"op": "self", "init": "copy"}),
                  ({"kind": "mlp", "ratio": 0.5, "strategy": "first"}, {"op": "self", "init": "copy"}))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    spec = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    loaded = load_model(spec)
    perturb(loaded.model)  # graftc's DiT starts adaLN-Zero: give every layer signal
    return spec, loaded


def test_inspect_counts(family):
    _, loaded = family
    regions = graftc.inspect_regions(loaded.model, loaded.example)
    kinds = [r.kind for r in regions]
    assert kinds.count("attention") == DEPTH
    assert kinds.count("mlp") == DEPTH
    assert kinds.count("block") == DEPTH
    for r in regions:
        assert r.cover, f"{r.kind} {r.fqn} has no module cover"
        assert r.params > 0 and r.flops > 0


def test_self_copy_reproduces_teacher(family, tmp_path):
    spec, loaded = family
    teacher, result = graft(loaded, SELF_50)
    assert len(result.rewrites) == DEPTH
    assert max_diff(teacher, run(result.model, loaded)) <= 1e-5
    assert type(result.model) is type(loaded.model)


def test_round_trip(family, tmp_path):
    spec, loaded = family
    plan = plan_of(({"kind": "attention", "layers": [0, 2]}, {"op": "self", "init": "random"}),
                   ({"kind": "mlp", "layers": "all"}, {"op": "mlp", "ratio": 3}))
    _, result = graft(loaded, plan)
    grafted = run(result.model, loaded)
    reloaded = save_and_load(result, spec, tmp_path / "out")
    assert type(reloaded) is type(loaded.model)
    assert max_diff(grafted, run(reloaded, loaded)) == 0.0


def test_mlp_ratio_changes_width_and_keeps_shapes(family):
    spec, loaded = family
    teacher, result = graft(loaded, plan_of(({"kind": "mlp", "layers": "all"}, {"op": "mlp", "ratio": 1})))
    out = run(result.model, loaded)
    assert [t.shape for t in teacher] == [o.shape for o in out]
    assert all(torch.isfinite(o).all() for o in out)
    for record in result.rewrites:
        region = record["region"]
        for role, fqn in region["roles"].items():
            linear = result.model.get_submodule(fqn)
            hidden = linear.out_features if role in ("w_in", "w_gate", "w_up") else linear.in_features
            assert hidden == region["attrs"]["width"]
    assert result.reports[-1].params_after < result.reports[0].params_before


def test_wider_mlp_from_teacher_is_exact(family):
    _, loaded = family
    teacher, result = graft(loaded, plan_of(({"kind": "mlp", "layers": "all"}, {"op": "mlp", "ratio": 6})))
    assert max_diff(teacher, run(result.model, loaded)) <= 1e-5


def test_random_self_graft_changes_outputs(family):
    _, loaded = family
    teacher, result = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "self", "init": "random"})))
    assert max_diff(teacher, run(result.model, loaded)) > 1e-4


def test_emit_code_shows_rewritten_forward(family):
    _, loaded = family
    _, result = graft(loaded, plan_of(({"kind": "mlp", "layers": [1]}, {"op": "mlp", "ratio": 2})))
    fqn = result.rewrites[0]["fqn"]
    code = graftc.compiler.emit_code(result.model, loaded.example, [fqn])
    assert f"forward of {fqn}" in code and "aten.linear" in code


def test_attention_with_rotary_tables_made_by_a_matmul_is_found():
    """transformers 5.17 builds RoPE's angles as inv_freq @ positions (a GEMM of a buffer): the q/k path still leads
    back to the q and k Linears, and the region is found."""
    import torch.nn.functional as F

    from graftc.match import inspect_regions

    class RotaryAttention(torch.nn.Module):
        def __init__(self, width=16, heads=2):
            super().__init__()
            self.heads, self.dh = heads, width // heads
            self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
            self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, self.dh, 2).float() / self.dh))

        def forward(self, x):
            b, n, _ = x.shape
            positions = torch.arange(n, device=x.device).float()
            angles = (self.inv_freq[:, None] @ positions[None, :]).transpose(0, 1)  # [n, dh / 2], a matmul
            cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

            def rope(t):
                half = t.shape[-1] // 2
                return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

            q, k, v = (p(x).view(b, n, self.heads, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(b, n, -1))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = RotaryAttention()

        def forward(self, x):
            return x + self.attn(x)

    regions = inspect_regions(Block().eval(), (torch.randn(1, 5, 16),))
    assert [(r.kind, r.fqn) for r in regions if r.kind == "attention"] == [("attention", "attn")]


@torch.no_grad()
def test_diffusers_teacher_samples_apply_guidance(tmp_path):
    """A class-conditional diffusers DiT's teacher samples with classifier-free guidance (one batched call through
    graftc.diffusion.guided_eps) follow eps_u + s (eps_c - eps_u) from separate conditional and null-class calls
    in the same DDIM loop; guidance changes them."""
    from graftc.distill.data import generator
    from graftc.families import make_task
    from graftc.plan import parse_plan

    loaded = load_model(zoo.diffusers_dit(tmp_path / "dit"))
    perturb(loaded.model)  # outputs that depend on the label
    rows, scale = torch.arange(4), 2.0

    def samples(cfg_scale):
        data = parse_plan({"version": 1, "data": {"sampler_steps": 3, "cfg_scale": cfg_scale}}).data
        task = make_task(loaded, data, seed=0)
        return task, task.generate(loaded.model, rows)["x0"]

    task, guided = samples(scale)
    scheduler = copy.deepcopy(task.scheduler)
    scheduler.set_timesteps(3)
    x = torch.randn(4, task.channels, task.size, task.size, generator=generator(0, "samples", 0))
    x = x * scheduler.init_noise_sigma
    labels = rows % task.classes
    for t in scheduler.timesteps:
        inp, tt = scheduler.scale_model_input(x, t), torch.full((4,), int(t))
        cond, uncond = (loaded.model(hidden_states=inp, timestep=tt, class_labels=y).sample[:, :task.channels]
                        for y in (labels, torch.full_like(labels, task.classes)))
        x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    assert torch.allclose(guided, x, atol=1e-5), float((guided - x).abs().max())
    assert (guided - samples(1.0)[1]).abs().max() > 1e-3
