// Dense CPU path: the distances of all masked pixels by box filters instead of one patch loop per row.
//
// For an offset o, the squared-difference image D_o(q) = sum_c (x_c(q) - x_c(q + o))^2 is shared by every patch
// that contains q, so a row's distance d2(p, o) is a box sum of D_o around p. Rows are grouped in bands of kLines
// image lines. Per band and offset, D_o is computed on the lines and columns the band's patches touch, summed over
// the patch height on each line that holds rows, then over the patch width at the rows themselves. Memory is
// O(band lines x width x channels) plus the band's (rows, K) distances, never O(K x H x W).
//
// "window" padding reads zero for candidate pixels outside p's (2s+1)^2 window, and for query pixels too when
// patch > search. For a fixed o the patch then splits into rectangles that do not depend on p: A(o), where both
// pixels are inside, holds (x(p+j) - x(p+o+j))^2; the query-only and candidate-only parts hold x^2, read from a
// summed-area table of sum_c x_c^2 in double.
//
// The backward pass is the transpose: per band and offset, each row's weight is spread over its box (the transpose
// of a box sum is a box sum) and multiplied by the pixel differences. Each band writes its own gradient buffer and
// the buffers are added in band order, so the result has the same bits for any number of threads.
#include "cpu/cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>

namespace metaf2n::cpu::dense {

namespace kernels {

using cpu::kernels::lanes;
using cpu::kernels::load;
using cpu::kernels::store;
using cpu::kernels::Vec;

// The running box sum moves down one line: d = sum_c (a_c - b_c)^2 enters, the line stored in `ring` leaves.
template <typename T>
METAF2N_INLINE void slide_squared_differences_impl(const T* a, const T* b, int64_t cs, int64_t C, int64_t n,
                                                         T* ring, T* sums) {
  int64_t x = 0;
  for (; x + lanes<T> <= n; x += lanes<T>) {
    Vec<T> d = {};
    for (int64_t c = 0; c < C; ++c) {
      const Vec<T> e = load(a + c * cs + x) - load(b + c * cs + x);
      d += e * e;
    }
    store(sums + x, load(sums + x) - load(ring + x) + d);
    store(ring + x, d);
  }
  for (; x < n; ++x) {
    T d = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T e = a[c * cs + x] - b[c * cs + x];
      d += e * e;
    }
    sums[x] = sums[x] - ring[x] + d;
    ring[x] = d;
  }
}

// out[x] = sum_{t < wide} in[x + t] for x < n, added in t order (as the per-row loops do).
template <typename T>
METAF2N_INLINE void box_line_impl(const T* in, int64_t n, int64_t wide, T* out) {
  int64_t x = 0;
  for (; x + lanes<T> <= n; x += lanes<T>) {
    Vec<T> acc = load(in + x);
    for (int64_t t = 1; t < wide; ++t) acc += load(in + x + t);
    store(out + x, acc);
  }
  for (; x < n; ++x) {
    T acc = in[x];
    for (int64_t t = 1; t < wide; ++t) acc += in[x + t];
    out[x] = acc;
  }
}

// sums[x] = sum_{t < count} lines[t * n + x], added in t order.
template <typename T>
METAF2N_INLINE void sum_lines_impl(const T* __restrict lines, int64_t count, int64_t n, T* __restrict sums) {
  for (int64_t x = 0; x < n; ++x) sums[x] = lines[x];
  for (int64_t t = 1; t < count; ++t) {
    for (int64_t x = 0; x < n; ++x) sums[x] += lines[t * n + x];
  }
}

// g[x] += sign * a[x].
template <typename T>
METAF2N_INLINE void accumulate_impl(const T* __restrict a, T sign, int64_t n, T* __restrict g) {
  for (int64_t x = 0; x < n; ++x) g[x] += sign * a[x];
}

// g[x] += sign * m[x] * a[x].
template <typename T>
METAF2N_INLINE void add_product_impl(const T* __restrict m, const T* __restrict a, T sign, int64_t n,
                                           T* __restrict g) {
  for (int64_t x = 0; x < n; ++x) g[x] += sign * (m[x] * a[x]);
}

// The gradient of one line for one offset, every channel: query pixels a (gradient ga) and their candidates
// b = a + shift (gradient gb = ga + gshift; the gradient buffer has lines of its own length).
// kPair:  ga += m (a - b), gb -= m (a - b)      ("image": the patch term (a - b)^2)
// kCross: ga -= m b,       gb -= m a            ("window", rectangle A: (a - b)^2 - a^2 - b^2 = -2ab)
// kCrossAndCandidate: kCross plus gb += m b     ("window" when A is also the candidate's rectangle)
// ga and gb overlap when the shift is short: every vector is stored before the next one is read, so each
// element receives all its terms whatever the overlap, in a fixed order.
enum class Update { kPair, kCross, kCrossAndCandidate };

template <Update U, typename T>
METAF2N_INLINE void pair_update_impl(const T* m, const T* a, int64_t shift, int64_t cs, int64_t C, int64_t n,
                                           T* ga, int64_t gshift, int64_t gcs) {
  for (int64_t c = 0; c < C; ++c) {
    const T* ac = a + c * cs;
    const T* bc = ac + shift;
    T* gac = ga + c * gcs;
    T* gbc = gac + gshift;
    int64_t x = 0;
    for (; x + lanes<T> <= n; x += lanes<T>) {
      const Vec<T> mv = load(m + x), av = load(ac + x), bv = load(bc + x);
      if constexpr (U == Update::kPair) {
        const Vec<T> g = mv * (av - bv);
        store(gac + x, load(gac + x) + g);
        store(gbc + x, load(gbc + x) - g);
      } else if constexpr (U == Update::kCross) {
        store(gac + x, load(gac + x) - mv * bv);
        store(gbc + x, load(gbc + x) - mv * av);
      } else {
        store(gac + x, load(gac + x) - mv * bv);
        store(gbc + x, load(gbc + x) + mv * (bv - av));
      }
    }
    for (; x < n; ++x) {
      if constexpr (U == Update::kPair) {
        const T g = m[x] * (ac[x] - bc[x]);
        gac[x] += g;
        gbc[x] -= g;
      } else if constexpr (U == Update::kCross) {
        gac[x] -= m[x] * bc[x];
        gbc[x] -= m[x] * ac[x];
      } else {
        gac[x] -= m[x] * bc[x];
        gbc[x] += m[x] * (bc[x] - ac[x]);
      }
    }
  }
}

#define METAF2N_DENSE_KERNELS(T)                                                                                    \
  METAF2N_MULTIVERSION void slide_squared_differences(const T* a, const T* b, int64_t cs, int64_t C,          \
                                                            int64_t n, T* ring, T* sums) {                          \
    slide_squared_differences_impl(a, b, cs, C, n, ring, sums);                                                     \
  }                                                                                                                 \
  METAF2N_MULTIVERSION void box_line(const T* in, int64_t n, int64_t wide, T* out) {                        \
    box_line_impl(in, n, wide, out);                                                                                \
  }                                                                                                                 \
  METAF2N_MULTIVERSION void sum_lines(const T* lines, int64_t count, int64_t n, T* sums) {                   \
    sum_lines_impl(lines, count, n, sums);                                                                          \
  }                                                                                                                 \
  METAF2N_MULTIVERSION void accumulate(const T* a, T sign, int64_t n, T* g) {                                 \
    accumulate_impl(a, sign, n, g);                                                                                 \
  }                                                                                                                 \
  METAF2N_MULTIVERSION void add_product(const T* m, const T* a, T sign, int64_t n, T* g) {                    \
    add_product_impl(m, a, sign, n, g);                                                                             \
  }                                                                                                                 \
  METAF2N_MULTIVERSION void pair_update(Update u, const T* m, const T* a, int64_t shift, int64_t cs,         \
                                              int64_t C, int64_t n, T* ga, int64_t gshift, int64_t gcs) {           \
    switch (u) {                                                                                                    \
      case Update::kPair: pair_update_impl<Update::kPair>(m, a, shift, cs, C, n, ga, gshift, gcs); break;           \
      case Update::kCross: pair_update_impl<Update::kCross>(m, a, shift, cs, C, n, ga, gshift, gcs); break;         \
      default: pair_update_impl<Update::kCrossAndCandidate>(m, a, shift, cs, C, n, ga, gshift, gcs); break;         \
    }                                                                                                               \
  }
METAF2N_DENSE_KERNELS(float)
METAF2N_DENSE_KERNELS(double)
#undef METAF2N_DENSE_KERNELS

}  // namespace kernels

