"""`graftc analyze`: how local each attention layer is, and how heavy-tailed each region's activations are.

Attention locality (METHOD.md, "Which layers"): for every attention region, the attention map
A = softmax(q k^T / sqrt(d)) per head is rebuilt from the region's own q and k projections (hooked inputs of the
q/k Linears, projected with the teacher's weights as `passes.common.teacher_attention` splits them, GQA heads
repeated), one block of query rows at a time, inside the forward hook of that layer: peak extra memory is one
block of one layer's map, never all layers' N x N maps. Per layer it accumulates

* band mass  L_k = (1/N) sum_ij A_ij [|i - j| <= k] on the flattened (raster) token index, for each k,
* 2D window mass for k x k windows on the token grid (image models): Chebyshev distance <= (k - 1) / 2,
* mean attention distance sum_ij A_ij |i - j| / N (and the Euclidean distance on the grid),

averaged over heads, samples and batches (every query row weighs the same). The map is the one the layer
computes: the teacher's q/k norms (Qwen3) and rotary position embeddings (Llama, Qwen3, ...) are applied as the
module receives them, and so is its attention mask (causal, padding; a causal layer called without a mask gets
the causal triangle), so padding rows and keys count for nothing.

Activation statistics: the output (first tensor) of every attention and mlp region's cover, streamed: std,
max|x| / std, excess kurtosis, share of |x - mean| > 6 std, and a recommended stage-1 loss (`LOSS_RULE`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import matplotlib
import torch

from graftc.distill.data import first_tensor
from graftc.errors import GraftError
from graftc.families import family
from graftc.files import to_device
from graftc.match import inspect_regions
from graftc.passes.common import TeacherAttention, rotate, teacher_attention, teacher_is_causal
from graftc.site import Call, attendable, call_of
from graftc.rules import submodule

DEFAULT_KS = (1, 2, 4, 8, 16, 32)
DEFAULT_WINDOWS = (3, 5, 7, 9)
KURTOSIS_LIMIT = 3.0
TAIL_LIMIT = 1e-3
LOSS_RULE = (f"l1 if excess kurtosis > {KURTOSIS_LIMIT:g} or the share of values beyond 6 sigma > {TAIL_LIMIT:g} "
             "(heavy tails: L1 is robust to outliers), else l2")


def parse_ks(text: str, what: str = "--ks") -> list[int]:
    """'1,2,4' -> [1, 2, 4]: distinct non-negative integers, sorted."""
    try:
        ks = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise GraftError(f"{what}: expected comma-separated non-negative integers like 1,2,4,8 (got {text!r})") from None
    if not ks or any(k < 0 for k in ks):
        raise GraftError(f"{what}: expected comma-separated non-negative integers like 1,2,4,8 (got {text!r})")
    return sorted(set(ks))


# ------------------------------------------------------------------ attention maps
def attention_stats(q: torch.Tensor, k: torch.Tensor, ks: Iterable[int], grid: tuple[int, int] | None = None,
                    windows: Iterable[int] = DEFAULT_WINDOWS, block: int = 256,
                    allowed: torch.Tensor | None = None) -> dict:
    """Sums over query rows of band mass, window mass and distances for q, k of shape [B, H, N, d].

    `allowed`: which keys each query may attend to, bool broadcastable to [B, H, N, N] (None: all); a query row
    with no allowed key (padding) is left out. Returns {"rows": query rows counted, "band": {k: sum},
    "window": {k: sum}, "distance": sum, "distance_2d": sum}; divide by rows for the averages. Softmax rows are
    computed `block` at a time."""
    if q.shape != k.shape or q.dim() != 4:
        raise GraftError(f"attention_stats: q and k must both be [B, H, N, d] (got {tuple(q.shape)}, {tuple(k.shape)})")
    batch, heads, n, dh = q.shape
    ks, windows = list(ks), list(windows)
    use_grid = grid is not None and grid[0] * grid[1] == n
    scale = 1.0 / math.sqrt(dh)
    q32, k32 = q.float(), k.float()
    cols = torch.arange(n, device=q.device)
    band = torch.zeros(len(ks), dtype=torch.float64, device=q.device)
    window = torch.zeros(len(windows), dtype=torch.float64, device=q.device)
    distance = torch.zeros((), dtype=torch.float64, device=q.device)
    distance_2d = torch.zeros((), dtype=torch.float64, device=q.device)
    k_band = torch.tensor(ks, device=q.device)
    k_window = torch.tensor([(w - 1) // 2 for w in windows], device=q.device)
    rows_counted = 0
    for start in range(0, n, max(1, block)):
        stop = min(start + block, n)
        scores = q32[:, :, start:stop] @ k32.transpose(-1, -2) * scale  # [B, H, b, N]
        if allowed is not None:
            keep = allowed[..., start:stop, :] if allowed.shape[-2] == n else allowed
            keep = keep.expand(batch, heads, stop - start, n)
            scores = scores.masked_fill(~keep, float("-inf"))
            a = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed key: all zero, not counted
            rows_counted += int(keep.any(-1).sum())
        else:
            a = torch.softmax(scores, dim=-1)
            rows_counted += batch * heads * (stop - start)
        mass = a.sum((0, 1)).double()  # [b, N]
        rows = torch.arange(start, stop, device=q.device)
        d = (rows[:, None] - cols[None, :]).abs()  # [b, N]
        distance += (mass * d).sum()
        band += torch.stack([(mass * (d <= kk)).sum() for kk in k_band]) if ks else band
        if use_grid:
            width = grid[1]
            dy = (rows[:, None] // width - cols[None, :] // width).abs()
            dx = (rows[:, None] % width - cols[None, :] % width).abs()
            cheb = torch.maximum(dy, dx)
            distance_2d += (mass * torch.sqrt((dy * dy + dx * dx).double())).sum()
            window += torch.stack([(mass * (cheb <= r)).sum() for r in k_window]) if windows else window
    out = {"rows": rows_counted, "band": {kk: float(v) for kk, v in zip(ks, band.tolist())},
           "distance": float(distance)}
    if use_grid:
        out["window"] = {w: float(v) for w, v in zip(windows, window.tolist())}
        out["distance_2d"] = float(distance_2d)
    return out


def _projection(region, model):
    """(q-input module, k-input module, the teacher's attention with GQA heads repeated): passes.common's
    teacher_attention splits fused qkv Linears, repeats kv heads and keeps the q/k norms."""
    roles = region.roles
    if "qkv" in roles:
        q_mod = k_mod = submodule(model, roles["qkv"])
    elif "q" in roles and "k" in roles:
        q_mod, k_mod = submodule(model, roles["q"]), submodule(model, roles["k"])
    else:
        raise GraftError("no q/k projection Linears found")
    if not (isinstance(q_mod, torch.nn.Linear) and isinstance(k_mod, torch.nn.Linear)):
        raise GraftError("the q/k projections are not Linear modules")
    return q_mod, k_mod, teacher_attention(region, model, repeat_kv=True)


@dataclass
class _Layer:
    region: Any
    ks: list
    windows: list
    block: int
    teacher: TeacherAttention
    causal: bool = False
    call: Call = field(default_factory=Call)  # the rest of the layer's current call (mask, rotary positions)
    pending: dict = field(default_factory=dict)
    rows: int = 0
    tokens: int = 0
    grid_used: bool = False
    band: dict = field(default_factory=dict)
    window: dict = field(default_factory=dict)
    distance: float = 0.0
    distance_2d: float = 0.0

    def feed(self, role: str, x: torch.Tensor) -> None:
        self.pending[role] = x.detach()
        if "q" not in self.pending or "k" not in self.pending:
            return
        xq, xk = self.pending.pop("q"), self.pending.pop("k")
        if xq.dim() != 3 or xk.shape != xq.shape:
            self.pending.clear()
            return
        t, batch, n = self.teacher, *xq.shape[:2]
        q, k = (self._heads(x, part, batch, n) for x, part in ((xq, 0), (xk, 1)))
        if t.q_norm is not None:
            q, k = t.q_norm(q), t.k_norm(k)
        if self.call.positions is not None:
            cos, sin = self.call.positions
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        grid = self.region.attrs.get("grid")
        s = attention_stats(q, k, self.ks, tuple(grid) if grid else None, self.windows, self.block,
                            self.allowed(n, q.device))
        self.rows += s["rows"]
        self.tokens = n
        self.distance += s["distance"]
        for kk, v in s["band"].items():
            self.band[kk] = self.band.get(kk, 0.0) + v
        if "window" in s:
            self.grid_used = True
            self.distance_2d += s["distance_2d"]
            for w, v in s["window"].items():
                self.window[w] = self.window.get(w, 0.0) + v

    def _heads(self, x: torch.Tensor, part: int, batch: int, n: int) -> torch.Tensor:
        """x [B, N, D] through the teacher's q (part 0) or k (part 1) projection, as [B, heads, N, head_dim]."""
        t = self.teacher
        rows = slice(part * t.heads * t.head_dim, (part + 1) * t.heads * t.head_dim)
        bias = None if t.qkv_bias is None else t.qkv_bias[rows].to(x.dtype)
        y = torch.nn.functional.linear(x, t.qkv_weight[rows].to(x.dtype), bias)
        return y.view(batch, n, t.heads, t.head_dim).transpose(1, 2)

    def allowed(self, n: int, device) -> torch.Tensor | None:
        """Which keys each query may attend to, [B or 1, 1, N or 1, N] bool: the layer's own mask, else the causal
        triangle for a causal layer, else None (all)."""
        mask = self.call.mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == n and mask.shape[-2] in (1, n):
            keys = attendable(mask)
            queries = self.call.valid(n)  # a key-only mask (encoders) lets padding rows attend: leave them out
            return keys if queries is None else keys & queries[:, None, :, None]
        if self.causal:
            return torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return None

    def result(self) -> dict:
        r = self.region
        out = {"index": r.index, "fqn": r.fqn, "heads": self.teacher.heads, "head_dim": self.teacher.head_dim,
               "tokens": self.tokens,
               "band_mass": {str(k): v / self.rows for k, v in sorted(self.band.items())},
               "mean_distance": self.distance / self.rows}
        if self.grid_used:
            out["grid"] = list(r.attrs["grid"])
            out["window_mass"] = {str(w): v / self.rows for w, v in sorted(self.window.items())}
            out["mean_distance_2d"] = self.distance_2d / self.rows
        return out


# ------------------------------------------------------------------ activation statistics
@dataclass
class _Moments:
    region: Any
    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0
    max_abs: float = 0.0
    beyond: int = 0

    def feed(self, output) -> None:
        try:
            x = first_tensor(output).detach().double().flatten()
        except GraftError:
            return
        if not x.numel():
            return
        mean_b, std_b = x.mean(), x.std(unbiased=False)
        # share beyond 6 sigma: against this batch's own mean and std (one pass, no second forward)
        self.beyond += int(((x - mean_b).abs() > 6 * std_b).sum()) if std_b > 0 else 0
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x * x).sum())
        self.s3 += float((x ** 3).sum())
        self.s4 += float((x ** 4).sum())
        self.max_abs = max(self.max_abs, float(x.abs().max()))

    def result(self) -> dict | None:
        if not self.n:
            return None
        n = self.n
        m = self.s1 / n
        e2, e3, e4 = self.s2 / n, self.s3 / n, self.s4 / n
        var = max(e2 - m * m, 0.0)
        m4 = e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m ** 4
        std = math.sqrt(var)
        kurt = m4 / (var * var) - 3.0 if var > 0 else 0.0
        tail = self.beyond / n
        r = self.region
        return {"kind": r.kind, "index": r.index, "fqn": r.fqn, "hooked": r.cover[-1], "mean": m, "std": std,
                "max_abs": self.max_abs, "max_over_std": self.max_abs / std if std > 0 else 0.0,
                "kurtosis": kurt, "beyond_6sigma": tail, "elements": n,
                "loss": "l1" if (kurt > KURTOSIS_LIMIT or tail > TAIL_LIMIT) else "l2"}


