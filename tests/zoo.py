"""Tiny, deterministic model factories for graftc's tests.

Every model builder:

* seeds torch itself (``torch.manual_seed``), so two calls give identical weights;
* builds a random-weight model from a config (nothing is ever downloaded);
* writes it with ``save_pretrained(directory)`` in safetensors format;
* returns the directory as a ``str``, ready for ``from_pretrained``.

The docstring of each builder says which inputs the model's ``forward`` takes.
Each builder ``NAME(directory, ...)`` has an in-memory twin ``make_NAME(...)`` with
the same keyword overrides; it returns the same (seeded) model, unsaved, in eval mode.
The pipeline builders (:func:`dit_pipeline`, :func:`pixart_pipeline`) return
in-memory diffusers pipelines assembled from tiny random components; their
docstrings give the call conventions that work with them.

All models are a few tens of thousands of parameters and build in a few
milliseconds on CPU.
"""

from __future__ import annotations

import os

import torch

# Shared sizes. The latent image is LATENT_SIZE x LATENT_SIZE with LATENT_CHANNELS channels;
# the tiny VAE downsamples by VAE_SCALE, so pipelines produce IMAGE_SIZE x IMAGE_SIZE images.
LATENT_SIZE = 8
LATENT_CHANNELS = 4
VAE_SCALE = 2
IMAGE_SIZE = LATENT_SIZE * VAE_SCALE
VOCAB_SIZE = 128
CAPTION_CHANNELS = 16
SEED = 0


def _save(model, directory) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------------
# diffusers transformers
# ---------------------------------------------------------------------------


def diffusers_dit(directory, depth: int = 2, heads: int = 2, head_dim: int = 8, num_classes: int = 10) -> str:
    """Class-conditional DiT (``diffusers.DiTTransformer2DModel``), saved to ``directory``.

    Config: sample_size 8, in_channels 4, out_channels 8 (learned sigma, like the
    facebook/DiT-XL-2 checkpoints), patch_size 2, ``num_embeds_ada_norm=num_classes``
    (the class table has ``num_classes + 1`` rows; the extra row is the null class),
    inner dim ``heads * head_dim``, ``depth`` blocks of norm_type "ada_norm_zero".

    Inputs::

        model(hidden_states,            # float (B, 4, 8, 8)
              timestep=...,             # long  (B,)   values in [0, 1000)
              class_labels=...)         # long  (B,)   values in [0, num_classes]
        -> Transformer2DModelOutput(sample=float (B, 8, 8, 8)); return_dict=False gives (sample,)

    Load back with ``diffusers.DiTTransformer2DModel.from_pretrained(path, use_safetensors=True)``.
    """
    model = make_diffusers_dit(depth=depth, heads=heads, head_dim=head_dim, num_classes=num_classes)
    return _save(model, directory)


def make_diffusers_dit(depth: int = 2, heads: int = 2, head_dim: int = 8, num_classes: int = 10):
    """In-memory (unsaved, eval-mode) model of :func:`diffusers_dit`; same seed, so same weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(SEED)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=depth,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    return model.eval()


def pixart(directory, depth: int = 2, heads: int = 2, head_dim: int = 8) -> str:
    """Text-conditional PixArt-Sigma-style transformer (``diffusers.PixArtTransformer2DModel``).

    Config: norm_type "ada_norm_single", use_additional_conditions False (as in
    PixArt-Sigma), caption_channels 16, cross_attention_dim ``heads * head_dim``,
    sample_size 8, in_channels 4, out_channels 8, patch_size 2, ``depth`` blocks.

    Inputs::

        model(hidden_states,               # float (B, 4, 8, 8)
              encoder_hidden_states=...,   # float (B, L, 16)   caption (T5) features
              timestep=...,                # long or float (B,)
              encoder_attention_mask=...,  # optional, (B, L) of 0/1 (1 = keep)
              added_cond_kwargs=None)      # optional; {"resolution": None, "aspect_ratio": None}
        -> Transformer2DModelOutput(sample=float (B, 8, 8, 8)); return_dict=False gives (sample,)

    Load back with ``diffusers.PixArtTransformer2DModel.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_pixart(depth=depth, heads=heads, head_dim=head_dim), directory)


