"""Vision transformers: transformers ViT/DeiT folders load with pixel_values, swa2d on their patch grid keeps the
class (and distillation) tokens global, stage 1 distills on real images and `graftc eval` reports top-1 agreement;
the timm: loader where timm imports."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import graftc
from graftc.cli import main
from graftc.errors import GraftError
from graftc.passes.local_attention import grid_attention
from graftc.spec import load_model
from tests import zoo
from tests.helpers import graft, max_diff, perturb, plan_of, run, save_and_load

BUILDERS = {"vit": zoo.vit, "deit": zoo.deit}
PREFIX = {"vit": 1, "deit": 2}  # class token; class + distillation token
GRID = zoo.VIT_IMAGE // zoo.VIT_PATCH


@pytest.fixture(scope="module", params=list(BUILDERS))
def vision(request, tmp_path_factory):
    spec = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    loaded = load_model(spec)
    perturb(loaded.model)
    return request.param, spec, loaded


def reference_mask(prefix: int, height: int, width: int, kernel: int) -> torch.Tensor:
    """[N, N] which keys each query sees, written out by rule: prefix tokens see and are seen by every token; a
    patch sees the patches within kernel // 2 rows and columns of it."""
    tokens = prefix + height * width
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    radius = kernel // 2
    for i in range(tokens):
        for j in range(tokens):
            if i < prefix or j < prefix:
                mask[i, j] = True
            else:
                (qy, qx), (ky, kx) = divmod(i - prefix, width), divmod(j - prefix, width)
                mask[i, j] = abs(qy - ky) <= radius and abs(qx - kx) <= radius
    return mask


# ------------------------------------------------------------------------------------------- loading, inspect
def test_folder_loads_as_an_image_classifier_with_pixel_values(vision):
    name, spec, loaded = vision
    assert loaded.family == "image-classifier"
    pixels = loaded.kwargs["pixel_values"]
    assert pixels.shape == (1, 3, zoo.VIT_IMAGE, zoo.VIT_IMAGE) and pixels.dtype == torch.float32
    from transformers import AutoModelForImageClassification

    fresh = AutoModelForImageClassification.from_pretrained(spec).eval()
    assert type(fresh) is type(loaded.model)
    with torch.no_grad():
        assert torch.equal(load_model(spec).model(pixel_values=pixels).logits, fresh(pixel_values=pixels).logits)


def test_inspect_finds_the_grid_after_the_prefix_tokens(vision, capsys):
    name, spec, _ = vision
    assert main(["inspect", spec, "--json"]) == 0
    regions = json.loads(capsys.readouterr().out)
    attention = [r for r in regions if r["kind"] == "attention"]
    assert [r["fqn"] for r in attention] == [f"{name}.layers.{i}.attention" for i in range(2)]
    assert sum(r["kind"] == "mlp" for r in regions) == 2
    found = graftc.inspect_regions(*(lambda l: (l.model, l.example))(load_model(spec)))
    for region in (r for r in found if r.kind == "attention"):
        assert region.input_shape[-2] == PREFIX[name] + GRID * GRID
        assert region.attrs["grid"] == [GRID, GRID] and region.attrs["prefix"] == PREFIX[name]


def test_a_model_without_image_sizes_in_its_config_gets_no_pixel_values(tmp_path):
    """BERT takes input_ids: the image path must not claim it."""
    loaded = load_model(zoo.bert(tmp_path))
    assert loaded.family == "transformers" and "pixel_values" not in loaded.kwargs


