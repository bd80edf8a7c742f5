// CUDA kernels: self-similarity graph rows and the fused KL + L1 loss, forward and backward.
//
// One thread block handles one "row" (masked pixel) of the loss, or two rows of a graph op, over the whole batch in
// a single launch. A block stages the tiles of radius R = s + f around its pixels in shared memory (as the
// accumulation type: float, or double for float64 images; half and bfloat16 are read natively and widened), channel
// group by channel group, so every value of the image is read from global memory once per row:
//
//   * Distances. A work item is (slot, offset row dy, kM neighbouring offsets dx). Its kM accumulators live in
//     registers; for every patch row it reads the query line and kM + kL - 1 candidate values once and forms
//     kM x kL differences (d = q - c; acc += d * d). Items are numbered dy-fastest and the tile stride is odd, so
//     a warp's shared loads spread over the banks.
//   * Rows. exp(-d2 / (h C P^2)) needs no max-subtraction (the centre distance is exactly 0, every other one is
//     >= 0), the row sums and the loss / gradient sums are block reductions in a fixed order.
//   * Loss. Both graphs (sr and hr) of a row are computed by the same block; the per-row loss goes to an (N,)
//     buffer summed by at::sum. No N x K tensor is written.
//   * Backward (fast, default). The per-offset weights w_k (the coefficient of (x_query - x_candidate)) go to
//     shared memory and the block computes its tile gradient in gather form: candidate-role items own kM tile
//     pixels of one line and sum their <= P^2 terms; query-role items own kM pixels of a query line and sum K
//     terms split into groups of offset rows (partials combined in a fixed order). Every tile pixel is added once
//     (atomicAdd) to the gradient of the unpadded image at its reflected position: no padded buffer, no fold.
//   * Backward (deterministic, with torch.use_deterministic_algorithms(True)). The blocks only write the weights
//     w (N, K); rows are sorted by pixel on the device, a (B, H, W) map points at each pixel's first row, one
//     thread per padded-image element gathers the terms of every row whose tile covers it in a fixed order, and
//     a fold kernel adds each pixel's <= 9 reflected sources in a fixed order.
//
//   * Dense path (path="dense"): distances by box filters over image tiles into an (N, K)
//     buffer that rows_kernel reads instead of computing them, and a deterministic gather backward (see "Dense path"
//     below). Checked on the CPU emulator (csrc/cuda_emu/), not yet timed on a GPU.
//
// Positions are not range-checked on the device (that would need a host sync): a row whose (b, y, x) lies outside
// the batch reads nothing, its graph row is NaN, its loss term is NaN (so the loss is NaN), and it contributes no
// gradient.
#include "ssg.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Context.h>
#ifdef METAF2N_CUDA_EMULATION
#include "cuda_emu/cuda_emu.h"  // the tests' CPU build of this file (csrc/cuda_emu/)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// Spelled as macros so that the CPU emulator can stand in for them.
#define METAF2N_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define METAF2N_LAUNCH(grid, block, bytes, stream, ...) __VA_ARGS__<<<grid, block, bytes, stream>>>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace metaf2n::cuda {

namespace {

constexpr int kM = 9;            // outputs (offsets or pixels) per work item, kept in registers
constexpr int kL = 9;            // inner block of the reduction dimension, unrolled
constexpr int kMaxThreads = 256;
constexpr int kSoftSharedBytes = 64 * 1024;  // channel groups are sized to stay under this when possible

enum Mode : int { kGraphForward = 0, kGraphBackward = 1, kLossForward = 2, kLossBackward = 3 };

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }
// std::max's rule, (a < b) ? b : a: a NaN in `a` stays NaN, as on the CPU (CUDA's max/fmax would drop it).
template <typename T>
__device__ __forceinline__ T max_keep_nan(T a, T b) { return a < b ? b : a; }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return fabs(v); }

// Reflect-101 index; |i - clamp(i)| < n is guaranteed by the callers (the padding is smaller than the image).
__device__ __forceinline__ int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Geometry shared by all kernels (host-computed).
struct Geometry {
  int B, C, H, W;
  int s, f, n, P, R, side, K, pad;
  bool window;
  int stride;       // shared tile line length (odd, >= every column a work item reads)
  int wstride;      // shared weight line length: P - 1 zeros, n weights, zeros
  int chunks;       // ceil(n / kM): distance items per offset row
  int chunks_c;     // ceil(side / kM): candidate-role items per tile line
  int chunks_q;     // ceil(P / kM): query-role items per query line
  int group_rows;   // offset rows per query-role item
  int groups;       // ceil(n / group_rows)
  int cg;           // channels staged in shared memory at once
  int nslots;       // tiles per block: 2 rows of the graph ops, or (sr, hr) of one loss row
  int ngrad;        // slots that receive a gradient
  int64_t off_tiles, off_d, off_wp, off_gq, off_red;  // shared-memory offsets, in accumulation-type elements
};

template <typename scalar_t, typename acc_t>
struct RowArgs {
  Geometry g;
  int64_t N;
  const scalar_t* img0;       // graph image, or sr
  const scalar_t* img1;       // hr (loss), else unused
  const int64_t* pos;         // (N, 3) rows (b, y, x)
  scalar_t* rows_out;         // graph forward: (N, K)
  const acc_t* rows_in;       // graph backward: saved rows (N, K)
  const acc_t* grad_rows;     // graph backward: incoming gradient (N, K)
  acc_t* partial;             // loss forward (and loss_with_grad): (N,) per-row kl * KL + l1 * L1
  const acc_t* grad;          // loss backward: the incoming scalar gradient (device); nullptr means 1
  acc_t* gacc;                // fast backward: gradient of the image (B, C, H, W)
  acc_t* wout;                // deterministic loss backward: weights (N, K)
  const acc_t* dist[2];       // dense path: distances (rows by first sorted index, K) of img0 and img1, else nullptr
  const int* dist_row;        // dense path: each row's line in dist (-1 for a row outside the batch)
  acc_t zc;                   // -1 / (h C P^2)
  acc_t factor;               // -2 / (h C P^2): dL/dz -> coefficient of (x_query - x_candidate)
  acc_t kl, l1, inv_nk;
};

struct Slot {
  int64_t row;
  int64_t base;  // element offset of image b, channel 0
  int y, x;
  bool exists;   // row < N
  bool valid;    // exists and inside the batch
};

// ---------------------------------------------------------------------------------------------------------------
// Register-blocked inner loops. acc[m] for kM outputs; q/c/w point into shared memory.

// acc[m] += sum_{i < valid} (q[i] - c[m + i])^2
template <bool Full, typename acc_t>
__device__ __forceinline__ void distance_block(const acc_t* __restrict__ q, const acc_t* __restrict__ c, int valid,
                                               acc_t (&acc)[kM]) {
  acc_t qv[kL];
  acc_t cv[kM + kL - 1];
#pragma unroll
  for (int i = 0; i < kL; ++i) qv[i] = (Full || i < valid) ? q[i] : acc_t(0);
#pragma unroll
  for (int j = 0; j < kM + kL - 1; ++j) cv[j] = (Full || j < kM - 1 + valid) ? c[j] : acc_t(0);
#pragma unroll
  for (int i = 0; i < kL; ++i) {
    if (Full || i < valid) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const acc_t d = qv[i] - cv[m + i];
        acc[m] += d * d;
      }
    }
  }
}

// Distances of offsets (oy, ox0 .. ox0 + kM) in one channel tile Tc, added to acc.
template <typename acc_t>
__device__ __forceinline__ void distance_item(const acc_t* __restrict__ Tc, const Geometry& g, int oy, int ox0,
                                              acc_t (&acc)[kM]) {
  const acc_t* q = Tc + g.s * g.stride + g.s;
  const acc_t* c = Tc + oy * g.stride + ox0;
  for (int iy = 0; iy < g.P; ++iy, q += g.stride, c += g.stride) {
    int ixb = 0;
    for (; ixb + kL <= g.P; ixb += kL) distance_block<true>(q + ixb, c + ixb, kL, acc);
    if (ixb < g.P) distance_block<false>(q + ixb, c + ixb, g.P - ixb, acc);
  }
}

// Candidate role of tile pixels (r, col0 + m): acc[m] += sum_{i < valid} w[m - i + kL - 1] * (tm[m] - q[i]),
// where w points kL - 1 weights before the one of (m, i) = (0, 0).
template <bool Full, typename acc_t>
__device__ __forceinline__ void candidate_block(const acc_t* __restrict__ q, const acc_t* __restrict__ w, int valid,
                                                const acc_t (&tm)[kM], acc_t (&acc)[kM]) {
  acc_t qv[kL];
  acc_t wv[kM + kL - 1];
#pragma unroll
  for (int i = 0; i < kL; ++i) qv[i] = (Full || i < valid) ? q[i] : acc_t(0);
#pragma unroll
  for (int j = 0; j < kM + kL - 1; ++j) wv[j] = (Full || j >= kL - valid) ? w[j] : acc_t(0);
#pragma unroll
  for (int i = 0; i < kL; ++i) {
    if (Full || i < valid) {
#pragma unroll
      for (int m = 0; m < kM; ++m) acc[m] += wv[m - i + kL - 1] * (tm[m] - qv[i]);
    }
  }
}

// Gradient of tile pixels (r, col0 .. col0 + kM) as candidates: sum over the patch pixels (iy, ix) whose offset
// (r - iy, col - ix) lies in the window of w_k * (x(candidate) - x(query)). wp is the zero-bordered weight plane.
template <typename acc_t>
__device__ __forceinline__ void candidate_item(const acc_t* __restrict__ Tc, const acc_t* __restrict__ wp,
                                               const Geometry& g, int r, int col0, acc_t (&acc)[kM]) {
  acc_t tm[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) tm[m] = Tc[r * g.stride + col0 + m];
  const int iy_lo = max(0, r - g.n + 1), iy_hi = min(g.P - 1, r);
  for (int iy = iy_lo; iy <= iy_hi; ++iy) {
    const acc_t* q = Tc + (g.s + iy) * g.stride + g.s;
    // weight index of (m, ix) is wp[oy][P - 1 + col0 + m - ix]; block (ixb, i): m - ix = m - i - ixb.
    const int wrow = (r - iy) * g.wstride + g.P - 1 + col0 - (kL - 1);
    int ixb = 0;
    for (; ixb + kL <= g.P; ixb += kL) candidate_block<true>(q + ixb, wp + (wrow - ixb), kL, tm, acc);
    if (ixb < g.P) candidate_block<false>(q + ixb, wp + (wrow - ixb), g.P - ixb, tm, acc);
  }
}

