"""Checks for the tiny model factories in tests/zoo.py.

For each family: build into tmp_path, load back with the library's own
``from_pretrained(use_safetensors=True)``, compare a forward against the in-memory
twin, and ``torch.export.export(..., strict=False)`` the loaded model. The export
test prints the distinct aten ops and a few ``nn_module_stack`` entries (run with
``-s`` to see them).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))
import zoo  # noqa: E402


# --------------------------------------------------------------------------- inputs


def _gen():
    return torch.Generator().manual_seed(1234)


def dit_inputs():
    g = _gen()
    x = torch.randn(2, 4, 8, 8, generator=g)
    return (x,), {"timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 3])}


def pixart_inputs():
    g = _gen()
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, zoo.CAPTION_CHANNELS, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return (x,), {
        "encoder_hidden_states": text,
        "timestep": torch.tensor([10, 500]),
        "encoder_attention_mask": mask,
    }


def lm_inputs():
    ids = torch.randint(0, zoo.VOCAB_SIZE, (2, 6), generator=_gen())
    return (ids,), {"use_cache": False}


def bert_inputs():
    ids = torch.randint(0, zoo.VOCAB_SIZE, (2, 6), generator=_gen())
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return (ids,), {"attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def image_inputs():
    return (torch.randn(2, 3, zoo.VIT_IMAGE, zoo.VIT_IMAGE, generator=_gen()),), {}


def _load_dit(path):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(path, use_safetensors=True)


def _load_pixart(path):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(path, use_safetensors=True)


def _load_causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)


def _load_encoder(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, use_safetensors=True)


def _load_image_classifier(path):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)


# name -> (builder, in-memory twin, loader, inputs, expected class name)
FAMILIES = {
    "diffusers_dit": (zoo.diffusers_dit, zoo.make_diffusers_dit, _load_dit, dit_inputs, "DiTTransformer2DModel"),
    "pixart": (zoo.pixart, zoo.make_pixart, _load_pixart, pixart_inputs, "PixArtTransformer2DModel"),
    "qwen3": (zoo.qwen3, zoo.make_qwen3, _load_causal, lm_inputs, "Qwen3ForCausalLM"),
    "llama": (zoo.llama, zoo.make_llama, _load_causal, lm_inputs, "LlamaForCausalLM"),
    "bert": (zoo.bert, zoo.make_bert, _load_encoder, bert_inputs, "BertModel"),
    "vit": (zoo.vit, zoo.make_vit, _load_image_classifier, image_inputs, "ViTForImageClassification"),
    "deit": (zoo.deit, zoo.make_deit, _load_image_classifier, image_inputs, "DeiTForImageClassification"),
}

_loaded_cache: dict = {}


def _built_and_loaded(name, tmp_path_factory):
    """Build once per family per session (the export test reuses the round-trip's directory)."""
    if name not in _loaded_cache:
        builder, _, loader, _, _ = FAMILIES[name]
        path = builder(tmp_path_factory.mktemp(name))
        _loaded_cache[name] = (path, loader(path).eval())
    return _loaded_cache[name]


def _leaves(out):
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", list(FAMILIES))
def test_roundtrip_matches_in_memory(name, tmp_path_factory):
    _, make, _, inputs, cls_name = FAMILIES[name]
    path, loaded = _built_and_loaded(name, tmp_path_factory)

    assert isinstance(path, str)
    files = os.listdir(path)
    assert any(f.endswith(".safetensors") for f in files), files
    assert not any(f.endswith(".bin") for f in files), files
    assert type(loaded).__name__ == cls_name

    fresh = make()
    n_params = sum(p.numel() for p in fresh.parameters())
    assert n_params < 300_000, n_params
    # Same seed -> the in-memory twin has exactly the saved weights.
    ref_sd, got_sd = fresh.state_dict(), loaded.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k

    args, kwargs = inputs()
    with torch.no_grad():
        want = _leaves(fresh(*args, **kwargs))
        got = _leaves(loaded(*args, **kwargs))
    assert want and len(want) == len(got)
    for w, g in zip(want, got):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_builders_are_deterministic():
    a, b = zoo.make_qwen3(), zoo.make_qwen3()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize(
    "make, overrides, check",
    [
        (zoo.make_diffusers_dit, dict(depth=1, heads=4, head_dim=4), dict(num_layers=1, num_attention_heads=4)),
        (zoo.make_pixart, dict(depth=3, heads=1, head_dim=16), dict(num_layers=3, cross_attention_dim=16)),
        (zoo.make_qwen3, dict(depth=1, heads=4, kv_heads=1, head_dim=4), dict(num_key_value_heads=1, head_dim=4)),
        (zoo.make_llama, dict(depth=3, heads=2, kv_heads=1), dict(num_hidden_layers=3, hidden_size=16)),
        (zoo.make_bert, dict(depth=1, heads=4, head_dim=4), dict(num_hidden_layers=1, num_attention_heads=4)),
        (zoo.make_vit, dict(depth=3, heads=4, head_dim=8), dict(num_hidden_layers=3, num_attention_heads=4)),
        (zoo.make_deit, dict(depth=1, heads=1, head_dim=8), dict(num_hidden_layers=1, hidden_size=8)),
    ],
)
def test_overrides_reach_config(make, overrides, check):
    cfg = make(**overrides).config
    for key, value in check.items():
        got = cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)
        assert got == value, (key, got, value)


