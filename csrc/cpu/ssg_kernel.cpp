// CPU kernels: self-similarity graph rows and the fused KL + L1 loss, forward and backward.
//
// Every masked pixel ("row") reads a tile of radius R = s + f around itself: straight from the reflect-padded image
// ("image" padding) or from a copy of its (2s+1)^2 window with a zero border of f ("window" padding). The distances
// d2[k] of its K = (2s+1)^2 candidate patches are accumulated offset-row by offset-row in blocks of kLanes
// neighbouring offsets, which the compiler keeps in one SIMD register while it walks the patch.
//
// Backward passes scatter into band buffers: rows are sorted by (b, y, x) and grouped by kBandLines image lines,
// each group writes its own buffer, and buffers are added to the padded gradient in group order. The result does
// not depend on the number of threads and never needs atomics.
#include "ssg.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace metaf2n::cpu {

namespace kernels {

constexpr int kLanes = 8;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One AVX2/FMA clone and one baseline clone, picked at load time.
#define METAF2N_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define METAF2N_MULTIVERSION
#endif

// d2[(dy+s)*n + (dx+s)] = sum over c, j of (x(centre + j) - x(centre + (dy,dx) + j))^2, n = 2s + 1.
template <typename T>
inline void distances_impl(const T* centre, int64_t cs, int64_t ls, int C, int s, int f, T* d2) {
  const int n = 2 * s + 1;
  const int P = 2 * f + 1;
  const int nfull = n / kLanes * kLanes;
  std::fill(d2, d2 + n * n, T(0));
  for (int c = 0; c < C; ++c) {
    const T* plane = centre + c * cs;
    for (int dy = -s; dy <= s; ++dy) {
      T* out = d2 + (dy + s) * n;
      for (int i0 = 0; i0 < nfull; i0 += kLanes) {
        T acc[kLanes] = {};
        for (int jy = -f; jy <= f; ++jy) {
          const T* a = plane + jy * ls - f;
          const T* b = plane + (jy + dy) * ls - s - f + i0;
          for (int jx = 0; jx < P; ++jx) {
            const T av = a[jx];
            for (int l = 0; l < kLanes; ++l) {
              const T d = av - b[jx + l];
              acc[l] += d * d;
            }
          }
        }
        for (int l = 0; l < kLanes; ++l) out[i0 + l] += acc[l];
      }
      for (int i = nfull; i < n; ++i) {
        T acc = 0;
        for (int jy = -f; jy <= f; ++jy) {
          const T* a = plane + jy * ls - f;
          const T* b = plane + (jy + dy) * ls - s - f + i;
          for (int jx = 0; jx < P; ++jx) {
            const T d = a[jx] - b[jx];
            acc += d * d;
          }
        }
        out[i] += acc;
      }
    }
  }
}

// Adds w[k] * (a - b) to the gradient of every query pixel a and subtracts it from its candidate pixel b.
// gacc is scratch of P * P * kLanes values.
template <typename T>
inline void scatter_impl(const T* centre, int64_t cs, int64_t ls, T* gcentre, int64_t gcs, int64_t gls, int C,
                         int s, int f, const T* w, T* gacc) {
  const int n = 2 * s + 1;
  const int P = 2 * f + 1;
  const int nfull = n / kLanes * kLanes;
  for (int c = 0; c < C; ++c) {
    const T* plane = centre + c * cs;
    T* gplane = gcentre + c * gcs;
    std::fill(gacc, gacc + P * P * kLanes, T(0));
    for (int dy = -s; dy <= s; ++dy) {
      const T* wrow = w + (dy + s) * n;
      for (int i0 = 0; i0 < nfull; i0 += kLanes) {
        T wv[kLanes];
        for (int l = 0; l < kLanes; ++l) wv[l] = wrow[i0 + l];
        for (int jy = -f; jy <= f; ++jy) {
          const T* a = plane + jy * ls - f;
          const T* b = plane + (jy + dy) * ls - s - f + i0;
          T* gb = gplane + (jy + dy) * gls - s - f + i0;
          T* ga = gacc + (jy + f) * P * kLanes;
          for (int jx = 0; jx < P; ++jx) {
            const T av = a[jx];
            for (int l = 0; l < kLanes; ++l) {
              const T t = wv[l] * (av - b[jx + l]);
              ga[jx * kLanes + l] += t;
              gb[jx + l] -= t;
            }
          }
        }
      }
      for (int i = nfull; i < n; ++i) {
        const T wi = wrow[i];
        for (int jy = -f; jy <= f; ++jy) {
          const T* a = plane + jy * ls - f;
          const T* b = plane + (jy + dy) * ls - s - f + i;
          T* gb = gplane + (jy + dy) * gls - s - f + i;
          T* ga = gacc + (jy + f) * P * kLanes;
          for (int jx = 0; jx < P; ++jx) {
            const T t = wi * (a[jx] - b[jx]);
            ga[jx * kLanes] += t;
            gb[jx] -= t;
          }
        }
      }
    }
    for (int jy = -f; jy <= f; ++jy) {
      for (int jx = -f; jx <= f; ++jx) {
        const T* lanes = gacc + ((jy + f) * P + (jx + f)) * kLanes;
        T sum = 0;
        for (int l = 0; l < kLanes; ++l) sum += lanes[l];
        gplane[jy * gls + jx] += sum;
      }
    }
  }
}

METAF2N_MULTIVERSION void distances(const float* centre, int64_t cs, int64_t ls, int C, int s, int f, float* d2) {
  distances_impl(centre, cs, ls, C, s, f, d2);
}
METAF2N_MULTIVERSION void distances(const double* centre, int64_t cs, int64_t ls, int C, int s, int f,
                                    double* d2) {
  distances_impl(centre, cs, ls, C, s, f, d2);
}
METAF2N_MULTIVERSION void scatter(const float* centre, int64_t cs, int64_t ls, float* gcentre, int64_t gcs,
                                  int64_t gls, int C, int s, int f, const float* w, float* gacc) {
  scatter_impl(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, gacc);
}
METAF2N_MULTIVERSION void scatter(const double* centre, int64_t cs, int64_t ls, double* gcentre, int64_t gcs,
                                  int64_t gls, int C, int s, int f, const double* w, double* gacc) {
  scatter_impl(centre, cs, ls, gcentre, gcs, gls, C, s, f, w, gacc);
}

}  // namespace kernels