// Query role of query pixels (iy, ix0 + m), offset rows [oy_lo, oy_hi):
// acc[m] += sum_{oy, ox} w[oy][ox] * (x(query) - x(query + offset)); w is zero past column n.
template <typename acc_t>
__device__ __forceinline__ void query_item(const acc_t* __restrict__ Tc, const acc_t* __restrict__ wp,
                                           const Geometry& g, int iy, int ix0, int oy_lo, int oy_hi,
                                           acc_t (&acc)[kM]) {
  acc_t qm[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) qm[m] = Tc[(g.s + iy) * g.stride + g.s + ix0 + m];
  for (int oy = oy_lo; oy < oy_hi; ++oy) {
    const acc_t* t = Tc + (oy + iy) * g.stride + ix0;
    const acc_t* w = wp + oy * g.wstride + g.P - 1;
    for (int oxb = 0; oxb < g.n; oxb += kL) {
      acc_t tv[kM + kL - 1];
      acc_t wv[kL];
#pragma unroll
      for (int j = 0; j < kM + kL - 1; ++j) tv[j] = t[oxb + j];
#pragma unroll
      for (int l = 0; l < kL; ++l) wv[l] = w[oxb + l];
#pragma unroll
      for (int l = 0; l < kL; ++l) {
#pragma unroll
        for (int m = 0; m < kM; ++m) acc[m] += wv[l] * (qm[m] - tv[m + l]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------

// Sum of a and b over the block, in a fixed order; every thread gets the totals. red holds 64 values.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b, acc_t* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  acc_t ta = 0, tb = 0;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) {
    ta += red[w];
    tb += red[32 + w];
  }
  __syncthreads();
  a = ta;
  b = tb;
}

// Tiles [slot][c][r][col] of channels c0 .. c0 + cgn for slots 0 .. nslots; columns >= side are zero, and so are
// "window" pixels outside the (2s+1)^2 window and every pixel of an invalid slot.
template <typename scalar_t, typename acc_t>
__device__ void load_tiles(const Geometry& g, const Slot* slots, const scalar_t* const* images, int nslots, int c0,
                           int cgn, acc_t* tiles) {
  const int lines = nslots * cgn * g.side;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int64_t plane = static_cast<int64_t>(g.H) * g.W;
  for (int line = warp; line < lines; line += warps) {
    const int r = line % g.side;
    const int sc = line / g.side;
    const int c = sc % cgn;
    const int slot = sc / cgn;
    const Slot& sl = slots[slot];
    const int dy = r - g.R;
    const bool row_in = sl.valid && (!g.window || (dy >= -g.s && dy <= g.s));
    const scalar_t* src = images[slot] + sl.base + (c0 + c) * plane;
    const int64_t yoff = row_in ? static_cast<int64_t>(reflect(sl.y + dy, g.H)) * g.W : 0;
    acc_t* dst = tiles + static_cast<int64_t>(line) * g.stride;
    for (int col = lane; col < g.stride; col += 32) {
      const int dx = col - g.R;
      acc_t v = 0;
      if (row_in && col < g.side && (!g.window || (dx >= -g.s && dx <= g.s))) {
        v = static_cast<acc_t>(src[yoff + reflect(sl.x + dx, g.W)]);
      }
      dst[col] = v;
    }
  }
}

template <typename scalar_t, typename acc_t, int kMode>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(const RowArgs<scalar_t, acc_t> a) {
  constexpr bool kGraph = kMode == kGraphForward || kMode == kGraphBackward;
  constexpr bool kDistances = kMode != kGraphBackward;
  constexpr bool kBackward = kMode == kGraphBackward || kMode == kLossBackward;
  const Geometry& g = a.g;

  METAF2N_DYNAMIC_SHARED(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tiles = smem + g.off_tiles;
  acc_t* D = smem + g.off_d;    // [slot][K]: distances, then exp(z)
  acc_t* wp = smem + g.off_wp;  // [gslot][n][wstride]: zero-bordered weights
  acc_t* gq = smem + g.off_gq;  // [gslot][group][c][P][P]: query-role partial sums
  acc_t* red = smem + g.off_red;
  __shared__ Slot slots[2];
  __shared__ const scalar_t* images[2];

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const bool fast_grad = kBackward && a.wout == nullptr;
  const int K = g.K;

  if (tid < g.nslots) {
    Slot sl;
    sl.row = kGraph ? static_cast<int64_t>(blockIdx.x) * 2 + tid : static_cast<int64_t>(blockIdx.x);
    sl.exists = sl.row < a.N;
    int64_t b = -1, y = -1, x = -1;
    if (sl.exists) {
      b = a.pos[3 * sl.row];
      y = a.pos[3 * sl.row + 1];
      x = a.pos[3 * sl.row + 2];
    }
    sl.valid = sl.exists && b >= 0 && b < g.B && y >= 0 && y < g.H && x >= 0 && x < g.W;
    sl.base = sl.valid ? b * g.C * static_cast<int64_t>(g.H) * g.W : 0;
    sl.y = sl.valid ? static_cast<int>(y) : 0;
    sl.x = sl.valid ? static_cast<int>(x) : 0;
    slots[tid] = sl;
    images[tid] = (kGraph || tid == 0) ? a.img0 : a.img1;
  }
  if (fast_grad) {
    for (int i = tid; i < g.ngrad * g.n * g.wstride; i += nthreads) wp[i] = 0;
  }
  __syncthreads();

  // ---- distances -------------------------------------------------------------------------------------------
  if (kDistances && a.dist[0] != nullptr) {  // computed by the dense path's box filters
    for (int i = tid; i < g.nslots * K; i += nthreads) {
      const int slot = i / K;
      if (!slots[slot].valid) continue;
      const acc_t* src = a.dist[kGraph ? 0 : slot];
      D[i] = src[static_cast<int64_t>(a.dist_row[slots[slot].row]) * K + i % K];
    }
    __syncthreads();
  } else if constexpr (kDistances) {
    const int items = g.nslots * g.chunks * g.n;
    for (int c0 = 0; c0 < g.C; c0 += g.cg) {
      const int cgn = min(g.cg, g.C - c0);
      if (c0 > 0) __syncthreads();
      load_tiles<scalar_t, acc_t>(g, slots, images, g.nslots, c0, cgn, tiles);
      __syncthreads();
      for (int item = tid; item < items; item += nthreads) {
        const int oy = item % g.n;
        const int t = item / g.n;
        const int chunk = t % g.chunks;
        const int slot = t / g.chunks;
        if (!slots[slot].valid) continue;
        const int ox0 = chunk * kM;
        const int valid_m = min(kM, g.n - ox0);
        acc_t* d = D + slot * K + oy * g.n + ox0;
        acc_t acc[kM];
#pragma unroll
        for (int m = 0; m < kM; ++m) acc[m] = (c0 > 0 && m < valid_m) ? d[m] : acc_t(0);
        for (int c = 0; c < cgn; ++c) {
          distance_item(tiles + static_cast<int64_t>((slot * cgn + c) * g.side) * g.stride, g, oy, ox0, acc);
        }
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          if (m < valid_m) d[m] = acc[m];
        }
      }
    }
    __syncthreads();
  }

  // ---- rows, loss, weights ---------------------------------------------------------------------------------
  if constexpr (kMode == kGraphForward) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    acc_t s0 = 0, s1 = 0;
    for (int k = tid; k < K; k += nthreads) {
      if (slots[0].valid) {
        const acc_t e = exp_(D[k] * a.zc);
        D[k] = e;
        s0 += e;
      }
      if (g.nslots > 1 && slots[1].valid) {
        const acc_t e = exp_(D[K + k] * a.zc);
        D[K + k] = e;
        s1 += e;
      }
    }
    block_sum2(s0, s1, red);
    const acc_t inv[2] = {acc_t(1) / s0, acc_t(1) / s1};
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      if (slot >= g.nslots || !slots[slot].exists) continue;
      scalar_t* out = a.rows_out + slots[slot].row * K;
      const bool ok = slots[slot].valid;
      for (int k = tid; k < K; k += nthreads) out[k] = static_cast<scalar_t>(ok ? D[slot * K + k] * inv[slot] : nan);
    }
  } else if constexpr (kMode == kGraphBackward) {
    // dL/dz_k = S_k (G_k - sum_j G_j S_j)
    acc_t s0 = 0, s1 = 0;
    for (int k = tid; k < K; k += nthreads) {
      if (slots[0].valid) {
        s0 += a.grad_rows[slots[0].row * K + k] * a.rows_in[slots[0].row * K + k];
      }
      if (g.nslots > 1 && slots[1].valid) {
        s1 += a.grad_rows[slots[1].row * K + k] * a.rows_in[slots[1].row * K + k];
      }
    }
    block_sum2(s0, s1, red);
    const acc_t dot[2] = {s0, s1};
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      if (slot >= g.nslots || !slots[slot].valid) continue;
      const int64_t base = slots[slot].row * K;
      for (int k = tid; k < K; k += nthreads) {
        const acc_t S = a.rows_in[base + k];
        const acc_t G = a.grad_rows[base + k];
        wp[(slot * g.n + k / g.n) * g.wstride + g.P - 1 + k % g.n] = a.factor * S * (G - dot[slot]);
      }
    }
  } else {
    // Loss rows: slot 0 is sr, slot 1 is hr; both are valid or neither.
    const acc_t prob_floor = static_cast<acc_t>(kProbFloor);
    const bool ok = slots[0].valid;
    acc_t ssr = 0, shr = 0;
    if (ok) {
      for (int k = tid; k < K; k += nthreads) {
        const acc_t e0 = exp_(D[k] * a.zc), e1 = exp_(D[K + k] * a.zc);
        D[k] = e0;
        D[K + k] = e1;
        ssr += e0;
        shr += e1;
      }
    }
    block_sum2(ssr, shr, red);
    const acc_t isr = acc_t(1) / ssr, ihr = acc_t(1) / shr;
    // This row's kl * KL + l1 * L1 term into a.partial (NaN for an out-of-range row); the whole block takes part.
    const auto write_row_loss = [&]() {
      acc_t lp = 0, unused = 0;
      if (ok) {
        for (int k = tid; k < K; k += nthreads) {
          const acc_t S = D[k] * isr, H = D[K + k] * ihr;
          const acc_t t = max_keep_nan(H, prob_floor);
          lp += a.kl * (t * (log_(t) - log_(max_keep_nan(S, prob_floor)))) + a.l1 * abs_(S - H);
        }
      }
      block_sum2(lp, unused, red);
      if (tid == 0) a.partial[slots[0].row] = ok ? lp : std::numeric_limits<acc_t>::quiet_NaN();
    };
    if constexpr (kMode == kLossForward) {
      write_row_loss();
    } else {
      // dL/dz_k = A (S_k sum_{j in U} t_j - t_k [k in U]) + B S_k (sgn_k - sum_j S_j sgn_j), U = {S_j >= floor}
      acc_t tu = 0, ss = 0;
      if (ok) {
        for (int k = tid; k < K; k += nthreads) {
          const acc_t S = D[k] * isr, H = D[K + k] * ihr;
          const acc_t diff = S - H;
          const acc_t sgn = diff > acc_t(0) ? acc_t(1) : (diff < acc_t(0) ? acc_t(-1) : acc_t(0));
          if (S >= prob_floor) tu += max_keep_nan(H, prob_floor);
          ss += S * sgn;
        }
      }
      block_sum2(tu, ss, red);
      if (a.partial != nullptr) write_row_loss();  // loss and gradient in one pass
      const acc_t gscale = (a.grad != nullptr ? *a.grad : acc_t(1)) * a.inv_nk;
      const acc_t A = a.kl * gscale, Bw = a.l1 * gscale;
      for (int k = tid; k < K; k += nthreads) {
        acc_t w = 0;
        if (ok) {
          const acc_t S = D[k] * isr, H = D[K + k] * ihr;
          const acc_t diff = S - H;
          const acc_t sgn = diff > acc_t(0) ? acc_t(1) : (diff < acc_t(0) ? acc_t(-1) : acc_t(0));
          const acc_t tk = S >= prob_floor ? max_keep_nan(H, prob_floor) : acc_t(0);
          w = a.factor * (A * (S * tu - tk) + Bw * S * (sgn - ss));
        }
        if (fast_grad) {
          wp[(k / g.n) * g.wstride + g.P - 1 + k % g.n] = w;
        } else {
          a.wout[slots[0].row * K + k] = w;
        }
      }
    }
  }

  // ---- fast backward: tile gradients, added to the image gradient with atomics ---------------------------------
  if constexpr (kBackward) {
    if (!fast_grad) return;
    const bool resident = kDistances && g.cg >= g.C;  // the distance pass left all channels in shared memory
    const int64_t plane = static_cast<int64_t>(g.H) * g.W;
    for (int c0 = 0; c0 < g.C; c0 += g.cg) {
      const int cgn = min(g.cg, g.C - c0);
      __syncthreads();  // weights are complete; the previous group's tiles and partials are consumed
      // Tile layout of this pass: resident tiles keep the distance pass's cgn, which equals this one.
      if (!resident) {
        load_tiles<scalar_t, acc_t>(g, slots, images, g.ngrad, c0, cgn, tiles);
        __syncthreads();
      }
      const int nq = g.ngrad * cgn * g.chunks_q * g.groups * g.P;
      const int nc = g.ngrad * cgn * g.chunks_c * g.side;
      for (int item = tid; item < nq + nc; item += nthreads) {
        acc_t acc[kM];
#pragma unroll
        for (int m = 0; m < kM; ++m) acc[m] = 0;
        if (item < nq) {
          const int iy = item % g.P;
          int t = item / g.P;
          const int grp = t % g.groups;
          t /= g.groups;
          const int chunk = t % g.chunks_q;
          t /= g.chunks_q;
          const int c = t % cgn;
          const int gs = t / cgn;
          if (!slots[gs].valid) continue;
          const int ix0 = chunk * kM;
          const int oy_lo = grp * g.group_rows, oy_hi = min(g.n, oy_lo + g.group_rows);
          query_item(tiles + static_cast<int64_t>((gs * cgn + c) * g.side) * g.stride,
                     wp + static_cast<int64_t>(gs) * g.n * g.wstride, g, iy, ix0, oy_lo, oy_hi, acc);
          acc_t* out = gq + ((static_cast<int64_t>(gs * g.groups + grp) * cgn + c) * g.P + iy) * g.P + ix0;
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            if (ix0 + m < g.P) out[m] = acc[m];
          }
        } else {
          const int ci = item - nq;
          const int r = ci % g.side;
          int t = ci / g.side;
          const int chunk = t % g.chunks_c;
          t /= g.chunks_c;
          const int c = t % cgn;
          const int gs = t / cgn;
          const Slot& sl = slots[gs];
          if (!sl.valid) continue;
          const int dy = r - g.R;
          if (g.window && (dy < -g.s || dy > g.s)) continue;  // outside the window: constants
          const int col0 = chunk * kM;
          candidate_item(tiles + static_cast<int64_t>((gs * cgn + c) * g.side) * g.stride,
                         wp + static_cast<int64_t>(gs) * g.n * g.wstride, g, r, col0, acc);
          acc_t* dst = a.gacc + sl.base + (c0 + c) * plane + static_cast<int64_t>(reflect(sl.y + dy, g.H)) * g.W;
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            const int dx = col0 + m - g.R;
            if (col0 + m < g.side && (!g.window || (dx >= -g.s && dx <= g.s))) {
              atomicAdd(dst + reflect(sl.x + dx, g.W), acc[m]);
            }
          }
        }
      }
      __syncthreads();
      // Query-role partials, summed over the offset-row groups in order.
      const int pp = g.P * g.P;
      for (int i = tid; i < g.ngrad * cgn * pp; i += nthreads) {
        const int ix = i % g.P;
        const int iy = (i / g.P) % g.P;
        const int c = (i / pp) % cgn;
        const int gs = i / (pp * cgn);
        const Slot& sl = slots[gs];
        if (!sl.valid) continue;
        const int dy = iy - g.f, dx = ix - g.f;
        if (g.window && (dy < -g.s || dy > g.s || dx < -g.s || dx > g.s)) continue;
        acc_t sum = 0;
        for (int grp = 0; grp < g.groups; ++grp) {
          sum += gq[((static_cast<int64_t>(gs * g.groups + grp) * cgn + c) * g.P + iy) * g.P + ix];
        }
        atomicAdd(a.gacc + sl.base + (c0 + c) * plane + static_cast<int64_t>(reflect(sl.y + dy, g.H)) * g.W +
                      reflect(sl.x + dx, g.W),
                  sum);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic backward.

// map[key] = index of the first sorted row at that pixel (keys past the batch mark invalid rows).
__global__ void first_row_kernel(const int64_t* __restrict__ keys, int64_t N, int64_t total, int* __restrict__ map) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t key = keys[i];
  if (key < total && (i == 0 || keys[i - 1] != key)) map[key] = static_cast<int>(i);
}

// line[order[i]] = map[keys[i]]: the line of dist that holds row order[i]'s distances (-1 outside the batch).
__global__ void dist_line_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ order,
                                 const int* __restrict__ map, int64_t N, int64_t total, int* __restrict__ line) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  line[order[i]] = keys[i] < total ? map[keys[i]] : -1;
}

