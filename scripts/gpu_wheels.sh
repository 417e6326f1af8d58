#!/usr/bin/env bash
# Fetch, here (the CPU machine, which reaches the package index), the wheels graftc needs on the GPU machine's
# image, which reaches none. They go to .whl/ (git-ignored); benches/gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target DIR` and puts DIR on PYTHONPATH. The device tool sends ignored paths
# only when asked: call it with carry [".whl"].
#   bash scripts/gpu_wheels.sh            # then: run(command="bash benches/gpu_check.sh", carry=[".whl"])
#
# The image (python3 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, huggingface-hub 1.33,
# safetensors 0.8, numpy 2.5, accelerate, peft, timm, networkx, matplotlib, pyyaml, tqdm, pillow, regex,
# requests, filelock, packaging, pytest, pytest-xdist, hypothesis, scipy, scikit-learn, tensorboard,
# typing-extensions) lacks exactly these, checked requirement by requirement against its package list:
#   pydantic 2.13.4        graftc's plans          needs annotated-types, pydantic-core ==2.46.4,
#                                                  typing-inspection, typing-extensions >=4.14.1
#   pydantic-core 2.46.4   (compiled: cp312 manylinux)
#   annotated-types 0.7.0, typing-inspection 0.4.2  (not in the image)
#   diffusers 0.42.1       diffusers models, tests needs huggingface-hub >=1.32,<3 (image: 1.33), safetensors
#                                                  >=0.8 (image: 0.8.0), filelock, numpy, pillow, regex, requests
#                                                  (all in the image); importlib_metadata is imported only on
#                                                  Python < 3.8, so it is not fetched
#   typing-extensions 4.16.0  a fallback only: gpu_check.sh installs it when the image's is older than pydantic
#                             needs (the image's version is not recorded); a newer one is backward compatible
# The versions are the ones graftc's CPU suite runs with here (also under torch 2.11 + transformers 5.17).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
wheels=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 diffusers==0.42.1
        typing-extensions==4.16.0)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# CPython 3.12 on x86-64 Linux; pip matches manylinux tags exactly, so name the usual ones.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$tmp" "${wheels[@]}"

# Exactly one wheel per package: two versions of one package stop the whole install there.
python3 - "$tmp" "${wheels[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path

folder, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
files = sorted(folder.glob("*.whl"))
names = [norm(f.name.split("-")[0]) for f in files]
missing = [w for w in wanted if norm(w.split("==")[0]) not in names]
duplicates = {n for n in names if names.count(n) > 1}
if missing or duplicates or len(files) != len(wanted):
    sys.exit(f"gpu_wheels: expected one wheel each of {wanted}; got {[f.name for f in files]}")
for f in files:  # what each needs, to read against the image's list (skipping extras)
    with zipfile.ZipFile(f) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                 if l.startswith("Requires-Dist:") and "extra ==" not in l]
    print(f"{f.name}: needs {', '.join(needs) or 'nothing'}")
EOF

rm -rf "$dest"
mkdir -p "$dest"
mv "$tmp"/*.whl "$dest"/
bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB in $dest/ (the device tool carries 64 MiB in all)"
if (( bytes > 32 * 1024 * 1024 )); then
    echo "gpu_wheels: over 32 MiB: too much of the 64 MiB the device tool carries" >&2
    exit 1
fi
