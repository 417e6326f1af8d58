#!/usr/bin/env bash
# The one prepared script for a lent GPU (kept under 8 minutes): kernel tests on CUDA, then the kernel and block
# benchmarks. Run from anywhere; results go to $OUT (the device tool's output folder) or benches/results.
#   bash benches/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-benches/results}
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$results/gpu.txt"
python -c "import torch, triton; assert torch.cuda.is_available(); print('torch', torch.__version__, 'triton', triton.__version__)" \
    || { echo "no CUDA torch + triton here"; exit 1; }
python -c "import graftc" 2>/dev/null || pip install -q --no-deps -e . || exit 1

step() {  # name, seconds, command...: run with a time limit, keep going on failure, log to $results/name.txt
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$results/$name.txt"
    echo "== $name exit ${PIPESTATUS[0]}"
}
step gpu_tests 180 python -m pytest -q tests/test_kernel_hyena.py tests/test_kernel_local_attention.py
step parallel_tests 90 python -m pytest -q tests/test_parallel.py -k "fused or triton or gpu or merge_input or modulated"
step kernels_cuda 150 python benches/kernels.py --device cuda --out "$results/kernels_cuda.json"
step block_speed_cuda 120 python benches/block_speed.py --device cuda --reps 10 --out "$results/block_speed_cuda.json"
step parallel_blocks_cuda 150 python benches/parallel_blocks.py --device cuda --reps 20 --warmup 3 --out "$results/parallel_blocks_cuda.json"