# ------------------------------------------------------------------ the whole model
def _batches(source, n_batches: int, batch_size: int):
    """(args, kwargs) pairs from a Task (batches 'analyze', 0..n-1), Batch objects or (args, kwargs) tuples."""
    if hasattr(source, "batch") and hasattr(source, "make"):
        for i in range(n_batches):
            b = source.batch("analyze", i, batch_size)
            yield b.args, b.kwargs
        return
    for item in source:
        if hasattr(item, "args") and hasattr(item, "kwargs"):
            yield item.args, item.kwargs
        elif isinstance(item, dict):
            yield (), item
        elif isinstance(item, torch.Tensor):
            yield (item,), {}
        else:
            args, kwargs = item
            yield tuple(args), dict(kwargs)


@torch.no_grad()
def analyze(model: torch.nn.Module, task_or_batches, ks: Iterable[int] = DEFAULT_KS, regions=None,
            example: Any = None, windows: Iterable[int] = DEFAULT_WINDOWS, block: int = 256, n_batches: int = 1,
            batch_size: int = 8, progress=None) -> dict:
    """Attention locality and activation statistics of `model` over its inputs.

    `task_or_batches`: a graftc.distill.data Task (prepared; batches `task.batch("analyze", i, batch_size)` for
    i < n_batches), or an iterable of Batch / (args, kwargs) / kwargs dicts / tensors. `regions`: from
    graftc.match.inspect_regions (found from `example`, else the first batch, when None)."""
    ks, windows = sorted(set(int(k) for k in ks)), sorted(set(int(w) for w in windows))
    if not ks or any(k < 0 for k in ks):
        raise GraftError("analyze: ks must be non-negative integers")
    if any(w < 1 or w % 2 == 0 for w in windows):
        raise GraftError("analyze: 2D windows must be odd positive integers (3, 5, 7, ...)")
    batches = list(_batches(task_or_batches, n_batches, batch_size))
    if not batches:
        raise GraftError("analyze: no input batches")
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if regions is None:
        first = example if example is not None else (batches[0][1] or batches[0][0])
        regions = inspect_regions(model, to_device(first, device))
    layers, moments, skipped, handles = [], [], [], []
    try:
        for region in regions:
            if region.kind == "attention":
                try:
                    q_mod, k_mod, teacher = _projection(region, model)
                except (GraftError, KeyError, RuntimeError, AttributeError) as exc:
                    skipped.append({"fqn": region.fqn, "kind": "attention", "reason": str(exc)[:200]})
                else:
                    layer = _Layer(region, ks, windows, block, teacher, teacher_is_causal(region, model))
                    layers.append(layer)
                    context = region.attrs.get("site", {}).get("context", {})
                    if region.cover and context:  # the mask and rotary tables the layer is called with
                        handles.append(submodule(model, region.cover[0]).register_forward_pre_hook(
                            lambda mod, args, kwargs, layer=layer, context=context:
                                setattr(layer, "call", call_of(context, args, kwargs)), with_kwargs=True))
                    roles = ("q", "k") if q_mod is k_mod else ("q",)
                    handles.append(q_mod.register_forward_pre_hook(_feeder(layer, roles)))
                    if q_mod is not k_mod:
                        handles.append(k_mod.register_forward_pre_hook(_feeder(layer, ("k",))))
            if region.kind in ("attention", "mlp"):
                if not region.cover:
                    skipped.append({"fqn": region.fqn, "kind": region.kind, "reason": "computed inline (no module to hook)"})
                    continue
                stats = _Moments(region)
                moments.append(stats)
                handles.append(submodule(model, region.cover[-1]).register_forward_hook(
                    lambda mod, args, out, stats=stats: stats.feed(out)))
        for i, (args, kwargs) in enumerate(batches):
            model(*to_device(args, device), **to_device(kwargs, device))
            for layer in layers:
                layer.pending.clear()
            if progress:
                progress(f"  batch {i + 1}/{len(batches)}")
    finally:
        for h in handles:
            h.remove()
    attention = [layer.result() for layer in layers if layer.rows]
    for layer in layers:
        if not layer.rows:
            skipped.append({"fqn": layer.region.fqn, "kind": "attention",
                            "reason": "no self-attention call with matching q/k shapes was seen"})
    acts = [r for r in (m.result() for m in moments) if r is not None]
    acts.sort(key=lambda a: (a["kind"] != "attention", a["index"]))
    return {"ks": ks, "windows": windows, "batches": len(batches),
            "samples": sum(_batch_size(a, kw) for a, kw in batches), "attention": attention, "activations": acts,
            "skipped": skipped, "loss_rule": LOSS_RULE,
            "notes": ["attention maps are softmax(q k^T / sqrt(d)) from the q/k projections with the layer's own "
                      "q/k norms, rotary position embeddings and attention mask (causal, padding) applied",
                      "share beyond 6 sigma uses each batch's own mean and std"]}