namespace {

constexpr int64_t kBandLines = 8;     // image lines per backward band
constexpr int64_t kBandsPerWave = 16;  // bands whose buffers are alive at once

struct Pixel {
  int64_t b, y, x;
};

Pixel pixel_at(const int64_t* pos, int64_t i) { return Pixel{pos[3 * i], pos[3 * i + 1], pos[3 * i + 2]}; }

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
    if (window_) buffer_.assign(C_ * side() * side(), T(0));  // the border of width f stays zero
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
    if (window_) scratch_.assign(C_ * side() * side(), T(0));
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

at::Tensor reflect_pad(const at::Tensor& image, int64_t pad) {
  return at::reflection_pad2d(image.contiguous(), {pad, pad, pad, pad}).contiguous();
}

// Calls make_worker() once per thread chunk and worker(i, pixel) for every row i.
template <typename MakeWorker>
void for_each_row(const at::Tensor& positions, MakeWorker make_worker) {
  const int64_t N = positions.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    auto worker = make_worker();
    for (int64_t i = begin; i < end; ++i) worker(i, pixel_at(pos, i));
  });
}

// Backward driver. make_worker() returns worker(i, pixel, tile, w) that fills the K scatter weights w of row i
// from its tile of the differentiated image. Returns the gradient of the padded image (B, C, Hp, Wp).
template <typename T, typename MakeWorker>
at::Tensor scatter_rows(const at::Tensor& padded, const at::Tensor& positions, const GraphParams& p,
                        MakeWorker make_worker) {
  const int64_t N = positions.size(0);
  const int64_t C = padded.size(1), Hp = padded.size(2), Wp = padded.size(3);
  const int64_t pad = p.pad();
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::Tensor grad_padded = at::zeros_like(padded);
  T* gp = grad_padded.data_ptr<T>();

  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
    const Pixel a = pixel_at(pos, i), b = pixel_at(pos, j);
    return std::tie(a.b, a.y, a.x) < std::tie(b.b, b.y, b.x);
  });
  struct Group {
    int64_t start, end;
  };
  std::vector<Group> groups;
  for (int64_t k = 0; k < N; ++k) {
    const Pixel q = pixel_at(pos, order[k]);
    const bool same = k > 0 && [&] {
      const Pixel prev = pixel_at(pos, order[k - 1]);
      return prev.b == q.b && prev.y / kBandLines == q.y / kBandLines;
    }();
    if (same) {
      groups.back().end = k + 1;
    } else {
      groups.push_back(Group{k, k + 1});
    }
  }

  const int64_t num_groups = static_cast<int64_t>(groups.size());
  for (int64_t first = 0; first < num_groups; first += kBandsPerWave) {
    const int64_t last = std::min(num_groups, first + kBandsPerWave);
    std::vector<Band<T>> bands(last - first);
    at::parallel_for(first, last, 1, [&](int64_t gbegin, int64_t gend) {
      TileSource<T> source(padded, p);
      GradSink<T> sink(C, Wp, p);
      std::vector<T> w(p.K());
      std::vector<T> gacc(p.patch * p.patch * kernels::kLanes);
      auto worker = make_worker();
      for (int64_t g = gbegin; g < gend; ++g) {
        const Group& group = groups[g];
        const Pixel lo = pixel_at(pos, order[group.start]), hi = pixel_at(pos, order[group.end - 1]);
        Band<T>& band = bands[g - first];
        band.b = lo.b;
        band.ylo = lo.y;
        band.lines = hi.y - lo.y + 1 + 2 * pad;
        band.data.assign(C * band.lines * Wp, T(0));
        for (int64_t k = group.start; k < group.end; ++k) {
          const int64_t i = order[k];
          const Pixel q = pixel_at(pos, i);
          const Tile<T> tile = source.tile(q);
          worker(i, q, tile, w.data());
          const auto target = sink.begin(band, q);
          kernels::scatter(tile.centre, tile.cs, tile.ls, target.centre, target.cs, target.ls,
                           static_cast<int>(C), static_cast<int>(p.s()), static_cast<int>(p.f()), w.data(),
                           gacc.data());
          sink.end();
        }
      }
    });
    for (const Band<T>& band : bands) {
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

// Row softmax of z = -d2 / (h C P^2); the centre term is exp(0) = 1, so the sum is >= 1.
template <typename T>
void softmax_rows(const T* d2, int64_t K, double scale, T* out) {
  T sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    out[k] = std::exp(-d2[k] * static_cast<T>(scale));
    sum += out[k];
  }
  const T inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) out[k] *= inv;
}

