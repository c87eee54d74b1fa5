#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine that has torch, numpy, tokenizers, tiktoken,
# safetensors, huggingface_hub, transformers and tqdm but not pydantic (this workplace's device machine):
# downloads them, at the versions requirements.lock pins, for CPython 3.12 on x86-64 Linux into .whl/
# (git-ignored through .git/info/exclude). Usage: benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${1:-3.12}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  pins+=("$(grep -E "^${name}==" requirements.lock)")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl
