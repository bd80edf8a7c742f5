// Op schemas and the dispatch to the CPU / CUDA kernels (the argument checks are in ssg_args.cpp).
#include "ssg.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace metaf2n {

namespace {

std::string_view view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

// Work of the two CPU paths per offset, in element operations:
//  direct: N C P^2 squared differences;
//  dense:  C + 3 per pixel of the lines its bands read (the lines holding rows, plus P - 1 per band of 32 lines,
//          width W) and P per row (the sum over the patch width).
// kDenseCostRatio is the time of one dense element operation over one direct one: the work ratio where the measured
// times cross in `python bench/bench_ssl.py --sweep` (fused loss forward + backward, 256^2 crop, search 25, patch 9,
// masks of 1.2% to 27% of the pixels; 2026-11-30, 2-core AVX2 machine): 1.54 with 2 threads (crossing at 5.0% of
// the pixels), 1.39 with 1 thread (4.6%). The table and the plot are in the README's benchmark section.
constexpr double kDenseCostRatio = 1.5;

bool dense_is_cheaper(const at::Tensor& image, const at::Tensor& pos, const GraphParams& p) {
  const int64_t N = pos.size(0), B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  if (N == 0) return false;
  constexpr int64_t kBandLines = 32;  // csrc/cpu/ssg_dense.cpp's kLines
  const int64_t bands_per_image = (H + kBandLines - 1) / kBandLines;
  std::vector<uint8_t> line_used(B * H, 0), band_used(B * bands_per_image, 0);
  const int64_t* rows = pos.data_ptr<int64_t>();
  int64_t lines = 0, bands = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t b = rows[3 * i], y = rows[3 * i + 1];
    lines += !line_used[b * H + y];
    line_used[b * H + y] = 1;
    bands += !band_used[b * bands_per_image + y / kBandLines];
    band_used[b * bands_per_image + y / kBandLines] = 1;
  }
  const double P = static_cast<double>(p.patch);
  const double direct = static_cast<double>(N) * C * P * P;
  const double dense = static_cast<double>(W) * (lines + bands * (P - 1)) * (C + 3) + N * P;
  return direct > kDenseCostRatio * dense;
}

// Which implementation computes the op: "direct" (one patch loop per row), "dense" (box filters) or "auto" (on the
// CPU the cheaper by the work estimate above). On CUDA "auto" takes the direct kernels: the dense CUDA kernels have
// been checked on the CPU emulator of csrc/cuda_emu/ but not timed on a GPU, so there is no measured crossover to
// choose by.
bool use_dense(c10::string_view path, const at::Tensor& image, const at::Tensor& pos, const GraphParams& p) {
  const std::string_view name = view(path);
  TORCH_CHECK_VALUE(name == "auto" || name == "direct" || name == "dense",
                    "path must be \"auto\", \"direct\" or \"dense\", got \"", std::string(name), "\"");
  if (image.is_cuda()) return name == "dense";
  if (name == "auto") return dense_is_cheaper(image, pos, p);
  return name == "dense";
}

// Half and bfloat16 images are computed in float32 on the CPU; CUDA kernels read them natively.
at::Tensor cpu_compute_input(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? t.to(at::kFloat) : t;
}

at::Tensor similarity_graph(const at::Tensor& image, const at::Tensor& positions, int64_t search, int64_t patch,
                            double h, c10::string_view padding, c10::string_view path) {
  const GraphParams p = make_params(search, patch, h, view(padding));
  check_image(image, "image", p);
  check_positions(positions, image);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const bool dense = use_dense(path, image, pos, p);
#ifdef METAF2N_WITH_CUDA
  if (image.is_cuda()) return cuda::graph_forward(image, pos, p, dense);
#endif
  const auto forward = dense ? &cpu::dense::graph_forward : &cpu::graph_forward;
  return forward(cpu_compute_input(image), pos, p).to(image.scalar_type());
}

at::Tensor similarity_graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                                     const at::Tensor& positions, int64_t search, int64_t patch, double h,
                                     c10::string_view padding, c10::string_view path) {
  const GraphParams p = make_params(search, patch, h, view(padding));
  check_image(image, "image", p);
  check_positions(positions, image);
  check_rows(grad_rows, "grad_rows", positions, p, image);
  check_rows(rows, "rows", positions, p, image);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const bool dense = use_dense(path, image, pos, p);
#ifdef METAF2N_WITH_CUDA
  if (image.is_cuda()) return cuda::graph_backward(grad_rows, rows, image, pos, p, dense);
#endif
  const at::Tensor x = cpu_compute_input(image);
  const auto backward = dense ? &cpu::dense::graph_backward : &cpu::graph_backward;
  return backward(grad_rows.to(x.scalar_type()), rows.to(x.scalar_type()), x, pos, p).to(image.scalar_type());
}

// The checked arguments of the loss ops.
struct LossCall {
  GraphParams p;
  LossWeights w;
  at::Tensor pos;  // int64, contiguous
};

LossCall check_loss_args(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions, int64_t search,
                         int64_t patch, double h, double kl_weight, double l1_weight, c10::string_view padding) {
  LossCall call{make_params(search, patch, h, view(padding)), make_weights(kl_weight, l1_weight), at::Tensor()};
  check_image(sr, "sr", call.p);
  check_same_image(sr, "sr", hr, "hr");
  check_positions(positions, sr);
  call.pos = positions.to(at::kLong).contiguous();
  return call;
}

