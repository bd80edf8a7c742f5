#!/usr/bin/env bash
# Set up, then run the test suite (slow tests too with: bash scripts/test.sh -m "slow or not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
# Also build metaf2n._C_cuda_emu: the CUDA kernels on a CPU emulator, so tests/test_cuda_emulation.py runs them here.
export METAF2N_CUDA_EMULATION=${METAF2N_CUDA_EMULATION:-ON}
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