namespace {

using namespace common;

constexpr int64_t kLines = 32;         // query lines per band
constexpr int64_t kColumns = 256;      // query columns per band: wide images are cut into tiles that stay in cache
constexpr int64_t kBandsPerWave = 32;  // bands whose gradient buffers are alive at once
constexpr int64_t kMaxRows = 512;      // a band ends early, at a line boundary, once it holds this many rows (its buffers: 7 x rows x K values)
// Running box sums are recomputed from their lines this often: each step's rounding stays in a running sum, and
// over a whole band it reached 1.4e-5 of a float32 row (2e-7 for the direct path); every 8 lines keeps it below
// 5e-7 (bench/bench_ssl.py --sweep prints both; tests/test_dense.py checks 1e-5).
constexpr int64_t kResumLines = 8;

// An inclusive range of patch displacements along one axis.
struct Span {
  int64_t lo, hi;
  int64_t size() const { return hi - lo + 1; }
  bool operator==(const Span& other) const { return lo == other.lo && hi == other.hi; }
};

// Displacements j where both the query pixel p + j and the candidate p + o + j are read from the image.
Span both_span(int64_t o, const GraphParams& p) {
  const int64_t s = p.s(), f = p.f();
  if (p.padding == Padding::Image) return {-f, f};
  const int64_t m = std::min(s, f);
  return {std::max(-m, -s - o), std::min(m, s - o)};
}

// "window": displacements where the query pixel lies in the window, and where the candidate does.
Span query_span(const GraphParams& p) { return {-std::min(p.s(), p.f()), std::min(p.s(), p.f())}; }
Span candidate_span(int64_t o, const GraphParams& p) {
  return {std::max(-p.f(), -p.s() - o), std::min(p.f(), p.s() - o)};
}

// Rows of one image whose centres lie in lines [y0, y1) and columns [xlo, xhi]: the sorted rows
// order[first, first + count), line by line.
struct DenseBand {
  int64_t b, y0, y1, xlo, xhi, first, count;
  std::vector<int64_t> line_first;  // rows of line y are [line_first[y - y0], line_first[y - y0 + 1]), band-relative
  std::vector<int64_t> x;           // each row's x - xlo
};

std::vector<DenseBand> make_bands(const int64_t* pos, const std::vector<int64_t>& order) {
  std::vector<DenseBand> bands;
  const int64_t N = static_cast<int64_t>(order.size());
  for (int64_t k = 0; k < N;) {
    const Pixel q = pixel_at(pos, order[k]);
    DenseBand band{q.b, q.y, q.y + 1, q.x, q.x, k, 0, {}, {}};
    int64_t end = k;
    while (end < N) {
      const Pixel r = pixel_at(pos, order[end]);
      if (r.b != q.b || r.y / kLines != q.y / kLines || r.x / kColumns != q.x / kColumns) break;
      if (end - k >= kMaxRows && r.y != band.y1 - 1) break;
      band.y1 = r.y + 1;
      band.xlo = std::min(band.xlo, r.x);
      band.xhi = std::max(band.xhi, r.x);
      ++end;
    }
    band.count = end - k;
    band.line_first.assign(band.y1 - band.y0 + 1, band.count);
    for (int64_t r = band.count - 1; r >= 0; --r) band.line_first[pixel_at(pos, order[k + r]).y - band.y0] = r;
    for (int64_t line = band.y1 - band.y0 - 1; line >= 0; --line) {
      band.line_first[line] = std::min(band.line_first[line], band.line_first[line + 1]);
    }
    for (int64_t r = 0; r < band.count; ++r) band.x.push_back(pixel_at(pos, order[k + r]).x - band.xlo);
    bands.push_back(std::move(band));
    k = end;
  }
  return bands;
}

std::vector<int64_t> sorted_rows(const int64_t* pos, int64_t N) {
  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  // Band by band (image, band of lines, tile of columns), then line by line.
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
    const Pixel a = pixel_at(pos, i), b = pixel_at(pos, j);
    return std::make_tuple(a.b, a.y / kLines, a.x / kColumns, a.y, a.x) <
           std::make_tuple(b.b, b.y / kLines, b.x / kColumns, b.y, b.x);
  });
  return order;
}

