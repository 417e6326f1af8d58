"""Real English text that ships with every Python, for distilling and evaluating language models and encoders.

The source is `pydoc_data.topics.topics` (the language reference behind `help()`: 79 topics, ~465k characters
on Python 3.11). It is split by topic, deterministically:

  heldout   every 4th topic in sorted order from the second (`sorted(topics)[1::4]`): never trained on
  train     the other topics, less every paragraph that also occurs in a held-out topic (topics repeat each
            other: `compound` holds the whole of `try`, `for`, `with`, ...; `specialnames` the whole of
            `customization`): ~266k characters
  all       every topic, verbatim (the reference protocol below reads from it)

The perplexity reference protocol (`reference_windows`): the topics joined in sorted order, tokenized, and 4
windows of 512 tokens from token 20,000. With SmolLM2's tokenizer those tokens lie inside the `compound` topic,
which is held out; the dequantized SmolLM2-135M-Instruct teacher scores 17.9 on them (`window_perplexity`).

A second, larger source, for training only: the docstrings of the standard library's own sources (read with `ast`,
never imported; tests left out): ~1.8M characters and ~11.7k prose sentences on Python 3.11, against ~1k in the
train topics, less every paragraph that also occurs in a held-out topic. Plans name the training text with
`data.text: corpus:NAME` (CORPORA); the held-out split stays the same whatever a plan trains on.

For encoders: `sentences` cuts the prose of a split into sentences (code, grammar and tables dropped) and
`sentence_pairs` pairs neighbouring sentences of one paragraph (related text) for embedding checks.
"""
from __future__ import annotations

import ast
import functools
import re
import sysconfig
import textwrap
from pathlib import Path

import torch

from graftc.errors import GraftError

SPLITS = ("train", "heldout", "all")
CORPUS = "corpus:"  # data.text's prefix for a built-in training text
CORPORA = {"pydoc": "pydoc_data topics (train split)",
           "stdlib": "pydoc_data topics (train split) and the standard library's docstrings"}
SEPARATOR = "\n\n"
REFERENCE = {"split": "all", "length": 512, "count": 4, "start": 20_000}


def topics() -> dict[str, str]:
    """Every pydoc topic: name -> text."""
    from pydoc_data.topics import topics as found

    return dict(found)


def split_names(split: str) -> list[str]:
    """The topic names of a split, in sorted order."""
    if split not in SPLITS:
        raise GraftError(f"text split '{split}': expected one of {', '.join(SPLITS)}")
    names = sorted(topics())
    heldout = set(names[1::4])
    return [n for n in names if split == "all" or (n in heldout) == (split == "heldout")]


def _blocks(topic: str) -> list[str]:
    return re.split(r"\n\s*\n", topic)


def _key(block: str) -> str:
    return " ".join(block.split())


def split_topics(split: str) -> dict[str, str]:
    """name -> text of the topics of a split, in sorted order; train topics without their held-out paragraphs."""
    found, names = topics(), split_names(split)
    if split != "train":
        return {n: found[n] for n in names}
    heldout = _heldout_keys()
    return {n: "\n\n".join(b for b in _blocks(found[n]) if _key(b) not in heldout) for n in names}


@functools.lru_cache(maxsize=1)
def _heldout_keys() -> frozenset[str]:
    """Every paragraph of the held-out topics, whitespace-normalized: what no training text may hold."""
    found = topics()
    return frozenset(_key(b) for n in split_names("heldout") for b in _blocks(found[n]))


def text(split: str) -> str:
    """The topics of a split joined in sorted order."""
    return SEPARATOR.join(split_topics(split).values())


def corpus_name(value: str | None) -> str | None:
    """The built-in corpus a data.text value names: 'corpus:NAME', or unset for corpus:pydoc; None for a file or
    folder. An unknown name raises ValueError (plan validation reports it where it sits)."""
    if not value:
        return "pydoc"
    if not value.startswith(CORPUS):
        return None
    name = value.removeprefix(CORPUS)
    if name not in CORPORA:
        raise ValueError(_unknown(name))
    return name


def _unknown(name: str) -> str:
    return f"unknown corpus '{CORPUS}{name}' (known: {', '.join(CORPUS + n for n in CORPORA)})"


