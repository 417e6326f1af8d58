"""One DiT-XL/2-shaped block (width 1152, 16 heads, MLP ratio 4), original vs grafted with each attention op.

Every variant is timed side by side in one run: each repetition times every variant once, in turn. The
speedup is the median over repetitions of the ratio within a repetition (the original and the graft ran
seconds apart, so load on this shared machine hits both alike); the ms columns are medians per variant. The FLOP-ideal speedup
is (FLOPs of the original block) / (FLOPs of the grafted block), both counted by torch's FlopCounterMode (the
graftc kernels register their exact FLOP formulas: a window counts only the pairs it computes). The last
column is how much of that ideal the measured speedup reaches.

    python benches/block_speed.py                       # tokens 1024 4096 16384, every op
    python benches/block_speed.py --tokens 1024 --ops hyena_x swa --reps 5
    python benches/block_speed.py --pool benches/results/block_speed_cpu_paired_run*.json   # runs pooled
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import graftc
from graftc.models.dit import DiTBlock
from graftc.passes import rules_by_op

RULES = rules_by_op()
OPS = {op: {"op": op} for op, rule in RULES.items() if rule.plugs_in and rule.kinds[0] == "attention"}  # defaults


def grafted(block: torch.nn.Module, inputs: tuple, replacement: dict) -> torch.nn.Module:
    replacement = dict(replacement)
    if "grid" in RULES[replacement["op"]].needs:  # a lone block has no patch embedding to infer its grid from
        side = math.isqrt(inputs[0].shape[1])
        replacement["grid"] = [side, side]
    plan = {"version": 1, "graft": [{"select": {"kind": "attention", "layers": "all"}, "replace": replacement}]}
    return graftc.compile(copy.deepcopy(block), plan, inputs).model


def count_flops(model: torch.nn.Module, inputs: tuple) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def paired_speedup(times: dict[str, list[float]], base: str, other: str) -> float:
    """Median over repetitions of base time / other time, each ratio from one repetition."""
    return statistics.median(b / o for b, o in zip(times[base], times[other]))


def interleaved_times(models: dict, inputs: tuple, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per forward of each model over `reps` repetitions, each repetition running every model once."""
    times = {name: [] for name in models}
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    with torch.no_grad():
        for rep in range(warmup + reps):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(*inputs)
                sync()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def pooled(paths: list[str]) -> None:
    """Median fraction of FLOP-ideal over every repetition of several saved runs: single runs on a shared
    machine scatter by +-5 points; the pooled median is the steadier figure."""
    fractions: dict[tuple[str, int], list[float]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            times = row["all_ms"]
            fractions.setdefault((row["op"], row["tokens"]), []).extend(
                o / g / row["flop_ideal"] for o, g in zip(times["original"], times[row["op"]]))
    print(f"{len(paths)} runs pooled\n{'op':<9} {'tokens':>6} {'reps':>5} {'of ideal':>9}")
    for (op, tokens), values in fractions.items():
        print(f"{op:<9} {tokens:>6} {len(values):>5} {100 * statistics.median(values):>8.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    parser.add_argument("--out", default=None, help="default benches/results/block_speed_DEVICE.json")
    parser.add_argument("--pool", nargs="+", metavar="JSON", help="measure nothing: pool these saved runs")
    args = parser.parse_args()
    if args.pool:
        return pooled(args.pool)

    torch.manual_seed(0)
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    header = f"{'op':<9} {'tokens':>6} {'orig ms':>9} {'graft ms':>9} {'speedup':>8} {'ideal':>7} {'of ideal':>9}"
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"DiT-XL/2-shaped block (width {args.width}, {args.heads} heads), batch 1, {where}, {dtype}")
    print(header + "\n" + "-" * len(header))
    for tokens in args.tokens:
        block = DiTBlock(args.width, args.heads, 4.0).eval().to(device, dtype)
        inputs = (torch.randn(1, tokens, args.width, device=device, dtype=dtype),
                  torch.randn(1, args.width, device=device, dtype=dtype))
        models = {"original": block} | {op: grafted(block, inputs, OPS[op]) for op in args.ops}
        flops = {name: count_flops(m, inputs) for name, m in models.items()}
        reps = max(2, args.reps if tokens <= 4096 else args.reps // 2)
        times = interleaved_times(models, inputs, reps)
        seconds = {name: statistics.median(ts) for name, ts in times.items()}
        for op in args.ops:
            speedup, ideal = paired_speedup(times, "original", op), flops["original"] / flops[op]
            row = {"op": op, "tokens": tokens, "original_ms": 1e3 * seconds["original"], "graft_ms": 1e3 * seconds[op],
                   "speedup": speedup, "flop_ideal": ideal, "fraction_of_ideal": speedup / ideal,
                   "original_gflop": flops["original"] / 1e9, "graft_gflop": flops[op] / 1e9, "reps": reps,
                   "all_ms": {"original": [1e3 * t for t in times["original"]], op: [1e3 * t for t in times[op]]}}
            rows.append(row)
            print(f"{op:<9} {tokens:>6} {row['original_ms']:>9.1f} {row['graft_ms']:>9.1f} {speedup:>7.2f}x "
                  f"{ideal:>6.2f}x {100 * speedup / ideal:>8.1f}%", flush=True)
    out = Path(args.out or f"benches/results/block_speed_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": where, "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "width": args.width, "heads": args.heads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
