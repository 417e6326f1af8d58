"""A grafted model stays usable where the original was: pipelines, generate(), output types, other patterns."""
from __future__ import annotations

import copy

import pytest
import torch

import graftc
from graftc.spec import load_model
from tests import zoo
from tests.helpers import graft, max_diff, perturb, plan_of, run, save_and_load

SELF_COPY = plan_of(({"kind": "attention", "layers": "all"}, {"op": "self", "init": "copy"}))
NARROW = plan_of(({"kind": "attention", "ratio": 0.5}, {"op": "self", "init": "random"}),
                 ({"kind": "mlp", "layers": "all"}, {"op": "mlp", "ratio": 3}))
# New operators that start as the teacher: a window covering every token (q/k/v/o copied), a wider MLP whose
# extra units start at zero, and copies: the grafted model must give the teacher's outputs wherever it is used.
EXACT = plan_of(({"kind": "attention", "layers": "::2"}, {"op": "swa", "window": 10_000}),
                ({"kind": "attention", "layers": "1::2"}, {"op": "self", "init": "copy"}),
                ({"kind": "mlp", "layers": "::2"}, {"op": "mlp", "ratio": 6, "init": "teacher"}),
                ({"kind": "mlp", "layers": "1::2"}, {"op": "self", "init": "copy"}))


def _dit_images(transformer):
    return zoo.dit_pipeline(transformer)(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.0,
                                         generator=torch.Generator().manual_seed(0), output_type="np").images


def test_grafted_dit_runs_in_dit_pipeline(tmp_path):
    loaded = load_model(zoo.diffusers_dit(tmp_path))
    perturb(loaded.model)  # a zero-initialized (adaLN-Zero) DiT would hide any difference
    expected = _dit_images(loaded.model)
    _, exact = graft(loaded, EXACT)
    images = _dit_images(exact.model)
    assert images.shape == (2, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE, 3)
    assert abs(images - expected).max() <= 1e-5
    _, narrow = graft(loaded, NARROW)
    assert abs(_dit_images(narrow.model) - expected).max() > 1e-3  # the comparison sees a real change


def _pixart_latents(transformer):
    return zoo.pixart_pipeline(transformer)(
        prompt="a photo of a cat", num_inference_steps=3, height=zoo.IMAGE_SIZE, width=zoo.IMAGE_SIZE,
        use_resolution_binning=False, clean_caption=False, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_grafted_pixart_runs_in_pixart_sigma_pipeline(tmp_path):
    loaded = load_model(zoo.pixart(tmp_path))
    perturb(loaded.model)
    expected = _pixart_latents(loaded.model)
    _, exact = graft(loaded, EXACT)
    latents = _pixart_latents(exact.model)
    assert latents.shape == (1, zoo.LATENT_CHANNELS, zoo.LATENT_SIZE, zoo.LATENT_SIZE)
    assert (latents - expected).abs().max() <= 1e-5 * expected.abs().max()
    _, narrow = graft(loaded, NARROW)
    assert (_pixart_latents(narrow.model) - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("builder", [zoo.qwen3, zoo.llama], ids=["qwen3", "llama"])
def test_grafted_causal_lm_generates(builder, tmp_path):
    loaded = load_model(builder(tmp_path))
    prompt = torch.tensor([[1, 5, 7, 9]])
    expected = loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)
    for plan in (SELF_COPY, EXACT):  # an exact graft decodes the same tokens, with the KV cache
        _, copied = graft(loaded, plan)
        assert torch.equal(copied.model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    _, narrowed = graft(loaded, NARROW)
    tokens = narrowed.model.generate(prompt, max_new_tokens=6, do_sample=False)
    greedy = prompt  # the same decode by hand: argmax of a full forward, one token at a time, no cache
    with torch.no_grad():
        for _ in range(6):
            greedy = torch.cat([greedy, narrowed.model(greedy, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, greedy)


def test_grafted_bert_keeps_output_type(tmp_path):
    loaded = load_model(zoo.bert(tmp_path))
    perturb(loaded.model)
    original = loaded.model(**loaded.kwargs)
    _, result = graft(loaded, EXACT)
    out = result.model(**loaded.kwargs)
    assert type(out) is type(original)
    for name in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(getattr(out, name), getattr(original, name), rtol=0, atol=1e-5)
    _, narrow = graft(loaded, NARROW)
    assert (narrow.model(**loaded.kwargs).last_hidden_state - original.last_hidden_state).abs().max() > 1e-3


def test_eager_attention_matches_explicit_pattern(tmp_path):
    """transformers' eager attention spells softmax(QK^T)V out with matmuls and a mask add."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo.qwen3(tmp_path), attn_implementation="eager").eval()
    example = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "use_cache": False}
    regions = graftc.inspect_regions(model, example)
    attention = [r for r in regions if r.kind == "attention"]
    assert len(attention) == 2 and {r.attrs["pattern"] for r in attention} == {"explicit_masked"}
    assert attention[0].attrs["kv_heads"] == 2 and attention[0].attrs["heads"] == 4


class ExplicitAttention(torch.nn.Module):
    """Unmasked explicit attention with a fused qkv projection, written by hand."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim), ExplicitAttention(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def handwritten_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), Block(), Block()).eval(), (torch.randn(2, 6, 16),)


def test_python_spec_with_explicit_attention(tmp_path):
    loaded = load_model(f"python:{__file__}:handwritten_model")
    regions = graftc.inspect_regions(loaded.model, loaded.args)
    assert [r.kind for r in regions].count("attention") == 3
    att = next(r for r in regions if r.kind == "attention")
    assert att.attrs["pattern"] == "explicit" and att.roles == {"qkv": "0.attn.qkv", "o": "0.attn.out"}
    assert att.cover == ["0.attn"]
    teacher, result = graft(loaded, SELF_COPY)
    assert max_diff(teacher, run(result.model, loaded)) <= 1e-6
    reloaded = save_and_load(result, loaded.spec, tmp_path / "out", model=handwritten_model()[0])
    assert max_diff(run(result.model, loaded), run(reloaded, loaded)) == 0.0


def test_timm_vit_classifies():
    timm = pytest.importorskip("timm", exc_type=ImportError)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    regions = graftc.inspect_regions(model, (x,))
    assert [r.kind for r in regions].count("attention") == 2
    expected = model(x)
    result = graftc.compile(copy.deepcopy(model), SELF_COPY, (x,))
    logits = result.model(x)
    assert logits.shape == (2, 10) and torch.allclose(logits, expected, atol=1e-5)
