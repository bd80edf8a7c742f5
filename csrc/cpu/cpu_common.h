// What the direct (ssg_kernel.cpp) and dense (ssg_dense.cpp) CPU paths share: padding, the exact softmax rows and
// the loss terms computed from them, the denormal guard.
#pragma once

#include "ssg.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace metaf2n::cpu {

namespace kernels {
constexpr int64_t kSlack = 16;  // spare elements after every buffer a vector read may run into (>= lanes - 1)

// Vectors of lanes<T> values (GCC/Clang vector extensions; one AVX2 register: 8 floats or 4 doubles), loaded and
// stored with memcpy so that no alignment is assumed. The direct kernels read up to lanes<T> - 1 values past the
// end of a tile line: every buffer a tile points into has kSlack spare values at its end.
constexpr int kVectorBytes = 32;
template <typename T>
constexpr int lanes = kVectorBytes / sizeof(T);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One AVX2/FMA clone and one baseline clone, picked at load time.
#define METAF2N_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define METAF2N_MULTIVERSION
#endif
// The generic bodies must be inlined into each clone to be compiled for its instruction set.
#define METAF2N_INLINE inline __attribute__((always_inline))

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
METAF2N_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
METAF2N_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}


// One graph row from its distances: z = -d2 * scale, prob = softmax(z), logp = z - log(sum exp z).
void log_softmax(const float* d2, int K, float scale, float* logp, float* prob);
void log_softmax(const double* d2, int K, double scale, double* logp, double* prob);
}  // namespace kernels

namespace common {

// Far-away offsets have probabilities like exp(-100); their products with gradient terms fall below float's normal
// range, where x86 arithmetic is tens of times slower. Inside our loops such values are flushed to zero (FTZ/DAZ),
// which changes results by less than 1e-38 in absolute value. The thread's previous mode is restored on exit.
class FlushDenormals {
 public:
#if defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

struct Pixel {
  int64_t b, y, x;
};

inline Pixel pixel_at(const int64_t* pos, int64_t i) { return Pixel{pos[3 * i], pos[3 * i + 1], pos[3 * i + 2]}; }

// softmax(-d2 / (h C P^2)) along rows; the centre term is exp(0) = 1, so no row sum is below 1.
inline at::Tensor rows_from_distances(const at::Tensor& d2, const GraphParams& p, int64_t C) {
  return at::softmax(d2 * (-1.0 / (p.h * C * p.patch * p.patch)), 1);
}

// Factor turning dL/dz into the scatter weight of (a - b): z = -d2 / h and d d2 / d a = 2 (a - b) / (C P^2).
inline double scatter_factor(const GraphParams& p, int64_t C) { return -2.0 / (p.h * C * p.patch * p.patch); }

// The reflect-padded image, followed in memory by kSlack zeros that tile reads may run into.
inline at::Tensor reflect_pad(const at::Tensor& image, int64_t pad) {
  const int64_t B = image.size(0), C = image.size(1), Hp = image.size(2) + 2 * pad, Wp = image.size(3) + 2 * pad;
  at::Tensor storage = at::zeros({B * C * Hp * Wp + kernels::kSlack}, image.options());
  at::Tensor padded = storage.narrow(0, 0, B * C * Hp * Wp).view({B, C, Hp, Wp});
  at::reflection_pad2d_out(padded, image.contiguous(), {pad, pad, pad, pad});
  return padded;
}

inline at::Tensor unpad_gradient(const at::Tensor& grad_padded, const at::Tensor& image, int64_t pad) {
  return at::reflection_pad2d_backward(grad_padded, image.contiguous(), {pad, pad, pad, pad});
}

// The two graphs of a chunk of rows, (count, K) each, with their log-probabilities: S, logS from sr; H, logH from hr.
template <typename T>
struct LossRows {
  int64_t count, K;
  std::vector<T> S, logS, H, logH;
};

// kl_weight * sum(t (log t - log max(S, floor))) + l1_weight * sum|S - H| over a chunk, t = max(H, floor);
// log max(S, floor) = max(log S, log floor) needs no logarithm per entry.
template <typename T>
double chunk_loss(const LossRows<T>& rows, const LossWeights& lw) {
  const T floor = static_cast<T>(kProbFloor), log_floor = static_cast<T>(std::log(kProbFloor));
  double kl = 0, l1 = 0;
  for (int64_t r = 0; r < rows.count; ++r) {
    T row_kl = 0, row_l1 = 0;
    for (int64_t k = r * rows.K; k < (r + 1) * rows.K; ++k) {
      const T t = std::max(rows.H[k], floor);
      row_kl += t * (std::max(rows.logH[k], log_floor) - std::max(rows.logS[k], log_floor));
      row_l1 += std::abs(rows.S[k] - rows.H[k]);
    }
    kl += row_kl;
    l1 += row_l1;
  }
  return lw.kl * kl + lw.l1 * l1;
}

// Scatter weights of the loss: a, b already include the mean, the incoming gradient and scatter_factor().
// dL/dz_k = a (S_k sum_{j in U} t_j - t_k [k in U]) + b S_k (sgn_k - sum_j S_j sgn_j), U = {S_j >= floor}.
template <typename T>
void loss_weights(const LossRows<T>& rows, double a, double b, T* out) {
  const T floor = static_cast<T>(kProbFloor);
  for (int64_t r = 0; r < rows.count; ++r) {
    const T* S = rows.S.data() + r * rows.K;
    const T* H = rows.H.data() + r * rows.K;
    T sum_t_in_u = 0, sum_s_sgn = 0;
    for (int64_t k = 0; k < rows.K; ++k) {
      if (S[k] >= floor) sum_t_in_u += std::max(H[k], floor);
      sum_s_sgn += S[k] * static_cast<T>((S[k] > H[k]) - (S[k] < H[k]));
    }
    for (int64_t k = 0; k < rows.K; ++k) {
      const T t_in_u = S[k] >= floor ? std::max(H[k], floor) : T(0);
      const T sgn = static_cast<T>((S[k] > H[k]) - (S[k] < H[k]));
      out[r * rows.K + k] = static_cast<T>(a) * (S[k] * sum_t_in_u - t_in_u) +
                            static_cast<T>(b) * S[k] * (sgn - sum_s_sgn);
    }
  }
}

inline double sum_in_order(const std::vector<double>& values) {
  double total = 0;
  for (double v : values) total += v;
  return total;
}

}  // namespace common
}  // namespace metaf2n::cpu
