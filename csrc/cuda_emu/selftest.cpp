// Small kernels with known defects (and their correct twins) that show what the CPU emulator catches, for
// tests/test_cuda_emulation.py: torch.ops.metaf2n_cuda_emu.selftest(name, threads, shared_bytes, blocks) returns the
// kernel's output buffer (2 x blocks x threads floats).
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include <string>

#include "cuda_emu/cuda_emu.h"

namespace {

// Thread t reads the value thread t + 1 wrote to shared memory, with (synced) or without (race) a barrier between.
__global__ void neighbour_kernel(float* out, bool sync) {
  METAF2N_DYNAMIC_SHARED(raw);
  float* s = reinterpret_cast<float*>(raw);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  s[t] = static_cast<float>(t);
  if (sync) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// Thread t reads the value of thread t + 32 (another warp), then overwrites its own slot; without the second barrier
// a warp that runs ahead overwrites a slot before the other warp has read it.
__global__ void reuse_kernel(float* out, bool sync) {
  METAF2N_DYNAMIC_SHARED(raw);
  float* s = reinterpret_cast<float*>(raw);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  s[t] = static_cast<float>(t);
  __syncthreads();
  const float v = s[(t + 32) % n];
  if (sync) __syncthreads();
  s[t] = -1.0f;
  out[t] = v;
}

// Thread t reads what thread t - 1 wrote (thread 0 its own slot): with no barrier only a schedule that runs higher
// threads first shows the race.
__global__ void lower_neighbour_kernel(float* out, bool sync) {
  METAF2N_DYNAMIC_SHARED(raw);
  float* s = reinterpret_cast<float*>(raw);
  const int t = static_cast<int>(threadIdx.x);
  s[t] = static_cast<float>(t);
  if (sync) __syncthreads();
  out[t] = s[t > 0 ? t - 1 : 0];
}

// Two block reductions (warp shuffles, then one partial per warp in shared memory) that reuse the same buffer:
// without the barrier after the read, a warp that runs ahead through its shuffles overwrites its partial before the
// other warps have read the first one.
__global__ void reduce_twice_kernel(float* out, bool sync) {
  __shared__ float partial[32];
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  for (int rep = 0; rep < 2; ++rep) {
    float a = static_cast<float>((t + 1) * (rep + 1));
    for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (t % 32 == 0) partial[t / 32] = a;
    __syncthreads();
    float total = 0;
    for (int w = 0; w < n / 32; ++w) total += partial[w];
    if (sync) __syncthreads();
    out[rep * n + t] = total;
  }
}

__global__ void shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void uninitialised_kernel(float* out) {
  METAF2N_DYNAMIC_SHARED(raw);
  out[threadIdx.x] = reinterpret_cast<float*>(raw)[threadIdx.x];
}

__global__ void overflow_kernel(float* out) {
  METAF2N_DYNAMIC_SHARED(raw);
  if (threadIdx.x == 0) reinterpret_cast<float*>(raw)[blockDim.x] = 1.0f;  // one past a blockDim-float buffer
  out[threadIdx.x] = 0.0f;
}

// Odd lanes wait at __syncthreads() while even lanes of the same warp wait at a shuffle.
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x % 2 == 1) {
    __syncthreads();
    out[threadIdx.x] = 0.0f;
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 2);
  }
}

at::Tensor selftest(const std::string& name, int64_t threads, int64_t shared_bytes, int64_t blocks) {
  at::Tensor out = at::zeros({std::max<int64_t>(blocks, 1) * threads * 2}, at::kFloat);
  float* o = out.data_ptr<float>();
  const unsigned g = static_cast<unsigned>(blocks), b = static_cast<unsigned>(threads);
  if (name == "neighbour" || name == "neighbour_race") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, neighbour_kernel)(o, name == "neighbour");
  } else if (name == "reuse" || name == "reuse_race") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, reuse_kernel)(o, name == "reuse");
  } else if (name == "lower_neighbour" || name == "lower_neighbour_race") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, lower_neighbour_kernel)(o, name == "lower_neighbour");
  } else if (name == "reduce_twice" || name == "reduce_twice_race") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, reduce_twice_kernel)(o, name == "reduce_twice");
  } else if (name == "shuffle") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, shuffle_kernel)(o);
  } else if (name == "uninitialised") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, uninitialised_kernel)(o);
  } else if (name == "overflow") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, overflow_kernel)(o);
  } else if (name == "divergent") {
    METAF2N_LAUNCH(g, b, shared_bytes, nullptr, divergent_kernel)(o);
  } else {
    TORCH_CHECK_VALUE(false, "unknown self-test ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metaf2n_cuda_emu, m) {
  m.def("selftest(str name, int threads, int shared_bytes, int blocks=1) -> Tensor", &selftest);
}
