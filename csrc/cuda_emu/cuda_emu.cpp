// The CPU emulator's runtime: fibers for threads, barriers, warp shuffles and launch limits (see cuda_emu.h).
//
// A fiber starts on its own stack through makecontext/setcontext once; after that every switch is an
// _setjmp/_longjmp pair, which (unlike swapcontext) makes no system call. glibc's checked longjmp refuses jumps
// between stacks, hence no _FORTIFY_SOURCE here.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include "cuda_emu/cuda_emu.h"

#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace metaf2n::emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int64_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kGuardBytes = 64;
constexpr unsigned char kFill = 0xFF;   // NaN in float and double
constexpr unsigned char kGuard = 0xA5;

enum class Wait { Ready, Block, Warp, Done };

struct Fiber {
  ucontext_t start;  // entry on the fiber's stack, used once
  jmp_buf resume;    // where the fiber continues
  bool started = false;
  ThreadState state;
  Wait wait = Wait::Ready;
  uint64_t exchange[2] = {0, 0};  // double-buffered: a lane may publish its next value while others read this one
  unsigned shuffles = 0;
};

struct Run {
  BlockState block;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  std::vector<unsigned char> shared;  // dynamic bytes + guard
  jmp_buf scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
};

thread_local Run* active = nullptr;

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoll(v, nullptr, 10) : fallback;
}

bool reverse_order() {
  const char* v = std::getenv("METAF2N_CUDA_EMU_ORDER");
  if (v == nullptr || *v == '\0' || std::string_view(v) == "forward") return false;
  TORCH_CHECK_VALUE(std::string_view(v) == "reverse", "METAF2N_CUDA_EMU_ORDER must be forward or reverse, got ", v);
  return true;
}

std::mutex limits_mutex;
std::unordered_map<KernelId, int64_t>& dynamic_limits() {
  static std::unordered_map<KernelId, int64_t> limits;
  return limits;
}

Run& run() {
  TORCH_CHECK(active != nullptr, "CUDA emulator: a device function was called outside a kernel launch");
  return *active;
}

[[noreturn]] void fiber_main() {
  Run& r = *active;
  (*r.body)();
  r.fibers[r.current].wait = Wait::Done;
  _longjmp(r.scheduler, 1);
}

void yield(Wait why) {
  Run& r = *active;
  Fiber& f = r.fibers[r.current];
  f.wait = why;
  if (_setjmp(f.resume) == 0) _longjmp(r.scheduler, 1);
}

// Runs fiber i until it yields or finishes.
void enter(Run& r, int i) {
  r.current = i;
  Fiber& f = r.fibers[i];
  if (_setjmp(r.scheduler) != 0) return;
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  setcontext(&f.start);
}

// Runs one block to completion; returns an error message or "".
std::string run_block(Run& r, bool reverse) {
  const int n = static_cast<int>(r.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.wait = Wait::Ready;
    f.shuffles = 0;
    f.started = false;
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = r.stacks.get() + static_cast<size_t>(i) * kStackBytes;
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.start, fiber_main, 0);
  }
  // Warp by warp, each as far as it can go: a warp that runs ahead of the others to the next use of a shared buffer
  // shows a missing barrier (in forward order the first warp runs ahead, in reverse order the last one).
  const int warps = (n + 31) / 32;
  while (true) {
    for (int wj = 0; wj < warps; ++wj) {
      const int w = reverse ? warps - 1 - wj : wj;
      const int w0 = 32 * w, w1 = std::min(n, w0 + 32);
      while (true) {
        for (int j = w0; j < w1; ++j) {
          const int i = reverse ? w1 - 1 - (j - w0) : j;
          if (r.fibers[i].wait != Wait::Ready) continue;
          enter(r, i);
          if (!r.error.empty()) return r.error;
        }
        int at_warp = 0, done = 0;
        for (int i = w0; i < w1; ++i) {
          at_warp += r.fibers[i].wait == Wait::Warp;
          done += r.fibers[i].wait == Wait::Done;
        }
        if (at_warp == 0) break;
        if (at_warp < w1 - w0) {
          if (done > 0) return "a warp shuffle waits for lanes that have exited (warp " + std::to_string(w) + ")";
          break;  // the others wait at __syncthreads(): reported below
        }
        for (int i = w0; i < w1; ++i) r.fibers[i].wait = Wait::Ready;
      }
    }
    int done = 0, at_warp = 0;
    for (const Fiber& f : r.fibers) {
      done += f.wait == Wait::Done;
      at_warp += f.wait == Wait::Warp;
    }
    if (done == n) return "";
    if (at_warp > 0) {
      return "divergent barrier: some threads wait at a warp shuffle while others wait at __syncthreads()";
    }
    for (Fiber& f : r.fibers) {
      if (f.wait == Wait::Block) f.wait = Wait::Ready;  // threads that have exited no longer take part
    }
  }
}

}  // namespace

