"""Cached decoding of a grafted LLM: a Llama decoder at SmolLM2-135M's shape (width 576, 30 layers, 9 heads / 3 KV
heads, head dim 64, MLP 1536, vocab 49152, tied embeddings, RoPE theta 1e5; random weights), the teacher beside
50% interleaved swa (window 512), hyena_x and mamba2, at several contexts and batch sizes.

Per context, each repetition prefills every model in turn (batch 1, one forward over the context, logits of the
last token only) and then, per batch size, decodes with every model's cache side by side: each decode step runs
every model once, in turn, so load on this shared machine hits them alike. The decode speedup is the median over
steps (and repetitions) of the ratio teacher / graft within one step; ms per step and tokens/s are medians per
model. Batch > 1 is not prefilled: the batch-1 cache is repeated along the batch axis (`expand_cache`); the
decode step only needs the cache's shapes, not its contents.

Bandwidth view: a decode step reads every parameter once and the whole cache once, so bytes per step = parameter
bytes + cache/state bytes, and the ideal speedup is teacher bytes / graft bytes (each model's own parameters: the
grafted operators have their own projection sizes). "of ideal" is the measured speedup as a fraction of that.
Cache bytes are the sum of tensor bytes over `cache.layers` after the prefill (and the batch repeat); "grafted" is
the part in the grafted layers' entries (for the teacher: the same layers' KV, for comparison).

Before timing, a 2-layer version of each graft is checked: greedy `generate` with the cache equals it without,
and a decode step from a repeated cache gives every row the batch-1 step's logits.

    python benches/decode.py                                   # contexts 1k 4k 8k, batch 1 and 8, CPU fp32
    python benches/decode.py --steps 12 --reps 2 --threads 1   # the RESULTS.md run (a loaded 2-core machine)
    python benches/decode.py --contexts 1024 --batches 1 --steps 8 --reps 1
    python benches/decode.py --model demo:smollm2              # the real SmolLM2-135M-Instruct weights
    python benches/decode.py --artifact runs/smollm2-swa       # a saved graft beside its manifest's teacher
    python benches/decode.py --device cuda --steps 50 --reps 3 # bf16 by default on CUDA
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import graftc
from graftc.decode import RecurrentState, WindowKV
from graftc.passes import rules_by_op
from graftc.site import Site

# past_key_values= works on transformers 5.17 (the GPU image) and 5.24, where it is deprecated for cache=
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")

# Every attention operator in the registry that decodes (fits any model), at its defaults; swa with a window far
# shorter than the contexts. By default the three that benches/RESULTS.md tracks (and gpu_check.sh's budget fits).
OPS = {op: {"op": op} for op, rule in rules_by_op().items()
       if rule.plugs_in and rule.kinds[0] == "attention" and not rule.needs} | {"swa": {"op": "swa", "window": 512}}
DEFAULT_OPS = ["swa", "hyena_x", "mamba2"]
SELECT = {"kind": "attention", "ratio": 0.5, "strategy": "interleaved"}
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TARGET_CONTEXT, TARGET_FRACTION = 8192, 0.9  # issue 13: decode speedup >= 90% of the bandwidth ideal at 8k


def plan(op: dict) -> dict:
    return {"version": 1, "graft": [{"select": SELECT, "replace": op}]}


def llama(dtype: torch.dtype, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialized LlamaForCausalLM at SmolLM2-135M's shape (or with `overrides`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(SMOLLM2 | overrides))
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().to(dtype)


def load_teacher(spec: str | None, dtype: torch.dtype) -> torch.nn.Module:
    if spec is None:
        return llama(dtype)
    try:
        from graftc.spec import load_model
    except ImportError as error:
        sys.exit(f"--model {spec}: graftc.spec.load_model is not available in this checkout ({error}); "
                 "run without --model for the random SmolLM2-shaped decoder")
    try:
        return load_model(spec).model.eval().to(dtype)
    except Exception as error:  # noqa: BLE001 — a missing demo, package or file: one clear line, not a traceback
        sys.exit(f"--model {spec}: could not load it ({type(error).__name__}: {error}); "
                 "run without --model for the random SmolLM2-shaped decoder")


def load_artifact(path: str, teacher: torch.nn.Module) -> torch.nn.Module:
    """A saved graft rebuilt on a copy of the teacher (so the teacher's weights load once)."""
    try:
        return graftc.load(path, model=copy.deepcopy(teacher)).eval()
    except Exception as error:  # noqa: BLE001 — not an artifact, or not of this teacher: one clear line
        sys.exit(f"--artifact {path}: could not load it on {artifact_spec(path)!r} ({type(error).__name__}: {error})")


def artifact_spec(path: str) -> str:
    """The base model spec in an artifact's manifest."""
    from graftc.artifact import read_manifest

    try:
        return read_manifest(Path(path)).get("base", {}).get("spec", "")
    except Exception as error:  # noqa: BLE001 — graftc says what is missing in one line
        sys.exit(f"--artifact: {error}")


def graft(teacher: torch.nn.Module, op: dict) -> torch.nn.Module:
    ids = torch.randint(0, teacher.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(teacher)
    return graftc.compile(model, plan(op), {"input_ids": ids.to(teacher.device), "use_cache": False}).model.eval()


def grafted_layers(model: torch.nn.Module) -> list[int]:
    return sorted(m.context["layer_idx"] for m in model.modules() if isinstance(m, Site) and "layer_idx" in m.context)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Every parameter once (tied embeddings count once: the LM head reads the matrix, the lookup one row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- the cache: bytes and batch repeat
def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """The batch-major tensors of one cache layer, by name (the kinds a grafted Llama's cache holds)."""
    if isinstance(layer, RecurrentState):
        found = {f"conv_states[{i}]": t for i, t in layer.conv_states.items()}
        return found | {f"recurrent_states[{i}]": t for i, t in layer.recurrent_states.items()}
    names = ("keys", "values", "valid") if isinstance(layer, WindowKV) else ("keys", "values")
    if type(layer).__name__ not in ("DynamicLayer", "WindowKV"):
        raise TypeError(f"expand_cache/cache_bytes do not know cache layers of type {type(layer).__name__}")
    return {name: getattr(layer, name) for name in names}


def cache_bytes(cache, layers: list[int] | None = None) -> int:
    total = 0
    for i, layer in enumerate(cache.layers):
        if layers is None or i in layers:
            total += sum(t.numel() * t.element_size() for t in layer_tensors(layer).values()
                         if isinstance(t, torch.Tensor))
    return total


def expand_cache(cache, batch: int):
    """A new cache whose every layer holds this batch-1 cache's tensors repeated `batch` times along dim 0 (copies:
    the original is untouched, and decoding may update the new one in place). DynamicLayer keys/values, WindowKV
    keys/values/valid, RecurrentState conv_states/recurrent_states."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        copied = copy.copy(layer)
        for name, value in vars(layer).items():  # fresh containers: the copy's updates must not reach the original
            if isinstance(value, (dict, list)):
                setattr(copied, name, copy.copy(value))
        for name, t in layer_tensors(layer).items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.shape[0] != 1:
                raise ValueError(f"expand_cache takes a batch-1 cache; {name} has shape {tuple(t.shape)}")
            repeated = t.repeat(batch, *([1] * (t.dim() - 1)))
            if "[" in name:
                field, index = name[:-1].split("[")
                getattr(copied, field)[int(index)] = repeated
            else:
                setattr(copied, name, repeated)
        new.layers.append(copied)
    return new


# ---------------------------------------------------------------- measurements
def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def prefill(model: torch.nn.Module, ids: torch.Tensor, sync) -> tuple[float, object]:
    cache = new_cache(model)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - start, cache


def decode_steps(models: dict, caches: dict, batch: int, steps: int, warmup: int, sync, device) -> dict[str, list]:
    """Seconds per decode step of each model; every step runs all models once, in turn."""
    token = torch.full((batch, 1), 42, dtype=torch.long, device=device)
    times = {name: [] for name in models}
    with torch.no_grad():
        for step in range(warmup + steps):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(token, past_key_values=caches[name], use_cache=True)
                sync()
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def check(device: str, names: list[str]) -> list[str]:
    """In float32, a 2-layer version of each graft (its operator weights moved off their identity starts, so every operator
    mixes tokens; swa with a window of 4 < the prompt): greedy generate with the cache == without; one decode step
    from a batch-3 repeat of the cache gives each row the batch-1 step's logits."""
    lines = []
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    teacher = llama(torch.float32, seed=1, **tiny).to(device)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2)).to(device)
    ops = {"teacher": None} | {name: dict(OPS[name], window=4) if name == "swa" else OPS[name] for name in names}
    for name, op in ops.items():
        model = teacher if op is None else graft(teacher, op)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Site):
                    for p in m.operator.parameters():
                        p.add_(0.2 * p.abs().mean() * torch.randn_like(p))
            cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
            uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
            _, cache = prefill(model, prompt, lambda: None)
            wide = expand_cache(cache, 3)
            one = model(prompt[:, -1:], past_key_values=cache, use_cache=True).logits
            three = model(prompt[:, -1:].expand(3, 1), cache=wide, use_cache=True).logits
        same = torch.equal(cached, uncached)
        rows = (three - one).abs().max().item() / one.abs().max().item()
        ok = same and rows < 1e-5
        lines.append(f"check {name:<8} layers {grafted_layers(model) or '-'}: generate cached == uncached: {same}; "
                     f"repeated cache, max rel. diff of rows {rows:.1e}: {'ok' if ok else 'FAILED'}")
        if not ok:
            raise SystemExit("\n".join(lines) + f"\n{name}: cached decoding or expand_cache is wrong; not timing")
    return lines


