#!/usr/bin/env bash
# Set up the pipeline on a fresh machine: a virtual environment in .venv (VENV=... to move it) with torch,
# deepspeed, megatron-core, transformers, sentencepiece, mlflow and this project (editable).
#
# torch is installed first and pinned, so pip never resolves a newer one (and gigabytes of CUDA wheels):
#   - a torch already importable by $PYTHON is kept (GPU images, clusters' module systems): the venv then
#     sees the system site-packages;
#   - otherwise torch==2.13.0 is installed. On a machine without a GPU set TORCH_INDEX_URL to PyTorch's
#     CPU wheel index (https://download.pytorch.org/whl/cpu) unless a local CPU wheel is on pip's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the torch found by $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --progress-bar off)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  "${pip[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing deepspeed (no build isolation: it builds against the torch above)"
"${pip[@]}" setuptools wheel
"${pip[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
echo "setup: installing megatron-core, transformers, sentencepiece, mlflow and the pipeline"
"${pip[@]}" -e ".[dev]"
"$VENV/bin/python" -m pip check || echo "setup: warning: pip check reports the conflicts above"
if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.cuda.is_available())" 2>/dev/null; then
  echo "setup: building DeepSpeed's shared-memory CPU collectives (else the first run builds them: ~40 s)"
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null
fi
echo "setup: done; the command is $VENV/bin/freelm"
