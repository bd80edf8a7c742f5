// csrc/cuda/ssg_kernel.cu compiled as C++ against the CPU emulator (cuda_emu.h): the same kernels and host code,
// run on CPU tensors by the tests (tests/test_cuda_emulation.py).
#define METAF2N_CUDA_EMULATION
#include "cuda/ssg_kernel.cu"
