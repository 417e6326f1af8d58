"""Short end-to-end distillations of the real pretrained models (issue 14): `graftc compile` with both stages on
demo:smollm2 (swa) and demo:minilm (hyena_x), on graftc.text's train split (the default text), then the
artifact reloads and behaves identically, and `graftc chat` talks.

Each model loads once per module (SmolLM2 ~20 s); the CLI's loader is pointed at a copy of it, so `compile` and
`chat` run for real without loading the weights again. Grafted layers start from random weights (`init: random`)
so that the loss has something to recover in a few steps, and the assertions can fail: every node's stage-1
validation loss must fall below its value before training, and the graft must move closer to the teacher on
held-out text (KL for the LM, last-hidden-state MSE for the encoder) than it was straight after the rewrite.
Skips, naming the install command, only where an optional package is absent.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import graftc
from graftc import compile as graft
from graftc import text
from graftc.cli import main
from graftc.families.transformers import embedding_quality, lm_windows
from graftc.plan import parse_plan
from tests.test_real_models import minilm, smollm2  # noqa: F401  (module-scoped fixtures: one load each)


def plan(op: dict, layers: list[int], seq_len: int) -> dict:
    return {"version": 1,
            "graft": [{"select": {"kind": "attention", "layers": layers}, "replace": {**op, "init": "random"}}],
            "distill": {"stage1": {"steps": 10, "batch_size": 4, "lr": 2e-3, "eval_every": 5},
                        "stage2": {"steps": 5, "batch_size": 2, "lr": 2e-5, "warmup": 1, "ema": 0,
                                   "objective": "distill"},
                        "checkpoint_every": 100},
            "data": {"seq_len": seq_len, "val_fraction": 0.02}}


def compile_with(loaded, plan_data: dict, tmp_path, monkeypatch) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """`graftc compile` on a copy of the loaded model; returns the manifest, the distilled graft as compile held
    it in memory, and a rewrite-only graft (random init, not distilled) to measure progress against."""
    from graftc import artifact

    monkeypatch.setattr("graftc.spec.load_model", lambda spec, seed=0: copy.deepcopy(loaded))
    kept = {}
    save = artifact.save

    def keep(out, result, *args, **kwargs):
        kept["model"] = result.model
        return save(out, result, *args, **kwargs)

    monkeypatch.setattr("graftc.artifact.save", keep)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_data))
    out = tmp_path / "art"
    assert main(["compile", loaded.spec, str(path), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    torch.manual_seed(0)
    undistilled = graft(copy.deepcopy(loaded.model), parse_plan(plan_data), loaded.example).model
    return manifest, kept["model"].eval(), undistilled.eval()


def assert_stage1_fell(manifest: dict) -> None:
    nodes = manifest["distill"]["stage1"]
    assert nodes and manifest["distill"]["stage2"]["steps_run"] == 5
    for node in nodes:
        assert node["best_val"] < node["val_before"], f"stage 1 did not lower {node['fqn']}'s validation loss: {node}"


def test_smollm2_swa_distills_reloads_and_chats(smollm2, tmp_path, monkeypatch, capsys):
    loaded = smollm2
    manifest, distilled, undistilled = compile_with(loaded, plan({"op": "swa", "window": 8}, [1, 2], seq_len=32),
                                                    tmp_path, monkeypatch)
    assert_stage1_fell(manifest)
    model = graftc.load(tmp_path / "art", model=copy.deepcopy(loaded.model))
    # closer to the teacher on held-out text than the rewrite alone
    windows = text.token_windows(loaded.tokenizer, "heldout", 64, 2)
    before = lm_windows(loaded.model, undistilled, windows)
    after = lm_windows(loaded.model, model, windows)
    assert after["kl"] < before["kl"], (before, after)
    # the reloaded artifact decodes exactly as the graft that compile distilled in memory
    again = distilled
    prompt = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        second = again.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(first, second)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "art"), "What is the capital of France?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip(), "graftc chat printed nothing"


def test_minilm_hyena_x_distills_and_reloads(minilm, tmp_path, monkeypatch):
    """The centred featurizer of examples/minilm-hyena-x-50.yaml, in the real encoder."""
    loaded = minilm
    manifest, distilled, undistilled = compile_with(loaded, plan({"op": "hyena_x", "causal": False}, [2], seq_len=32),
                                                    tmp_path, monkeypatch)
    assert_stage1_fell(manifest)
    model = graftc.load(tmp_path / "art", model=copy.deepcopy(loaded.model))
    # closer to the teacher's last hidden state (the distillation objective) on held-out text than the rewrite alone
    windows = text.token_windows(loaded.tokenizer, "heldout", 32, 16)
    with torch.no_grad():
        target = loaded.model(input_ids=windows).last_hidden_state
        before, after = (float((m(input_ids=windows).last_hidden_state - target).pow(2).mean())
                         for m in (undistilled, model))
    assert after < before, (before, after)
    sentences = text.sentences("heldout")[:64]
    same = embedding_quality(distilled, model, loaded.tokenizer, sentences)  # in memory vs reloaded
    assert same["embedding_cosine_min"] > 1 - 1e-9 and same["retrieval_top1"] == 1.0


def test_sentence_samples_keep_special_tokens_and_padding_stays_out_of_losses(minilm):
    """text_unit: sentence: one prose sentence a sample, [CLS] ... [SEP] then padding, and the mask that keeps the
    padding out of both stages' losses (real_tokens)."""
    from graftc.distill.data import real_tokens
    from graftc.families.transformers import TextTask
    from graftc.plan import Data

    tokenizer = minilm.tokenizer
    task = TextTask(minilm, Data(text_unit="sentence", seq_len=48, val_fraction=0.05), seed=0)
    task.prepare(None, log=lambda *_: None)
    ids, mask = task.samples["input_ids"], task.samples["attention_mask"].bool()
    found = text.sentences("train")
    assert len(ids) == len(found) and len(found) > 500
    lengths = mask.sum(1)
    assert int(lengths.min()) < 20 < 48 == int(lengths.max())  # short sentences are padded, long ones cut at seq_len
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids.gather(1, (lengths - 1)[:, None]).squeeze(1) == tokenizer.sep_token_id).all()
    assert (ids[~mask] == tokenizer.pad_token_id).all() and mask[:, :1].all()
    assert tokenizer.decode(ids[3][mask[3]], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(found[3], add_special_tokens=False)["input_ids"])

    batch = task.batch("stage2", 0, 4)
    assert torch.equal(batch.kwargs["attention_mask"], batch.target["attention_mask"])
    keep = task.token_mask(batch)
    student, teacher = torch.randn(4, 48, 8), torch.randn(4, 48, 8)
    loss = task.distill_loss(*real_tokens(keep, student, teacher))
    noisy_padding = student.masked_fill(~keep[..., None], 1e3)
    assert torch.equal(task.distill_loss(*real_tokens(keep, noisy_padding, teacher)), loss)  # padding: no effect
    moved = student.clone()
    moved[0, 0] += 1
    assert task.distill_loss(*real_tokens(keep, moved, teacher)) != loss  # a real token: an effect
