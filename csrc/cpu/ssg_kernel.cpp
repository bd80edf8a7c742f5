// CPU kernels: self-similarity graph rows and the fused KL + L1 loss, forward and backward.
//
// Every masked pixel ("row") reads a tile of radius R = s + f around itself: straight from the reflect-padded image
// ("image" padding) or from a copy of its (2s+1)^2 window with a zero border of f ("window" padding). The distances
// d2[k] of its K = (2s+1)^2 candidate patches are accumulated offset-row by offset-row in blocks of lanes<T>
// neighbouring offsets, which the compiler keeps in one SIMD register while it walks the patch.
//
// Backward passes scatter into band buffers: rows are sorted by (b, y, x) and grouped by kBandLines image lines,
// each group writes its own buffer, and buffers are added to the padded gradient in group order. The result does
// not depend on the number of threads and never needs atomics.
#include "cpu/cpu_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace metaf2n::cpu {

namespace kernels {

template <typename T>
inline int blocks(int n) { return (n + lanes<T> - 1) / lanes<T>; }

// PT is the patch width when known at compile time (the common sizes, loops unrolled), 0 otherwise.
template <int PT>
constexpr int patch_width(int f) {
  return PT > 0 ? PT : 2 * f + 1;
}

// G neighbouring blocks of offsets at once: G independent accumulator chains keep the adder pipeline full.
template <int G, int PT, typename T>
METAF2N_INLINE void distance_blocks(const T* plane, int64_t ls, int s, int f, int dy, int i0, int n, T* out) {
  const int P = patch_width<PT>(f);
  Vec<T> acc[G] = {};
  for (int jy = -f; jy <= f; ++jy) {
    const T* a = plane + jy * ls - f;
    const T* b = plane + (jy + dy) * ls - s - f + i0;
    for (int jx = 0; jx < P; ++jx) {
      for (int g = 0; g < G; ++g) {
        const Vec<T> d = a[jx] - load(b + jx + g * lanes<T>);
        acc[g] += d * d;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const int valid = std::min(lanes<T>, n - i0 - g * lanes<T>);
    for (int l = 0; l < valid; ++l) out[i0 + g * lanes<T> + l] += acc[g][l];
  }
}

// d2[(dy+s)*n + (dx+s)] = sum over c, j of (x(centre + j) - x(centre + (dy,dx) + j))^2, n = 2s + 1.
template <int PT, typename T>
METAF2N_INLINE void distances_impl(const T* centre, int64_t cs, int64_t ls, int C, int s, int f, T* d2) {
  const int n = 2 * s + 1;
  std::fill(d2, d2 + n * n, T(0));
  for (int c = 0; c < C; ++c) {
    const T* plane = centre + c * cs;
    for (int dy = -s; dy <= s; ++dy) {
      T* out = d2 + (dy + s) * n;
      int i0 = 0;
      for (; i0 + 4 * lanes<T> <= blocks<T>(n) * lanes<T>; i0 += 4 * lanes<T>) {
        distance_blocks<4, PT>(plane, ls, s, f, dy, i0, n, out);
      }
      switch (blocks<T>(n) - i0 / lanes<T>) {
        case 3: distance_blocks<3, PT>(plane, ls, s, f, dy, i0, n, out); break;
        case 2: distance_blocks<2, PT>(plane, ls, s, f, dy, i0, n, out); break;
        case 1: distance_blocks<1, PT>(plane, ls, s, f, dy, i0, n, out); break;
        default: break;
      }
    }
  }
}

// Scratch for scatter(): zero-bordered copies of the weight rows.
template <typename T>
inline int64_t scatter_scratch_size(int s, int f) {
  const int n = 2 * s + 1, P = 2 * f + 1;
  return static_cast<int64_t>(n) * (P - 1 + blocks<T>(n + P - 1) * lanes<T>);
}

// Candidate-pixel gradient of one tile line, G blocks of lanes<T> columns from column v0.
template <int G, int PT, typename T>
METAF2N_INLINE void candidate_blocks(const T* a, const T* b, T* gb, const T* wrow, int f, int v0) {
  const int P = patch_width<PT>(f);
  Vec<T> bv[G], acc[G] = {};
  for (int g = 0; g < G; ++g) bv[g] = load(b + v0 + g * lanes<T>);
  for (int jx = 0; jx < P; ++jx) {
    for (int g = 0; g < G; ++g) acc[g] += load(wrow + v0 + g * lanes<T> - jx) * (a[jx] - bv[g]);
  }
  // Lanes past the last column have zero weight: they add 0 to the gradient buffer's slack or next line.
  for (int g = 0; g < G; ++g) store(gb + v0 + g * lanes<T>, load(gb + v0 + g * lanes<T>) - acc[g]);
}

// Adds w[k] * (a - b) to the gradient of every query pixel a and subtracts it from its candidate pixel b.
// Candidate pixels are visited lanes<T> columns at a time, each gathering its terms from the weights shifted by
// the patch column, so no vector store ever overlaps the next load.
template <int PT, typename T>
METAF2N_INLINE void scatter_impl(const T* centre, int64_t cs, int64_t ls, T* gcentre, int64_t gcs, int64_t gls,
                                 int C, int s, int f, const T* w, T* scratch) {
  const int n = 2 * s + 1;
  const int P = patch_width<PT>(f);
  const int columns = n + P - 1;            // candidate pixels per tile line
  const int lead = P - 1;                   // zeros before each weight row
  const int row = lead + blocks<T>(columns) * lanes<T>;
  std::fill(scratch, scratch + n * row, T(0));
  for (int dy = 0; dy < n; ++dy) std::copy(w + dy * n, w + (dy + 1) * n, scratch + dy * row + lead);

  for (int c = 0; c < C; ++c) {
    const T* plane = centre + c * cs;
    T* gplane = gcentre + c * gcs;
    for (int jy = -f; jy <= f; ++jy) {
      const T* a = plane + jy * ls - f;
      for (int dy = -s; dy <= s; ++dy) {
        const T* b = plane + (jy + dy) * ls - s - f;
        T* gb = gplane + (jy + dy) * gls - s - f;
        const T* wrow = scratch + (dy + s) * row + lead;  // wrow[dx + s], zero outside [0, n)
        int v0 = 0;
        for (; v0 + 4 * lanes<T> <= blocks<T>(columns) * lanes<T>; v0 += 4 * lanes<T>) {
          candidate_blocks<4, PT>(a, b, gb, wrow, f, v0);
        }
        switch (blocks<T>(columns) - v0 / lanes<T>) {
          case 3: candidate_blocks<3, PT>(a, b, gb, wrow, f, v0); break;
          case 2: candidate_blocks<2, PT>(a, b, gb, wrow, f, v0); break;
          case 1: candidate_blocks<1, PT>(a, b, gb, wrow, f, v0); break;
          default: break;
        }
      }
      // A separate pass, so the P query accumulators never compete for registers with the candidate blocks.
      Vec<T> gquery[PT > 0 ? PT : 32] = {};  // P <= 31 is checked by make_params()
      for (int dy = -s; dy <= s; ++dy) {
        const T* b = plane + (jy + dy) * ls - s - f;
        const T* wrow = scratch + (dy + s) * row + lead;
        for (int i0 = 0; i0 < n; i0 += lanes<T>) {
          const Vec<T> wv = load(wrow + i0);
          for (int jx = 0; jx < P; ++jx) gquery[jx] += wv * (a[jx] - load(b + i0 + jx));
        }
      }
      T* ga = gplane + jy * gls - f;
      for (int jx = 0; jx < P; ++jx) {
        T sum = 0;
        for (int l = 0; l < lanes<T>; ++l) sum += gquery[jx][l];
        ga[jx] += sum;
      }
    }
  }
}

// exp(x) of 8 floats for x <= 0: Cody-Waite reduction to |r| <= ln2/2 and a degree-6 polynomial (about 1 ulp);
// results below float's normal range are 0, as under flush-to-zero. NaN stays NaN.
METAF2N_INLINE Vec<float> exp_nonpositive(Vec<float> x) {
  typedef int32_t VecInt __attribute__((vector_size(kVectorBytes)));
  const Vec<float> zero = {};
  const Vec<float> clamped = x < -87.0f ? zero - 87.0f : x;
  const Vec<float> n = (clamped * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const Vec<float> r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec<float> poly = r * (1.0f / 720) + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const VecInt bits = (__builtin_convertvector(n, VecInt) + 127) << 23;  // 2^n
  Vec<float> power;
  std::memcpy(&power, &bits, sizeof(power));
  return x < -87.0f ? zero : poly * power;
}

// One graph row from its distances: z = -d2 * scale, prob = softmax(z), logp = z - log(sum exp z).
template <typename T>
METAF2N_INLINE void log_softmax_impl(const T* d2, int K, T scale, T* logp, T* prob) {
  int k = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; k + lanes<T> <= K; k += lanes<T>) {
      const Vec<T> z = load(d2 + k) * -scale;
      store(logp + k, z);
      store(prob + k, exp_nonpositive(z));
    }
  }
  for (; k < K; ++k) {
    logp[k] = -d2[k] * scale;
    prob[k] = std::exp(logp[k]);
  }
  T sum = 0;
  for (k = 0; k < K; ++k) sum += prob[k];
  const T log_sum = std::log(sum), inv_sum = T(1) / sum;
  for (k = 0; k < K; ++k) {
    logp[k] -= log_sum;
    prob[k] *= inv_sum;
  }
}

// Patch widths 3..9 get bodies with the width as a constant; the rest share the generic body.
template <typename T>
METAF2N_INLINE void distances_any(const T* centre, int64_t cs, int64_t ls, int C, int s, int f, T* d2) {
  switch (2 * f + 1) {
    case 3: distances_impl<3>(centre, cs, ls, C, s, f, d2); break;
    case 5: distances_impl<5>(centre, cs, ls, C, s, f, d2); break;
    case 7: distances_impl<7>(centre, cs, ls, C, s, f, d2); break;
    case 9: distances_impl<9>(centre, cs, ls, C, s, f, d2); break;
    default: distances_impl<0>(centre, cs, ls, C, s, f, d2); break;
  }
}

template <typename T>
METAF2N_INLINE void scatter_any(const T* centre, int64_t cs, int64_t ls, T* gcentre, int64_t gcs, int64_t gls, int C,
                                int s, int f, const T* w, T* scratch) {
  switch (2 * f + 1) {
    case 3: scatter_impl<3>(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch); break;
    case 5: scatter_impl<5>(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch); break;
    case 7: scatter_impl<7>(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch); break;
    case 9: scatter_impl<9>(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch); break;
    default: scatter_impl<0>(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch); break;
  }
}

METAF2N_MULTIVERSION void log_softmax(const float* d2, int K, float scale, float* logp, float* prob) {
  log_softmax_impl(d2, K, scale, logp, prob);
}
METAF2N_MULTIVERSION void log_softmax(const double* d2, int K, double scale, double* logp, double* prob) {
  log_softmax_impl(d2, K, scale, logp, prob);
}
METAF2N_MULTIVERSION void distances(const float* centre, int64_t cs, int64_t ls, int C, int s, int f, float* d2) {
  distances_any(centre, cs, ls, C, s, f, d2);
}
METAF2N_MULTIVERSION void distances(const double* centre, int64_t cs, int64_t ls, int C, int s, int f,
                                    double* d2) {
  distances_any(centre, cs, ls, C, s, f, d2);
}
METAF2N_MULTIVERSION void scatter(const float* centre, int64_t cs, int64_t ls, float* gcentre, int64_t gcs,
                                  int64_t gls, int C, int s, int f, const float* w, float* scratch) {
  scatter_any(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch);
}
METAF2N_MULTIVERSION void scatter(const double* centre, int64_t cs, int64_t ls, double* gcentre, int64_t gcs,
                                  int64_t gls, int C, int s, int f, const double* w, double* scratch) {
  scatter_any(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, scratch);
}

}  // namespace kernels

namespace {

using namespace common;

constexpr int64_t kChunkRows = 32;     // rows whose distances are turned into probabilities together
constexpr int64_t kBandLines = 8;      // image lines per backward band
constexpr int64_t kBandsPerWave = 64;  // bands whose buffers are alive at once


// A view of one row's tile: `centre` is the row's pixel in channel 0.
template <typename T>
struct Tile {
  const T* centre;
  int64_t cs, ls;
};

// Gives each row its tile. Not shared between threads: "window" padding copies into its own buffer.
template <typename T>
class TileSource {
 public:
  TileSource(const at::Tensor& padded, const GraphParams& p)
      : data_(padded.data_ptr<T>()),
        C_(padded.size(1)),
        Hp_(padded.size(2)),
        Wp_(padded.size(3)),
        pad_(p.pad()),
        s_(p.s()),
        R_(p.s() + p.f()),
        window_(p.padding == Padding::Window) {
    if (window_) buffer_.assign(C_ * side() * side() + kernels::kSlack, T(0));  // the border stays zero
  }

