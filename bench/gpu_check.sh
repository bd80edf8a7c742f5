#!/usr/bin/env bash
# One-shot GPU check: build the CUDA kernels, run the CUDA tests and the benchmark, keep every output.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]      (default: $OUT, else results/gpu)
#
# Needs torch (CUDA build), nvcc, cmake and ninja already installed; no network access. Every step runs even if an
# earlier one failed; the exit status is non-zero when any step failed. About 5-8 minutes on an H200.
set -u
cd "$(dirname "$0")/.."

RESULTS="${1:-${OUT:-results/gpu}}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
FAILED=0
PY="${PYTHON:-python}"

export METAF2N_CUDA=ON
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Compile only for the GPU at hand: one architecture keeps the build short.
  arch="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null)"
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"
fi

step() {  # step NAME COMMAND...: runs the command, tees its output to RESULTS/NAME.log, records the outcome
  local name="$1"
  shift
  local start=$SECONDS
  echo "=== $name: $*" | tee "$RESULTS/$name.log"
  "$@" 2>&1 | tee -a "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  local line="$name: rc=$rc ($((SECONDS - start)) s)"
  echo "$line" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

step env bash -c "nvidia-smi; nvcc --version; cmake --version | head -1; $PY -c 'import torch, sys; \
print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; \
echo CUDA_HOME=\${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-}"
step build "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step kernels "$PY" -c "import torch, metaf2n.ops as o; print('has_cuda_kernels', o.has_cuda_kernels()); \
assert o.has_cuda_kernels(), 'the build has no CUDA kernels'"

tests=(tests/test_cuda.py)
[ -f tests/test_ssl.py ] && tests+=(tests/test_ssl.py)
[ -f tests/test_dense.py ] && tests+=(tests/test_dense.py)
step tests "$PY" -m pytest -q -rfEs --durations=15 "${tests[@]}"
step bench "$PY" bench/bench_ssl_cuda.py --out "$RESULTS"

# Training (issue 7). The GPU machine has no network: the lpips package and LPIPS's AlexNet weights travel in .cache/
# (prepare on the CPU machine: pip download --no-deps lpips==0.1.4 -d .cache/downloads;
#  cp ~/.cache/metaf2n/lpips_alexnet.pth .cache/; then carry .cache).
export METAF2N_CACHE="$PWD/.cache"
if ! "$PY" -c "import lpips" 2>/dev/null; then
  for whl in .cache/downloads/lpips-*.whl; do [ -f "$whl" ] && "$PY" -m pip install --no-deps "$whl"; done
fi
step train_tests "$PY" -m pytest -q -rfEs tests/test_maml.py tests/test_losses.py tests/test_train.py
step train_paper_cuda "$PY" -m metaf2n.train --preset paper --device cuda --precision bf16 --steps 3 --val-every 3 \
  --ckpt-every 3 --val-tasks 1 --quiet --out "$RESULTS/paper_run"
step bench_train "$PY" bench/bench_train.py --presets demo paper --device cuda --steps 5 --out "$RESULTS"
# Real-photo faces (issue 10): the face tests on the GPU machine, then detectors and restorers per second.
step faces_tests "$PY" -m pytest -q -rfEs tests/test_faces.py
step bench_faces "$PY" bench/bench_faces.py --device cuda --batches 1 8 --repeats 3 --out "$RESULTS"

echo "=== summary (results in $RESULTS)"
cat "$SUMMARY"
exit $FAILED
