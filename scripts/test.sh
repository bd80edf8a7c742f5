#!/usr/bin/env bash
# Set up, then run the test suite (slow tests too with: bash scripts/test.sh -m "slow or not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
# Also build metaf2n._C_cuda_emu: the CUDA kernels on a CPU emulator, so tests/test_cuda_emulation.py runs them here.
export METAF2N_CUDA_EMULATION=${METAF2N_CUDA_EMULATION:-ON}
bash scripts/setup.sh
# Test oracles, never runtime dependencies: the ncnn runtime (runs the released x4plus .param/.bin) and
# facenet-pytorch's own MTCNN, installed without its dependencies (it pins torch < 2.3; it needs only requests).
.venv/bin/python -m pip install --quiet "ncnn==1.0.20261020" "requests>=2"
.venv/bin/python -m pip install --quiet --no-deps "facenet-pytorch==2.6.0"
.venv/bin/python -m pytest -q "$@"
# The numerics again with ATen's scalar kernels, as a CPU with other vector units would dispatch them: the tests
# compare with float64 oracles and must not depend on that choice. The Winograd op follows the same variable, so this
# also runs its generic kernel as the default.
ATEN_CPU_CAPABILITY=default .venv/bin/python -m pytest -q tests/test_ssl.py tests/test_dense.py tests/test_winograd.py