// Summed-area table of sum_c x_c^2 over each padded image: sat[b][y][x] = sum over [0, y) x [0, x), in double.
class SquareSums {
 public:
  template <typename T>
  SquareSums(const T* data, int64_t B, int64_t C, int64_t Hp, int64_t Wp)
      : Hp_(Hp), Wp_(Wp), table_(B * (Hp + 1) * (Wp + 1), 0.0) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double* t = table_.data() + b * (Hp + 1) * (Wp + 1);
        for (int64_t y = 0; y < Hp; ++y) {
          double line = 0;
          for (int64_t x = 0; x < Wp; ++x) {
            double v = 0;
            for (int64_t c = 0; c < C; ++c) {
              const double value = data[((b * C + c) * Hp + y) * Wp + x];
              v += value * value;
            }
            line += v;
            t[(y + 1) * (Wp + 1) + x + 1] = t[y * (Wp + 1) + x + 1] + line;
          }
        }
      }
    });
  }

  // sum over padded pixels (cy + j_y, cx + j_x), j in ys x xs.
  double rect(int64_t b, int64_t cy, int64_t cx, Span ys, Span xs) const {
    const double* t = table_.data() + b * (Hp_ + 1) * (Wp_ + 1);
    const int64_t y0 = cy + ys.lo, y1 = cy + ys.hi + 1, x0 = cx + xs.lo, x1 = cx + xs.hi + 1;
    return t[y1 * (Wp_ + 1) + x1] - t[y0 * (Wp_ + 1) + x1] - t[y1 * (Wp_ + 1) + x0] + t[y0 * (Wp_ + 1) + x0];
  }

 private:
  int64_t Hp_, Wp_;
  std::vector<double> table_;
};