  Tile<T> tile(const Pixel& q) {
    const T* image_centre = data_ + q.b * C_ * Hp_ * Wp_ + (q.y + pad_) * Wp_ + (q.x + pad_);
    if (!window_) return Tile<T>{image_centre, Hp_ * Wp_, Wp_};
    const int64_t n = 2 * s_ + 1;
    for (int64_t c = 0; c < C_; ++c) {
      for (int64_t dy = -s_; dy <= s_; ++dy) {
        const T* src = image_centre + c * Hp_ * Wp_ + dy * Wp_ - s_;
        std::copy(src, src + n, buffer_.data() + (c * side() + R_ + dy) * side() + R_ - s_);
      }
    }
    return Tile<T>{buffer_.data() + R_ * side() + R_, side() * side(), side()};
  }

 private:
  int64_t side() const { return 2 * R_ + 1; }

  const T* data_;
  int64_t C_, Hp_, Wp_, pad_, s_, R_;
  bool window_;
  std::vector<T> buffer_;
};

// Unnormalised squared distances d2 (count, K) of the rows ids[0 .. count) of a padded image.
template <typename T>
void row_distances(TileSource<T>& source, const int64_t* pos, const int64_t* ids, int64_t count,
                   const GraphParams& p, int64_t C, T* d2) {
  for (int64_t r = 0; r < count; ++r) {
    const Tile<T> t = source.tile(pixel_at(pos, ids[r]));
    kernels::distances(t.centre, t.cs, t.ls, static_cast<int>(C), static_cast<int>(p.s()), static_cast<int>(p.f()),
                       d2 + r * p.K());
  }
}


// Calls fn(ids, count) for consecutive chunks of kChunkRows rows, in parallel. The chunking does not depend on
// the number of threads.
template <typename Fn>
void for_each_chunk(const int64_t* ids, int64_t N, Fn fn) {
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * kChunkRows;
      fn(k, ids + first, std::min(kChunkRows, N - first));
    }
  });
}

