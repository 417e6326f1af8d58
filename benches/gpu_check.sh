#!/usr/bin/env bash
# The one prepared script for a lent GPU (the H200 machine: no package index there). About 7 minutes at most by
# construction: every step has a time limit, cut further when the whole budget (GPU_CHECK_BUDGET, 400 s) runs
# low; a step that fails or times out is recorded and the next one runs. Steps: the GPU's own copy bandwidth and
# bf16 GEMM rate (the rooflines), the kernel tests on CUDA (fp32 and bf16: tests/test_kernel_*.py,
# tests/test_decode.py, the fused paths of tests/test_parallel.py), then benches/kernels.py,
# benches/block_speed.py, benches/parallel_blocks.py and benches/decode.py (where present), and a summary that
# reads every figure against its roofline and the issue's targets.
#
# Before: `bash scripts/gpu_wheels.sh` here (pydantic, diffusers... into .whl/). Then, with the device tool:
#   run(command="bash benches/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Writes to $OUT (else benches/results/gpu_check/): gpu_check.log (everything printed), summary.md,
# summary.json, and each benchmark's JSON: at most 8 files, as the device tool returns.
#
# graftc is not pip-installed: the wheels go to a temporary --target folder and graftc runs from this checkout
# through a package view (graftc/ with passes/ and kernels/ linked in as pyproject's package-dir maps them), all
# on PYTHONPATH. Knobs: PYTHON (python3), GPU_CHECK_BUDGET (seconds), GPU_CHECK_WHEELS (.whl),
# GPU_CHECK_DRY_RUN=1 (no GPU: skip the CUDA assertion and run everything on the CPU with tiny sizes, to test
# this script's plumbing).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
RESULTS=${OUT:-$ROOT/benches/results/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-400}
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RESERVE=30  # seconds kept for the summary (and a killed step's 10 s grace)
START=$SECONDS
mkdir -p "$RESULTS"
: > "$WORK/steps.tsv"