# ------------------------------------------------------------------------------------------- swa2d with prefix tokens
@pytest.mark.parametrize("prefix,grid,kernel", [(1, (4, 4), 3), (2, (3, 5), 3), (1, (5, 4), 1), (0, (4, 4), 3)])
def test_grid_attention_matches_the_explicit_mask(prefix, grid, kernel):
    gen = torch.Generator().manual_seed(0)
    tokens = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, tokens, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(prefix, *grid, kernel))
    got = grid_attention(q, k, v, grid, kernel, prefix)
    assert (got - expected).abs().max() < 1e-12
    dout = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(expected, (q, k, v), dout), torch.autograd.grad(got, (q, k, v), dout)):
        assert (a - b).abs().max() < 1e-12
    # float32 through the blocked CPU kernel
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    assert (grid_attention(q32, k32, v32, grid, kernel, prefix) - expected.float()).abs().max() < 1e-5


def test_swa2d_in_the_model_is_the_masked_teacher_attention(vision):
    """The grafted layer (init: teacher) equals the teacher's q/k/v/o with the explicit mask: the prefix was
    inferred, the grid placed after it."""
    name, _, loaded = vision
    _, result = graft(loaded, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "kernel": 3})))
    teacher = getattr(loaded.model, name).layers[0].attention
    operator = getattr(result.model, name).layers[0].attention.operator
    assert operator.prefix == PREFIX[name] and operator.grid == (GRID, GRID)
    tokens, heads, dh = PREFIX[name] + GRID * GRID, operator.heads, operator.head_dim
    x = torch.randn(2, tokens, heads * dh, generator=torch.Generator().manual_seed(1))
    split = lambda t: t.view(2, tokens, heads, dh).transpose(1, 2)  # noqa: E731
    q, k, v = split(teacher.q_proj(x)), split(teacher.k_proj(x)), split(teacher.v_proj(x))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(PREFIX[name], GRID, GRID, 3))
    expected = teacher.o_proj(y.transpose(1, 2).reshape(2, tokens, heads * dh))
    with torch.no_grad():
        assert (operator(x) - expected).abs().max() < 1e-5


def test_full_window_swa2d_reproduces_the_teacher_and_a_small_one_does_not(vision):
    _, _, loaded = vision
    teacher, full = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 99})))
    assert max_diff(teacher, run(full.model, loaded)) <= 1e-5
    _, local = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 1})))
    assert max_diff(teacher, run(local.model, loaded)) > 1e-4
    assert local.reports[-1].flops_after < full.reports[-1].flops_after


def test_explicit_grid_needs_the_prefix_said(vision):
    name, _, loaded = vision
    tokens = PREFIX[name] + GRID * GRID
    with pytest.raises(GraftError, match=f"grid 4x4 does not hold the region's {tokens} tokens"):
        graft(loaded, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "grid": [4, 4]})))
    with pytest.raises(GraftError, match=f"grid 2x8 after 3 prefix tokens does not hold the region's {tokens} tokens"):
        graft(loaded, plan_of(({"kind": "attention", "layers": [0]}, {"op": "swa2d", "grid": [2, 8], "prefix": 3})))
    teacher, inferred = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 3})))
    _, said = graft(loaded, plan_of(({"kind": "attention", "layers": "all"},
                                     {"op": "swa2d", "kernel": 3, "grid": [4, 4], "prefix": PREFIX[name]})))
    assert max_diff(run(inferred.model, loaded), run(said.model, loaded)) == 0.0


def test_swa2d_graft_round_trips_bit_exactly(vision, tmp_path):
    """The prefix is part of the recorded region: the reloaded graft places the grid where the graft did."""
    _, spec, loaded = vision
    _, result = graft(loaded, plan_of(({"kind": "attention", "ratio": 0.5}, {"op": "swa2d", "kernel": 3})))
    perturb(result.model, seed=1)  # as if distilled
    grafted = run(result.model, loaded)
    reloaded = save_and_load(result, spec, tmp_path / "out")
    assert type(reloaded) is type(loaded.model)
    with torch.no_grad():
        assert max_diff(grafted, run(reloaded, loaded)) == 0.0