// The padded-image gradient of one band: lines [ylo, ylo + lines) of image b in padded coordinates.
template <typename T>
struct Band {
  int64_t b, ylo, lines;
  std::vector<T> data;
};

// Gives each row a gradient tile inside its band. "window" padding scatters into a zero-bordered scratch tile
// first and keeps only the window: candidate pixels outside it are constants.
template <typename T>
class GradSink {
 public:
  GradSink(int64_t C, int64_t Wp, const GraphParams& p)
      : C_(C), Wp_(Wp), pad_(p.pad()), s_(p.s()), R_(p.s() + p.f()), window_(p.padding == Padding::Window) {
    if (window_) scratch_.assign(C_ * side() * side() + kernels::kSlack, T(0));
  }

  struct Target {
    T* centre;
    int64_t cs, ls;
  };

  Target begin(Band<T>& band, const Pixel& q) {
    band_centre_ = band.data.data() + (q.y + pad_ - band.ylo) * Wp_ + (q.x + pad_);
    band_cs_ = band.lines * Wp_;
    if (!window_) return Target{band_centre_, band_cs_, Wp_};
    std::fill(scratch_.begin(), scratch_.end(), T(0));
    return Target{scratch_.data() + R_ * side() + R_, side() * side(), side()};
  }

  void end() {
    if (!window_) return;
    const int64_t n = 2 * s_ + 1;
    for (int64_t c = 0; c < C_; ++c) {
      for (int64_t dy = -s_; dy <= s_; ++dy) {
        const T* src = scratch_.data() + (c * side() + R_ + dy) * side() + R_ - s_;
        T* dst = band_centre_ + c * band_cs_ + dy * Wp_ - s_;
        for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
      }
    }
  }