def median_ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(b / o for b, o in zip(base, other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per model, context, batch and rep")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    parser.add_argument("--reps", type=int, default=2, help="repetitions (each prefills every model again)")
    parser.add_argument("--ops", nargs="*", default=None, choices=list(OPS),
                        help="50%% interleaved grafts made here (default: " + " ".join(DEFAULT_OPS)
                        + "; none when --artifact is given)")
    parser.add_argument("--artifact", nargs="+", default=[], metavar="DIR",
                        help="saved grafts (graftc compile -o DIR) timed beside the teacher; the teacher is --model "
                             "or else the first artifact's base spec (e.g. demo:smollm2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--model", default=None,
                        help="default: the random SmolLM2-shaped decoder; or a graftc MODEL spec, e.g. demo:smollm2")
    parser.add_argument("--skip", nargs="*", default=[], metavar="CONTEXTxBATCH",
                        help="combinations not to measure, e.g. 8192x8")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); on a loaded 2-core machine 1 avoids threads waiting "
                             "on each other at every op")
    parser.add_argument("--no-check", action="store_true", help="skip the 2-layer correctness check")
    parser.add_argument("--out", default=None, help="default benches/results/decode_DEVICE.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops is None:
        args.ops = [] if args.artifact else DEFAULT_OPS
    if args.artifact and not args.model:
        args.model = artifact_spec(args.artifact[0])
    began, load_before = time.perf_counter(), os.getloadavg()
    device = args.device
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    checks = [] if args.no_check else check(device, args.ops or DEFAULT_OPS)
    print("\n".join(checks), flush=True)

    teacher = load_teacher(args.model, torch.float32)
    saved = {Path(path).name: load_artifact(path, teacher).to(dtype).to(device) for path in args.artifact}
    teacher = teacher.to(dtype).to(device)
    config = teacher.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    models = {"teacher": teacher} | {name: graft(teacher, OPS[name]) for name in args.ops} | saved
    grafts = [name for name in models if name != "teacher"]
    layers = {name: grafted_layers(models[name]) for name in grafts}
    layers["teacher"] = layers[grafts[0]] if grafts else []
    params = {name: parameter_bytes(m) for name, m in models.items()}
    setup_s = time.perf_counter() - began
    print(f"{args.model or 'random SmolLM2-135M-shaped Llama'}: {config.num_hidden_layers} layers, width "
          f"{config.hidden_size}, {config.num_attention_heads}/{kv_heads} heads x {head_dim}; {where}, {dtype}; "
          f"grafted layers {layers['teacher']}; parameters "
          + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in params.items())
          + f"; teacher KV {per_token} B per token of context (theory); setup {setup_s:.0f} s; load average "
          + "/".join(f"{v:.1f}" for v in load_before), flush=True)

    rows, skip = [], {tuple(int(v) for v in s.lower().split("x")) for s in args.skip}
    for context in args.contexts:
        ids = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        ids = ids.to(device)
        batches = [b for b in args.batches if (context, b) not in skip]
        prefill_s = {name: [] for name in models}
        decode_s = {b: {name: [] for name in models} for b in batches}
        nbytes: dict[int, dict] = {}
        for rep in range(args.reps):
            caches = {}
            for name, model in models.items():
                seconds, caches[name] = prefill(model, ids, sync)
                prefill_s[name].append(seconds)
                print(f"  context {context} rep {rep}: prefill {name} {seconds:.1f} s", flush=True)
            for i, batch in enumerate(batches):
                live = {}
                for name in models:
                    live[name] = expand_cache(caches[name], batch)
                    if i == len(batches) - 1:
                        caches[name] = None  # the batch-1 cache is not needed any more: free it before decoding
                nbytes[batch] = {name: {"total": cache_bytes(c), "grafted": cache_bytes(c, layers[name])}
                                 for name, c in live.items()}
                for name, ts in decode_steps(models, live, batch, args.steps, args.warmup, sync, device).items():
                    decode_s[batch][name].extend(ts)
                print(f"  context {context} rep {rep}: decoded batch {batch}: "
                      + ", ".join(f"{n} {1e3 * statistics.median(t[-args.steps:]):.0f} ms"
                                  for n, t in decode_s[batch].items()), flush=True)
                del live
        for batch in batches:
            for name in models:
                times, b = decode_s[batch][name], nbytes[batch][name]
                step = statistics.median(times)
                read = params[name] + b["total"]
                row = {"context": context, "batch": batch, "model": name, "prefill_batch": 1,
                       "prefill_s": statistics.median(prefill_s[name]), "decode_ms": 1e3 * step,
                       "tokens_per_s": batch / step, "cache_bytes": b["total"], "cache_bytes_grafted": b["grafted"],
                       "parameter_bytes": params[name], "bytes_per_step": read,
                       "all_prefill_s": prefill_s[name], "all_decode_ms": [1e3 * t for t in times]}
                if name == "teacher":
                    row["cache_bytes_per_token"] = b["total"] / (context * batch)
                    row["cache_bytes_per_token_theory"] = per_token
                else:
                    teacher_row = next(r for r in rows if r["batch"] == batch and r["context"] == context
                                       and r["model"] == "teacher")
                    speedup = median_ratio(decode_s[batch]["teacher"], times)
                    ideal = teacher_row["bytes_per_step"] / read
                    row |= {"decode_speedup": speedup, "bandwidth_ideal": ideal, "fraction_of_ideal": speedup / ideal,
                            "prefill_speedup": median_ratio(prefill_s["teacher"], prefill_s[name])}
                rows.append(row)

    # grafted layers' state at each context: constant for every op (the teacher's same layers grow)
    independent = {}
    for name in grafts:
        for batch in args.batches:
            seen = {r["context"]: r["cache_bytes_grafted"] for r in rows if r["model"] == name and r["batch"] == batch}
            if seen:
                independent[f"{name} batch {batch}"] = {"bytes": seen, "constant": len(set(seen.values())) == 1}
    targets = [r for r in rows if r["context"] == TARGET_CONTEXT and "fraction_of_ideal" in r]
    verdict = ("target: decode speedup >= 90% of the bandwidth ideal at 8k: "
               + ("; ".join(f"{r['model']} batch {r['batch']} {100 * r['fraction_of_ideal']:.0f}%"
                            f" ({'met' if r['fraction_of_ideal'] >= TARGET_FRACTION else 'MISSED'})" for r in targets)
                  if targets else "not measured (no 8192 context)"))
    total_s = time.perf_counter() - began

    print()
    print(table(rows))
    print("\ngrafted layers' cache bytes by context (independent of context?):")
    for key, value in independent.items():
        print(f"  {key}: " + ", ".join(f"{c}: {b:,}" for c, b in value["bytes"].items())
              + f" -> {'constant' if value['constant'] else 'GROWS'}")
    print(verdict)
    print(f"total {total_s:.0f} s")
    out = Path(args.out or f"benches/results/decode_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model or "random SmolLM2-135M-shaped Llama", "device": where, "dtype": str(dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "config": {k: getattr(config, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
        "ops": {name: OPS[name] for name in args.ops}, "artifacts": {Path(p).name: p for p in args.artifact},
        "select": SELECT, "grafted_layers": layers,
        "parameter_bytes": params, "teacher_cache_bytes_per_token_theory": per_token,
        "steps": args.steps, "warmup": args.warmup, "reps": args.reps, "skipped": sorted(skip),
        "batch_note": "every cache is prefilled at batch 1; batch > 1 repeats it along dim 0 (expand_cache)",
        "checks": checks, "independent_of_context": independent, "verdict": verdict, "setup_s": setup_s,
        "total_s": total_s, "load_average": {"before": load_before, "after": os.getloadavg()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def table(rows: list[dict]) -> str:
    """Markdown: one line per context, batch and model; ratios graft/teacher paired within a step."""
    lines = ["| context | batch | model | prefill s (b1) | decode ms/step | tok/s | cache MB: grafted layers / total "
             "| decode speedup | bandwidth ideal | of ideal | prefill speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cache = f"{r['cache_bytes_grafted'] / 1e6:.2f} / {r['cache_bytes'] / 1e6:.1f}"
        if r["model"] == "teacher":
            ratios = (f"({r['cache_bytes_per_token'] / 1e3:.2f} KB/token; theory "
                      f"{r['cache_bytes_per_token_theory'] / 1e3:.2f}) | | | |")
        else:
            ratios = (f"{r['decode_speedup']:.2f}x | {r['bandwidth_ideal']:.2f}x | "
                      f"{100 * r['fraction_of_ideal']:.0f}% | {r['prefill_speedup']:.2f}x |")
        prefill = f"{r['prefill_s']:.1f}" if r["batch"] == 1 else f"({r['prefill_s']:.1f}, b1 x{r['batch']})"
        lines.append(f"| {r['context']} | {r['batch']} | {r['model']} | {prefill} | {r['decode_ms']:.0f} | "
                     f"{r['tokens_per_s']:.1f} | {cache} | {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
