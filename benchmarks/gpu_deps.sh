#!/usr/bin/env bash
# The Python packages the GPU benchmarks need that the device machine's image lacks (it has torch,
# numpy, aiohttp, PIL, safetensors, transformers; no registry access), as a folder to carry:
#
#   bash benchmarks/gpu_deps.sh              # here, once: writes .gpu_deps/ (~45 MB, git-ignored)
#   # then on the device (carry: [".gpu_deps"]):
#   export PYTHONPATH=$PWD/.gpu_deps:$PWD; bash benchmarks/gpu_session.sh priority
#
# Wheels for the device's Python (3.12, x86-64 manylinux), no dependencies (the image has them).
# Pins: scripts/constraints.txt. PyAV is left out (its bundled FFmpeg is >100 MB and no benchmark
# decodes video); torchao only for the FP8 rows.
set -euo pipefail
dest=${1:-.gpu_deps}
py_version=${GPU_PYTHON_VERSION:-3.12}
pin() { grep -E "^$1==" scripts/constraints.txt | cut -d' ' -f1; }
rm -rf "$dest"
pip install --quiet --target "$dest" --no-deps --only-binary=:all: --python-version "$py_version" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "$(pin diffusers)" "$(pin omegaconf)" "$(pin ftfy)" "$(pin wcwidth)" "$(pin torchao)"
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$dest/bin" "$dest/test"  # console scripts, torchao's tests
du -sh "$dest"
