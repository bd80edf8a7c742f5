// Self-similarity graphs (SSG) and the fused self-similarity loss: shared declarations.
// The maths is stated once in DESIGN.md ("The self-similarity maths"); every backend implements exactly that.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>
#include <vector>

namespace metaf2n {

enum class Padding { Image, Window };

// Validated graph parameters; s and f are the search and patch radii.
struct GraphParams {
  int64_t search;
  int64_t patch;
  double h;
  Padding padding;

  int64_t s() const { return search / 2; }
  int64_t f() const { return patch / 2; }
  int64_t K() const { return search * search; }
  // Reflect padding applied to the image: "image" reads candidate patches from an image padded by s + f,
  // "window" pads by s and reads zeros outside the (2s+1)^2 window.
  int64_t pad() const { return padding == Padding::Image ? s() + f() : s(); }
};

struct LossWeights {
  double kl;
  double l1;
};

// Argument checks shared by all backends; they raise ValueError / TypeError naming the argument.
GraphParams make_params(int64_t search, int64_t patch, double h, std::string_view padding);
LossWeights make_weights(double kl_weight, double l1_weight);
void check_image(const at::Tensor& image, const char* name, const GraphParams& p);
void check_same_image(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name);
// Ranges are checked only for CPU positions: reading CUDA positions would synchronise the device, and the CUDA
// kernels skip out-of-range rows instead.
void check_positions(const at::Tensor& positions, const at::Tensor& image);
void check_rows(const at::Tensor& rows, const char* name, const at::Tensor& positions, const GraphParams& p,
                const at::Tensor& image);

// Backend entry points (inputs already checked; positions are int64 (N, 3) rows of (b, y, x)).
namespace cpu {
at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p);
at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p);
at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& w);
at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& w);
// The loss and its gradient w.r.t. sr in one pass (both graphs are computed once instead of twice).
std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& w);
namespace dense {  // the same entry points computed by box filters (csrc/cpu/ssg_dense.cpp)
at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p);
at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p);
at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& w);
at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& w);
std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& w);
}  // namespace dense
}  // namespace cpu

#ifdef METAF2N_WITH_CUDA
namespace cuda {  // the same entry points on CUDA tensors (csrc/cuda/ssg_kernel.cu); `dense` takes the box-filter path
at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, const GraphParams& p, bool dense);
at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, const GraphParams& p, bool dense);
at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions,
                        const GraphParams& p, const LossWeights& w, bool dense);
at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, const GraphParams& p, const LossWeights& w, bool dense);
std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, const GraphParams& p,
                                                  const LossWeights& w, bool dense);
// The shared-memory plan of a rows_kernel launch, computed on the host without a GPU (for tests):
// {dynamic bytes, static bytes, channels staged at once}; ValueError when dynamic + static exceeds `optin`.
// mode: 0 graph forward, 1 graph backward, 2 loss forward, 3 loss backward.
std::vector<int64_t> shared_memory_plan(int64_t channels, int64_t search, int64_t patch, const GraphParams& p,
                                        int64_t mode, bool fast_grad, int64_t elem_bytes, int64_t static_bytes,
                                        int64_t optin);
}  // namespace cuda
#endif

// Clamp applied to both graphs inside the KL term, as in the published SSL code.
constexpr double kProbFloor = 1e-10;

}  // namespace metaf2n
