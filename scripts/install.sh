#!/usr/bin/env bash
# Create .venv and install titan-world with verified pins, without ever pulling a CUDA torch.
# Why a script and not plain `pip install -e .`: mosaicml-streaming and torchtitan declare
# dependencies that drag in torchvision / a different torch; we install them --no-deps and
# add the pieces they really need (listed in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.installed-$(cat pyproject.toml scripts/install.sh scripts/constraints.txt | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
C="-c scripts/constraints.txt"
echo "[install] torch (CPU wheel unless a torch is already present)"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then $PIP install $C torch; fi
echo "[install] mosaicml-streaming (--no-deps: its pins conflict with torch 2.13)"
$PIP install --no-deps $C mosaicml-streaming
echo "[install] torchtitan (--no-deps)"
$PIP install --no-deps $C torchtitan
echo "[install] titan-world and its dependencies"
$PIP install $C -e ".[dev]"
echo "[install] official vbench 0.1.5 + openai-clip + pyiqa (--no-deps: tests/test_vbench_parity.py only)"
# their declared dependencies pin old transformers/numpy and pull torchvision; the parity tests
# stand in for the few imports the scoring paths never run (tests/vbench_official.py)
$PIP install --no-deps $C vbench openai-clip pyiqa
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[install] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