 private:
  int64_t side() const { return 2 * R_ + 1; }

  int64_t C_, Wp_, pad_, s_, R_;
  bool window_;
  std::vector<T> scratch_;
  T* band_centre_ = nullptr;
  int64_t band_cs_ = 0;
};

// Backward driver. weights(ids, count, first, w) writes the (count, K) scatter weights w of rows ids[0 .. count),
// which are the sorted rows first .. first + count: the
// coefficient of (a - b) in the gradient of each query pixel a (and minus that of its candidate b).
// Returns the gradient of the padded image (B, C, Hp, Wp).
template <typename T, typename Weights>
at::Tensor scatter_rows(const at::Tensor& padded, const at::Tensor& positions, const GraphParams& p,
                        Weights weights) {
  const int64_t N = positions.size(0);
  const int64_t C = padded.size(1), Hp = padded.size(2), Wp = padded.size(3);
  const int64_t pad = p.pad(), K = p.K();
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::Tensor grad_padded = at::zeros_like(padded);
  T* gp = grad_padded.data_ptr<T>();

  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
    const Pixel a = pixel_at(pos, i), b = pixel_at(pos, j);
    return std::tie(a.b, a.y, a.x) < std::tie(b.b, b.y, b.x);
  });
  std::vector<int64_t> group_starts;  // groups of sorted rows sharing an image and a band of lines
  for (int64_t k = 0; k < N; ++k) {
    const Pixel q = pixel_at(pos, order[k]);
    const bool same = k > 0 && [&] {
      const Pixel prev = pixel_at(pos, order[k - 1]);
      return prev.b == q.b && prev.y / kBandLines == q.y / kBandLines;
    }();
    if (!same) group_starts.push_back(k);
  }
  group_starts.push_back(N);

  const int64_t num_groups = static_cast<int64_t>(group_starts.size()) - 1;
  std::vector<Band<T>> bands(std::min(num_groups, kBandsPerWave));  // reused by every wave: no fresh pages
  for (int64_t first = 0; first < num_groups; first += kBandsPerWave) {
    const int64_t last = std::min(num_groups, first + kBandsPerWave);
    // Bands hold very different numbers of rows: threads take them one at a time from a shared counter.
    std::atomic<int64_t> next{first};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), last - first), 1, [&](int64_t, int64_t) {
      FlushDenormals flush;
      TileSource<T> source(padded, p);
      GradSink<T> sink(C, Wp, p);
      std::vector<T> scratch(kernels::scatter_scratch_size<T>(static_cast<int>(p.s()), static_cast<int>(p.f())));
      std::vector<T> w(kChunkRows * K);
      for (int64_t g = next++; g < last; g = next++) {
        const int64_t start = group_starts[g], stop = group_starts[g + 1];
        const Pixel lo = pixel_at(pos, order[start]), hi = pixel_at(pos, order[stop - 1]);
        Band<T>& band = bands[g - first];
        band.b = lo.b;
        band.ylo = lo.y;
        band.lines = hi.y - lo.y + 1 + 2 * pad;
        band.data.assign(C * band.lines * Wp + kernels::kSlack, T(0));
        for (int64_t k0 = start; k0 < stop; k0 += kChunkRows) {
          const int64_t count = std::min(kChunkRows, stop - k0);
          weights(order.data() + k0, count, k0, w.data());
          const T* wdata = w.data();
          for (int64_t r = 0; r < count; ++r) {
            const Pixel q = pixel_at(pos, order[k0 + r]);
            const Tile<T> tile = source.tile(q);
            const auto target = sink.begin(band, q);
            kernels::scatter(tile.centre, tile.cs, tile.ls, target.centre, target.cs, target.ls,
                             static_cast<int>(C), static_cast<int>(p.s()), static_cast<int>(p.f()),
                             wdata + r * K, scratch.data());
            sink.end();
          }
        }
      }
    });
    for (int64_t g = first; g < last; ++g) {
      const Band<T>& band = bands[g - first];
      at::parallel_for(0, C * band.lines, 16, [&](int64_t begin, int64_t end) {
        for (int64_t cl = begin; cl < end; ++cl) {
          const int64_t c = cl / band.lines, line = cl % band.lines;
          const T* src = band.data.data() + cl * Wp;
          T* dst = gp + ((band.b * C + c) * Hp + band.ylo + line) * Wp;
          for (int64_t x = 0; x < Wp; ++x) dst[x] += src[x];
        }
      });
    }
  }
  return grad_padded;
}