// The padded images of one call and what the band loops need to know about them.
template <typename T>
struct Padded {
  const T* data;
  int64_t C, Hp, Wp, pad;
  const T* at(int64_t b, int64_t y, int64_t x) const { return data + (b * C * Hp + y + pad) * Wp + x + pad; }
  int64_t cs() const { return Hp * Wp; }
};

// Per-thread buffers, grown as needed and kept for the thread's bands.
template <typename T>
struct Workspace {
  std::vector<T> ring, sums, line, spread, by_offset;
};

// Whether a line's rows are summed over the patch width by one vector pass over the line (cost ~ width) rather than
// one loop per row (cost ~ rows, but scalar): the vector pass wins from about one row per 8 pixels.
bool box_whole_line(int64_t rows, int64_t width) { return 8 * rows >= width; }

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// d2 (count, K) of the band's rows: unnormalised sums of squared differences over the patch. Per offset, the box
// sum over the patch height runs down the band's lines (recomputed every kResumLines lines); the sum over the patch
// width is taken at the rows.
template <typename T>
void band_distances(const Padded<T>& img, const SquareSums* squares, const DenseBand& band, const int64_t* pos,
                    const int64_t* order, const GraphParams& p, Workspace<T>& ws, T* d2) {
  const int64_t s = p.s(), n = 2 * s + 1, K = p.K(), count = band.count;
  const int64_t band_lines = band.y1 - band.y0;
  const bool window = p.padding == Padding::Window;
  T* by_offset = sized(ws.by_offset, K * count);  // (K, count): one offset's distances are written together
  const Span q = query_span(p);
  std::vector<double> query_squares(window ? count : 0);  // "window": sum of x^2 where the query is in the window
  for (int64_t r = 0; r < static_cast<int64_t>(query_squares.size()); ++r) {
    const Pixel c = pixel_at(pos, order[band.first + r]);
    query_squares[r] = squares->rect(c.b, c.y + img.pad, c.x + img.pad, q, q);
  }
  for (int64_t oy = -s; oy <= s; ++oy) {
    const Span ay = both_span(oy, p);
    for (int64_t ox = -s; ox <= s; ++ox) {
      T* out = by_offset + ((oy + s) * n + (ox + s)) * count;
      if (oy == 0 && ox == 0) {
        std::fill(out, out + count, T(0));
        continue;
      }
      const Span ax = both_span(ox, p);
      const int64_t height = ay.size(), wide = ax.size();
      const int64_t qy0 = band.y0 + ay.lo, qx0 = band.xlo + ax.lo, width = band.xhi - band.xlo + wide;
      T* ring = sized(ws.ring, height * width);
      T* sums = sized(ws.sums, width);
      T* boxed = sized(ws.line, width);
      std::fill(ring, ring + height * width, T(0));
      std::fill(sums, sums + width, T(0));
      const int64_t shift = oy * img.Wp + ox;
      for (int64_t i = 0; i < band_lines + height - 1; ++i) {
        const T* a = img.at(band.b, qy0 + i, qx0);
        kernels::slide_squared_differences(a, a + shift, img.cs(), img.C, width, ring + (i % height) * width, sums);
        if ((i + 1) % kResumLines == 0) kernels::sum_lines(ring, height, width, sums);
        const int64_t line = i - (height - 1);  // sums now covers the patch height of query line y0 + line
        if (line < 0) continue;
        const int64_t r0 = band.line_first[line], r1 = band.line_first[line + 1];
        if (box_whole_line(r1 - r0, width)) {  // the same sums, in the same order, for the whole line at once
          kernels::box_line(sums, width - wide + 1, wide, boxed);
          for (int64_t r = r0; r < r1; ++r) out[r] = boxed[band.x[r]];
          continue;
        }
        for (int64_t r = r0; r < r1; ++r) {
          const T* v = sums + band.x[r];
          T sum = v[0];
          for (int64_t t = 1; t < wide; ++t) sum += v[t];
          out[r] = sum;
        }
      }
      if (!window) continue;
      const Span cy = candidate_span(oy, p), cx = candidate_span(ox, p);
      for (int64_t r = 0; r < count; ++r) {
        const Pixel c = pixel_at(pos, order[band.first + r]);
        const int64_t py = c.y + img.pad, px = c.x + img.pad;
        const double only = query_squares[r] - squares->rect(c.b, py, px, ay, ax) +
                            squares->rect(c.b, py + oy, px + ox, cy, cx) -
                            squares->rect(c.b, py + oy, px + ox, ay, ax);
        out[r] = static_cast<T>(static_cast<double>(out[r]) + only);
      }
    }
  }
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < count; r0 += kTile) {
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      for (int64_t r = r0; r < std::min(count, r0 + kTile); ++r) {
        for (int64_t k = k0; k < std::min(K, k0 + kTile); ++k) d2[r * K + k] = by_offset[k * count + r];
      }
    }
  }
}