// Gradient of every element of the padded image (B, C, H + 2 pad, W + 2 pad), each a fixed-order sum over the rows
// whose tile covers it (rows at one pixel in sorted order).
template <typename scalar_t, typename acc_t>
__global__ void gather_kernel(const Geometry g, const scalar_t* __restrict__ img, const acc_t* __restrict__ w,
                              const int64_t* __restrict__ keys, const int64_t* __restrict__ order,
                              const int* __restrict__ map, int64_t N, acc_t* __restrict__ gpad) {
  const int Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  const int64_t total = static_cast<int64_t>(g.B) * g.C * Hp * Wp;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int ux = static_cast<int>(idx % Wp);
  int64_t t = idx / Wp;
  const int uy = static_cast<int>(t % Hp);
  t /= Hp;
  const int c = static_cast<int>(t % g.C);
  const int b = static_cast<int>(t / g.C);
  const int yu = uy - g.pad, xu = ux - g.pad;  // image coordinates of the padded element
  const int reach = g.window ? g.s : g.R;      // rows whose tile gives this element a gradient
  const scalar_t* x = img + (static_cast<int64_t>(b) * g.C + c) * g.H * static_cast<int64_t>(g.W);
  acc_t acc = 0;
  for (int py = max(0, yu - reach); py <= min(g.H - 1, yu + reach); ++py) {
    for (int px = max(0, xu - reach); px <= min(g.W - 1, xu + reach); ++px) {
      const int64_t key = (static_cast<int64_t>(b) * g.H + py) * g.W + px;
      int j = map[key];
      if (j < 0) continue;
      // Tile value of row (py, px) at tile coordinates (r, col).
      auto T = [&](int r, int col) -> acc_t {
        const int dy = r - g.R, dx = col - g.R;
        if (g.window && (dy < -g.s || dy > g.s || dx < -g.s || dx > g.s)) return acc_t(0);
        return static_cast<acc_t>(x[static_cast<int64_t>(reflect(py + dy, g.H)) * g.W + reflect(px + dx, g.W)]);
      };
      const int ru = yu - py + g.R, cu = xu - px + g.R;
      const acc_t xv = T(ru, cu);
      for (; j < N && keys[j] == key; ++j) {
        const acc_t* wr = w + order[j] * g.K;
        // candidate role: offsets (ru - iy, cu - ix) of the patch pixels (iy, ix)
        for (int iy = max(0, ru - g.n + 1); iy <= min(g.P - 1, ru); ++iy) {
          for (int ix = max(0, cu - g.n + 1); ix <= min(g.P - 1, cu); ++ix) {
            acc += wr[(ru - iy) * g.n + (cu - ix)] * (xv - T(g.s + iy, g.s + ix));
          }
        }
        // query role
        const int iy = ru - g.s, ix = cu - g.s;
        if (iy >= 0 && iy < g.P && ix >= 0 && ix < g.P) {
          for (int oy = 0; oy < g.n; ++oy) {
            for (int ox = 0; ox < g.n; ++ox) acc += wr[oy * g.n + ox] * (xv - T(oy + iy, ox + ix));
          }
        }
      }
    }
  }
  gpad[idx] = acc;
}

// Folds the reflect padding back: each pixel adds its <= 3 x 3 padded sources in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void fold_kernel(const Geometry g, const acc_t* __restrict__ gpad, scalar_t* __restrict__ out) {
  const int Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  const int64_t total = static_cast<int64_t>(g.B) * g.C * g.H * g.W;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int x = static_cast<int>(idx % g.W);
  int64_t t = idx / g.W;
  const int y = static_cast<int>(t % g.H);
  const int64_t bc = t / g.H;
  int ys[3], xs[3];
  int ny = 0, nx = 0;
  ys[ny++] = y;
  if (y >= 1 && y <= g.pad) ys[ny++] = -y;
  if (y <= g.H - 2 && g.H - 1 - y <= g.pad) ys[ny++] = 2 * (g.H - 1) - y;
  xs[nx++] = x;
  if (x >= 1 && x <= g.pad) xs[nx++] = -x;
  if (x <= g.W - 2 && g.W - 1 - x <= g.pad) xs[nx++] = 2 * (g.W - 1) - x;
  const acc_t* src = gpad + bc * Hp * static_cast<int64_t>(Wp);
  acc_t sum = 0;
  for (int i = 0; i < ny; ++i) {
    for (int j = 0; j < nx; ++j) sum += src[static_cast<int64_t>(ys[i] + g.pad) * Wp + xs[j] + g.pad];
  }
  out[idx] = static_cast<scalar_t>(sum);
}

// ---------------------------------------------------------------------------------------------------------------
// Dense path: distances by box filters over tiles of the image, and a gather backward.
//
//   * For an offset o, the patch pixels j of a row p fall into rectangles that do not depend on p: in "image"
//     padding every j is a pair (x(p + j), x(p + o + j)); in "window" padding (pixels outside p's window read 0)
//     the pairs are the rectangle B = Q n C, where Q holds the j with p + j in the window and C those with p + o + j
//     in it, and Q \ B (C \ B) add x(p + j)^2 (x(p + o + j)^2). In "image" padding Q = C = B = the patch.
//   * Distances. A block takes a kTile x kTile tile of one image (skipped when no row lies in it) and a chunk of
//     offsets. Per offset it forms E(q) = sum_c (x_c(q) - x_c(q + o))^2 on the tile plus B, sums it along lines over
//     B's width, then down the columns over B's height at the tile's rows only; in "window" padding it adds the x^2
//     parts from a summed-area table (in double) of the tile plus the window. The distance goes to line map[pixel]
//     of `dist` (N, K): rows at one pixel share the line of the first.
//   * Gradient. The weights w (N, K) of rows at one pixel are first added up in row order (combine_kernel). A block
//     then owns a kTile x kTile tile of the padded image and loops over every offset in order. For each, the weight
//     plane W_o box-summed over B and Q around the tile (u as a query pixel) and over B and C around the tile
//     shifted by -o (u as a candidate) gives
//       S_B(u) (x(u) - x(u + o)) + (S_Q(u) - S_B(u)) x(u)
//         + S_B(u - o) (x(u) - x(u - o)) + (S_C(u - o) - S_B(u - o)) x(u).
//     Every padded pixel is written once, by one thread, in a fixed order: the result is deterministic; fold_kernel
//     folds the padding back.

constexpr int kTile = 16;
constexpr int kDenseThreads = 256;
constexpr int kDenseOffsets = 16;  // offsets per distance block: a row's distances are written 16 at a time

// An inclusive range [lo, hi] of patch offsets j along one axis.
struct Span {
  int lo, hi;
  __device__ __forceinline__ int size() const { return hi - lo + 1; }
};

// The rectangles of offset (oy, ox) along one axis: Q (query pixel in the window), C (candidate in the window),
// B = Q n C. "image" padding: all three are the patch.
struct Spans {
  Span q, c, b;
};

__device__ __forceinline__ Spans spans(const Geometry& g, int o) {
  if (!g.window) return {{-g.f, g.f}, {-g.f, g.f}, {-g.f, g.f}};
  const Span q{-min(g.f, g.s), min(g.f, g.s)};
  const Span c{max(-g.f, -g.s - o), min(g.f, g.s - o)};
  return {q, c, {max(q.lo, c.lo), min(q.hi, c.hi)}};
}

// Writes 1 to *any when a row lies in image rows [y0, y1) x columns [x0, x1) of image b (clipped to the image).
__device__ __forceinline__ void any_row(const Geometry& g, const int* __restrict__ map, int b, int y0, int y1, int x0,
                                        int x1, int* any) {
  y0 = max(y0, 0), x0 = max(x0, 0), y1 = min(y1, g.H), x1 = min(x1, g.W);
  const int w = x1 - x0;
  if (w <= 0 || y1 <= y0) return;
  for (int i = threadIdx.x; i < (y1 - y0) * w; i += blockDim.x) {
    if (map[(static_cast<int64_t>(b) * g.H + y0 + i / w) * g.W + x0 + i % w] >= 0) *any = 1;
  }
}

// out[r][t] = sum of in[r][t + lo .. t + hi] for r < lines, t < kTile (in has `width` columns).
template <typename acc_t>
__device__ __forceinline__ void line_sums(const acc_t* __restrict__ in, int width, int lines, int lo, int hi,
                                          acc_t* __restrict__ out) {
  for (int i = threadIdx.x; i < lines * kTile; i += blockDim.x) {
    const acc_t* src = in + (i / kTile) * width + i % kTile;
    acc_t sum = 0;
    for (int d = lo; d <= hi; ++d) sum += src[d];
    out[i] = sum;
  }
}