def make_pixart(depth: int = 2, heads: int = 2, head_dim: int = 8):
    """In-memory (unsaved, eval-mode) model of :func:`pixart`; same seed, so same weights."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(SEED)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=depth,
        cross_attention_dim=heads * head_dim,
        sample_size=LATENT_SIZE,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        caption_channels=CAPTION_CHANNELS,
        attention_type="default",
    )
    return model.eval()


# ---------------------------------------------------------------------------
# transformers language models
# ---------------------------------------------------------------------------


def qwen3(directory, depth: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8) -> str:
    """Decoder-only LM (``transformers.Qwen3ForCausalLM``), GQA when ``kv_heads < heads``.

    Config: vocab 128, hidden ``heads * head_dim``, intermediate 64, ``depth`` layers,
    q/k RMS norms (Qwen3), max positions 64, untied embeddings.

    Inputs::

        model(input_ids,               # long (B, T), values in [0, 128), T <= 64
              attention_mask=None,     # optional long (B, T)
              use_cache=False)         # pass use_cache=False for export / plain forwards
        -> CausalLMOutputWithPast(logits=float (B, T, 128))

    Load back with ``transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_qwen3(depth=depth, heads=heads, kv_heads=kv_heads, head_dim=head_dim), directory)


def _causal_lm(config_name: str, model_name: str, depth: int, heads: int, kv_heads: int, head_dim: int):
    """A seeded, eval-mode transformers causal LM of the given family with the zoo's shared sizes."""
    return _seeded(config_name, model_name, vocab_size=VOCAB_SIZE, hidden_size=heads * head_dim,
                   intermediate_size=64, num_hidden_layers=depth, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=64,
                   tie_word_embeddings=False)


def _seeded(config_name: str, model_name: str, **config):
    """transformers' `model_name` built from `config_name(**config)` under the zoo's seed, in eval mode."""
    import transformers

    config = getattr(transformers, config_name)(**config)
    torch.manual_seed(SEED)
    return getattr(transformers, model_name)(config).eval()


def make_qwen3(depth: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    """In-memory (unsaved, eval-mode) model of :func:`qwen3`; same seed, so same weights."""
    return _causal_lm("Qwen3Config", "Qwen3ForCausalLM", depth, heads, kv_heads, head_dim)


def llama(directory, depth: int = 2, heads: int = 4, kv_heads: int = 4, head_dim: int = 8) -> str:
    """Decoder-only LM (``transformers.LlamaForCausalLM``), GQA when ``kv_heads < heads``.

    Config: vocab 128, hidden ``heads * head_dim``, intermediate 64, ``depth`` layers,
    max positions 64, untied embeddings.

    Inputs::

        model(input_ids,               # long (B, T), values in [0, 128), T <= 64
              attention_mask=None,     # optional long (B, T)
              use_cache=False)
        -> CausalLMOutputWithPast(logits=float (B, T, 128))

    Load back with ``transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_llama(depth=depth, heads=heads, kv_heads=kv_heads, head_dim=head_dim), directory)


def make_llama(depth: int = 2, heads: int = 4, kv_heads: int = 4, head_dim: int = 8):
    """In-memory (unsaved, eval-mode) model of :func:`llama`; same seed, so same weights."""
    return _causal_lm("LlamaConfig", "LlamaForCausalLM", depth, heads, kv_heads, head_dim)


def bert(directory, depth: int = 2, heads: int = 2, head_dim: int = 8) -> str:
    """Encoder (``transformers.BertModel``, with pooler).

    Config: vocab 128, hidden ``heads * head_dim``, intermediate 64, ``depth`` layers,
    max positions 64, 2 token types.

    Inputs::

        model(input_ids,               # long (B, T), values in [0, 128), T <= 64
              attention_mask=None,     # optional long (B, T)
              token_type_ids=None)     # optional long (B, T), values in {0, 1}
        -> BaseModelOutputWithPoolingAndCrossAttentions(
               last_hidden_state=float (B, T, heads*head_dim),
               pooler_output=float (B, heads*head_dim))

    Load back with ``transformers.AutoModel.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_bert(depth=depth, heads=heads, head_dim=head_dim), directory)