std::vector<int64_t> identity_ids(int64_t N) {
  std::vector<int64_t> ids(N);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}


// Fills the calling thread's LossRows, whose buffers live as long as the thread: chunk-sized allocations freed
// and taken again for every chunk would keep handing pages back to the system and faulting them in again.
template <typename T>
const LossRows<T>& loss_rows(const at::Tensor& padded_sr, const at::Tensor& padded_hr, const int64_t* pos,
                             const int64_t* ids, int64_t count, const GraphParams& p) {
  const int64_t C = padded_sr.size(1), K = p.K();
  const auto scale = static_cast<T>(1.0 / (p.h * C * p.patch * p.patch));
  TileSource<T> sr_source(padded_sr, p), hr_source(padded_hr, p);
  thread_local LossRows<T> rows;
  thread_local std::vector<T> d2;
  rows.count = count;
  rows.K = K;
  for (std::vector<T>* v : {&rows.S, &rows.logS, &rows.H, &rows.logH, &d2}) v->resize(count * K);
  row_distances(sr_source, pos, ids, count, p, C, d2.data());
  for (int64_t r = 0; r < count; ++r) {
    kernels::log_softmax(d2.data() + r * K, static_cast<int>(K), scale, rows.logS.data() + r * K,
                         rows.S.data() + r * K);
  }
  row_distances(hr_source, pos, ids, count, p, C, d2.data());
  for (int64_t r = 0; r < count; ++r) {
    kernels::log_softmax(d2.data() + r * K, static_cast<int>(K), scale, rows.logH.data() + r * K,
                         rows.H.data() + r * K);
  }
  return rows;
}


}  // namespace