// sum of h[ty + lo .. ty + hi][tx] (h has kTile columns).
template <typename acc_t>
__device__ __forceinline__ acc_t column_sum(const acc_t* __restrict__ h, int ty, int tx, int lo, int hi) {
  acc_t sum = 0;
  for (int d = lo; d <= hi; ++d) sum += h[(ty + d) * kTile + tx];
  return sum;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDenseThreads)
    dense_distance_kernel(const Geometry g, const scalar_t* __restrict__ img, const int* __restrict__ map,
                          int tiles_x, acc_t* __restrict__ dist) {
  METAF2N_DYNAMIC_SHARED(smem_raw);
  const int E = kTile + 2 * g.f;   // side of the largest squared-difference region
  const int A = kTile + 2 * g.s + 1;  // side of the summed-area table ("window" padding)
  double* sat = reinterpret_cast<double*>(smem_raw);                      // [A][A], "window" padding only
  acc_t* e = reinterpret_cast<acc_t*>(sat + (g.window ? A * A : 0));     // [E][E]
  acc_t* hsum = e + E * E;                                                // [E][kTile]
  acc_t* out = hsum + E * kTile;  // [kTile * kTile][kDenseOffsets]: this block's distances, written out at the end
  int* line = reinterpret_cast<int*>(out + kTile * kTile * kDenseOffsets);  // [kTile * kTile]: dist line, or -1
  __shared__ int any;

  const int b = blockIdx.y, tid = threadIdx.x, nthreads = blockDim.x;
  const int y0 = (blockIdx.x / tiles_x) * kTile, x0 = (blockIdx.x % tiles_x) * kTile;
  if (tid == 0) any = 0;
  __syncthreads();
  for (int i = tid; i < kTile * kTile; i += nthreads) {
    const int y = y0 + i / kTile, x = x0 + i % kTile;
    const int j = (y < g.H && x < g.W) ? map[(static_cast<int64_t>(b) * g.H + y) * g.W + x] : -1;
    line[i] = j;
    if (j >= 0) any = 1;
  }
  __syncthreads();
  if (!any) return;

  const int64_t plane = static_cast<int64_t>(g.H) * g.W;
  const scalar_t* xb = img + static_cast<int64_t>(b) * g.C * plane;
  if (g.window) {
    // sat[r][c] = sum of sum_c x^2 over image rows y0 - s .. y0 - s + r - 1 and columns likewise (rows and columns
    // more than s past the image, which no row's window reaches, count 0).
    for (int i = tid; i < A * A; i += nthreads) {
      const int r = i / A, c = i % A;
      double v = 0;
      const int y = y0 - g.s + r - 1, x = x0 - g.s + c - 1;
      if (r > 0 && c > 0 && y < g.H + g.s && x < g.W + g.s) {
        const int64_t q = static_cast<int64_t>(reflect(y, g.H)) * g.W + reflect(x, g.W);
        for (int ch = 0; ch < g.C; ++ch) {
          const double a = static_cast<double>(static_cast<acc_t>(xb[ch * plane + q]));
          v += a * a;
        }
      }
      sat[i] = v;
    }
    __syncthreads();
    for (int r = tid; r < A; r += nthreads) {
      for (int c = 1; c < A; ++c) sat[r * A + c] += sat[r * A + c - 1];
    }
    __syncthreads();
    for (int c = tid; c < A; c += nthreads) {
      for (int r = 1; r < A; ++r) sat[r * A + c] += sat[(r - 1) * A + c];
    }
    __syncthreads();  // (the first barrier of the offset loop would order these writes too; kept for clarity)
  }
  // sum of x^2 over image rows [y0 + ty + ys.lo, y0 + ty + ys.hi] x columns likewise (inside the table)
  const auto x2 = [&](int ty, int tx, Span ys, Span xs) {
    const int r0 = ty + ys.lo + g.s, r1 = ty + ys.hi + g.s + 1, c0 = tx + xs.lo + g.s, c1 = tx + xs.hi + g.s + 1;
    return sat[r1 * A + c1] - sat[r0 * A + c1] - sat[r1 * A + c0] + sat[r0 * A + c0];
  };

  const int k0 = static_cast<int>(blockIdx.z) * kDenseOffsets, k_end = min(g.K, k0 + kDenseOffsets);
  for (int k = k0; k < k_end; ++k) {
    const int oy = k / g.n - g.s, ox = k % g.n - g.s;
    const Spans sy = spans(g, oy), sx = spans(g, ox);
    const int ey = kTile - 1 + sy.b.size(), ex = kTile - 1 + sx.b.size();  // E(q) for q = tile pixel + B
    for (int i = tid; i < ey * ex; i += nthreads) {
      const int qy = y0 + sy.b.lo + i / ex, qx = x0 + sx.b.lo + i % ex;
      acc_t sum = 0;
      if (qy <= g.H - 1 + sy.b.hi && qx <= g.W - 1 + sx.b.hi) {  // past that only a partial tile's missing pixels read
        const int64_t q = static_cast<int64_t>(reflect(qy, g.H)) * g.W + reflect(qx, g.W);
        const int64_t c = static_cast<int64_t>(reflect(qy + oy, g.H)) * g.W + reflect(qx + ox, g.W);
        for (int ch = 0; ch < g.C; ++ch) {
          const acc_t d = static_cast<acc_t>(xb[ch * plane + q]) - static_cast<acc_t>(xb[ch * plane + c]);
          sum += d * d;
        }
      }
      e[i] = sum;
    }
    __syncthreads();
    line_sums(e, ex, ey, 0, sx.b.size() - 1, hsum);
    __syncthreads();
    for (int i = tid; i < kTile * kTile; i += nthreads) {
      if (line[i] < 0) continue;
      const int ty = i / kTile, tx = i % kTile;
      acc_t sum = column_sum(hsum, ty, tx, 0, sy.b.size() - 1);
      if (g.window) {
        const Span cy{oy + sy.c.lo, oy + sy.c.hi}, cx{ox + sx.c.lo, ox + sx.c.hi};  // C and B around p + o
        const Span by{oy + sy.b.lo, oy + sy.b.hi}, bx{ox + sx.b.lo, ox + sx.b.hi};
        sum += static_cast<acc_t>((x2(ty, tx, sy.q, sx.q) - x2(ty, tx, sy.b, sx.b)) +
                                  (x2(ty, tx, cy, cx) - x2(ty, tx, by, bx)));
      }
      out[i * kDenseOffsets + k - k0] = sum;
    }
    // No barrier needed here: the next offset writes e first, which nothing reads after the barrier above.
  }
  __syncthreads();
  // Each row's distances as one run of consecutive addresses (a warp writes a few rows' runs at once).
  const int count = k_end - k0;
  for (int i = tid; i < kTile * kTile * count; i += nthreads) {
    const int t = i / count, kk = i % count;
    if (line[t] >= 0) dist[static_cast<int64_t>(line[t]) * g.K + k0 + kk] = out[t * kDenseOffsets + kk];
  }
}

// wsum[k][j] = sum of w[order[i]][k] over the sorted rows i = j, j + 1, ... at the pixel of keys[j], for the first
// row j of each pixel inside the batch (other entries are left alone). Offset-major: the gradient kernel reads one
// offset's weights of neighbouring pixels, whose sorted rows are neighbours too.
template <typename acc_t>
__global__ void combine_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ order, int64_t N,
                               int64_t total, int K, const acc_t* __restrict__ w, acc_t* __restrict__ wsum) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * K) return;
  const int64_t j = idx % N;
  const int k = static_cast<int>(idx / N);
  const int64_t key = keys[j];
  if (key >= total || (j > 0 && keys[j - 1] == key)) return;
  acc_t sum = 0;
  for (int64_t i = j; i < N && keys[i] == key; ++i) sum += w[order[i] * K + k];
  wsum[idx] = sum;
}