def make_bert(depth: int = 2, heads: int = 2, head_dim: int = 8):
    """In-memory (unsaved, eval-mode) model of :func:`bert`; same seed, so same weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=heads * head_dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(SEED)
    model = BertModel(config)
    return model.eval()


# ---------------------------------------------------------------------------
# transformers image classifiers
# ---------------------------------------------------------------------------

VIT_IMAGE = 16  # pixels per side; patch 4 gives a 4 x 4 grid of patch tokens
VIT_PATCH = 4
VIT_LABELS = 10


def vit(directory, depth: int = 2, heads: int = 2, head_dim: int = 16) -> str:
    """Image classifier (``transformers.ViTForImageClassification``): class token + 4 x 4 patch grid.

    Config: image_size 16, patch_size 4, num_channels 3, hidden ``heads * head_dim``,
    intermediate 64, ``depth`` layers, 10 labels, qkv bias.

    Inputs::

        model(pixel_values)            # float (B, 3, 16, 16)
        -> ImageClassifierOutput(logits=float (B, 10))

    Load back with ``transformers.AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_vit(depth=depth, heads=heads, head_dim=head_dim), directory)


def _image_classifier(config_name: str, model_name: str, depth: int, heads: int, head_dim: int):
    """A seeded, eval-mode transformers image classifier with the zoo's ViT sizes."""
    return _seeded(config_name, model_name, image_size=VIT_IMAGE, patch_size=VIT_PATCH, num_channels=3,
                   hidden_size=heads * head_dim, num_hidden_layers=depth, num_attention_heads=heads,
                   intermediate_size=64, num_labels=VIT_LABELS)


def make_vit(depth: int = 2, heads: int = 2, head_dim: int = 16):
    """In-memory (unsaved, eval-mode) model of :func:`vit`; same seed, so same weights."""
    return _image_classifier("ViTConfig", "ViTForImageClassification", depth, heads, head_dim)


def deit(directory, depth: int = 2, heads: int = 2, head_dim: int = 16) -> str:
    """Image classifier (``transformers.DeiTForImageClassification``): class and distillation tokens + 4 x 4 grid.

    Config as :func:`vit`; the sequence is [class, distillation, 16 patches] (18 tokens), the head reads the
    class token.

    Inputs::

        model(pixel_values)            # float (B, 3, 16, 16)
        -> ImageClassifierOutput(logits=float (B, 10))

    Load back with ``transformers.AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)``.
    """
    return _save(make_deit(depth=depth, heads=heads, head_dim=head_dim), directory)


def make_deit(depth: int = 2, heads: int = 2, head_dim: int = 16):
    """In-memory (unsaved, eval-mode) model of :func:`deit`; same seed, so same weights."""
    return _image_classifier("DeiTConfig", "DeiTForImageClassification", depth, heads, head_dim)


# ---------------------------------------------------------------------------
# pipelines (in memory, tiny random components)
# ---------------------------------------------------------------------------


