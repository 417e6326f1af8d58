"""``graftc eval``'s result as a text table, with a line of settings and lines for agreement."""
from __future__ import annotations

from graftc.report import human


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return human(v)
    return f"{v:.4g}"


def table(result: dict) -> str:
    names = list(result["models"])
    rows = [("", *names)]
    labels = {"params": "params", "flops": "FLOPs (example inputs)", "fd": "FD (lower is better)", "sfid": "sFID",
              "is": "IS", "precision": "precision (k=3)", "recall": "recall (k=3)",
              "perplexity": "perplexity (--text)", "heldout_perplexity": "perplexity (held-out pydoc_data)",
              "decode_tokens_per_s": "decode tokens/s (cache)", "top1_accuracy": "top-1 accuracy (image labels)"}
    for key, label in labels.items():
        if any(key in result["models"][n] for n in names):
            rows.append((label, *(_fmt(result["models"][n].get(key)) for n in names)))
    speed = result["latency"]
    if "graft_ms" in speed:
        rows.append((f"latency ms ({speed['where']})", _fmt(speed["teacher_ms"]), _fmt(speed["graft_ms"])))
    else:
        rows.append((f"latency ms ({speed['where']})", _fmt(speed["teacher_ms"])))
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    s = result["settings"]
    head = f"eval: {s['samples']} samples, {s['steps']} steps, cfg {s['cfg']}, seed {s['seed']}, features {s['features']}"
    if "heldout" in s:  # a transformers model: the diffusion settings do not apply
        h = s["heldout"]
        head = (f"eval: held-out pydoc_data topics (graftc.text), {h['windows'][0]} windows of {h['windows'][1]} tokens, "
                f"decode {h['new_tokens']} tokens after {h['context']}" if "windows" in h else
                f"eval: held-out pydoc_data sentences (graftc.text), {h['sentences']} of them")
    if "images" in result.get("agreement", {}):  # an image classifier: the diffusion settings do not apply
        head = f"eval: held-out images from {result['agreement']['images']}, seed {s['seed']}"
    if s.get("reference"):
        head += f" (reference {s['reference']})"
    out = [head, *lines]
    if "graft_ms" in speed:
        out.append(f"speedup vs teacher: {speed['speedup']:.2f}x")
    if "agreement" in result:
        a = result["agreement"]
        line = (f"agreement with the teacher on {a['inputs']} held-out inputs: output MSE {a['mse']:.4g}, "
                f"cosine {a['cosine']:.4f} (min {a['cosine_min']:.4f})")
        if "embedding_cosine" in a:
            line += f", sentence-embedding cosine {a['embedding_cosine']:.6f}"
        if "top1_agreement" in a:
            line = (f"agreement with the teacher on {a['inputs']} held-out images ({a['images']}): top-1 agreement "
                    f"{a['top1_agreement']:.2%}, logits MSE {a['mse']:.4g}, cosine {a['cosine']:.4f}")
        out.append(line)
    if "heldout" in result:
        h, where = result["heldout"], result["settings"]["heldout"]
        if "next_token_agreement" in h:
            out.append(f"held-out windows {where['windows']}: greedy next-token agreement with the teacher "
                       f"{h['next_token_agreement']:.2%}, mean KL(teacher || graft) {h['kl']:.4g} nats/token")
        else:
            out.append(f"held-out sentences ({h['sentences']}): mean-pooled embedding cosine to the teacher's "
                       f"{h['embedding_cosine']:.4f} (min {h['embedding_cosine_min']:.4f}), retrieval top-1 "
                       f"{h['retrieval_top1']:.2%}")
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)
