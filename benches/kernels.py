"""graftc's kernels at DiT-XL/2 (256 tokens) and PixArt-Σ 2048² (16,384 tokens) shapes, against their peers.

- Hyena gated conv (`hyena_conv`, the path the dispatcher picks: Triton on CUDA, compiled shifted
  multiply-adds on CPU) vs the F.conv1d reference: achieved GB/s counting the ideal traffic (read the [B, L, 3D]
  projection once, write [B, L, D]) as a fraction of the device's bandwidth.
- Local attention (`window_attention` w=4 as in the paper, `neighborhood_attention` 7x7 and 9x9) vs full SDPA
  (no mask), the dense masked reference (where the N x N mask fits) and compiled FlexAttention with the same
  mask: achieved TFLOP/s counting only the
  pairs inside the window, as a fraction of the device's GEMM peak.

The device's peaks: on CPU measured here first (a large copy and a large fp32 GEMM); on GPU the datasheet
figures for H100/H200 SXM. Every row of a table is timed in the same run, interleaved (median of reps).

    python benches/kernels.py [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from graftc.kernels.hyena import hyena_conv
from graftc.kernels.hyena.naive import hyena_reference
from graftc.kernels.local_attention import neighborhood_attention, window_attention
from graftc.kernels.local_attention.naive import neighborhood_attention_reference, window_attention_reference

DATASHEET = {"H100": {"gbps": 3350.0, "tflops": 989.0}, "H200": {"gbps": 4800.0, "tflops": 989.0}}  # bf16 dense


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device: str, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, interleaved within each repetition."""
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_peaks(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        sheet = next((v for k, v in DATASHEET.items() if k in name), None)
        if sheet:
            return {"name": name, "source": "datasheet", **sheet}
    big = torch.empty(64 * 2**20, device=device)  # 256 MB
    a = torch.randn(4096, 4096, device=device)
    t = timed({"copy": lambda: big.clone(), "gemm": lambda: a @ a}, device, reps=5)
    return {"name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "source": "measured here",
            "gbps": 2 * big.numel() * 4 / t["copy"] / 1e9, "tflops": 2 * 4096**3 / t["gemm"] / 1e12}


def bench_hyena(device: str, dtype: torch.dtype, shapes: dict, reps: int, peaks: dict) -> list[dict]:
    rows = []
    for label, (batch, length, width) in shapes.items():
        u = torch.randn(batch, length, 3 * width, device=device, dtype=dtype)
        fw = torch.randn(3 * width, 4, device=device, dtype=dtype)
        fb = torch.randn(3 * width, device=device, dtype=dtype)
        iw = torch.randn(width, 4, device=device, dtype=dtype)
        for variant, args in {"X": (fw, fb, None), "SE": (fw, fb, iw)}.items():
            with torch.no_grad():
                t = timed({"kernel": lambda: hyena_conv(u, *args), "reference": lambda: hyena_reference(u, *args)},
                          device, reps)
            traffic = 4 * batch * length * width * u.element_size()  # read 3D, write D per position
            for path, seconds in t.items():
                gbps = traffic / seconds / 1e9
                rows.append({"kernel": f"hyena_{variant}", "shape": label, "path": path, "ms": 1e3 * seconds,
                             "gbps": gbps, "of_peak": gbps / peaks["gbps"], "speedup_vs_reference": t["reference"] / seconds})
    return rows


def _pairs_1d(tokens: int, window: int) -> int:
    return sum(min(tokens - 1, i + window) - max(0, i - window) + 1 for i in range(tokens))


def _pairs_2d(height: int, width: int, kernel: int) -> int:
    r = kernel // 2
    ys = sum(min(height - 1, y + r) - max(0, y - r) + 1 for y in range(height))
    xs = sum(min(width - 1, x + r) - max(0, x - r) + 1 for x in range(width))
    return ys * xs


def _compiled_flex(mask_mod, tokens: int, device):
    """A compiled flex_attention callable (q, k, v) -> out whose block mask skips the blocks no query sees."""
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    attend = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: attend(q, k, v, block_mask=block_mask)


def flex_window_attention(tokens: int, window: int, causal: bool = False, device="cpu"):
    """Compiled FlexAttention with window_attention's mask: (q, k, v) -> out."""
    def mask_mod(b, h, i, j):
        near = (i - j).abs() <= window
        return near & (j <= i) if causal else near
    return _compiled_flex(mask_mod, tokens, device)


def flex_neighborhood_attention(grid: tuple[int, int], kernel: int, device="cpu"):
    """Compiled FlexAttention with neighborhood_attention's mask, tokens in raster order (not reordered into
    rectangular tiles first: that was slower, see RESULTS.md): (q, k, v) -> out."""
    height, width = grid
    r = kernel // 2

    def mask_mod(b, h, i, j):
        return ((i // width - j // width).abs() <= r) & ((i % width - j % width).abs() <= r)
    return _compiled_flex(mask_mod, height * width, device)


def bench_local(device: str, dtype: torch.dtype, grids: dict, reps: int, peaks: dict, heads: int = 16,
                head_dim: int = 72) -> list[dict]:
    rows = []
    for label, (height, width) in grids.items():
        tokens = height * width
        q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        cases = {"window w=4": (lambda: window_attention(q, k, v, 4), lambda: window_attention_reference(q, k, v, 4),
                                flex_window_attention(tokens, 4, device=device), _pairs_1d(tokens, 4))}
        for kernel in (7, 9):
            cases[f"neighborhood {kernel}x{kernel}"] = (
                lambda kernel=kernel: neighborhood_attention(q, k, v, (height, width), kernel),
                lambda kernel=kernel: neighborhood_attention_reference(q, k, v, (height, width), kernel),
                flex_neighborhood_attention((height, width), kernel, device=device),
                _pairs_2d(height, width, kernel))
        full = lambda: F.scaled_dot_product_attention(q, k, v)
        for case, (ours, reference, flex, pairs) in cases.items():
            fns = {"graftc": ours, "flex (compiled)": lambda flex=flex: flex(q, k, v), "sdpa full": full}
            if tokens <= 4096:  # the reference materializes [heads, N, N]
                fns["reference (masked)"] = reference
            with torch.no_grad():
                t = timed(fns, device, reps)
            flops = 4 * heads * head_dim * pairs
            for path, seconds in t.items():
                tflops = flops / seconds / 1e12
                rows.append({"kernel": case, "shape": label, "path": path, "ms": 1e3 * seconds, "tflops": tflops,
                             "of_peak": tflops / peaks["tflops"], "speedup_vs_sdpa": t["sdpa full"] / seconds,
                             "flop_ideal_vs_sdpa": tokens * tokens / pairs})
    return rows


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Columns (key, title, format); each column as wide as its widest cell, the first left-aligned."""
    cells = [[format(row[key], fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(columns)]
    line = lambda values: " ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    print(line([title for _, title, _ in columns]) + "\n" + "-" * (sum(widths) + len(widths) - 1))
    for c in cells:
        print(line(c), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="DiT-XL/2 shapes only, fewer reps")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    torch._dynamo.config.recompile_limit = 256  # one compiled FlexAttention per mask: past the limit Flex would run eagerly
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = 3 if args.quick else args.reps
    peaks = device_peaks(device)
    print(f"device {peaks['name']} ({peaks['source']}): {peaks['gbps']:.0f} GB/s, {peaks['tflops']:.2f} TFLOP/s, {dtype}")

    hyena_shapes = {"DiT-XL/2 [1,256,3x1152]": (1, 256, 1152), "PixArt 2048² [1,16384,3x1152]": (1, 16384, 1152),
                    "[8,4096,3x1152]": (8, 4096, 1152)}
    grids = {"DiT-XL/2 16x16": (16, 16), "64x64": (64, 64), "PixArt 2048² 128x128": (128, 128)}
    if args.quick:
        hyena_shapes = dict(list(hyena_shapes.items())[:1])
        grids = dict(list(grids.items())[:2])

    hyena = bench_hyena(device, dtype, hyena_shapes, reps, peaks)
    for r in hyena:
        r["name"] = f"{r['kernel']} {r['shape']}"
    print("\nHyena gated conv (forward)")
    print_table(hyena, [("name", "kernel / shape", ""), ("path", "path", ""), ("ms", "ms", ".3f"),
                        ("gbps", "GB/s", ".1f"), ("of_peak", "of peak", ".1%"),
                        ("speedup_vs_reference", "vs ref", ".2f")])
    local = bench_local(device, dtype, grids, reps, peaks)
    for r in local:
        r["name"] = f"{r['kernel']} {r['shape']}"
    print("\nLocal attention (forward), 16 heads x 72, batch 1")
    print_table(local, [("name", "kernel / shape", ""), ("path", "path", ""), ("ms", "ms", ".2f"),
                        ("tflops", "TFLOP/s", ".3f"), ("of_peak", "of peak", ".1%"),
                        ("speedup_vs_sdpa", "vs sdpa", ".2f"), ("flop_ideal_vs_sdpa", "ideal vs sdpa", ".1f")])
    out = Path(args.out or f"benches/results/kernels_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": peaks, "dtype": str(dtype), "torch": torch.__version__,
                               "hyena": hyena, "local_attention": local}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