// The transpose of "box sum over ys x xs, read at the rows": the rows' weights w[r * stride] spread over their boxes,
// out(q) = sum_{j in ys x xs} w(q - j). Calls fn(qy, qx0, width, line) for each image line qy the boxes reach, with
// the line's values from column qx0 on, running down the lines like band_distances.
template <typename T, typename Fn>
void for_each_spread_line(const DenseBand& band, const T* w, int64_t stride, Span ys, Span xs, Workspace<T>& ws,
                          Fn fn) {
  const int64_t band_lines = band.y1 - band.y0, height = ys.size(), wide = xs.size();
  const int64_t width = band.xhi - band.xlo + wide;
  T* spread = sized(ws.spread, band_lines * width);  // each line's rows spread over the patch width
  T* sums = sized(ws.sums, width);
  std::fill(spread, spread + band_lines * width, T(0));
  std::fill(sums, sums + width, T(0));
  T* points = sized(ws.line, width + wide - 1);
  for (int64_t line = 0; line < band_lines; ++line) {
    const int64_t r0 = band.line_first[line], r1 = band.line_first[line + 1];
    if (box_whole_line(r1 - r0, width)) {  // the weights as points, then the box filter over the line
      std::fill(points, points + width + wide - 1, T(0));
      for (int64_t r = r0; r < r1; ++r) points[band.x[r] + wide - 1] += w[r * stride];
      kernels::box_line(points, width, wide, spread + line * width);
      continue;
    }
    for (int64_t r = r0; r < r1; ++r) {
      T* h = spread + line * width + band.x[r];
      const T value = w[r * stride];
      for (int64_t t = 0; t < wide; ++t) h[t] += value;
    }
  }
  auto has_rows = [&](int64_t line) { return band.line_first[line] < band.line_first[line + 1]; };
  int64_t live = 0;  // lines with rows among the last `height`
  for (int64_t i = 0; i < band_lines + height - 1; ++i) {
    if (i < band_lines && has_rows(i)) {
      kernels::accumulate(spread + i * width, T(1), width, sums);
      ++live;
    }
    if (i >= height && has_rows(i - height)) {
      kernels::accumulate(spread + (i - height) * width, T(-1), width, sums);
      --live;
    }
    if (live == 0) {
      std::fill(sums, sums + width, T(0));  // exactly zero again, not rounding residue
      continue;
    }
    if ((i + 1) % kResumLines == 0) {  // the exact sum of the lines in the box again
      const int64_t first = std::max<int64_t>(0, i - height + 1), last = std::min(i, band_lines - 1);
      kernels::sum_lines(spread + first * width, last - first + 1, width, sums);
    }
    fn(band.y0 + ys.lo + i, band.xlo + xs.lo, width, static_cast<const T*>(sums));
  }
}

// The gradient of one band: padded lines [ylo, ylo + lines) and columns [xlo, xlo + width) of image b.
template <typename T>
struct GradBand {
  int64_t b, ylo, lines, xlo, width;
  std::vector<T> data;
};