at::Tensor ssl_loss(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions, int64_t search,
                    int64_t patch, double h, double kl_weight, double l1_weight, c10::string_view padding,
                    c10::string_view path) {
  const auto [p, w, pos] = check_loss_args(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding);
  const bool dense = use_dense(path, sr, pos, p);
#ifdef METAF2N_WITH_CUDA
  if (sr.is_cuda()) return cuda::loss_forward(sr, hr, pos, p, w, dense);
#endif
  const auto forward = dense ? &cpu::dense::loss_forward : &cpu::loss_forward;
  return forward(cpu_compute_input(sr), cpu_compute_input(hr), pos, p, w).to(sr.scalar_type());
}

at::Tensor ssl_loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                             const at::Tensor& positions, int64_t search, int64_t patch, double h, double kl_weight,
                             double l1_weight, c10::string_view padding, c10::string_view path) {
  const auto [p, w, pos] = check_loss_args(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding);
  const bool dense = use_dense(path, sr, pos, p);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must be a scalar, got shape ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == sr.device(), "grad must be on sr's device ", sr.device(), ", got ",
                    grad.device());
#ifdef METAF2N_WITH_CUDA
  if (sr.is_cuda()) return cuda::loss_backward(grad, sr, hr, pos, p, w, dense);
#endif
  const at::Tensor x = cpu_compute_input(sr);
  const auto backward = dense ? &cpu::dense::loss_backward : &cpu::loss_backward;
  return backward(grad.to(x.scalar_type()), x, cpu_compute_input(hr), pos, p, w).to(sr.scalar_type());
}

// Used by autograd when sr requires a gradient: the backward then only scales the saved gradient.
std::tuple<at::Tensor, at::Tensor> ssl_loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                      const at::Tensor& positions, int64_t search, int64_t patch,
                                                      double h, double kl_weight, double l1_weight,
                                                      c10::string_view padding, c10::string_view path) {
  const auto [p, w, pos] = check_loss_args(sr, hr, positions, search, patch, h, kl_weight, l1_weight, padding);
  const bool dense = use_dense(path, sr, pos, p);
#ifdef METAF2N_WITH_CUDA
  if (sr.is_cuda()) return cuda::loss_with_grad(sr, hr, pos, p, w, dense);
#endif
  const auto fused = dense ? &cpu::dense::loss_with_grad : &cpu::loss_with_grad;
  auto [loss, grad] = fused(cpu_compute_input(sr), cpu_compute_input(hr), pos, p, w);
  return {loss.to(sr.scalar_type()), grad.to(sr.scalar_type())};
}

#ifdef METAF2N_WITH_CUDA
std::vector<int64_t> cuda_shared_memory_plan(int64_t channels, int64_t search, int64_t patch, c10::string_view padding,
                                             int64_t mode, bool fast_grad, int64_t elem_bytes, int64_t static_bytes,
                                             int64_t optin) {
  const GraphParams p = make_params(search, patch, 1.0, view(padding));
  return cuda::shared_memory_plan(channels, search, patch, p, mode, fast_grad, elem_bytes, static_bytes, optin);
}
#endif

// The path "auto" takes for these arguments (for the benchmark and the tests).
std::string auto_path(const at::Tensor& image, const at::Tensor& positions, int64_t search, int64_t patch,
                      c10::string_view padding) {
  const GraphParams p = make_params(search, patch, 1.0, view(padding));
  check_image(image, "image", p);
  check_positions(positions, image);
  return use_dense("auto", image, positions.to(at::kLong).contiguous(), p) ? "dense" : "direct";
}

bool has_cuda_kernels() {
#ifdef METAF2N_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(metaf2n, m) {
  m.def("similarity_graph(Tensor image, Tensor positions, int search, int patch, float h, str padding, str path=\"auto\") -> Tensor");
  m.def(
      "similarity_graph_backward(Tensor grad_rows, Tensor rows, Tensor image, Tensor positions, int search, "
      "int patch, float h, str padding, str path=\"auto\") -> Tensor");
  m.def(
      "ssl_loss(Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, float kl_weight, "
      "float l1_weight, str padding, str path=\"auto\") -> Tensor");
  m.def(
      "ssl_loss_backward(Tensor grad, Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, "
      "float kl_weight, float l1_weight, str padding, str path=\"auto\") -> Tensor");
  m.def(
      "ssl_loss_with_grad(Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, "
      "float kl_weight, float l1_weight, str padding, str path=\"auto\") -> (Tensor, Tensor)");
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
  m.def("_auto_path(Tensor image, Tensor positions, int search, int patch, str padding) -> str", &auto_path);
#ifdef METAF2N_WITH_CUDA
  m.def(
      "_cuda_shared_memory_plan(int channels, int search, int patch, str padding, int mode, bool fast_grad, "
      "int elem_bytes, int static_bytes, int optin) -> int[]",
      &cuda_shared_memory_plan);
#endif
}

TORCH_LIBRARY_IMPL(metaf2n, CPU, m) {
  m.impl("similarity_graph", &similarity_graph);
  m.impl("similarity_graph_backward", &similarity_graph_backward);
  m.impl("ssl_loss", &ssl_loss);
  m.impl("ssl_loss_backward", &ssl_loss_backward);
  m.impl("ssl_loss_with_grad", &ssl_loss_with_grad);
}

#ifdef METAF2N_WITH_CUDA
TORCH_LIBRARY_IMPL(metaf2n, CUDA, m) {
  m.impl("similarity_graph", &similarity_graph);
  m.impl("similarity_graph_backward", &similarity_graph_backward);
  m.impl("ssl_loss", &ssl_loss);
  m.impl("ssl_loss_backward", &ssl_loss_backward);
  m.impl("ssl_loss_with_grad", &ssl_loss_with_grad);
}
#endif

}  // namespace metaf2n

// `import metaf2n._C` loads this library, whose static initialisers register the ops above.
#include <Python.h>
static struct PyModuleDef metaf2n_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&metaf2n_module); }