# --------------------------------------------------------------------------- export


def _short_stack(node):
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, t if isinstance(t, str) else getattr(t, "__qualname__", str(t))) for path, t in stack.values()]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_non_strict(name, tmp_path_factory):
    _, _, _, inputs, _ = FAMILIES[name]
    _, model = _built_and_loaded(name, tmp_path_factory)
    args, kwargs = inputs()

    ep = torch.export.export(model, args, kwargs, strict=False)

    with torch.no_grad():
        want = _leaves(model(*args, **kwargs))
    got = _leaves(ep.module()(*args, **kwargs))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)

    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    ops = Counter(str(n.target) for n in calls)
    print(f"\n=== export: {name} ({type(model).__name__}) — {len(calls)} call_function nodes")
    print("ops:", ", ".join(f"{op} x{c}" for op, c in sorted(ops.items())))
    interesting = ("linear", "attention", "matmul", "bmm", "softmax", "embedding", "conv2d")
    shown = set()
    for n in calls:
        kind = next((k for k in interesting if k in str(n.target)), None)
        if kind is None or kind in shown:
            continue
        shown.add(kind)
        stack = _short_stack(n)
        print(f"  {n.target} <- {stack[-1] if stack else None}  (stack depth {len(stack)})")
    example = next((n for n in calls if "linear" in str(n.target)), calls[0])
    print("  full nn_module_stack of", example.name, "=", example.meta.get("nn_module_stack"))
    assert any("nn_module_stack" in n.meta for n in calls)


# --------------------------------------------------------------------------- pipelines


def test_dit_pipeline_runs(tmp_path):
    model = _load_dit(zoo.diffusers_dit(tmp_path / "dit"))
    pipe = zoo.dit_pipeline(model)
    out = pipe(
        class_labels=[1],
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    images = out.images
    assert isinstance(images, np.ndarray) and images.shape == (1, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert pipe.get_label_ids(["class1"]) == [1]


def test_dit_pipeline_cfg_needs_1000_classes():
    # DiTPipeline hard-codes null class id 1000 for classifier-free guidance.
    pipe = zoo.dit_pipeline(zoo.make_diffusers_dit(num_classes=1000))
    out = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=4.0, output_type="pt")
    assert out.images.shape == (2, 3, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)
    assert torch.isfinite(out.images).all()


PIXART_CALL = dict(
    num_inference_steps=2,
    height=zoo.IMAGE_SIZE,
    width=zoo.IMAGE_SIZE,
    use_resolution_binning=False,
    clean_caption=False,
    max_sequence_length=16,
)


def test_pixart_pipeline_runs_with_prompt(tmp_path):
    model = _load_pixart(zoo.pixart(tmp_path / "pixart"))
    pipe = zoo.pixart_pipeline(model)
    out = pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **PIXART_CALL)
    latents = out.images
    assert latents.shape == (1, zoo.LATENT_CHANNELS, zoo.LATENT_SIZE, zoo.LATENT_SIZE)
    assert torch.isfinite(latents).all()

    out = pipe(prompt="a red dog", generator=torch.Generator().manual_seed(0), output_type="np", **PIXART_CALL)
    assert out.images.shape == (1, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE, 3)
    assert np.isfinite(out.images).all()


def test_pixart_pipeline_runs_with_prompt_embeds():
    pipe = zoo.pixart_pipeline(zoo.make_pixart())
    g = _gen()
    embeds = torch.randn(1, 7, zoo.CAPTION_CHANNELS, generator=g)
    neg = torch.randn(1, 7, zoo.CAPTION_CHANNELS, generator=g)
    mask = torch.ones(1, 7, dtype=torch.long)
    out = pipe(
        prompt=None,
        negative_prompt=None,  # default "" conflicts with negative_prompt_embeds
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=mask,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **PIXART_CALL,
    )
    assert out.images.shape == (1, zoo.LATENT_CHANNELS, zoo.LATENT_SIZE, zoo.LATENT_SIZE)
    assert torch.isfinite(out.images).all()