// Loads the weight plane of one offset (wsum_k: its weights by sorted row) on image rows [y0, y0 + lines) x columns
// [x0, x0 + width) (zero off the image or without a row).
template <typename acc_t>
__device__ __forceinline__ void load_weights(const Geometry& g, const int* __restrict__ map_b,
                                             const acc_t* __restrict__ wsum_k, int y0, int x0, int lines, int width,
                                             acc_t* plane) {
  for (int i = threadIdx.x; i < lines * width; i += blockDim.x) {
    const int y = y0 + i / width, x = x0 + i % width;
    acc_t v = 0;
    if (y >= 0 && y < g.H && x >= 0 && x < g.W) {
      const int j = map_b[static_cast<int64_t>(y) * g.W + x];
      if (j >= 0) v = wsum_k[j];
    }
    plane[i] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDenseThreads)
    dense_gradient_kernel(const Geometry g, const scalar_t* __restrict__ img, const int* __restrict__ map,
                          const acc_t* __restrict__ wsum, int64_t N, int tiles_x, acc_t* __restrict__ gpad) {
  METAF2N_DYNAMIC_SHARED(smem_raw);
  const int E = kTile + 2 * g.f;
  acc_t* plane = reinterpret_cast<acc_t*>(smem_raw);  // [E][E]
  acc_t* h_qb = plane + E * E;                        // [E][kTile] line sums over B around the tile (query role)
  acc_t* h_q = h_qb + E * kTile;                      //            ... over Q
  acc_t* h_cb = h_q + E * kTile;                      //            ... over B around the tile - o (candidate role)
  acc_t* h_c = h_cb + E * kTile;                      //            ... over C
  acc_t* acc = h_c + E * kTile;                       // [C][kTile * kTile]: the tile's gradient
  __shared__ int any;

  const int b = blockIdx.y, tid = threadIdx.x, nthreads = blockDim.x;
  const int Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  // Tile origin in image coordinates (padded pixel u = image pixel u - pad).
  const int y0 = (blockIdx.x / tiles_x) * kTile - g.pad, x0 = (blockIdx.x % tiles_x) * kTile - g.pad;
  if (tid == 0) any = 0;
  for (int i = tid; i < g.C * kTile * kTile; i += nthreads) acc[i] = 0;
  __syncthreads();
  any_row(g, map, b, y0 - g.R, y0 + kTile + g.R, x0 - g.R, x0 + kTile + g.R, &any);  // rows that reach the tile
  __syncthreads();

  const int64_t plane_size = static_cast<int64_t>(g.H) * g.W;
  const scalar_t* xb = img + static_cast<int64_t>(b) * g.C * plane_size;
  const int* map_b = map + static_cast<int64_t>(b) * plane_size;
  const auto value = [&](int c, int y, int x) {  // image value at a (reflected) position
    return static_cast<acc_t>(xb[c * plane_size + static_cast<int64_t>(reflect(y, g.H)) * g.W + reflect(x, g.W)]);
  };
  for (int k = 0; k < (any ? g.K : 0); ++k) {
    const int oy = k / g.n - g.s, ox = k % g.n - g.s;
    const Spans sy = spans(g, oy), sx = spans(g, ox);
    // Query role: u - j for j in Q (which holds B), around the tile.
    const int qlines = kTile - 1 + sy.q.size(), qwidth = kTile - 1 + sx.q.size();
    const acc_t* wsum_k = wsum + static_cast<int64_t>(k) * N;
    load_weights(g, map_b, wsum_k, y0 - sy.q.hi, x0 - sx.q.hi, qlines, qwidth, plane);
    __syncthreads();
    line_sums(plane, qwidth, qlines, sx.q.hi - sx.b.hi, sx.q.hi - sx.b.lo, h_qb);
    if (g.window) line_sums(plane, qwidth, qlines, 0, sx.q.size() - 1, h_q);
    __syncthreads();
    // Candidate role: u - o - j for j in C (which holds B).
    const int clines = kTile - 1 + sy.c.size(), cwidth = kTile - 1 + sx.c.size();
    load_weights(g, map_b, wsum_k, y0 - oy - sy.c.hi, x0 - ox - sx.c.hi, clines, cwidth, plane);
    __syncthreads();
    line_sums(plane, cwidth, clines, sx.c.hi - sx.b.hi, sx.c.hi - sx.b.lo, h_cb);
    if (g.window) line_sums(plane, cwidth, clines, 0, sx.c.size() - 1, h_c);
    __syncthreads();
    for (int t = tid; t < kTile * kTile; t += nthreads) {
      const int ty = t / kTile, tx = t % kTile;
      const acc_t qb = column_sum(h_qb, ty, tx, sy.q.hi - sy.b.hi, sy.q.hi - sy.b.lo);
      const acc_t cb = column_sum(h_cb, ty, tx, sy.c.hi - sy.b.hi, sy.c.hi - sy.b.lo);
      const acc_t q_only = g.window ? column_sum(h_q, ty, tx, 0, sy.q.size() - 1) - qb : acc_t(0);
      const acc_t c_only = g.window ? column_sum(h_c, ty, tx, 0, sy.c.size() - 1) - cb : acc_t(0);
      // A non-zero sum means a row within reach, so every position read below is within the padding.
      const int y = y0 + ty, x = x0 + tx;
      for (int c = 0; c < g.C; ++c) {
        acc_t a = 0;
        if (qb != acc_t(0)) a += qb * (value(c, y, x) - value(c, y + oy, x + ox));
        if (cb != acc_t(0)) a += cb * (value(c, y, x) - value(c, y - oy, x - ox));
        if (q_only != acc_t(0) || c_only != acc_t(0)) a += (q_only + c_only) * value(c, y, x);
        acc[c * kTile * kTile + t] += a;
      }
    }
    // No barrier needed here: the next offset's load_weights writes `plane`, then waits for every thread before the
    // line sums are written again. Each thread adds to the same pixels of acc at every offset.
  }
  for (int i = tid; i < g.C * kTile * kTile; i += nthreads) {
    const int c = i / (kTile * kTile), t = i % (kTile * kTile);
    const int uy = y0 + g.pad + t / kTile, ux = x0 + g.pad + t % kTile;
    if (uy < Hp && ux < Wp) gpad[((static_cast<int64_t>(b) * g.C + c) * Hp + uy) * Wp + ux] = acc[i];
  }
}
// ---------------------------------------------------------------------------------------------------------------
// Host side.

// A kernel's static shared memory and the device's per-block opt-in limit (static + dynamic must fit it).
struct SharedLimits {
  int64_t static_bytes;
  int64_t optin;
};

int max_shared_optin(int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return value;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Geometry, shared-memory layout and channel group size of a rows_kernel launch.
// The sizes every kernel shares: image, window, patch and padding.
Geometry base_geometry(int64_t B, int64_t C, int64_t H, int64_t W, const GraphParams& p) {
  Geometry g{};
  g.B = static_cast<int>(B);
  g.C = static_cast<int>(C);
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.s = static_cast<int>(p.s());
  g.f = static_cast<int>(p.f());
  g.n = static_cast<int>(p.search);
  g.P = static_cast<int>(p.patch);
  g.R = g.s + g.f;
  g.side = 2 * g.R + 1;
  g.K = g.n * g.n;
  g.pad = static_cast<int>(p.pad());
  g.window = p.padding == Padding::Window;
  return g;
}

// Shared-memory layout and channel group size of a rows_kernel launch (host only, no CUDA call: tested on the CPU
// through metaf2n::_cuda_shared_memory_plan). A block's static shared memory counts against the same per-block limit as
// the dynamic part: dynamic + static must fit `limits.optin`.
// The dense path reads its distances from global memory and stages no tiles (stage_tiles = false).
Geometry plan_geometry(int64_t B, int64_t C, int64_t H, int64_t W, const GraphParams& p, int mode, bool fast_grad,
                       bool stage_tiles, size_t elem, const SharedLimits& limits, const char* dtype_name) {
  Geometry g = base_geometry(B, C, H, W, p);
  g.chunks = ceil_div(g.n, kM);
  g.chunks_c = ceil_div(g.side, kM);
  g.chunks_q = ceil_div(g.P, kM);
  // Columns read: distances up to chunks*kM + P - 2, candidate role up to chunks_c*kM - 1, query role up to
  // ceil(n/kL)*kL + chunks_q*kM - 2. An odd stride spreads a warp's lines over the banks.
  int stride = std::max({g.chunks * kM + g.P - 1, g.chunks_c * kM, ceil_div(g.n, kL) * kL + g.chunks_q * kM - 1});
  g.stride = stride | 1;
  g.wstride = (std::max(g.chunks_c * kM, ceil_div(g.n, kL) * kL) + g.P - 1) | 1;
  // Query-role items cost about as much as candidate-role ones (P * ceil(P/kL) blocks of kM x kL).
  g.group_rows = std::max(1, ceil_div(g.P * ceil_div(g.P, kL), ceil_div(g.n, kL)));
  g.groups = ceil_div(g.n, g.group_rows);
  const bool graph = mode == kGraphForward || mode == kGraphBackward;
  const bool backward = mode == kGraphBackward || mode == kLossBackward;
  g.nslots = 2;
  g.ngrad = graph ? 2 : 1;

  const int64_t side_lines = static_cast<int64_t>(g.side) * g.stride;
  auto layout = [&](int cg) {  // bytes of dynamic shared memory with cg channels staged at once
    int64_t off = 0;
    g.off_tiles = off;
    if (stage_tiles) off += round_up(g.nslots * cg * side_lines, 2);
    g.off_d = off;
    if (mode != kGraphBackward) off += round_up(static_cast<int64_t>(g.nslots) * g.K, 2);
    g.off_wp = off;
    if (backward && fast_grad) off += round_up(static_cast<int64_t>(g.ngrad) * g.n * g.wstride, 2);
    g.off_gq = off;
    if (backward && fast_grad) off += round_up(static_cast<int64_t>(g.ngrad) * g.groups * cg * g.P * g.P, 2);
    g.off_red = off;
    off += 64;
    return off * static_cast<int64_t>(elem);
  };
  const int64_t one = layout(1) + limits.static_bytes;
  TORCH_CHECK_VALUE(one <= limits.optin, "search ", p.search, " with patch ", p.patch, " needs ", one,
                    " bytes of shared memory per block (", limits.static_bytes, " of them static) for ", dtype_name,
                    " images, more than this GPU allows (", limits.optin,
                    "); use a smaller search window or patch (or float32 instead of float64)");
  int cg = 1;
  while (cg < g.C && layout(cg + 1) + limits.static_bytes <= std::max<int64_t>(kSoftSharedBytes, one)) ++cg;
  g.cg = cg;
  layout(cg);
  return g;
}

int64_t shared_bytes(const Geometry& g, size_t elem) { return (g.off_red + 64) * static_cast<int64_t>(elem); }

int threads_for(const Geometry& g, int mode) {
  int64_t items;
  if (mode == kGraphBackward) {
    items = static_cast<int64_t>(g.ngrad) * g.cg * (g.chunks_q * g.groups * g.P + g.chunks_c * g.side);
  } else {
    items = static_cast<int64_t>(g.nslots) * g.chunks * g.n;
  }
  return static_cast<int>(std::clamp<int64_t>(round_up(items, 32), 64, kMaxThreads));
}

// Static shared memory of a kernel and the opt-in limit of `device`; the kernel's maximum dynamic shared memory is
// raised to what the device allows once per (device, kernel), under a lock, so that concurrent host threads never
// race on the attribute.
template <typename... Params>
SharedLimits kernel_limits(void (*kernel)(Params...), int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, SharedLimits> ready;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  const auto found = ready.find(key);
  if (found != ready.end()) return found->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  SharedLimits limits{static_cast<int64_t>(attributes.sharedSizeBytes), max_shared_optin(device)};
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(limits.optin - limits.static_bytes)));
  ready.emplace(key, limits);
  return limits;
}