// The band's share of the padded image's gradient, given w (count, K): the coefficient of (a - b) in the
// gradient of each query pixel a (and minus that of its candidate b), as in the direct path.
template <typename T>
void band_backward(const Padded<T>& img, const DenseBand& band, const GraphParams& p, const T* w,
                   Workspace<T>& ws, GradBand<T>& grad) {
  const int64_t s = p.s(), n = 2 * s + 1, K = p.K(), C = img.C, Wp = img.Wp;
  const bool window = p.padding == Padding::Window;
  grad.b = band.b;
  grad.ylo = band.y0;
  grad.lines = band.y1 - band.y0 + 2 * img.pad;
  grad.xlo = band.xlo;
  grad.width = band.xhi - band.xlo + 1 + 2 * img.pad;
  grad.data.assign(C * grad.lines * grad.width + cpu::kernels::kSlack, T(0));
  const int64_t gw = grad.width, gcs = grad.lines * gw;
  auto g_at = [&](int64_t y, int64_t x) {
    return grad.data.data() + (y + img.pad - grad.ylo) * gw + (x + img.pad - grad.xlo);
  };

  for (int64_t oy = -s; oy <= s; ++oy) {
    for (int64_t ox = -s; ox <= s; ++ox) {
      if (oy == 0 && ox == 0) continue;  // d2(p, 0) = 0 whatever the image
      const int64_t k = (oy + s) * n + (ox + s), shift = oy * Wp + ox, gshift = oy * gw + ox;
      const Span ay = both_span(oy, p), ax = both_span(ox, p);
      const Span cy = window ? candidate_span(oy, p) : ay, cx = window ? candidate_span(ox, p) : ax;
      const bool same = cy == ay && cx == ax;
      const kernels::Update update =
          !window ? kernels::Update::kPair : same ? kernels::Update::kCrossAndCandidate : kernels::Update::kCross;
      for_each_spread_line(band, w + k, K, ay, ax, ws, [&](int64_t qy, int64_t qx0, int64_t width, const T* m) {
        kernels::pair_update(update, m, img.at(band.b, qy, qx0), shift, img.cs(), C, width, g_at(qy, qx0), gshift,
                             gcs);
      });
      if (same) continue;
      // "window" with patch > search: the candidate's x^2 term has a rectangle of its own.
      for_each_spread_line(band, w + k, K, cy, cx, ws, [&](int64_t qy, int64_t qx0, int64_t width, const T* m) {
        for (int64_t c = 0; c < C; ++c) {
          const T* b = img.at(band.b, qy, qx0) + c * img.cs() + shift;
          kernels::add_product(m, b, T(1), width, g_at(qy, qx0) + c * gcs + gshift);
        }
      });
    }
  }
  if (!window) return;
  // The query's own x^2 term over the displacements where it lies in the window, summed over the offsets (the
  // centre offset's terms cancel: it is skipped everywhere).
  std::vector<T> total(band.count, T(0));
  const int64_t centre = s * n + s;
  for (int64_t r = 0; r < band.count; ++r) {
    T sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += k == centre ? T(0) : w[r * K + k];
    total[r] = sum;
  }
  const Span q = query_span(p);
  for_each_spread_line(band, total.data(), 1, q, q, ws, [&](int64_t qy, int64_t qx0, int64_t width, const T* m) {
    for (int64_t c = 0; c < C; ++c) {
      kernels::add_product(m, img.at(band.b, qy, qx0) + c * img.cs(), T(1), width, g_at(qy, qx0) + c * gcs);
    }
  });
}

// Calls fn(g) for the bands g in [first, last), handed to the threads one at a time (bands differ in size).
template <typename Fn>
void for_each_band(int64_t first, int64_t last, Fn fn) {
  if (first >= last) return;
  std::atomic<int64_t> next{first};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), last - first), 1, [&](int64_t, int64_t) {
    FlushDenormals flush;
    for (int64_t g = next++; g < last; g = next++) fn(g);
  });
}

// Everything the band loops of one image need: the padded image, its square sums ("window") and the bands.
template <typename T>
struct Prepared {
  at::Tensor padded;  // keeps the data alive
  Padded<T> img;
  std::optional<SquareSums> squares;
  const SquareSums* sq() const { return squares ? &*squares : nullptr; }
};

template <typename T>
Prepared<T> prepare(const at::Tensor& image, const GraphParams& p) {
  const at::Tensor padded = reflect_pad(image, p.pad());
  const int64_t B = padded.size(0), C = padded.size(1), Hp = padded.size(2), Wp = padded.size(3);
  Prepared<T> out;
  out.padded = padded;
  out.img = Padded<T>{padded.data_ptr<T>(), C, Hp, Wp, p.pad()};
  if (p.padding == Padding::Window) out.squares.emplace(out.img.data, B, C, Hp, Wp);
  return out;
}

struct Rows {
  std::vector<int64_t> order;
  std::vector<DenseBand> bands;
  const int64_t* pos;
};