step() {  # step NAME LIMIT COMMAND...: at most LIMIT seconds, fewer if the budget runs low; never fatal
    local name=$1 limit=$2 left t0 rc status
    shift 2
    left=$(( BUDGET - (SECONDS - START) - RESERVE ))
    (( limit > left )) && limit=$left
    echo
    echo "== $name: limit ${limit}s, $(( SECONDS - START ))s elapsed: $*"
    if (( limit < 15 )); then
        echo "== $name SKIPPED: the ${BUDGET}s budget is spent"
        printf '%s\tskipped (budget)\t0\t0\n' "$name" >> "$WORK/steps.tsv"
        return 0
    fi
    t0=$SECONDS
    # SIGINT first (pytest still writes its report, Python prints where it was), SIGKILL 10 s later; not
    # --foreground, so the signals reach the whole process group (pytest-xdist's workers too)
    timeout -s INT -k 10 "$limit" "$@" < /dev/null
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) (( SECONDS - t0 >= limit )) && status="timeout (${limit}s)" || status="killed (exit $rc)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    echo "== $name: $status after $(( SECONDS - t0 ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$limit" >> "$WORK/steps.tsv"
}

missing() {  # missing NAME WHY: a step that cannot run here
    echo
    echo "== $1: not run: $2"
    printf '%s\tnot run: %s\t0\t0\n' "$1" "$2" >> "$WORK/steps.tsv"
}

write_helpers() {
    # Installs the carried wheels the image lacks (or has older): a wheel is skipped when the image already has
    # that package at the same or a newer version, so pydantic etc. go in and the image's own packages stay.
    cat > "$WORK/pick_wheels.py" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from packaging.version import Version

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, wanted = whl.name.split("-")[:2]
    try:
        have = version(re.sub(r"[-_.]+", "-", name))
    except PackageNotFoundError:
        have = None
    keep = have is not None and Version(have) >= Version(wanted)
    print(f"  {name} {wanted}: image has {have or 'none'} -> {'keep the image' if keep else 'install'}", file=sys.stderr)
    if not keep:
        print(whl)
EOF
    # The package view: graftc's packages where pyproject's package-dir puts them (graftc.kernels = kernels/...),
    # as links into this checkout, so `import graftc` works from PYTHONPATH without installing anything.
    cat > "$WORK/package_view.py" <<'EOF'
import os, sys, tomllib
from pathlib import Path

root, view = Path(sys.argv[1]), Path(sys.argv[2])
dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
top = [p for p in dirs if "." not in p]
for package in top:
    target = view / package
    target.mkdir(parents=True)
    for entry in (root / dirs[package]).iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, target / entry.name)
for package, folder in dirs.items():
    if "." in package:
        link = view.joinpath(*package.split("."))
        if link.is_symlink() and link.resolve() == (root / folder).resolve():
            continue
        if link.is_symlink():
            link.unlink()
        os.symlink(root / folder, link)
print(f"package view {view}: " + ", ".join(f"{p} -> {dirs[p]}/" for p in dirs))
EOF
    cat > "$WORK/roofline.py" <<'EOF'
"""The GPU's own ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 GEMM."""
import json, sys
import torch

result = {"reference": {"copy_gbps": 4300.0, "gemm_bf16_tflops": 790.0,
                        "source": "measured on this workplace's H200 machines, 2026-10/11"}}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    result["device"] = {"name": props.name, "multiprocessors": props.multi_processor_count,
                        "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                        "torch": torch.__version__, "cuda": torch.version.cuda}

    def seconds(fn, reps=20):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    src = torch.empty(2**29, dtype=torch.float32, device="cuda")  # 2 GiB, far past the 60 MB L2
    dst = torch.empty_like(src)
    copy_s = seconds(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_s = seconds(lambda: a @ b)
    result["measured"] = {"copy_gbps": 2 * 2**31 / copy_s / 1e9, "gemm_bf16_tflops": 2 * 8192**3 / gemm_s / 1e12}
    print(f"{props.name}: copy {result['measured']['copy_gbps']:.0f} GB/s, "
          f"bf16 GEMM {result['measured']['gemm_bf16_tflops']:.0f} TFLOP/s")
else:
    print("no CUDA device: the summary uses the reference rooflines")
with open(sys.argv[1], "w") as f:
    json.dump(result, f, indent=2)
EOF
    cat > "$WORK/summary.py" <<'EOF'
"""Every figure against its roofline and the issue's targets -> summary.md and summary.json (and stdout)."""
import json, sys, traceback
import xml.etree.ElementTree as ET
from pathlib import Path

work, results = Path(sys.argv[1]), Path(sys.argv[2])
md, data = [], {}


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except Exception:
        return None


def table(header, rows):
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "---|" * len(header))
    md.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    md.append("")


def section(title):
    def wrap(fn):
        md.append(f"## {title}\n")
        try:
            fn()
        except Exception:
            md.append("summary failed here:\n\n```\n" + traceback.format_exc(limit=3) + "```\n")
        return fn
    return wrap


roof = load(work / "roofline.json") or {}
data["roofline"] = roof
measured = roof.get("measured") or {}
reference = roof.get("reference") or {"copy_gbps": 4300.0, "gemm_bf16_tflops": 790.0}
BW = measured.get("copy_gbps") or reference["copy_gbps"]
PEAK = measured.get("gemm_bf16_tflops") or reference["gemm_bf16_tflops"]
source = "measured in this run" if measured else "reference figures (not measured in this run)"
device = (roof.get("device") or {}).get("name", "no CUDA device (dry run?)")
md.append(f"# gpu_check summary: {device}\n")
md.append(f"Rooflines ({source}): copy {BW:.0f} GB/s, bf16 GEMM {PEAK:.0f} TFLOP/s"
          + (f"; reference {reference['copy_gbps']:.0f} GB/s, {reference['gemm_bf16_tflops']:.0f} TFLOP/s" if measured else "")
          + "\n")


@section("Steps")
def _():
    rows = [line.rstrip("\n").split("\t") for line in (work / "steps.tsv").read_text().splitlines() if line.strip()]
    data["steps"] = [dict(zip(("step", "status", "seconds", "limit"), r)) for r in rows]
    table(["step", "status", "seconds", "limit s"], rows)


@section("Tests on CUDA")
def _():
    data["tests"] = {}
    rows = []
    for xml in sorted(work.glob("*.xml")):
        total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed = []
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in total:
                total[key] += int(suite.get(key, 0))
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
        data["tests"][xml.stem] = {**total, "passed": passed, "failed_tests": failed}
        rows.append([xml.stem, passed, total["failures"] + total["errors"], total["skipped"], ", ".join(failed[:12])])
    table(["suite", "passed", "failed", "skipped", "failing tests"], rows or [["(no junit report)", "", "", "", ""]])


@section("Kernels (benches/kernels.py) against the rooflines")
def _():
    k = load(results / "kernels_cuda.json") or load(results / "kernels_cpu.json")
    if not k:
        md.append("no kernels JSON\n")
        return
    data["kernels"] = {"dtype": k.get("dtype"), "hyena": [], "local_attention": []}
    rows = []
    for r in k["hyena"]:
        frac = r["gbps"] / BW
        data["kernels"]["hyena"].append({**r, "of_copy_roofline": frac})
        rows.append([r["kernel"], r["shape"], r["path"], f"{r['ms']:.3f}", f"{r['gbps']:.0f}", f"{frac:.1%}",
                     f"{r['speedup_vs_reference']:.2f}x"])
    md.append(f"Hyena gated conv, {k.get('dtype')}: target >= 80% of the copy roofline for the fused kernel\n")
    table(["kernel", "shape", "path", "ms", "GB/s", "of copy roofline", "vs reference"], rows)
    rows = []
    by_case = {}
    for r in k["local_attention"]:
        by_case.setdefault((r["kernel"], r["shape"]), {})[r["path"]] = r
    for (kernel, shape), paths in by_case.items():
        ours, flex = paths.get("graftc"), paths.get("flex (compiled)")
        if not ours:
            continue
        vs_flex = flex["ms"] / ours["ms"] if flex else None
        frac = ours["tflops"] / PEAK
        data["kernels"]["local_attention"].append({"kernel": kernel, "shape": shape, "graftc_ms": ours["ms"],
                                                   "tflops": ours["tflops"], "of_gemm_roofline": frac,
                                                   "speedup_vs_flex": vs_flex, "speedup_vs_sdpa": ours["speedup_vs_sdpa"],
                                                   "flop_ideal_vs_sdpa": ours["flop_ideal_vs_sdpa"]})
        rows.append([kernel, shape, f"{ours['ms']:.3f}", f"{ours['tflops']:.1f}", f"{frac:.1%}",
                     f"{vs_flex:.2f}x" if vs_flex else "-", f"{ours['speedup_vs_sdpa']:.2f}x",
                     f"{ours['flop_ideal_vs_sdpa']:.1f}x"])
    md.append("Local attention (graftc's kernel), window pairs only: against the GEMM roofline, compiled "
              "FlexAttention with the same mask, and full SDPA\n")
    table(["kernel", "shape", "ms", "TFLOP/s", "of GEMM roofline", "vs flex", "vs sdpa", "ideal vs sdpa"], rows)


@section("One DiT-XL/2-shaped block (benches/block_speed.py)")
def _():
    b = load(results / "block_speed_cuda.json") or load(results / "block_speed_cpu.json")
    if not b:
        md.append("no block_speed JSON\n")
        return
    rows, out = [], []
    for r in b["rows"]:
        t_orig = r["original_gflop"] / r["original_ms"]  # GFLOP/ms = TFLOP/s
        t_graft = r["graft_gflop"] / r["graft_ms"]
        out.append({**{k: v for k, v in r.items() if k != "all_ms"}, "original_tflops": t_orig, "graft_tflops": t_graft,
                    "original_of_gemm_roofline": t_orig / PEAK, "graft_of_gemm_roofline": t_graft / PEAK})
        rows.append([r["op"], r["tokens"], f"{r['original_ms']:.2f}", f"{r['graft_ms']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['flop_ideal']:.2f}x", f"{r['fraction_of_ideal']:.1%}", f"{t_orig:.3g} ({t_orig / PEAK:.1%})",
                     f"{t_graft:.3g} ({t_graft / PEAK:.1%})"])
    data["block_speed"] = {"dtype": b.get("dtype"), "rows": out}
    table(["op", "tokens", "orig ms", "graft ms", "speedup", "FLOP-ideal", "of ideal", "orig TFLOP/s", "graft TFLOP/s"],
          rows)
    hx = [r for r in b["rows"] if r["op"] == "hyena_x" and r["tokens"] == max(x["tokens"] for x in b["rows"])]
    if hx:
        s = hx[0]["speedup"]
        projected = 2 / (1 + 1 / s)
        data["block_speed"]["projected_half_hyena_x"] = {"tokens": hx[0]["tokens"], "block_speedup": s,
                                                         "model_speedup": projected}
        md.append(f"Projected forward of a 28-block model with 14 blocks Hyena-X at {hx[0]['tokens']} tokens "
                  f"(block time only, no cross-attention or embedders): 2 / (1 + 1/{s:.2f}) = **{projected:.2f}x** "
                  f"(target for PixArt-Σ 2048², 16,384 tokens: >= 1.6x; the paper: 1.43x on an H100)\n")


@section("Depth->width (benches/parallel_blocks.py)")
def _():
    p = load(results / "parallel_blocks_cuda.json") or load(results / "parallel_blocks_cpu.json")
    if not p:
        md.append("no parallel_blocks JSON\n")
        return
    rows, out = [], []
    for r in p["rows"]:
        t_orig = r["original_gflop"] / r["original_ms"]
        t_fused = r["parallel_gflop"] / r["fused_ms"]
        out.append({**{k: v for k, v in r.items() if k != "all_ms"}, "original_tflops": t_orig, "fused_tflops": t_fused})
        rows.append([r["batch"], f"{r['original_ms']:.2f}", f"{r['fused_ms']:.2f}", f"{r['reference_ms']:.2f}",
                     f"{r['fused_speedup']:.2f}x", f"{r['reference_speedup']:.2f}x",
                     f"{t_orig:.3g} ({t_orig / PEAK:.1%})", f"{t_fused:.3g} ({t_fused / PEAK:.1%})"])
    data["parallel_blocks"] = {"config": p.get("config"), "dtype": p.get("dtype"), "verdict": p.get("verdict"), "rows": out}
    table(["batch", "orig ms", "fused ms", "unfused ms", "fused x", "unfused x", "orig TFLOP/s", "fused TFLOP/s"], rows)
    md.append(f"{p.get('verdict')} (target: fused >= 1.9x at batch 1)\n")


@section("Decode (benches/decode.py)")
def _():
    d = load(results / "decode_cuda.json") or load(results / "decode_cpu.json")
    if not d:
        md.append("no decode JSON (benches/decode.py absent or failed)\n")
        return
    rows, out = [], []
    for r in d["rows"]:  # a decode step reads every parameter and the whole cache once: bytes / time vs the copy roofline
        gbps = r["bytes_per_step"] / (r["decode_ms"] / 1e3) / 1e9
        out.append({k: v for k, v in r.items() if not k.startswith("all_")} | {"gbps": gbps, "of_copy_roofline": gbps / BW})
        ratio = (f"{r['decode_speedup']:.2f}x | {r['bandwidth_ideal']:.2f}x | {r['fraction_of_ideal']:.0%}"
                 if "decode_speedup" in r else "| |")
        rows.append([r["context"], r["batch"], r["model"], f"{r['decode_ms']:.2f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['cache_bytes'] / 1e6:.1f}", f"{gbps:.3g} ({gbps / BW:.1%})", ratio])
    data["decode"] = {k: v for k, v in d.items() if k != "rows"} | {"rows": out}
    table(["context", "batch", "model", "ms/step", "tok/s", "cache MB", "GB/s (of copy roofline)", "speedup",
           "bandwidth ideal", "of ideal"], rows)
    md.append(f"{d.get('verdict')}\n")

(results / "summary.md").write_text("\n".join(md) + "\n")
(results / "summary.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
print("\n".join(md))
EOF
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, results in $RESULTS, scratch $WORK$([[ $DRY == 1 ]] && echo ', DRY RUN (CPU)')"
    write_helpers
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
    if [[ $DRY != 1 ]]; then
        "$PY" -c "import torch, triton; assert torch.cuda.is_available(); print('triton', triton.__version__, '|', torch.cuda.get_device_name())" \
            || { echo "gpu_check: no CUDA torch + triton here (GPU_CHECK_DRY_RUN=1 to run without)"; missing all "no CUDA"; "$PY" "$WORK/summary.py" "$WORK" "$RESULTS" > /dev/null; return 1; }
        DEVICE=cuda
    else
        DEVICE=cpu
    fi

    # The wheels graftc needs and the image lacks, then graftc from this checkout: nothing is pip-installed into
    # the image. PYTHONPATH: the package view, the wheels, then the checkout itself (for `from tests import ...`).
    local site=$WORK/site picked
    mkdir -p "$site"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        picked=$("$PY" "$WORK/pick_wheels.py" "$WHEELS") || picked=$(ls "$WHEELS"/*.whl)
        if [[ -n $picked ]]; then
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target "$site" $picked || echo "gpu_check: installing the wheels failed"
        fi
    else
        echo "gpu_check: no wheels in $WHEELS (run scripts/gpu_wheels.sh here first and carry .whl)"
    fi
    "$PY" "$WORK/package_view.py" "$ROOT" "$WORK/src" || echo "gpu_check: the package view failed"
    export PYTHONPATH="$WORK/src:$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    # -P: the working folder stays off sys.path, where the checkout's graftc/ (without kernels/) would shadow the view
    if ! (cd "$WORK" && "$PY" -P -c "
import graftc, graftc.kernels, graftc.passes, pydantic, diffusers, transformers, triton, torch
graftc.compile  # loads the compiler, rules and every pass
print('import graftc: ok |', graftc.__file__, '| pydantic', pydantic.__version__, '| diffusers', diffusers.__version__,
      '| transformers', transformers.__version__, '| triton', triton.__version__, '| torch', torch.__version__)"); then
        echo "gpu_check: import graftc failed: nothing can be measured"
        missing all "import graftc failed"
        "$PY" "$WORK/summary.py" "$WORK" "$RESULTS" > /dev/null
        return 1
    fi
    printf 'setup\tok\t%s\t0\n' "$(( SECONDS - START ))" >> "$WORK/steps.tsv"

    step roofline 60 "$PY" "$WORK/roofline.py" "$WORK/roofline.json"

    # Tests: pytest from the checkout with -P (PYTHONSAFEPATH, inherited by subprocesses) for the same reason.
    local workers=8
    [[ $DRY == 1 ]] && workers=2
    pytest_step() {  # pytest_step NAME LIMIT ARGS...
        local name=$1 limit=$2
        shift 2
        step "$name" "$limit" env PYTHONSAFEPATH=1 "$PY" -m pytest -q -n "$workers" -rfE --tb=short --durations=5 \
            --junitxml="$WORK/$name.xml" "$@"
    }
    pytest_step kernel_tests 150 tests/test_kernel_*.py
    if [[ -f tests/test_decode.py ]]; then  # the decode paths (call contract): cached generate == uncached
        pytest_step decode_tests 60 tests/test_decode.py
    else
        missing decode_tests "tests/test_decode.py absent"
    fi
    pytest_step parallel_tests 60 tests/test_parallel.py -k "fused or triton or gpu or merge_input or modulated"

    # Benchmarks, most important first; each writes its JSON straight into $RESULTS.
    local decode_args
    if [[ $DRY == 1 ]]; then  # CPU, tiny sizes: the plumbing, not the figures
        step kernels 150 "$PY" benches/kernels.py --device cpu --quick --reps 1 --out "$RESULTS/kernels_cpu.json"
        step block_speed 90 "$PY" benches/block_speed.py --device cpu --tokens 256 --ops hyena_x swa --width 256 \
            --heads 4 --reps 2 --out "$RESULTS/block_speed_cpu.json"
        step parallel_blocks 90 "$PY" benches/parallel_blocks.py --device cpu --config DiT-S/2 --batches 1 --reps 2 \
            --warmup 1 --out "$RESULTS/parallel_blocks_cpu.json"
        decode_args=(--device cpu --contexts 64 --batches 1 --steps 2 --warmup 1 --reps 1 --ops swa --no-check)
    else
        # kernels: every shape (the PixArt 2048² one is the roofline target), FlexAttention compiled per mask
        step kernels 130 "$PY" benches/kernels.py --device cuda --reps 5 --out "$RESULTS/kernels_cuda.json"
        # block_speed: 4096 and 16384 tokens (the PixArt-Σ 2048² projection), every op
        step block_speed 90 "$PY" benches/block_speed.py --device cuda --tokens 4096 16384 --reps 10 \
            --out "$RESULTS/block_speed_cuda.json"
        step parallel_blocks 90 "$PY" benches/parallel_blocks.py --device cuda --reps 20 --warmup 3 \
            --out "$RESULTS/parallel_blocks_cuda.json"
        # decode: 1k and the 8k target context, batch 1 and 8, swa/hyena_x/mamba2 beside the teacher
        decode_args=(--device cuda --contexts 1024 8192 --batches 1 8 --steps 20 --warmup 3 --reps 2)
    fi
    if [[ -f benches/decode.py ]]; then
        step decode 80 "$PY" benches/decode.py "${decode_args[@]}" --out "$RESULTS/decode_$DEVICE.json"
    else
        missing decode "benches/decode.py absent"
    fi

    echo
    echo "== summary ($(( SECONDS - START ))s elapsed)"
    timeout 25 "$PY" "$WORK/summary.py" "$WORK" "$RESULTS" || echo "gpu_check: the summary failed"
    echo "gpu_check: done in $(( SECONDS - START ))s; $(ls "$RESULTS" | wc -l) files in $RESULTS"
}

main 2>&1 | tee "$RESULTS/gpu_check.log"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$status"
