"""transformers models: causal LMs and encoders from save_pretrained folders and GGUF files, with their
tokenizers; distillation data cut from real text; ViT-style image classifiers load here and are handed to the
image-classifier family."""
from __future__ import annotations

import inspect
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from graftc import text
from graftc.distill.data import Batch, Task, first_tensor
from graftc.errors import GraftError, one_line
from graftc.families.example import eval_data, no_sample_quality
from graftc.families.images import image_kwargs
from graftc.loaded import EXAMPLE_TEXT, Loaded, from_pretrained
from graftc.metrics import sentence_embedding

MAKES_IMAGES = False


def load(path: Path, config: dict, tokenizer=None) -> Loaded:
    """The transformers class the folder's config names (else AutoModel), with example inputs: real text where
    a tokenizer is given, an image for a ViT-style classifier (family image-classifier), else random token ids."""
    import transformers  # heavy: only for the models that need it

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    if not (isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or cls is transformers.AutoModel)):
        raise GraftError(f"{path}: '{arch}' is not a transformers model class")
    model = from_pretrained(cls, path, trust_remote_code=False)
    if tokenizer is not None:
        return with_text_inputs(Loaded("", model, family="transformers"), tokenizer, path)
    pixels = image_kwargs(model, path)
    if pixels is not None:
        return Loaded("", model, (), pixels, family="image-classifier")
    vocab = getattr(model.config, "vocab_size", 100) or 100
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return Loaded("", model, (), example_kwargs(model, ids), family="transformers")


def example_kwargs(model, input_ids: torch.Tensor) -> dict:
    """Keyword inputs for tracing: the token ids, with the model's cache switched off."""
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if "use_cache" in inspect.signature(model.forward).parameters or getattr(model.config, "is_decoder", False):
        kwargs["use_cache"] = False  # a cache object is runtime state, not part of the computation to trace
    return kwargs


def with_text_inputs(loaded: Loaded, tokenizer, where: Path) -> Loaded:
    """Attach the tokenizer, checked against the model's embedding, and make the example inputs real text."""
    rows = loaded.model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise GraftError(f"{where}: the tokenizer does not match the model: "
                         f"it has {len(tokenizer)} tokens, the model embeds {rows}")
    loaded.tokenizer = tokenizer
    loaded.kwargs = example_kwargs(loaded.model, tokenizer(EXAMPLE_TEXT, return_tensors="pt")["input_ids"])
    return loaded


