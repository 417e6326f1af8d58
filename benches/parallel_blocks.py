"""Depth->width on a DiT-XL/2-shaped model (28 blocks, width 1152, 16 heads, 256 tokens): the original, the
depth-14 parallel model (fused: the width-doubled block of graftc.kernels.parallel), and the same model running
the unfused reference composition (GRAFTC_KERNELS=reference: each branch as its own DiT block, then the merge).

All three are timed side by side in one run: each repetition runs every model once, in turn, and the median per
model is reported, so load on a shared machine hits them alike. FLOPs come from torch's FlopCounterMode; the
three do the same GEMM work (plus the merge projections, +0.5%), so on a CPU, where the GEMMs dominate, this
guards against regressions (the fused model must not be slower than the original by more than 5%); on a GPU at
batch 1, where a forward is bound by kernel launches and per-op overhead, halving the depth is the gain (the
reference work reports 2x; the target here is >= 1.9x).

    python benches/parallel_blocks.py                          # CPU fp32, batch 1 and 8
    python benches/parallel_blocks.py --device cuda --reps 20  # bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import graftc
from graftc.models.dit import build_dit, example_inputs

from block_speed import count_flops, interleaved_times, paired_speedup  # same folder: the shared side-by-side timer

PLAN = {"version": 1, "graft": [{"select": {"kind": "block_pair", "layers": "all"}, "replace": {"op": "parallel"}}]}
CPU_TOLERANCE = 0.05  # fused may be at most 5% slower than the original on a CPU
GPU_TARGET = 1.9  # speedup at batch 1 on a GPU


class Kernels(torch.nn.Module):
    """Runs `model` with GRAFTC_KERNELS set to `mode` (and restores it afterwards)."""

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, *args):
        before = os.environ.get("GRAFTC_KERNELS")
        os.environ["GRAFTC_KERNELS"] = self.mode
        try:
            return self.model(*args)
        finally:
            if before is None:
                os.environ.pop("GRAFTC_KERNELS", None)
            else:
                os.environ["GRAFTC_KERNELS"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="DiT-XL/2", help="graftc DiT config (DiT-XL/2: 28 blocks, width 1152)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per model and batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    parser.add_argument("--out", default=None, help="default benches/results/parallel_blocks_DEVICE.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    start = time.perf_counter()
    original = build_dit(args.config).eval()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the modulation real values
        for block in original.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.02)
    parallel = copy.deepcopy(original)
    result = graftc.compile(parallel, PLAN, example_inputs(original, 1))
    original.to(device, dtype)
    parallel.to(device, dtype)
    setup_s = time.perf_counter() - start
    depth = sum(type(b).__name__ != "PairedAway" for b in parallel.blocks)
    params = {"original": sum(p.numel() for p in original.parameters()),
              "parallel": sum(p.numel() for p in parallel.parameters())}
    models = {"original": original, "fused": Kernels(parallel, "auto"), "reference": Kernels(parallel, "reference")}
    print(f"{args.config}: depth {len(original.blocks)} -> {depth}, params {params['original'] / 1e6:.1f}M -> "
          f"{params['parallel'] / 1e6:.1f}M ({len(result.rewrites)} pairs); {where}, {dtype}; setup {setup_s:.0f}s")
    header = (f"{'batch':>5} {'original ms':>12} {'fused ms':>10} {'ref ms':>10} {'fused x':>8} {'ref x':>7} "
              f"{'GFLOP orig':>11} {'GFLOP par':>10}")
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for batch in args.batches:
        inputs = tuple(t.to(device) for t in example_inputs(original, batch_size=batch, seed=batch))
        inputs = (inputs[0].to(dtype),) + inputs[1:]
        flops = {"original": count_flops(original, inputs), "parallel": count_flops(models["fused"], inputs)}
        times = interleaved_times(models, inputs, args.reps, args.warmup)
        ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
        row = {"batch": batch, "tokens": int(inputs[0].shape[-1] // original.patch_size) ** 2,
               "original_ms": ms["original"], "fused_ms": ms["fused"], "reference_ms": ms["reference"],
               "fused_speedup": paired_speedup(times, "original", "fused"),
               "reference_speedup": paired_speedup(times, "original", "reference"),
               "original_gflop": flops["original"] / 1e9, "parallel_gflop": flops["parallel"] / 1e9,
               "reps": args.reps, "all_ms": {k: [1e3 * t for t in v] for k, v in times.items()}}
        rows.append(row)
        print(f"{batch:>5} {ms['original']:>12.1f} {ms['fused']:>10.1f} {ms['reference']:>10.1f} "
              f"{row['fused_speedup']:>7.2f}x {row['reference_speedup']:>6.2f}x {row['original_gflop']:>11.1f} "
              f"{row['parallel_gflop']:>10.1f}", flush=True)
    if device == "cuda":
        first = rows[0]
        verdict = (f"GPU target: fused >= {GPU_TARGET}x at batch {first['batch']}: "
                   f"{'met' if first['fused_speedup'] >= GPU_TARGET else 'MISSED'} ({first['fused_speedup']:.2f}x)")
    else:  # the merge projections add 2D x D multiply-adds per token and pair: +8% GEMM work at any width
        worst = min(rows, key=lambda r: r["fused_speedup"])
        ideal = worst["original_gflop"] / worst["parallel_gflop"]
        verdict = (f"CPU guard: fused no more than {100 * CPU_TOLERANCE:.0f}% slower than the original: "
                   f"{'met' if worst['fused_speedup'] >= 1 / (1 + CPU_TOLERANCE) else 'MISSED'} "
                   f"(worst {worst['fused_speedup']:.3f}x at batch {worst['batch']}; its FLOP ratio allows "
                   f"{ideal:.3f}x, so {worst['fused_speedup'] / ideal:.3f} of FLOP-ideal)")
    print(verdict)
    out = Path(args.out or f"benches/results/parallel_blocks_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "device": where, "dtype": str(dtype),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "depth": [len(original.blocks), depth], "params": params, "verdict": verdict,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