def corpus(name: str) -> str:
    """A built-in training text (CORPORA); none of them holds a paragraph of the held-out split."""
    if name not in CORPORA:
        raise GraftError(f"data.text: {_unknown(name)}; or a text file, or a folder of .txt files")
    return text("train") if name == "pydoc" else SEPARATOR.join([text("train"), docstrings()])


@functools.lru_cache(maxsize=1)
def docstrings() -> str:
    """The module, class and function docstrings of the standard library's sources (not its tests), in path
    order, less the paragraphs that occur in a held-out topic. The files are parsed, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    heldout = _heldout_keys()
    found = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a source written for another Python version
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.extend(b for b in _blocks(doc) if _key(b) and _key(b) not in heldout)
    return SEPARATOR.join(found)


@functools.lru_cache(maxsize=8)
def _ids(tokenizer, split: str) -> tuple[int, ...]:
    return tuple(tokenizer(text(split), add_special_tokens=False, verbose=False)["input_ids"])


def token_windows(tokenizer, split: str, length: int, count: int, start: int = 0) -> torch.Tensor:
    """`count` consecutive windows of `length` tokens of a split, from token `start`: a LongTensor [count, length].
    No special tokens are added; the tokenization of each split is cached per tokenizer."""
    ids = _ids(tokenizer, split)
    end = start + length * count
    if length < 1 or count < 1 or start < 0 or end > len(ids):
        raise GraftError(f"text: {count} windows of {length} tokens from token {start} need {end} tokens; "
                         f"the '{split}' split has {len(ids)}")
    return torch.tensor(ids[start:end]).view(count, length)


def reference_windows(tokenizer) -> torch.Tensor:
    """The perplexity reference protocol: 4 windows of 512 tokens from token 20,000 of all topics, sorted."""
    return token_windows(tokenizer, **REFERENCE)


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over windows [N, L], each scored on its own (no context
    carried over): every token but a window's first is predicted."""
    total, tokens = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / tokens)))


# ---------------------------------------------------------------- sentences for encoders
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”’][.!?])\s+(?=[A-Z])")


def _prose(topic: str) -> list[str]:
    """The prose paragraphs of a topic, each on one line. Blocks are dedented first (a method's description is
    indented under its signature); what stays indented (code, grammar), headings, tables, list items and
    footnotes are dropped."""
    paragraphs = []
    for block in _blocks(topic):
        lines = textwrap.dedent(block).strip("\n").split("\n")
        if any(not line.strip() or line[:1].isspace() or re.fullmatch(r"[*=~^-]{3,}|[+|].*", line) for line in lines):
            continue
        para = " ".join(line.strip() for line in lines)
        if re.match(r"[-*+=|]|\[\d+\]|(\d+|[IVX]+)\.\s", para) or "::=" in para or ">>>" in para:
            continue
        paragraphs.append(para)
    return paragraphs


def _sentences_of(paragraph: str, min_words: int, max_words: int) -> list[str]:
    keep = []
    for s in _SENTENCE_END.split(paragraph):
        words = s.split()
        if min_words <= len(words) <= max_words and s.endswith(".") and s[:1].isupper() \
                and sum(c.isalpha() or c.isspace() for c in s) >= 0.85 * len(s):
            keep.append(s)
    return keep


def sentences(split: str = "heldout", min_words: int = 6, max_words: int = 40) -> list[str]:
    """The prose sentences of a split, in topic (sorted) and text order, without duplicates."""
    return sentences_in(split_topics(split).values(), min_words, max_words)


def sentences_in(texts, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The prose sentences of texts (paragraphs separated by blank lines), in order, without duplicates."""
    seen, out = set(), []
    for raw in texts:
        for para in _prose(raw):
            for s in _sentences_of(para, min_words, max_words):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def sentence_pairs(split: str = "heldout", min_words: int = 6, max_words: int = 40) -> list[tuple[str, str]]:
    """Neighbouring sentences of one paragraph (related text), each sentence in at most one pair."""
    seen, pairs = set(), []
    for topic in split_topics(split).values():
        for para in _prose(topic):
            kept = [s for s in _sentences_of(para, min_words, max_words) if s not in seen]
            seen.update(kept)
            pairs.extend(zip(kept[0::2], kept[1::2]))
    return pairs
