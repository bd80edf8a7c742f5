#!/usr/bin/env bash
# Runs the CUDA-emulator tests with the emulator and the CUDA kernels built under AddressSanitizer, so that an
# out-of-bounds read or write of a kernel in global memory (torch tensors) is reported. Not part of CI (about 6 min
# on 2 cores). Needs the test setup first (bash scripts/test.sh, which builds metaf2n._C_cuda_emu).
#
#   bash scripts/asan_emulation.sh [pytest args]
#
# The ASan build replaces the installed metaf2n._C_cuda_emu for the run and is put back afterwards. ASan warns once
# per process that it ignores a stack switch (the emulator's fibers): that line is expected.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
build=$(mktemp -d)
installed=$("$py" -c "import torch, metaf2n._C_cuda_emu as m; print(m.__file__)")
cp "$installed" "$build/original.so"
trap 'cp "$build/original.so" "$installed"; rm -rf "$build"' EXIT
cmake -S . -B "$build/cmake" -G Ninja -DMETAF2N_CUDA=OFF -DMETAF2N_CUDA_EMULATION=ON -DPython_EXECUTABLE="$PWD/$py" \
  -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer" >"$build/configure.log"
cmake --build "$build/cmake" --target _C_cuda_emu >"$build/build.log"
cp "$build"/cmake/_C_cuda_emu*.so "$installed"
# libstdc++ is preloaded with ASan so that ASan finds the real __cxa_throw (C++ exceptions) at start-up.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py "$@"