double softmax_scale(const GraphParams& p, int64_t C) { return 1.0 / (p.h * C * p.patch * p.patch); }

// Factor turning dL/dz_k into the scatter weight of (a - b): z = -d2 / h and d d2 / d a = 2 (a - b) / (C P^2).
double scatter_factor(const GraphParams& p, int64_t C) { return -2.0 / (p.h * C * p.patch * p.patch); }

}  // namespace

at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), K = p.K(), C = image.size(1);
  at::Tensor rows = at::empty({N, K}, image.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return rows;
  const at::Tensor padded = reflect_pad(image, p.pad());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_graph_forward_cpu", [&] {
    scalar_t* out = rows.data_ptr<scalar_t>();
    const double scale = softmax_scale(p, C);
    for_each_row(positions, [&] {
      return [&, source = TileSource<scalar_t>(padded, p), d2 = std::vector<scalar_t>(K)](
                 int64_t i, const Pixel& q) mutable {
        const Tile<scalar_t> t = source.tile(q);
        kernels::distances(t.centre, t.cs, t.ls, static_cast<int>(C), static_cast<int>(p.s()),
                           static_cast<int>(p.f()), d2.data());
        softmax_rows(d2.data(), K, scale, out + i * K);
      };
    });
  });
  return rows;
}

at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), K = p.K(), C = image.size(1);
  if (N == 0) return at::zeros_like(image, at::MemoryFormat::Contiguous);
  const at::Tensor padded = reflect_pad(image, p.pad());
  const at::Tensor g = grad_rows.contiguous();
  const at::Tensor S = rows.contiguous();
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_graph_backward_cpu", [&] {
    const scalar_t* gdata = g.data_ptr<scalar_t>();
    const scalar_t* sdata = S.data_ptr<scalar_t>();
    const auto factor = static_cast<scalar_t>(scatter_factor(p, C));
    grad_padded = scatter_rows<scalar_t>(padded, positions, p, [&] {
      return [&](int64_t i, const Pixel&, const Tile<scalar_t>&, scalar_t* w) {
        const scalar_t* gi = gdata + i * K;
        const scalar_t* si = sdata + i * K;
        scalar_t dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += gi[k] * si[k];
        for (int64_t k = 0; k < K; ++k) w[k] = factor * si[k] * (gi[k] - dot);
      };
    });
  });
  const int64_t pad = p.pad();
  return at::reflection_pad2d_backward(grad_padded, image.contiguous(), {pad, pad, pad, pad});
}

