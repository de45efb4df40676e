#!/usr/bin/env bash
# Every check that needs a GPU, as one command for a lent GPU machine (about 9 minutes in all; each
# step has its own time limit, so a slow one cannot take the others' time):
#   the CUDA tests, the worker at the Qwen2-0.5B shape on CUDA (bench_worker.py), FRISM's gate
#   learning there in bfloat16 with its measured peak beside the computed figure (bench_frism.py),
#   and the SVD paths with the per-matrix costs and the 7B projection (bench_svd.py).
#
#   bash tests/benchmarks/device_checks.sh OUT_DIR
#
# The GPU machine's own python3 holds torch, transformers, safetensors, psutil and pytest; diskcache
# and plotly travel as wheels in .whl/ (ignored by git), made beforehand on this side with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diskcache plotly
# OUT_DIR receives summary.txt (one line a step: exit code, seconds), steps.log (every step's
# output), worker_cuda.json, frism_cuda.json and svd_table.md.
set -uo pipefail
OUT=${1:?usage: device_checks.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DEVICE=${LAB_DEVICE:-cuda}  # LAB_DEVICE=cpu runs the same steps here, to try the script itself
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
WORK=/tmp/lab-device

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/summary.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log it, one summary line
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "===== $name: $*" >> "$OUT/steps.log"
  timeout "$limit" "$@" >> "$OUT/steps.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

step cuda_tests 90 python3 -m pytest -q -p no:cacheprovider -rs -k cuda \
  tests/test_linalg.py tests/test_decomposition_cache.py
step worker 240 python3 tests/benchmarks/bench_worker.py --shape qwen2-0.5b --device "$DEVICE" \
  --work "$WORK/hf05" --out "$OUT/worker_$DEVICE.json"
step frism 90 python3 tests/benchmarks/bench_frism.py --device "$DEVICE" --steps 4 --examples 8 \
  --work "$WORK/hf05" --out "$OUT/frism_$DEVICE.json"
step svd 100 python3 tests/benchmarks/bench_svd.py --device "$DEVICE" --skip threads --root "$WORK/svd" \
  --out "$OUT/svd_table.md"