# ------------------------------------------------------------------------------------------- data, distillation, eval
def test_digits_are_scaled_and_normalized_as_the_model_expects(tmp_path):
    from graftc.families import make_task
    from graftc.models.demo import load_digits_tensor
    from graftc.plan import parse_plan

    spec = zoo.vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.25, 0.125]}))
    task = make_task(load_model(spec), parse_plan({"version": 1}).data, seed=0)
    task.prepare(None, log=lambda line: None)
    images = torch.cat([task.samples["x0"], task.test["x0"]])
    labels = torch.cat([task.samples["y"], task.test["y"]])
    assert images.shape == (1797, 3, 16, 16) and len(task.test["x0"]) == 359
    digits, digit_labels = load_digits_tensor()
    assert sorted(labels.tolist()) == sorted(digit_labels.tolist())
    # pixel values back in [0, 1], identical over channels, each channel normalized with its own mean and std
    pixels = images * torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1) + torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # each image is its digit upsampled: pooled back to 8 x 8 it is close to the original
    pooled = F.avg_pool2d(pixels[:, :1], 2) * 2 - 1
    distance = torch.cdist(pooled[:5].flatten(1), digits.flatten(1)).min(1).values
    assert distance.max() < 2.5  # vs > 10 between unrelated digits
    # held-out images are never among the training or validation samples
    train = {tuple(x.flatten().tolist()) for x in task.samples["x0"]}
    assert not any(tuple(x.flatten().tolist()) in train for x in task.test["x0"][:50])
    batch = task.batch("stage1", 0, 8)
    assert set(batch.kwargs) == {"pixel_values"} and batch.kwargs["pixel_values"].shape == (8, 3, 16, 16)


def test_a_processor_mean_that_does_not_fit_the_channels_is_one_clear_error(tmp_path):
    from graftc.families import make_task
    from graftc.plan import parse_plan

    spec = zoo.vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5],
                                                                           "image_std": [0.5, 0.5]}))
    with pytest.raises(GraftError, match=r"preprocessor_config.json: image_mean \[0.5, 0.5\] and image_std "
                                         r"\[0.5, 0.5\] do not fit the model's 3 channels"):
        make_task(load_model(spec), parse_plan({"version": 1}).data, 0).prepare(None, log=lambda line: None)


def test_images_file_is_checked_against_the_model(tmp_path):
    from safetensors.torch import save_file

    from graftc.families import make_task
    from graftc.plan import parse_plan

    loaded = load_model(zoo.vit(tmp_path / "vit"))
    bad = tmp_path / "bad.safetensors"
    save_file({"x0": torch.zeros(4, 3, 8, 8)}, str(bad))
    data = parse_plan({"version": 1, "data": {"images": str(bad)}}).data
    with pytest.raises(GraftError, match=r"needs x0 \[N, 3, 16, 16\], the model's input \(got \(4, 3, 8, 8\)\)"):
        make_task(loaded, data, 0).prepare(None, log=lambda line: None)
    good = tmp_path / "good.safetensors"
    save_file({"x0": torch.randn(20, 3, 16, 16), "y": torch.arange(20) % 10}, str(good))
    task = make_task(loaded, parse_plan({"version": 1, "data": {"images": str(good)}}).data, 0)
    task.prepare(None, log=lambda line: None)
    assert len(task.test["x0"]) == 4 and len(task.samples["x0"]) == 16