at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), C = image.size(1);
  at::Tensor d2 = at::empty({N, p.K()}, image.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return d2;
  const at::Tensor padded = reflect_pad(image, p.pad());
  const std::vector<int64_t> ids = identity_ids(N);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_graph_forward_cpu", [&] {
    scalar_t* out = d2.data_ptr<scalar_t>();
    for_each_chunk(ids.data(), N, [&](int64_t k, const int64_t* chunk, int64_t count) {
      TileSource<scalar_t> source(padded, p);
      row_distances(source, positions.data_ptr<int64_t>(), chunk, count, p, C, out + k * kChunkRows * p.K());
    });
  });
  return rows_from_distances(d2, p, C);
}

at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), C = image.size(1);
  if (N == 0) return at::zeros_like(image, at::MemoryFormat::Contiguous);
  const at::Tensor padded = reflect_pad(image, p.pad());
  // Softmax backward: dL/dz = S * (G - sum_j G_j S_j).
  const at::Tensor w =
      (rows * (grad_rows - (grad_rows * rows).sum(1, /*keepdim=*/true)) * scatter_factor(p, C)).contiguous();
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_graph_backward_cpu", [&] {
    const scalar_t* all = w.data_ptr<scalar_t>();
    const int64_t K = p.K();
    grad_padded = scatter_rows<scalar_t>(padded, positions, p,
                                         [&](const int64_t* ids, int64_t count, int64_t, scalar_t* out) {
      for (int64_t r = 0; r < count; ++r) std::copy(all + ids[r] * K, all + (ids[r] + 1) * K, out + r * K);
    });
  });
  return unpad_gradient(grad_padded, image, p.pad());
}

