#!/usr/bin/env bash
# Install graftc and everything its tests need. Keeps an existing torch (e.g. a CUDA build); where none is
# present, installs the pinned CPU build rather than letting pip pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