def _feeder(layer: _Layer, roles: tuple):
    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            for role in roles:
                layer.feed(role, args[0])

    return hook


def _batch_size(args, kwargs) -> int:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 0


def layer_order(analysis: dict, k: int) -> list[int]:
    """Attention region indices sorted most local first (band mass L_k, highest first; ties by index)."""
    key = str(int(k))
    layers = analysis.get("attention", [])
    if layers and key not in layers[0]["band_mass"]:
        raise GraftError(f"layer_order: k={k} was not measured (measured: {', '.join(layers[0]['band_mass'])})")
    return [a["index"] for a in sorted(layers, key=lambda a: (-a["band_mass"][key], a["index"]))]


def default_k(analysis: dict) -> int:
    """The largest measured k <= N / 8 (else the smallest k): where band masses differ most usefully."""
    ks = analysis["ks"]
    n = max((a["tokens"] for a in analysis["attention"]), default=0)
    fit = [k for k in ks if k <= n / 8]
    return fit[-1] if fit else ks[0]


# ------------------------------------------------------------------ files
def write_analysis(analysis: dict, folder) -> list[str]:
    """analysis.json, locality_heatmap.png, locality_bars.png, activations.png, report.md into `folder`."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend: no display needed

    folder = Path(folder)
    (folder / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
    written = ["analysis.json"]
    att, acts, ks = analysis["attention"], analysis["activations"], analysis["ks"]
    if att:
        data = [[a["band_mass"][str(k)] for k in ks] for a in att]
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(ks), 1.2 + 0.35 * len(att)))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(att)), [str(a["index"]) for a in att])
        ax.set_xlabel("band half-width k (tokens, flattened index)")
        ax.set_ylabel("attention layer")
        ax.set_title("band mass L_k")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / "locality_heatmap.png", dpi=100)
        plt.close(fig)
        k = default_k(analysis)
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(att) + 2), 3.2))
        ax.bar([a["index"] for a in att], [a["band_mass"][str(k)] for a in att], color="tab:blue")
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("attention layer")
        ax.set_ylabel(f"L_{k}")
        ax.set_title(f"attention mass within |i - j| <= {k}")
        fig.tight_layout()
        fig.savefig(folder / "locality_bars.png", dpi=100)
        plt.close(fig)
        written += ["locality_heatmap.png", "locality_bars.png"]
    if acts:
        labels = [f"{a['kind'][:4]} {a['index']}" for a in acts]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(5, 0.4 * len(acts) + 2), 5), sharex=True)
        colors = ["tab:orange" if a["loss"] == "l1" else "tab:green" for a in acts]
        a1.bar(range(len(acts)), [a["kurtosis"] for a in acts], color=colors)
        a1.axhline(KURTOSIS_LIMIT, color="gray", lw=0.8, ls="--")
        a1.set_ylabel("excess kurtosis")
        a1.set_title("region outputs (orange: recommended l1, green: l2)")
        a2.bar(range(len(acts)), [a["max_over_std"] for a in acts], color=colors)
        a2.set_ylabel("max|x| / std")
        a2.set_xticks(range(len(acts)), labels, rotation=60, fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "activations.png", dpi=100)
        plt.close(fig)
        written.append("activations.png")
    (folder / "report.md").write_text(analysis_report(analysis))
    written.append("report.md")
    return written


def analysis_report(analysis: dict) -> str:
    """report.md of `graftc analyze`: locality per layer and activation statistics, in words and tables."""
    att, acts, ks = analysis["attention"], analysis["activations"], analysis["ks"]
    lines = [f"# Attention locality and activation statistics{' of ' + analysis['model'] if analysis.get('model') else ''}",
             "", f"Measured on {analysis['samples']} samples in {analysis['batches']} batch(es) of the model's own "
             "inputs" + (" (for diffusion models: noisy latents x_t at random timesteps of teacher samples, so "
                         "the figures average over the sampler's trajectory)." if family(analysis.get("family", "")).MAKES_IMAGES else "."),
             ""]
    if att:
        k = default_k(analysis)
        key = str(k)
        order = sorted(att, key=lambda a: (-a["band_mass"][key], a["index"]))
        n = att[0]["tokens"]
        lines += ["## Attention locality", "",
                  f"Band mass L_k is the share of attention that a query token gives to tokens at most k positions "
                  f"away on the flattened (raster) token index, averaged over heads, samples and query tokens. "
                  f"L_k = 1 means all attention is within the band; a uniform map over {n} tokens would give about "
                  f"(2k+1)/{n}. `locality_heatmap.png` shows L_k for every layer and k, `locality_bars.png` L_{k} "
                  f"per layer (dashed line: 50%).", "",
                  f"- Most local at k = {k}: " + ", ".join(f"layer {a['index']} ({a['band_mass'][key]:.2f})" for a in order[:3]),
                  f"- Least local at k = {k}: " + ", ".join(f"layer {a['index']} ({a['band_mass'][key]:.2f})" for a in order[::-1][:3]),
                  f"- {sum(a['band_mass'][key] > 0.5 for a in att)} of {len(att)} layers keep more than half of their "
                  f"attention mass within k = {k}.",
                  f"- Most-local-first order (for `layer_order(analysis, {k})`): {[a['index'] for a in order]}.", ""]
        has_grid = any("window_mass" in a for a in att)
        head = "| layer | fqn | " + " | ".join(f"L_{k}" for k in ks) + " | mean dist" + (
            " | " + " | ".join(f"{w}x{w}" for w in analysis["windows"]) + " | mean 2D dist" if has_grid else "") + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for a in att:
            row = f"| {a['index']} | {a['fqn']} | " + " | ".join(f"{a['band_mass'][str(k)]:.3f}" for k in ks) + \
                  f" | {a['mean_distance']:.2f}"
            if has_grid:
                wm = a.get("window_mass", {})
                row += " | " + " | ".join(f"{wm[str(w)]:.3f}" if str(w) in wm else "-" for w in analysis["windows"])
                row += f" | {a['mean_distance_2d']:.2f}" if "mean_distance_2d" in a else " | -"
            lines.append(row + " |")
        lines += [""]
        if has_grid:
            lines += ["Window columns: mass within a k x k window centred on the query on the token grid "
                      "(Chebyshev distance <= (k-1)/2), the natural 2D variant of sliding-window attention. Mean "
                      "distances are in tokens (flattened index) and in grid cells (Euclidean).", ""]
        lines += ["The maps are softmax(q k^T / sqrt(d)) rebuilt from each layer's q and k projections with what the "
                  "layer itself applies: q/k normalization, rotary position embeddings (RoPE) and its attention "
                  "mask (a causal layer's query sees only earlier tokens; padding counts for nothing).", ""]
    else:
        lines += ["## Attention locality", "", "No attention layer could be measured.", ""]
    if acts:
        lines += ["## Activation statistics (stage-1 loss)", "",
                  "Statistics of each attention and mlp region's output over all elements: std, max|x|/std, "
                  "excess kurtosis (0 for a Gaussian) and the share of values more than 6 standard deviations from "
                  "the mean (about 2e-9 for a Gaussian). `activations.png` plots kurtosis and max/std per region.",
                  "", f"Recommended stage-1 loss per node: **{LOSS_RULE}**. METHOD.md's reference results agree in "
                  "spirit: L1 was best for attention (heavy-tailed outliers), L2 for MLPs.", "",
                  "| region | fqn | std | max/std | kurtosis | >6 sigma | loss |", "|---|---|---|---|---|---|---|"]
        for a in acts:
            lines.append(f"| {a['kind']} {a['index']} | {a['fqn']} | {a['std']:.4g} | {a['max_over_std']:.1f} | "
                         f"{a['kurtosis']:.2f} | {a['beyond_6sigma']:.2e} | {a['loss']} |")
        lines.append("")
    if analysis["skipped"]:
        lines += ["## Not measured", ""] + [f"- {s['kind']} {s['fqn']}: {s['reason']}" for s in analysis["skipped"]] + [""]
    return "\n".join(lines)