const ThreadState& current_thread() { return run().fibers[active->current].state; }
const BlockState& current_block() { return run().block; }
unsigned char* dynamic_shared() { return run().shared.data(); }

void sync_threads() {
  run();
  yield(Wait::Block);
}

uint64_t warp_exchange(uint64_t mine, int src_lane) {
  Run& r = run();
  const int self = r.current;
  const int src = (self & ~31) + src_lane;
  Fiber& f = r.fibers[self];
  const unsigned slot = f.shuffles++ & 1u;
  f.exchange[slot] = mine;
  yield(Wait::Warp);
  if (src_lane < 0 || src_lane > 31 || src >= static_cast<int>(r.fibers.size())) {
    r.error = "a warp shuffle reads lane " + std::to_string(src_lane) + ", which this block does not have";
    _longjmp(r.scheduler, 1);  // never resumed: the launch fails
  }
  return r.fibers[src].exchange[slot];
}

int64_t static_shared_bytes() { return env_int("METAF2N_CUDA_EMU_STATIC", 80); }
int64_t shared_optin() { return env_int("METAF2N_CUDA_EMU_OPTIN", 232448); }

int64_t max_dynamic_shared(KernelId kernel) {
  const std::lock_guard<std::mutex> lock(limits_mutex);
  const auto found = dynamic_limits().find(kernel);
  return found != dynamic_limits().end() ? found->second : kDefaultSharedLimit - static_shared_bytes();
}

void set_max_dynamic_shared(KernelId kernel, int64_t bytes) {
  const std::lock_guard<std::mutex> lock(limits_mutex);
  dynamic_limits()[kernel] = bytes;
}

void run_grid(KernelId kernel, dim3 grid, dim3 block, int64_t shared_bytes, const std::function<void()>& body) {
  TORCH_CHECK(active == nullptr, "CUDA emulator: a kernel launched another kernel");
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && blocks >= 1,
              "CUDA emulator: invalid configuration argument (grid ", grid.x, "x", grid.y, "x", grid.z, ", block ",
              block.x, "x", block.y, "x", block.z, ")");
  TORCH_CHECK(shared_bytes <= max_dynamic_shared(kernel), "CUDA emulator: invalid argument: ", shared_bytes,
              " bytes of dynamic shared memory, above the kernel's limit of ", max_dynamic_shared(kernel),
              " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  TORCH_CHECK(shared_bytes + static_shared_bytes() <= shared_optin(), "CUDA emulator: invalid argument: ",
              shared_bytes, " dynamic + ", static_shared_bytes(), " static bytes of shared memory exceed the device's ",
              shared_optin());
  const bool reverse = reverse_order();

  Run r;
  r.body = &body;
  r.fibers.resize(static_cast<size_t>(threads));
  r.stacks.reset(new char[static_cast<size_t>(threads) * kStackBytes]);
  r.shared.resize(static_cast<size_t>(shared_bytes) + kGuardBytes);
  r.block.block_dim = block;
  r.block.grid_dim = grid;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t plane = static_cast<int64_t>(block.x) * block.y;
    r.fibers[t].state.thread = dim3(t % block.x, (t / block.x) % block.y, t / plane);
  }
  active = &r;
  std::string error;
  for (int64_t b = 0; b < blocks && error.empty(); ++b) {
    r.block.block = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<int64_t>(grid.x) * grid.y));
    std::memset(r.shared.data(), kFill, static_cast<size_t>(shared_bytes));
    std::memset(r.shared.data() + shared_bytes, kGuard, kGuardBytes);
    error = run_block(r, reverse);
    for (size_t i = 0; i < kGuardBytes && error.empty(); ++i) {
      if (r.shared[static_cast<size_t>(shared_bytes) + i] != kGuard) {
        error = "a write past the end of dynamic shared memory (" + std::to_string(shared_bytes) + " bytes)";
      }
    }
    if (!error.empty()) error += " in block " + std::to_string(b);
  }
  active = nullptr;
  TORCH_CHECK(error.empty(), "CUDA emulator: ", error);
}

}  // namespace metaf2n::emu