Rows make_rows(const at::Tensor& positions) {
  Rows rows;
  rows.pos = positions.data_ptr<int64_t>();
  rows.order = sorted_rows(rows.pos, positions.size(0));
  rows.bands = make_bands(rows.pos, rows.order);
  return rows;
}

// The band's two graphs as LossRows (count rows, in band order), in the calling thread's buffers.
template <typename T>
const LossRows<T>& band_loss_rows(const Prepared<T>& sr, const Prepared<T>& hr, const Rows& rows, int64_t g,
                                  const GraphParams& p, Workspace<T>& ws) {
  thread_local LossRows<T> out;
  thread_local std::vector<T> d2;
  const DenseBand& band = rows.bands[g];
  const int64_t K = p.K(), count = band.count;
  const auto scale = static_cast<T>(1.0 / (p.h * sr.img.C * p.patch * p.patch));
  out.count = count;
  out.K = K;
  for (std::vector<T>* v : {&out.S, &out.logS, &out.H, &out.logH, &d2}) v->resize(count * K);
  band_distances(sr.img, sr.sq(), band, rows.pos, rows.order.data(), p, ws, d2.data());
  for (int64_t r = 0; r < count; ++r) {
    cpu::kernels::log_softmax(d2.data() + r * K, static_cast<int>(K), scale, out.logS.data() + r * K,
                              out.S.data() + r * K);
  }
  band_distances(hr.img, hr.sq(), band, rows.pos, rows.order.data(), p, ws, d2.data());
  for (int64_t r = 0; r < count; ++r) {
    cpu::kernels::log_softmax(d2.data() + r * K, static_cast<int>(K), scale, out.logH.data() + r * K,
                              out.H.data() + r * K);
  }
  return out;
}

// Backward driver: weights(g, w) writes the (count, K) scatter weights of band g. Returns the padded gradient.
template <typename T, typename Weights>
at::Tensor scatter_bands(const Prepared<T>& x, const Rows& rows, const GraphParams& p, Weights weights) {
  const int64_t C = x.img.C, Hp = x.img.Hp, Wp = x.img.Wp, K = p.K();
  const int64_t num_bands = static_cast<int64_t>(rows.bands.size());
  at::Tensor grad_padded = at::zeros(x.padded.sizes(), x.padded.options());
  T* gp = grad_padded.data_ptr<T>();
  std::vector<GradBand<T>> buffers(std::min(num_bands, kBandsPerWave));
  for (int64_t first = 0; first < num_bands; first += kBandsPerWave) {
    const int64_t last = std::min(num_bands, first + kBandsPerWave);
    for_each_band(first, last, [&](int64_t g) {
      thread_local Workspace<T> ws;
      thread_local std::vector<T> w;
      T* wd = sized(w, rows.bands[g].count * K);
      weights(g, wd, ws);
      band_backward(x.img, rows.bands[g], p, wd, ws, buffers[g - first]);
    });
    // Every gradient line adds the buffers of the bands covering it in band order: one parallel pass per wave.
    const int64_t B = grad_padded.size(0);
    at::parallel_for(0, B * C * Hp, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bcy = begin; bcy < end; ++bcy) {
        const int64_t b = bcy / (C * Hp), c = bcy / Hp % C, y = bcy % Hp;
        T* dst = gp + bcy * Wp;
        for (int64_t g = first; g < last; ++g) {
          const GradBand<T>& band = buffers[g - first];
          if (band.b != b || y < band.ylo || y >= band.ylo + band.lines) continue;
          const T* src = band.data.data() + (c * band.lines + y - band.ylo) * band.width;
          for (int64_t xx = 0; xx < band.width; ++xx) dst[band.xlo + xx] += src[xx];
        }
      }
    });
  }
  return grad_padded;
}

}  // namespace

at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), C = image.size(1), K = p.K();
  at::Tensor d2 = at::empty({N, K}, image.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return d2;
  const Rows rows = make_rows(positions);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_dense_graph_forward_cpu", [&] {
    const Prepared<scalar_t> x = prepare<scalar_t>(image, p);
    scalar_t* out = d2.data_ptr<scalar_t>();
    for_each_band(0, static_cast<int64_t>(rows.bands.size()), [&](int64_t g) {
      thread_local Workspace<scalar_t> ws;
      thread_local std::vector<scalar_t> band_d2;
      const DenseBand& band = rows.bands[g];
      scalar_t* buf = sized(band_d2, band.count * K);
      band_distances(x.img, x.sq(), band, rows.pos, rows.order.data(), p, ws, buf);
      for (int64_t r = 0; r < band.count; ++r) {
        std::copy(buf + r * K, buf + (r + 1) * K, out + rows.order[band.first + r] * K);
      }
    });
  });
  return rows_from_distances(d2, p, C);
}