template <typename scalar_t, typename acc_t, int kMode>
Geometry make_geometry(const at::Tensor& image, const GraphParams& p, bool fast_grad, bool stage_tiles = true) {
  const SharedLimits limits = kernel_limits(rows_kernel<scalar_t, acc_t, kMode>, image.get_device());
  return plan_geometry(image.size(0), image.size(1), image.size(2), image.size(3), p, kMode, fast_grad, stage_tiles,
                       sizeof(acc_t), limits, c10::toString(image.scalar_type()));
}

template <typename scalar_t, typename acc_t, int kMode>
void launch_rows(const RowArgs<scalar_t, acc_t>& args, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "too many rows for one launch: ", args.N);
  const int64_t bytes = shared_bytes(args.g, sizeof(acc_t));  // within the limit set by kernel_limits
  METAF2N_LAUNCH(static_cast<unsigned>(blocks), threads_for(args.g, kMode), bytes, stream,
                 rows_kernel<scalar_t, acc_t, kMode>)(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
RowArgs<scalar_t, acc_t> base_args(const Geometry& g, const at::Tensor& positions, const GraphParams& p) {
  RowArgs<scalar_t, acc_t> a{};
  a.g = g;
  a.N = positions.size(0);
  a.pos = positions.data_ptr<int64_t>();
  const double denom = p.h * g.C * static_cast<double>(p.patch) * p.patch;
  a.zc = static_cast<acc_t>(-1.0 / denom);
  a.factor = static_cast<acc_t>(-2.0 / denom);
  return a;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows sorted by pixel: keys (the pixel b H W + y W + x, or B H W for a row outside the batch), order (the rows in
// that order, stable) and map (B H W): the sorted index of the first row at each pixel, -1 without one.
struct RowIndex {
  at::Tensor keys, order, map;
};

RowIndex index_rows(const at::Tensor& positions, int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  const int64_t N = positions.size(0);
  TORCH_CHECK(N <= std::numeric_limits<int>::max() && B * H * W <= std::numeric_limits<int>::max(),
              "deterministic and dense SSL supports at most 2^31 rows and pixels");
  const at::Tensor b = positions.select(1, 0), y = positions.select(1, 1), xx = positions.select(1, 2);
  const at::Tensor valid = b.ge(0).logical_and_(b.lt(B)).logical_and_(y.ge(0)).logical_and_(y.lt(H))
                               .logical_and_(xx.ge(0)).logical_and_(xx.lt(W));
  const at::Tensor outside = at::full({}, B * H * W, positions.options());
  const at::Tensor key = at::where(valid, b.mul(H).add_(y).mul_(W).add_(xx), outside);
  const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  RowIndex index{std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous(),
                 at::full({B * H * W}, -1, positions.options().dtype(at::kInt))};
  if (N > 0) {
    METAF2N_LAUNCH(static_cast<unsigned>((N + 255) / 256), 256, 0, stream, first_row_kernel)(
        index.keys.data_ptr<int64_t>(), N, B * H * W, index.map.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return index;
}

// out (B, C, H, W) = gpad (B, C, H + 2 pad, W + 2 pad) with the reflect padding folded back.
template <typename scalar_t, typename acc_t>
void fold_padding(const Geometry& g, const at::Tensor& gpad, at::Tensor& out, cudaStream_t stream) {
  const int64_t total = out.numel();
  METAF2N_LAUNCH(static_cast<unsigned>((total + 255) / 256), 256, 0, stream, fold_kernel<scalar_t, acc_t>)(
      g, gpad.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Deterministic image gradient from the weights w (N, K) of every row.
at::Tensor deterministic_gradient(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& w,
                                  const GraphParams& p, cudaStream_t stream) {
  const int64_t N = positions.size(0);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // No pixel to receive a gradient (B = 0 with rows left, whose positions are all out of range): zero-block grids
  // would fail to launch.
  if (x.numel() == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  const RowIndex index = index_rows(positions, B, H, W, stream);
  const at::Tensor &keys = index.keys, &order = index.order, &map = index.map;

  const Geometry g = base_geometry(B, C, H, W, p);
  const int64_t Hp = H + 2 * g.pad, Wp = W + 2 * g.pad;
  at::Tensor gpad = at::empty({B, C, Hp, Wp}, w.options());
  at::Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_ssl_deterministic_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t total_pad = B * C * Hp * Wp;
    METAF2N_LAUNCH(static_cast<unsigned>((total_pad + 127) / 128), 128, 0, stream, gather_kernel<scalar_t, acc_t>)(
        g, x.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
        map.data_ptr<int>(), N, gpad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fold_padding<scalar_t, acc_t>(g, gpad, out, stream);
  });
  return out;
}

// ---- dense path, host side ------------------------------------------------------------------------------------

int64_t dense_distance_bytes(const Geometry& g, size_t elem) {
  const int64_t E = kTile + 2 * g.f, A = kTile + 2 * g.s + 1;
  return (g.window ? A * A * static_cast<int64_t>(sizeof(double)) : 0) +
         (E * E + E * kTile + kTile * kTile * kDenseOffsets) * static_cast<int64_t>(elem) +
         kTile * kTile * static_cast<int64_t>(sizeof(int));
}

int64_t dense_gradient_bytes(const Geometry& g, size_t elem) {
  const int64_t E = kTile + 2 * g.f;
  return (E * E + 4 * E * kTile + static_cast<int64_t>(g.C) * kTile * kTile) * static_cast<int64_t>(elem);
}

template <typename... Params>
void check_dense_bytes(void (*kernel)(Params...), int64_t bytes, const at::Tensor& image, const GraphParams& p) {
  const SharedLimits limits = kernel_limits(kernel, image.get_device());
  TORCH_CHECK_VALUE(bytes + limits.static_bytes <= limits.optin, "path=\"dense\" with patch ", p.patch, " and ",
                    image.size(1), " channels needs ", bytes + limits.static_bytes,
                    " bytes of shared memory per block, more than this GPU allows (", limits.optin,
                    "); use path=\"direct\"");
}

// Rows sorted by pixel, and for each row the line of the distance tensors that holds its distances.
struct DenseRows {
  RowIndex index;
  at::Tensor line;  // (N,) int32
};

DenseRows dense_rows(const at::Tensor& positions, const at::Tensor& image, cudaStream_t stream) {
  const int64_t N = positions.size(0), B = image.size(0), H = image.size(2), W = image.size(3);
  DenseRows rows{index_rows(positions, B, H, W, stream), at::empty({N}, positions.options().dtype(at::kInt))};
  METAF2N_LAUNCH(static_cast<unsigned>((N + 255) / 256), 256, 0, stream, dist_line_kernel)(
      rows.index.keys.data_ptr<int64_t>(), rows.index.order.data_ptr<int64_t>(), rows.index.map.data_ptr<int>(), N,
      B * H * W, rows.line.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

// Distances (N, K) of every pixel of `image` that holds a row, on the line index.map gives it.
template <typename scalar_t, typename acc_t>
at::Tensor dense_distances(const at::Tensor& image, const RowIndex& index, const Geometry& g, const GraphParams& p,
                           cudaStream_t stream) {
  at::Tensor dist = at::empty({index.keys.size(0), g.K}, image.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (image.numel() == 0) return dist;
  const int64_t bytes = dense_distance_bytes(g, sizeof(acc_t));
  check_dense_bytes(dense_distance_kernel<scalar_t, acc_t>, bytes, image, p);
  const int tiles_x = ceil_div(g.W, kTile);
  const dim3 grid(static_cast<unsigned>(tiles_x * ceil_div(g.H, kTile)), static_cast<unsigned>(g.B),
                  static_cast<unsigned>(ceil_div(g.K, kDenseOffsets)));
  METAF2N_LAUNCH(grid, kDenseThreads, bytes, stream, dense_distance_kernel<scalar_t, acc_t>)(
      g, image.data_ptr<scalar_t>(), index.map.data_ptr<int>(), tiles_x, dist.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dist;
}

// Image gradient from the weights w (N, K) of every row, by the gather kernel: deterministic.
at::Tensor dense_gradient(const at::Tensor& x, const RowIndex& index, const at::Tensor& w, const GraphParams& p,
                          cudaStream_t stream) {
  const int64_t N = w.size(0), B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.numel() == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  const Geometry g = base_geometry(B, C, H, W, p);
  at::Tensor wsum = at::empty({w.size(1), N}, w.options());  // offset-major
  const int64_t Hp = H + 2 * g.pad, Wp = W + 2 * g.pad;
  at::Tensor gpad = at::empty({B, C, Hp, Wp}, w.options());
  at::Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_ssl_dense_gradient_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    METAF2N_LAUNCH(static_cast<unsigned>((N * g.K + 255) / 256), 256, 0, stream, combine_kernel<acc_t>)(
        index.keys.data_ptr<int64_t>(), index.order.data_ptr<int64_t>(), N, B * H * W, g.K, w.data_ptr<acc_t>(),
        wsum.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t bytes = dense_gradient_bytes(g, sizeof(acc_t));
    check_dense_bytes(dense_gradient_kernel<scalar_t, acc_t>, bytes, x, p);
    const int tiles_x = ceil_div(static_cast<int>(Wp), kTile);
    const dim3 grid(static_cast<unsigned>(tiles_x * ceil_div(static_cast<int>(Hp), kTile)), static_cast<unsigned>(B));
    METAF2N_LAUNCH(grid, kDenseThreads, bytes, stream, dense_gradient_kernel<scalar_t, acc_t>)(
        g, x.data_ptr<scalar_t>(), index.map.data_ptr<int>(), wsum.data_ptr<acc_t>(), N, tiles_x,
        gpad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fold_padding<scalar_t, acc_t>(g, gpad, out, stream);
  });
  return out;
}

// The dense path's distances of `x` (and `t`, for the loss) on the row arguments; the tensors they point to are kept
// in `keep` until the launch has been queued.
template <typename scalar_t, typename acc_t>
void attach_distances(RowArgs<scalar_t, acc_t>& a, const DenseRows& rows, const at::Tensor& x, const at::Tensor* t,
                      const GraphParams& p, cudaStream_t stream, std::vector<at::Tensor>& keep) {
  keep.push_back(dense_distances<scalar_t, acc_t>(x, rows.index, a.g, p, stream));
  a.dist[0] = keep.back().data_ptr<acc_t>();
  if (t != nullptr) {
    keep.push_back(dense_distances<scalar_t, acc_t>(*t, rows.index, a.g, p, stream));
    a.dist[1] = keep.back().data_ptr<acc_t>();
  }
  a.dist_row = rows.line.data_ptr<int>();
}

bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

}  // namespace

// Each entry point serves both paths: `dense` takes the distances from dense_distances and the gradient from
// dense_gradient; the row maths (rows_kernel) is the same.

at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p, bool dense) {
  const int64_t N = positions.size(0);
  at::Tensor out = at::empty({N, p.K()}, image.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const c10::cuda::CUDAGuard guard(image.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = image.contiguous();
  const DenseRows rows = dense ? dense_rows(positions, x, stream) : DenseRows{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_graph_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t, acc_t, kGraphForward>(x, p, false, !dense);
    auto a = base_args<scalar_t, acc_t>(g, positions, p);
    std::vector<at::Tensor> keep;
    if (dense) attach_distances(a, rows, x, nullptr, p, stream, keep);
    a.img0 = x.data_ptr<scalar_t>();
    a.rows_out = out.data_ptr<scalar_t>();
    launch_rows<scalar_t, acc_t, kGraphForward>(a, (N + 1) / 2, stream);
  });
  return out;
}

at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p, bool dense) {
  const int64_t N = positions.size(0);
  if (N == 0) return at::zeros_like(image, at::MemoryFormat::Contiguous);
  const c10::cuda::CUDAGuard guard(image.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = image.contiguous();
  const double factor = -2.0 / (p.h * x.size(1) * static_cast<double>(p.patch) * p.patch);
  const at::Tensor S = rows.to(acc_type(x.scalar_type())).contiguous();
  const at::Tensor G = grad_rows.to(acc_type(x.scalar_type())).contiguous();
  if (dense || deterministic()) {
    const at::Tensor w = S.mul(G.sub(G.mul(S).sum(1, /*keepdim=*/true))).mul_(factor).contiguous();
    if (dense) return dense_gradient(x, index_rows(positions, x.size(0), x.size(2), x.size(3), stream), w, p, stream);
    return deterministic_gradient(x, positions, w, p, stream);
  }
  at::Tensor gacc = at::zeros(x.sizes(), x.options().dtype(acc_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_graph_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t, acc_t, kGraphBackward>(x, p, true);
    auto a = base_args<scalar_t, acc_t>(g, positions, p);
    a.img0 = x.data_ptr<scalar_t>();
    a.rows_in = S.data_ptr<acc_t>();
    a.grad_rows = G.data_ptr<acc_t>();
    a.gacc = gacc.data_ptr<acc_t>();
    launch_rows<scalar_t, acc_t, kGraphBackward>(a, (N + 1) / 2, stream);
  });
  return gacc.scalar_type() == x.scalar_type() ? gacc : gacc.to(x.scalar_type());
}

at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& lw, bool dense) {
  const int64_t N = positions.size(0);
  if (N == 0) return at::zeros({}, sr.options());
  const c10::cuda::CUDAGuard guard(sr.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = sr.contiguous(), t = hr.contiguous();
  const DenseRows rows = dense ? dense_rows(positions, x, stream) : DenseRows{};
  at::Tensor partial = at::empty({N}, x.options().dtype(acc_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_ssl_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t, acc_t, kLossForward>(x, p, false, !dense);
    auto a = base_args<scalar_t, acc_t>(g, positions, p);
    std::vector<at::Tensor> keep;
    if (dense) attach_distances(a, rows, x, &t, p, stream, keep);
    a.img0 = x.data_ptr<scalar_t>();
    a.img1 = t.data_ptr<scalar_t>();
    a.partial = partial.data_ptr<acc_t>();
    a.kl = static_cast<acc_t>(lw.kl);
    a.l1 = static_cast<acc_t>(lw.l1);
    launch_rows<scalar_t, acc_t, kLossForward>(a, N, stream);
  });
  // Fixed-order device reduction in double, then the mean over N x K.
  const at::Tensor total = at::sum(partial, at::kDouble);
  return total.div_(static_cast<double>(N) * p.K()).to(sr.scalar_type());
}

namespace {

// Gradient of the loss w.r.t. sr for the scalar gradient `grad` (nullptr: 1); with `partial` (N,), the per-row
// losses of the same pass too.
at::Tensor loss_gradient(const at::Tensor* grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& positions,
                         const GraphParams& p, const LossWeights& lw, at::Tensor* partial, bool dense) {
  const int64_t N = positions.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor g0 = grad != nullptr ? grad->reshape({}).to(acc).contiguous() : at::Tensor();
  const bool with_weights = dense || deterministic();  // the rows write their weights w (N, K)
  const DenseRows rows = dense ? dense_rows(positions, x, stream) : DenseRows{};
  at::Tensor w, gacc;
  if (with_weights) {
    w = at::empty({N, p.K()}, x.options().dtype(acc));
  } else {
    gacc = at::zeros(x.sizes(), x.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "metaf2n_ssl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t, acc_t, kLossBackward>(x, p, !with_weights, !dense);
    auto a = base_args<scalar_t, acc_t>(g, positions, p);
    std::vector<at::Tensor> keep;
    if (dense) attach_distances(a, rows, x, &t, p, stream, keep);
    a.img0 = x.data_ptr<scalar_t>();
    a.img1 = t.data_ptr<scalar_t>();
    a.grad = grad != nullptr ? g0.data_ptr<acc_t>() : nullptr;
    a.partial = partial != nullptr ? partial->data_ptr<acc_t>() : nullptr;
    a.kl = static_cast<acc_t>(lw.kl);
    a.l1 = static_cast<acc_t>(lw.l1);
    a.inv_nk = static_cast<acc_t>(1.0 / (static_cast<double>(N) * p.K()));
    if (with_weights) {
      a.wout = w.data_ptr<acc_t>();
    } else {
      a.gacc = gacc.data_ptr<acc_t>();
    }
    launch_rows<scalar_t, acc_t, kLossBackward>(a, N, stream);
  });
  if (dense) return dense_gradient(x, rows.index, w, p, stream);
  if (with_weights) return deterministic_gradient(x, positions, w, p, stream);
  return gacc.scalar_type() == x.scalar_type() ? gacc : gacc.to(x.scalar_type());
}

}  // namespace

at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& lw, bool dense) {
  if (positions.size(0) == 0) return at::zeros_like(sr, at::MemoryFormat::Contiguous);
  const c10::cuda::CUDAGuard guard(sr.device());
  return loss_gradient(&grad, sr.contiguous(), hr.contiguous(), positions, p, lw, nullptr, dense);
}

std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& lw, bool dense) {
  const int64_t N = positions.size(0);
  if (N == 0) return {at::zeros({}, sr.options()), at::zeros_like(sr, at::MemoryFormat::Contiguous)};
  const c10::cuda::CUDAGuard guard(sr.device());
  const at::Tensor x = sr.contiguous();
  at::Tensor partial = at::empty({N}, x.options().dtype(acc_type(x.scalar_type())));
  at::Tensor grad = loss_gradient(nullptr, x, hr.contiguous(), positions, p, lw, &partial, dense);
  const at::Tensor total = at::sum(partial, at::kDouble);
  return {total.div_(static_cast<double>(N) * p.K()).to(sr.scalar_type()), grad};
}


std::vector<int64_t> shared_memory_plan(int64_t channels, int64_t search, int64_t patch, const GraphParams& p,
                                        int64_t mode, bool fast_grad, int64_t elem_bytes, int64_t static_bytes,
                                        int64_t optin) {
  TORCH_CHECK_VALUE(mode >= kGraphForward && mode <= kLossBackward, "mode must be 0..3, got ", mode);
  TORCH_CHECK_VALUE(elem_bytes == 4 || elem_bytes == 8, "elem_bytes must be 4 or 8, got ", elem_bytes);
  TORCH_CHECK_VALUE(channels >= 1, "channels must be >= 1, got ", channels);
  const int64_t side = 2 * (p.s() + p.f()) + 1;
  const Geometry g = plan_geometry(1, channels, side, side, p, static_cast<int>(mode), fast_grad, true,
                                   static_cast<size_t>(elem_bytes), SharedLimits{static_bytes, optin},
                                   elem_bytes == 8 ? "Double" : "Float");
  return {shared_bytes(g, static_cast<size_t>(elem_bytes)), static_bytes, g.cg};
}

}  // namespace metaf2n::cuda