at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K();
  if (N == 0) return at::zeros({}, sr.options());
  const at::Tensor padded_sr = reflect_pad(sr, p.pad());
  const at::Tensor padded_hr = reflect_pad(hr, p.pad());
  const std::vector<int64_t> ids = identity_ids(N);
  std::vector<double> losses((N + kChunkRows - 1) / kChunkRows);
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_loss_forward_cpu", [&] {
    for_each_chunk(ids.data(), N, [&](int64_t k, const int64_t* chunk, int64_t count) {
      losses[k] = chunk_loss(loss_rows<scalar_t>(padded_sr, padded_hr, positions.data_ptr<int64_t>(), chunk, count, p), lw);
    });
  });
  // Summed in chunk order so the result does not depend on the thread count.
  return at::scalar_tensor(sum_in_order(losses) / (static_cast<double>(N) * K), sr.options());
}

at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K(), C = sr.size(1);
  if (N == 0) return at::zeros_like(sr, at::MemoryFormat::Contiguous);
  const at::Tensor padded_sr = reflect_pad(sr, p.pad());
  const at::Tensor padded_hr = reflect_pad(hr, p.pad());
  const double mean = grad.item<double>() / (static_cast<double>(N) * K);
  const double a = lw.kl * mean * scatter_factor(p, C), b = lw.l1 * mean * scatter_factor(p, C);
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_loss_backward_cpu", [&] {
    const int64_t* pos = positions.data_ptr<int64_t>();
    grad_padded = scatter_rows<scalar_t>(padded_sr, positions, p,
                                         [&](const int64_t* ids, int64_t count, int64_t, scalar_t* w) {
      loss_weights(loss_rows<scalar_t>(padded_sr, padded_hr, pos, ids, count, p), a, b, w);
    });
  });
  return unpad_gradient(grad_padded, sr, p.pad());
}

std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K(), C = sr.size(1);
  if (N == 0) return {at::zeros({}, sr.options()), at::zeros_like(sr, at::MemoryFormat::Contiguous)};
  const at::Tensor padded_sr = reflect_pad(sr, p.pad());
  const at::Tensor padded_hr = reflect_pad(hr, p.pad());
  const double mean = 1.0 / (static_cast<double>(N) * K);
  const double a = lw.kl * mean * scatter_factor(p, C), b = lw.l1 * mean * scatter_factor(p, C);
  std::vector<double> losses(N);  // indexed by the first sorted row of each chunk, so summed in a fixed order
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_loss_with_grad_cpu", [&] {
    const int64_t* pos = positions.data_ptr<int64_t>();
    grad_padded = scatter_rows<scalar_t>(padded_sr, positions, p,
                                         [&](const int64_t* ids, int64_t count, int64_t first, scalar_t* w) {
      const LossRows<scalar_t>& rows = loss_rows<scalar_t>(padded_sr, padded_hr, pos, ids, count, p);
      losses[first] = chunk_loss(rows, lw);
      loss_weights(rows, a, b, w);
    });
  });
  return {at::scalar_tensor(sum_in_order(losses) * mean, sr.options()), unpad_gradient(grad_padded, sr, p.pad())};
}

}  // namespace metaf2n::cpu