namespace {

// Per-thread state of the loss: both images' tiles, distances and rows.
template <typename T>
struct LossRowState {
  LossRowState(const at::Tensor& padded_hr, const GraphParams& p)
      : hr_source(padded_hr, p), ds(p.K()), dh(p.K()), S(p.K()), H(p.K()) {}

  // Fills S (SR row) and H (HR row) for pixel q, given the SR tile.
  void rows(const Tile<T>& sr_tile, const Pixel& q, const GraphParams& p, int64_t C, double scale) {
    const Tile<T> hr_tile = hr_source.tile(q);
    const int Ci = static_cast<int>(C), s = static_cast<int>(p.s()), f = static_cast<int>(p.f());
    kernels::distances(sr_tile.centre, sr_tile.cs, sr_tile.ls, Ci, s, f, ds.data());
    kernels::distances(hr_tile.centre, hr_tile.cs, hr_tile.ls, Ci, s, f, dh.data());
    softmax_rows(ds.data(), p.K(), scale, S.data());
    softmax_rows(dh.data(), p.K(), scale, H.data());
  }

  TileSource<T> hr_source;
  std::vector<T> ds, dh, S, H;
};

}  // namespace

at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K(), C = sr.size(1);
  if (N == 0) return at::zeros({}, sr.options());
  const at::Tensor padded_sr = reflect_pad(sr, p.pad());
  const at::Tensor padded_hr = reflect_pad(hr, p.pad());
  std::vector<double> row_loss(N);
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_loss_forward_cpu", [&] {
    const double scale = softmax_scale(p, C);
    const auto floor = static_cast<scalar_t>(kProbFloor);
    for_each_row(positions, [&] {
      return [&, source = TileSource<scalar_t>(padded_sr, p), state = LossRowState<scalar_t>(padded_hr, p)](
                 int64_t i, const Pixel& q) mutable {
        state.rows(source.tile(q), q, p, C, scale);
        double kl = 0, l1 = 0;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t t = std::max(state.H[k], floor);
          const scalar_t x = std::max(state.S[k], floor);
          kl += static_cast<double>(t * (std::log(t) - std::log(x)));
          l1 += static_cast<double>(std::abs(state.S[k] - state.H[k]));
        }
        row_loss[i] = lw.kl * kl + lw.l1 * l1;
      };
    });
  });
  // Summed in row order so the result does not depend on the thread count.
  double total = 0;
  for (double v : row_loss) total += v;
  return at::scalar_tensor(total / (static_cast<double>(N) * K), sr.options());
}

at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K(), C = sr.size(1);
  if (N == 0) return at::zeros_like(sr, at::MemoryFormat::Contiguous);
  const at::Tensor padded_sr = reflect_pad(sr, p.pad());
  const at::Tensor padded_hr = reflect_pad(hr, p.pad());
  const double g = grad.item<double>();
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_loss_backward_cpu", [&] {
    const double scale = softmax_scale(p, C);
    const auto floor = static_cast<scalar_t>(kProbFloor);
    const double mean = g / (static_cast<double>(N) * K);
    const auto a = static_cast<scalar_t>(lw.kl * mean);
    const auto b = static_cast<scalar_t>(lw.l1 * mean);
    const auto factor = static_cast<scalar_t>(scatter_factor(p, C));
    grad_padded = scatter_rows<scalar_t>(padded_sr, positions, p, [&] {
      return [&, state = LossRowState<scalar_t>(padded_hr, p)](
                 int64_t, const Pixel& q, const Tile<scalar_t>& tile, scalar_t* w) mutable {
        state.rows(tile, q, p, C, scale);
        const std::vector<scalar_t>& S = state.S;
        const std::vector<scalar_t>& H = state.H;
        scalar_t sum_t_in_u = 0, sum_s_sgn = 0;
        for (int64_t k = 0; k < K; ++k) {
          if (S[k] >= floor) sum_t_in_u += std::max(H[k], floor);
          sum_s_sgn += S[k] * static_cast<scalar_t>((S[k] > H[k]) - (S[k] < H[k]));
        }
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t t = std::max(H[k], floor);
          const scalar_t sgn = static_cast<scalar_t>((S[k] > H[k]) - (S[k] < H[k]));
          const scalar_t kl = S[k] * sum_t_in_u - (S[k] >= floor ? t : scalar_t(0));
          const scalar_t l1 = S[k] * (sgn - sum_s_sgn);
          w[k] = factor * (a * kl + b * l1);
        }
      };
    });
  });
  const int64_t pad = p.pad();
  return at::reflection_pad2d_backward(grad_padded, sr.contiguous(), {pad, pad, pad, pad});
}

}  // namespace metaf2n::cpu
