#!/usr/bin/env bash
# Every GPU check in one run on one H100/H200: tests/test_gpu.py (limit 4 min), then the training
# benchmark's GPU section (the 0.3b and 1.3b recipes, bf16, ZeRO-1/2/3 eager and ZeRO-1 compiled, language
# and teacher steps: tokens/s, TFLOP/s, MFU against the dense bf16 peak, peak memory against the plan).
# (limit 5.5 min). Everything printed is also written under RESULTS_DIR. Fails, never skips,
# without CUDA.
#
#   bash benchmarks/gpu.sh RESULTS_DIR
#
# Python: .venv/bin/python when there is one, else python3 (PYTHON=... to choose). A machine whose python
# has torch but not the project's other packages (deepspeed, megatron-core, mlflow, ...) takes them offline
# from WHEELS=DIR: wheels of whatever that python lacks (fetched beforehand with `pip download --no-deps`,
# deepspeed built with `pip wheel --no-deps`), installed without their dependencies into a folder of their
# own, put first on PYTHONPATH; the image's own packages stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu.sh RESULTS_DIR}
mkdir -p "$out"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "benchmarks/gpu.sh: no CUDA device ($PYTHON: torch.cuda.is_available() is False); this script runs on a GPU" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
imports="import deepspeed, megatron.core, mlflow.tracking, pipeline.cli"
if ! "$PYTHON" -c "$imports" 2>/dev/null; then
  if [ -z "${WHEELS:-}" ]; then
    echo "benchmarks/gpu.sh: $PYTHON lacks the project's packages; pass WHEELS=DIR (see the header)" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl 2>&1 \
    | tee "$out/install.txt"
  export PYTHONPATH="$site:$PYTHONPATH"
  "$PYTHON" -c "$imports" 2>&1 | tee -a "$out/install.txt"
fi

nvidia-smi | tee "$out/nvidia-smi.txt"
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" \
  | tee "$out/versions.txt"
status=0
# Two pytest workers where pytest-xdist is installed: the tests are small and mostly wait on process start-up.
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 2 --dist load); fi
timeout 240 "$PYTHON" -m pytest tests/test_gpu.py -v -p no:cacheprovider "${parallel[@]}" 2>&1 | tee "$out/test_gpu.txt" \
  || status=1
timeout 330 "$PYTHON" benchmarks/train_throughput.py --gpu --steps 12 --json "$out/train_throughput.json" 2>&1 \
  | tee "$out/train_throughput.txt" || status=1
exit $status