@pytest.fixture(scope="module")
def digits_vit(tmp_path_factory):
    """The zoo ViT trained on the digits' training images for a few seconds (a teacher with real predictions)."""
    from graftc.families import make_task
    from graftc.plan import parse_plan

    model = zoo.make_vit().train()
    folder = tmp_path_factory.mktemp("digits-vit")
    spec = zoo._save(model, folder)  # only for the config: the trained weights are saved below
    task = make_task(load_model(spec), parse_plan({"version": 1}).data, seed=0)
    task.prepare(None, log=lambda line: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        batch = task.batch("teacher", step, 64)
        loss = F.cross_entropy(model(**batch.kwargs).logits, batch.target["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return zoo._save(model.eval(), folder)


def test_distillation_on_digits_brings_a_swa2d_graft_closer_and_eval_reports_top1(digits_vit, tmp_path, capsys):
    """Stage 1 fits each grafted layer to the teacher's on the digits (its validation loss falls); stage 2 then
    raises the top-1 agreement of the whole classifier on the held-out images. (Stage 1 alone can lower it: the
    class token's rows are exact at init, and per-layer training trades them for the patch rows; see README.)"""
    plan = {"version": 1, "graft": [{"select": {"kind": "attention", "layers": [0, 1]},
                                     "replace": {"op": "swa2d", "kernel": 3}}]}
    distill = {"stage1": {"steps": 30, "batch_size": 32, "lr": 3e-3},
               "stage2": {"steps": 60, "batch_size": 32, "lr": 1e-3, "warmup": 10}}
    results = {}
    for name, extra in {"rewrite": {}, "distilled": {"distill": distill}}.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps({**plan, **extra}))
        assert main(["compile", digits_vit, str(tmp_path / f"{name}.yaml"), "-o", str(tmp_path / name)]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / name), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    for node in json.loads((tmp_path / "distilled" / "manifest.json").read_text())["distill"]["stage1"]:
        assert node["best_val"] < 0.75 * node["val_before"], node
    before, after = results["rewrite"]["agreement"], results["distilled"]["agreement"]
    assert before["inputs"] == after["inputs"] == 359 and before["images"] == "demo:digits"
    assert after["mse"] < 0.5 * before["mse"]
    assert after["top1_agreement"] > before["top1_agreement"]
    models = results["distilled"]["models"]
    assert models["teacher"]["top1_accuracy"] > 0.5  # the teacher really classifies the digits
    assert abs(models["graft"]["top1_accuracy"] - models["teacher"]["top1_accuracy"]) < 0.1
    # the reported top-1 agreement, recomputed here from the artifact on the held-out images
    from graftc.families import make_task
    from graftc.plan import parse_plan

    loaded = load_model(digits_vit)
    student = graftc.load(tmp_path / "distilled", model=copy.deepcopy(loaded.model))
    task = make_task(loaded, parse_plan({"version": 1}).data, seed=0)
    task.prepare(None, log=lambda line: None)
    same = total = 0
    with torch.no_grad():
        for batch in task.eval_batches(64):
            ours, theirs = student(**batch.kwargs).logits, loaded.model(**batch.kwargs).logits
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += batch.size
    assert after["top1_agreement"] == same / total


# ------------------------------------------------------------------------------------------- timm
def _timm_or_reason():
    try:
        import timm  # noqa: F401
    except Exception as exc:  # ImportError, or its torchvision failing to load beside this torch
        return f"timm does not import here ({type(exc).__name__}: {str(exc)[:80]})"
    return None


@pytest.mark.skipif(_timm_or_reason() is not None, reason=str(_timm_or_reason()))
def test_timm_vit_loads_inspects_and_grafts():
    spec = "timm:vit_tiny_patch16_224:img_size=16,patch_size=4,depth=2,embed_dim=32,num_heads=2,num_classes=10"
    loaded = load_model(spec)
    assert loaded.family == "image-classifier" and loaded.args[0].shape == (1, 3, 16, 16)
    perturb(loaded.model)
    regions = [r for r in graftc.inspect_regions(loaded.model, loaded.example) if r.kind == "attention"]
    assert len(regions) == 2 and all(r.attrs["grid"] == [4, 4] and r.attrs["prefix"] == 1 for r in regions)
    teacher, copied = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "self", "init": "copy"})))
    assert max_diff(teacher, run(copied.model, loaded)) <= 1e-5
    _, full = graft(loaded, plan_of(({"kind": "attention", "layers": "all"}, {"op": "swa2d", "kernel": 99})))
    assert max_diff(teacher, run(full.model, loaded)) <= 1e-5
