// Argument checks shared by all backends (declared in ssg.h): ValueError / TypeError naming the argument. Also
// linked into the CUDA emulator module (csrc/cuda_emu/), whose ops take the same parameters.
#include "ssg.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace metaf2n {

GraphParams make_params(int64_t search, int64_t patch, double h, std::string_view padding) {
  TORCH_CHECK_VALUE(search >= 1 && search % 2 == 1, "search must be a positive odd window size, got ", search);
  TORCH_CHECK_VALUE(patch >= 1 && patch % 2 == 1 && patch <= 31, "patch must be an odd patch size in [1, 31], got ",
                    patch);
  TORCH_CHECK_VALUE(std::isfinite(h) && h > 0, "h must be a finite number > 0, got ", h);
  Padding mode;
  if (padding == "image") {
    mode = Padding::Image;
  } else if (padding == "window") {
    mode = Padding::Window;
  } else {
    TORCH_CHECK_VALUE(false, "padding must be \"image\" or \"window\", got \"", std::string(padding), "\"");
  }
  return GraphParams{search, patch, h, mode};
}

LossWeights make_weights(double kl_weight, double l1_weight) {
  TORCH_CHECK_VALUE(std::isfinite(kl_weight) && kl_weight >= 0, "kl_weight must be a finite number >= 0, got ",
                    kl_weight);
  TORCH_CHECK_VALUE(std::isfinite(l1_weight) && l1_weight >= 0, "l1_weight must be a finite number >= 0, got ",
                    l1_weight);
  return LossWeights{kl_weight, l1_weight};
}

void check_image(const at::Tensor& image, const char* name, const GraphParams& p) {
  TORCH_CHECK_VALUE(image.dim() == 4, name, " must be a (B, C, H, W) tensor, got shape ", image.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()),
                   name, " must be a floating tensor (float32, float64, float16 or bfloat16), got ",
                   image.scalar_type());
  TORCH_CHECK_VALUE(image.device().is_cpu() || image.device().is_cuda(),
                    name, " must be on a CPU or CUDA device, got ", image.device());
  TORCH_CHECK_VALUE(image.size(1) >= 1, name, " must have at least one channel, got shape ", image.sizes());
  const int64_t pad = p.pad();
  TORCH_CHECK_VALUE(image.size(2) > pad && image.size(3) > pad, name, " of size ", image.size(2), "x",
                    image.size(3), " is smaller than the window: padding \"",
                    p.padding == Padding::Image ? "image" : "window", "\" with search ", p.search, " and patch ",
                    p.patch, " reflect-pads by ", pad, ", so height and width must exceed ", pad);
}

void check_same_image(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), a_name, " and ", b_name, " must have the same shape, got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ",
                    a.device(), " and ", b.device());
}

void check_positions(const at::Tensor& positions, const at::Tensor& image) {
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
                   "positions must be an int64 or int32 tensor, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(1) == 3,
                    "positions must have shape (N, 3) with rows (b, y, x), got ", positions.sizes());
  TORCH_CHECK_VALUE(positions.device() == image.device(), "positions must be on the image's device ",
                    image.device(), ", got ", positions.device());
  if (positions.device().is_cpu() && positions.size(0) > 0) {
    const at::Tensor pos = positions.to(at::kLong);
    const int64_t limits[3] = {image.size(0), image.size(2), image.size(3)};
    const char* names[3] = {"batch index", "y", "x"};
    for (int d = 0; d < 3; ++d) {
      const at::Tensor column = pos.select(1, d);
      const int64_t lo = column.min().item<int64_t>();
      const int64_t hi = column.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < limits[d], "positions column ", d, " (", names[d], ") must lie in [0, ",
                        limits[d], "), got values in [", lo, ", ", hi, "]");
    }
  }
}

void check_rows(const at::Tensor& rows, const char* name, const at::Tensor& positions, const GraphParams& p,
                const at::Tensor& image) {
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == positions.size(0) && rows.size(1) == p.K(), name,
                    " must have shape (", positions.size(0), ", ", p.K(), "), got ", rows.sizes());
  TORCH_CHECK_VALUE(rows.device() == image.device(), name, " must be on the image's device ", image.device(),
                    ", got ", rows.device());
  TORCH_CHECK_TYPE(at::isFloatingType(rows.scalar_type()), name, " must be floating, got ", rows.scalar_type());
}

}  // namespace metaf2n
