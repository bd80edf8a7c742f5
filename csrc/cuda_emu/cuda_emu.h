// A CPU emulator for this project's CUDA kernels, so that csrc/cuda/ssg_kernel.cu runs in CI without a GPU.
//
// ssg_kernel.cu is compiled a second time as plain C++ with METAF2N_CUDA_EMULATION defined (csrc/cuda_emu/
// ssg_kernel_emu.cpp); this header stands in for the CUDA runtime and device built-ins it uses:
//
//   * Every thread of a block is a fiber (ucontext) on the calling OS thread. Blocks run one after another. A fiber
//     runs until __syncthreads() or a warp shuffle; a barrier opens when every live thread of the block (a shuffle:
//     of the warp) has reached it. A thread that waits at a block barrier while another waits at a warp shuffle is a
//     divergent barrier: the launch fails with an error.
//   * The order in which fibers run between barriers is a parameter (METAF2N_CUDA_EMU_ORDER = forward | reverse),
//     so that a read that is not separated from its write by a barrier gives different results in the two orders.
//   * Dynamic shared memory is filled with 0xFF bytes (NaN in float and double) before each block, so a read of a
//     value no thread wrote shows up as NaN; 64 guard bytes after it are checked when the block ends.
//   * Launch limits as on a GPU: at most 1024 threads, dynamic shared memory within the kernel's
//     cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB minus the static part until raised), and dynamic plus
//     static within the device's opt-in limit (METAF2N_CUDA_EMU_OPTIN bytes, default 232,448 as on an H100/H200).
//     The emulator cannot measure a kernel's static shared memory; it reports METAF2N_CUDA_EMU_STATIC bytes
//     (default 80, what nvcc reports for rows_kernel).
//   * atomicAdd is a plain add (one OS thread runs all fibers, and a fiber is never interrupted between two
//     barriers).
//
// What it does not model: timing, memory coalescing, bank conflicts, the real warp-synchronous execution of lanes
// (fibers are the strictest model: lanes share nothing without a shuffle or a barrier), and register or local
// memory limits.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <math.h>  // expf, exp, logf, log, fabsf, fabs in the global namespace, as in device code

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- CUDA keywords -----------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run one at a time on one OS thread, so a function-local static is exactly a block's static shared memory.
#define __shared__ static thread_local
#define METAF2N_DYNAMIC_SHARED(name) unsigned char* const name = ::metaf2n::emu::dynamic_shared()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace metaf2n::emu {

struct ThreadState {
  dim3 thread;
};
struct BlockState {
  dim3 block, block_dim, grid_dim;
};

const ThreadState& current_thread();
const BlockState& current_block();
unsigned char* dynamic_shared();
void sync_threads();
// Publishes this lane's 8 bytes and returns lane `src`'s, after every live lane of the warp has published.
uint64_t warp_exchange(uint64_t mine, int src_lane);

using KernelId = const void*;
int64_t max_dynamic_shared(KernelId kernel);
void set_max_dynamic_shared(KernelId kernel, int64_t bytes);
int64_t static_shared_bytes();
int64_t shared_optin();

// Runs body() as every thread of every block of the grid.
void run_grid(KernelId kernel, dim3 grid, dim3 block, int64_t shared_bytes, const std::function<void()>& body);

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  int64_t bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const auto fn = kernel;
    run_grid(reinterpret_cast<KernelId>(fn), grid, block, bytes, [&] { fn(args...); });
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 block, int64_t bytes, void (*kernel)(Params...)) {
  return Launch<Params...>{kernel, grid, block, bytes};
}

}  // namespace metaf2n::emu

#define METAF2N_LAUNCH(grid, block, bytes, stream, ...) \
  ::metaf2n::emu::launch(grid, block, static_cast<int64_t>(bytes), __VA_ARGS__)

#define threadIdx (::metaf2n::emu::current_thread().thread)
#define blockIdx (::metaf2n::emu::current_block().block)
#define blockDim (::metaf2n::emu::current_block().block_dim)
#define gridDim (::metaf2n::emu::current_block().grid_dim)

// ---- device built-ins -----------------------------------------------------------------------------------------------
inline void __syncthreads() { ::metaf2n::emu::sync_threads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: every lane*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = static_cast<int>(threadIdx.x & 31u);
  bits = ::metaf2n::emu::warp_exchange(bits, lane ^ lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// ---- runtime API -------------------------------------------------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
};

template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*)(Params...)) {
  attributes->sharedSizeBytes = static_cast<size_t>(::metaf2n::emu::static_shared_bytes());
  return cudaSuccess;
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value + ::metaf2n::emu::static_shared_bytes() > ::metaf2n::emu::shared_optin()) {
    return cudaErrorInvalidValue;
  }
  ::metaf2n::emu::set_max_dynamic_shared(reinterpret_cast<::metaf2n::emu::KernelId>(kernel), value);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(::metaf2n::emu::shared_optin());
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                                               \
  do {                                                                                                     \
    const cudaError_t metaf2n_emu_err = (expr);                                                            \
    TORCH_CHECK(metaf2n_emu_err == cudaSuccess, "CUDA emulator: ", #expr, " failed (invalid argument)"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