at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows_in, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p) {
  const int64_t N = positions.size(0), C = image.size(1), K = p.K();
  if (N == 0) return at::zeros_like(image, at::MemoryFormat::Contiguous);
  const Rows rows = make_rows(positions);
  // Softmax backward: dL/dz = S * (G - sum_j G_j S_j).
  const at::Tensor w = (rows_in * (grad_rows - (grad_rows * rows_in).sum(1, /*keepdim=*/true)) *
                        scatter_factor(p, C)).contiguous();
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "metaf2n_dense_graph_backward_cpu", [&] {
    const Prepared<scalar_t> x = prepare<scalar_t>(image, p);
    const scalar_t* all = w.data_ptr<scalar_t>();
    grad_padded = scatter_bands(x, rows, p, [&](int64_t g, scalar_t* out, Workspace<scalar_t>&) {
      const DenseBand& band = rows.bands[g];
      for (int64_t r = 0; r < band.count; ++r) {
        const int64_t id = rows.order[band.first + r];
        std::copy(all + id * K, all + (id + 1) * K, out + r * K);
      }
    });
  });
  return unpad_gradient(grad_padded, image, p.pad());
}

at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& lw) {
  const int64_t N = positions.size(0), K = p.K();
  if (N == 0) return at::zeros({}, sr.options());
  const Rows rows = make_rows(positions);
  std::vector<double> losses(rows.bands.size());
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_dense_loss_forward_cpu", [&] {
    const Prepared<scalar_t> x = prepare<scalar_t>(sr, p), t = prepare<scalar_t>(hr, p);
    for_each_band(0, static_cast<int64_t>(rows.bands.size()), [&](int64_t g) {
      thread_local Workspace<scalar_t> ws;
      losses[g] = chunk_loss(band_loss_rows(x, t, rows, g, p, ws), lw);
    });
  });
  // Summed in band order so the result does not depend on the thread count.
  return at::scalar_tensor(sum_in_order(losses) / (static_cast<double>(N) * K), sr.options());
}

namespace {

// The padded gradient of the loss times `grad`; with `losses` (one per band), also the bands' loss sums.
template <typename T>
at::Tensor loss_padded_grad(const at::Tensor& sr, const at::Tensor& hr, const Rows& rows, const GraphParams& p,
                            const LossWeights& lw, double grad, std::vector<double>* losses) {
  const int64_t N = static_cast<int64_t>(rows.order.size()), K = p.K(), C = sr.size(1);
  const double mean = 1.0 / (static_cast<double>(N) * K);
  const double a = lw.kl * mean * grad * scatter_factor(p, C), b = lw.l1 * mean * grad * scatter_factor(p, C);
  const Prepared<T> x = prepare<T>(sr, p), t = prepare<T>(hr, p);
  return scatter_bands(x, rows, p, [&](int64_t g, T* w, Workspace<T>& ws) {
    const LossRows<T>& loss_rows = band_loss_rows(x, t, rows, g, p, ws);
    if (losses) (*losses)[g] = chunk_loss(loss_rows, lw);
    loss_weights(loss_rows, a, b, w);
  });
}

}  // namespace

at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& lw) {
  if (positions.size(0) == 0) return at::zeros_like(sr, at::MemoryFormat::Contiguous);
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_dense_loss_backward_cpu", [&] {
    grad_padded = loss_padded_grad<scalar_t>(sr, hr, make_rows(positions), p, lw, grad.item<double>(), nullptr);
  });
  return unpad_gradient(grad_padded, sr, p.pad());
}

std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& lw) {
  if (positions.size(0) == 0) return {at::zeros({}, sr.options()), at::zeros_like(sr, at::MemoryFormat::Contiguous)};
  const Rows rows = make_rows(positions);
  std::vector<double> losses(rows.bands.size());
  at::Tensor grad_padded;
  AT_DISPATCH_FLOATING_TYPES(sr.scalar_type(), "metaf2n_dense_loss_with_grad_cpu", [&] {
    grad_padded = loss_padded_grad<scalar_t>(sr, hr, rows, p, lw, 1.0, &losses);
  });
  // Summed in band order so the result does not depend on the thread count.
  const double loss = sum_in_order(losses) * (1.0 / (static_cast<double>(positions.size(0)) * p.K()));
  return {at::scalar_tensor(loss, sr.options()), unpad_gradient(grad_padded, sr, p.pad())};
}

}  // namespace metaf2n::cpu::dense