def tiny_vae():
    """A tiny ``AutoencoderKL``: 3-channel 16x16 images <-> 4-channel 8x8 latents (scale factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    return vae.eval()


def tiny_t5_tokenizer():
    """An offline ``T5Tokenizer`` (Unigram) over a handful of words; unknown words map to ``<unk>``.

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, then the words below.
    """
    from transformers import T5Tokenizer

    words = ["▁", "▁a", "▁an", "▁the", "▁of", "▁photo", "▁cat", "▁dog"]
    words += ["▁red", "▁blue", "▁on", "▁in"]
    words += list("abcdefghijklmnopqrstuvwxyz")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w, -1.0 - 0.1 * i) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, d_model: int = CAPTION_CHANNELS):
    """A tiny ``T5EncoderModel`` (1 layer, 2 heads, gated-gelu as in T5 v1.1) giving ``d_model`` features."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(SEED)
    return T5EncoderModel(config).eval()


def dit_pipeline(transformer):
    """``diffusers.DiTPipeline`` around ``transformer`` (a model from :func:`diffusers_dit`).

    Components: :func:`tiny_vae`, ``DDIMScheduler()`` (default 1000-step config),
    ``id2label`` naming each class ("class0", "class1", ...).

    Call convention that works::

        pipe(class_labels=[1], num_inference_steps=2, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="np")
        -> ImagePipelineOutput(images=np.ndarray (1, 16, 16, 3))

    Notes: DiTPipeline always decodes with the VAE (it has no output_type="latent";
    use "np" or "pt"). With ``guidance_scale > 1`` it feeds the hard-coded null class
    id 1000, so classifier-free guidance needs ``diffusers_dit(..., num_classes=1000)``;
    with the default 10 classes, pass ``guidance_scale=1.0``.
    """
    from diffusers import DDIMScheduler, DiTPipeline

    num_classes = transformer.config.num_embeds_ada_norm
    id2label = {i: f"class{i}" for i in range(num_classes)}
    pipe = DiTPipeline(
        transformer=transformer.eval(), vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=id2label
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(transformer):
    """``diffusers.PixArtSigmaPipeline`` around ``transformer`` (a model from :func:`pixart`).

    Components: :func:`tiny_vae`, ``DPMSolverMultistepScheduler()`` (default config),
    :func:`tiny_t5_encoder` with ``d_model = transformer.config.caption_channels`` and
    the offline :func:`tiny_t5_tokenizer`, so plain string prompts work.

    Call convention that works::

        pipe(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=4.5,
             height=16, width=16, use_resolution_binning=False, clean_caption=False,
             max_sequence_length=16, generator=torch.Generator().manual_seed(0),
             output_type="latent")
        -> ImagePipelineOutput(images=float tensor (1, 4, 8, 8))   # or output_type="np": (1, 16, 16, 3)

    Notes: ``use_resolution_binning=False`` is required (binning only knows sample
    sizes 32/64/128/256); ``clean_caption=False`` avoids needing bs4/ftfy; height and
    width default to 16 (sample_size 8 x VAE scale 2) and must be multiples of 8.
    Precomputed text features also work instead of ``prompt``::

        pipe(prompt=None, negative_prompt=None,           # negative_prompt must be None here
             prompt_embeds=..., prompt_attention_mask=...,                    # (B, L, 16), (B, L)
             negative_prompt_embeds=..., negative_prompt_attention_mask=...,  # needed when guidance > 1
             **same_kwargs_as_above)
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(len(tokenizer), transformer.config.caption_channels)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAMILY_DEPTH = 6  # the depth of graftc's demo DiT, so every family has the same region counts
# Every model family graftc supports, as a MODEL spec (saved to `directory` where it is a save_pretrained dir).
FAMILIES = {
    "diffusers-dit": lambda d: diffusers_dit(d, depth=FAMILY_DEPTH),
    "pixart-sigma": lambda d: pixart(d, depth=FAMILY_DEPTH),
    "qwen3-gqa": lambda d: qwen3(d, depth=FAMILY_DEPTH),
    "llama": lambda d: llama(d, depth=FAMILY_DEPTH),
    "bert": lambda d: bert(d, depth=FAMILY_DEPTH),
    "vit": lambda d: vit(d, depth=FAMILY_DEPTH),
    "graftc-dit": lambda d: "dit:tiny",
    "demo": lambda d: "demo:tiny-dit",
}