def folder_tokenizer(folder: Path, **kw):
    """The tokenizer saved in `folder` (or inside its GGUF file, `gguf_file=`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as exc:
        where = folder / kw["gguf_file"] if "gguf_file" in kw else folder
        raise GraftError(f"{where}: cannot load its tokenizer: {one_line(exc)}") from None


def load_gguf(folder: Path, name: str) -> Loaded:
    """A transformers causal LM from the GGUF file folder/name, dequantized to float32, with the GGUF's tokenizer."""
    file = folder / name
    if not name:
        raise GraftError(f"{folder}:gguf=: name the .gguf file inside the folder ({folder}:gguf=FILE)")
    if not folder.is_dir():
        raise GraftError(f"{folder}:gguf={name}: folder not found: {folder}")
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))[:4])
        raise GraftError(f"{folder}:gguf={name}: no file {name} in {folder} "
                         + (f"(its .gguf files: {present})" if present else "(it holds no .gguf file)"))
    with open(file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GraftError(f"{file}: not a GGUF file (it does not start with the GGUF magic bytes)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise GraftError(f"{file}: reading GGUF weights needs the gguf package (>= 0.10): run `pip install gguf` "
                         "(scripts/install.sh does)")
    tokenizer = folder_tokenizer(folder, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise GraftError(f"{file}: cannot load a causal LM from it: {one_line(exc)}") from None
    return with_text_inputs(Loaded("", model, family="transformers"), tokenizer, file)


class TextTask(Task):
    """transformers models on a text file (or folder of .txt files), cut into blocks of seq_len tokens; without
    data.text, on graftc.text's train split of the pydoc_data topics (its held-out split is for evaluation), or on
    another of graftc.text's corpora (data.text: corpus:NAME)."""

    name = "text"

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        self._tokenizer = None
        if not data.text:  # the default text needs the model's tokenizer: without one, say so before anything runs
            self.tokenizer()
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and data.seq_len > positions:
            raise GraftError(f"data.seq_len: {data.seq_len} tokens per sample is more than this model can embed "
                             f"(max_position_embeddings {positions}); set seq_len to at most {positions}")
        self.causal = type(loaded.model).__name__.endswith("ForCausalLM")
        self.own_objective = "lm" if self.causal else None
        self.encoder = not self.causal

    def prepare(self, teacher, log=print) -> None:
        name = text.corpus_name(self.data.text)
        if name is None:  # a file or folder
            path = Path(self.data.text)
            files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
            if not path.exists() or not files:
                raise GraftError(f"data.text: {'no .txt files in' if path.exists() else 'not found:'} {path}")
            where, raw = str(path), "\n\n".join(f.read_text(errors="replace") for f in files)
        else:  # graftc.text's built-in corpora: real English, offline; its held-out split is never trained on
            where, raw = f"{text.CORPORA[name]} ({text.CORPUS}{name})", text.corpus(name)
        L = self.data.seq_len
        if self.data.text_unit == "sentence":
            self.samples = self._sentence_samples(raw, where)
            self._split()
            lengths = self.samples["attention_mask"].sum(1)
            log(f"data: {len(lengths)} sentences from {where}, {int(lengths.min())}-{int(lengths.max())} tokens "
                f"(median {int(lengths.median())}) with special tokens, padded to {L}")
            return
        ids = self.tokenizer()(raw, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < 2 * L:
            raise GraftError(f"data.text: {where} has {len(ids)} tokens, fewer than two samples of seq_len {L}")
        blocks = torch.tensor(ids[: len(ids) // L * L]).view(-1, L)
        self.samples = {"input_ids": blocks}
        self._split()
        log(f"data: {len(blocks)} samples of {L} tokens from {where}")

    def _sentence_samples(self, raw: str, where: str) -> dict[str, torch.Tensor]:
        found = text.sentences_in([raw])
        if len(found) < 2:
            raise GraftError(f"data.text: {where} has {len(found)} prose sentence(s) (6-40 words, capitalized, ending "
                             f"in a full stop); text_unit: sentence needs at least 2, or use text_unit: window")
        tokenizer = self.tokenizer()
        if tokenizer.pad_token_id is None:
            raise GraftError(f"data.text_unit: sentence pads samples to seq_len, and {self.loaded.spec}'s tokenizer "
                             f"has no padding token; use text_unit: window")
        coded = tokenizer(found, truncation=True, max_length=self.data.seq_len, padding="max_length",
                          return_tensors="pt", verbose=False)
        return {"input_ids": coded["input_ids"], "attention_mask": coded["attention_mask"]}

    def tokenizer(self):
        """The spec's own tokenizer (demo:smollm2, demo:minilm, .gguf folders), else the model folder's."""
        if self.loaded.tokenizer is not None:
            return self.loaded.tokenizer
        if self._tokenizer is not None:
            return self._tokenizer
        try:
            tokenizer = spec_tokenizer(self.loaded)
        except Exception as exc:
            raise GraftError(f"{self.loaded.spec}: no usable tokenizer in the model folder to cut data.text into "
                             f"tokens ({one_line(exc, 120)})") from None
        try:
            rows = self.loaded.model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):
            rows = None
        if rows is not None and len(tokenizer) > rows:
            raise GraftError(f"{self.loaded.spec}: the tokenizer does not match the model: it has {len(tokenizer)} "
                             f"tokens, the model embeds {rows}")
        self._tokenizer = tokenizer
        return tokenizer

    def make(self, index, g):
        rows = {k: v[index] for k, v in self.samples.items()}  # input_ids, and attention_mask for sentences
        static = {k: v for k, v in self.loaded.kwargs.items() if not isinstance(v, torch.Tensor)}
        return Batch((), {**static, **rows}, rows)

    def token_mask(self, batch):
        mask = batch.target.get("attention_mask")
        return None if mask is None else mask.bool()

    def output(self, out):
        logits = getattr(out, "logits", None)
        return logits if logits is not None else first_tensor(out)

    def distill_loss(self, student, teacher, weights=None):
        if not self.causal:
            return super().distill_loss(student, teacher)
        # matching next-token distributions: KL(teacher || student), per token
        return F.kl_div(F.log_softmax(student.float(), -1).flatten(0, -2), F.log_softmax(teacher.float(), -1).flatten(0, -2),
                        log_target=True, reduction="batchmean")

    def own_loss(self, output, batch, weights=None):
        if not self.causal:
            return super().own_loss(output, batch)
        ids = batch.target["input_ids"]
        mask = self.token_mask(batch)
        labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # padding predicts nothing
        return F.cross_entropy(output[:, :-1].flatten(0, 1).float(), labels.flatten())


def task(loaded, data, seed: int) -> TextTask:
    return TextTask(loaded, data, seed)


# ------------------------------------------------------------------------ graftc eval
def spec_tokenizer(loaded):
    """The spec's tokenizer (demo:smollm2, demo:minilm, .gguf), else the model folder's; raises what loading it
    raised, or ValueError where the folder has none (transformers then makes an empty one from its config)."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    from transformers import AutoTokenizer  # heavy: only for the models that need it

    tokenizer = AutoTokenizer.from_pretrained(loaded.spec)
    if len(tokenizer) < 2:
        raise ValueError(f"it has {len(tokenizer)} token(s)")
    return tokenizer


def text_tokenizer(loaded):
    """The spec's tokenizer, else the model folder's; None where it has none."""
    try:
        return spec_tokenizer(loaded)
    except Exception:
        return None


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


@torch.no_grad()
def lm_windows(teacher, graft, windows: torch.Tensor) -> dict:
    """Teacher and graft on the same windows [N, L] (each scored on its own): both perplexities (every token but
    a window's first is predicted), the share of positions where the graft's greedy next token is the
    teacher's, and the mean per-token KL(teacher || graft) in nats."""
    nll = {"teacher": 0.0, "graft": 0.0}
    same = kl = 0.0
    tokens = positions = 0
    for row in windows.split(1):
        t = teacher(input_ids=row, use_cache=False).logits.float().log_softmax(-1)
        g = t if graft is teacher else graft(input_ids=row, use_cache=False).logits.float().log_softmax(-1)
        target = row[:, 1:].flatten()
        for name, logp in (("teacher", t), ("graft", g)):
            nll[name] -= float(logp[:, :-1].flatten(0, 1).gather(1, target[:, None]).sum())
        same += float((t.argmax(-1) == g.argmax(-1)).sum())
        kl += float((t.exp() * (t - g)).sum())
        tokens += target.numel()
        positions += row.numel()
    return {"teacher_perplexity": math.exp(nll["teacher"] / tokens), "graft_perplexity": math.exp(nll["graft"] / tokens),
            "next_token_agreement": same / positions, "kl": kl / positions}


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode tokens/s with the model's cache after prefilling `prompt` [B, context] (not timed)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x
    kept = lambda out: out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # noqa: E731
    out = model(input_ids=prompt, use_cache=True)
    cache, token = kept(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = kept(out), out.logits[:, -1:].argmax(-1)
    return new_tokens * prompt.shape[0] / (time.perf_counter() - start)


@torch.no_grad()
def embedding_quality(teacher, graft, tokenizer, sentences: list[str], batch_size: int = 32) -> dict:
    """Mean-pooled sentence embeddings of teacher and graft: mean and min cosine per sentence, and retrieval
    top-1, the share of sentences whose graft embedding is nearest (by cosine) the teacher embedding of the
    same sentence among all of them."""
    def embed(model):
        rows = []
        for start in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            mask = enc["attention_mask"]
            out = model(**enc, output_hidden_states=True)
            rows.append(sentence_embedding(out, mask))
        return F.normalize(torch.cat(rows), dim=1)

    t, g = embed(teacher), embed(graft)
    cos = (t * g).sum(1)
    hits = (g @ t.T).argmax(1) == torch.arange(len(sentences))
    return {"sentences": len(sentences), "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "retrieval_top1": float(hits.double().mean())}


def heldout_quality(teacher, graft, loaded, tokenizer, context: int = 128, new_tokens: int = 32,
                    sentences: int = 512, log=lambda line: None) -> dict:
    """graftc.text's held-out evaluation of a transformers model (``graft``) beside its teacher (which may be
    the same model). Returns {"models": {"teacher": {...}, "graft": {...}}, "agreement": {...}, "settings"}."""
    if is_causal_lm(loaded.model):
        positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or 10**9
        protocol = dict(text.REFERENCE)
        protocol["length"] = min(protocol["length"], positions)
        windows = text.token_windows(tokenizer, **protocol)
        log(f"eval: {len(windows)} held-out windows of {windows.shape[1]} tokens, teacher beside graft")
        lm = lm_windows(teacher, graft, windows)
        prompt = text.token_windows(tokenizer, "heldout", min(context, positions - new_tokens), 1)
        log(f"eval: decode speed, {new_tokens} tokens after {prompt.shape[1]} tokens of context")
        speed = {"teacher": decode_speed(teacher, prompt, new_tokens)}
        speed["graft"] = speed["teacher"] if graft is teacher else decode_speed(graft, prompt, new_tokens)
        models = {name: {"heldout_perplexity": lm[f"{name}_perplexity"], "decode_tokens_per_s": speed[name]}
                  for name in ("teacher", "graft")}
        return {"models": models, "settings": {"windows": list(windows.shape), "protocol": protocol,
                                               "context": prompt.shape[1], "new_tokens": new_tokens},
                "agreement": {"next_token_agreement": lm["next_token_agreement"], "kl": lm["kl"]}}
    found = text.sentences("heldout")[:sentences]
    log(f"eval: embeddings of {len(found)} held-out sentences, teacher beside graft")
    return {"models": {}, "settings": {"sentences": len(found)},
            "agreement": embedding_quality(teacher, graft, tokenizer, found)}


@torch.no_grad()
def perplexity(model, loaded, text: str, seed: int, cache: Optional[str] = None, batch_size: int = 8) -> Optional[float]:
    """exp(mean next-token cross-entropy) over the held-out blocks of `text`; None for models that are not
    causal language models."""
    with tempfile.TemporaryDirectory(prefix="graftc-eval-") as tmp:
        blocks = task(loaded, eval_data(loaded, text=text, cache=cache or tmp), seed)
        if blocks.own_objective != "lm":
            return None
        blocks.prepare(model, log=lambda line: None)
        batches = blocks.val_batches(batch_size)
    device = next(model.parameters()).device
    total = count = 0.0
    for b in batches:
        ids = b.kwargs["input_ids"].to(device)
        out = blocks.output(model(**{**b.kwargs, "input_ids": ids}))
        tokens = ids[:, 1:].numel()
        total += float(blocks.own_loss(out, type(b)(b.args, b.kwargs, {"input_ids": ids}))) * tokens
        count += tokens
    return math.exp(total / count)


def evaluate(run) -> bool:
    """graftc eval's figures for a transformers model (`run`: a graftc.evaluate.run.Evaluation): with --text,
    each model's perplexity on it (causal LMs); with a tokenizer, graftc.text's held-out evaluation. Agreement on
    held-out task inputs applies only with --text: without it the held-out evaluation compares teacher and graft."""
    no_sample_quality(run)
    models = run.result["models"]
    if run.text:
        for e in run.entries:
            ppl = perplexity(e["model"], run.loaded, run.text, run.seed, run.cache)
            if ppl is not None:
                models[e["name"]]["perplexity"] = ppl
    tokenizer = text_tokenizer(run.loaded)
    if tokenizer is None:
        run.result["notes"].append("held-out text evaluation skipped: the model has no tokenizer")
        return bool(run.text)
    held = heldout_quality((run.teacher or run.target)["model"], run.target["model"], run.loaded, tokenizer,
                           run.context, run.new_tokens, run.sentences, run.log)
    for e in run.entries:  # without a teacher the model is called "teacher" and compared with itself
        models[e["name"]].update(held["models"].get(e["name"], {}))
    run.result["settings"]["heldout"] = held["settings"]
    if run.teacher is not None:
        run.result["heldout"] = held["agreement"]
    return bool(run.text)
