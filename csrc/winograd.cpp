// torch.ops.metaf2n.winograd_conv3x3_: a 3x3 convolution by Winograd F(4x4, 3x3) on the CPU, for inference.
// Checks the arguments, picks the kernel for the CPU's instruction set (ATEN_CPU_CAPABILITY caps it as for ATen) and runs it. The weight transform U = G g G^T is done by the caller (metaf2n.winograd, in float64).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "cpu/winograd.h"

namespace metaf2n {
namespace {

bool cpu_has(const char* isa) {
  const std::string name(isa);
  if (name == "generic") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

// The widest kernel the CPU runs, capped like ATen's own kernels by ATEN_CPU_CAPABILITY (default, avx2, avx512).
std::string default_isa() {
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string cap = env ? env : "";
  if (cap != "default" && cap != "avx2" && cpu_has("avx512")) return "avx512";
  if (cap != "default" && cpu_has("avx2")) return "avx2";
  return "generic";
}

winograd::Image image_of(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(2), t.stride(3)};
}

void check_nhwc(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be (N, C, H, W), got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) == 1, name,
                    " must have channel stride 1 (channels_last, or a channel slice of such a tensor), got strides ",
                    t.strides());
}

// Whether two NHWC views may share an element. Channel slices of one channels_last buffer (same pixel strides,
// disjoint channel ranges within a pixel) do not, though their memory ranges interleave.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.storage().is_alias_of(b.storage()) || at::get_overlap_status(a, b) == at::MemOverlapStatus::No) return false;
  const int64_t pixel = a.stride(3);
  if (a.strides() != b.strides() || pixel <= 0 || a.stride(2) % pixel != 0 || a.stride(0) % pixel != 0) return true;
  const int64_t ca = a.storage_offset() % pixel, cb = b.storage_offset() % pixel;
  if (ca + a.size(1) > pixel || cb + b.size(1) > pixel) return true;
  return ca < cb + b.size(1) && cb < ca + a.size(1);
}

void winograd_conv3x3_(const at::Tensor& output, const at::Tensor& input, const at::Tensor& weights,
                       const std::optional<at::Tensor>& bias, int64_t upsample,
                       std::optional<double> negative_slope, const std::optional<at::Tensor>& residual1,
                       double scale1, const std::optional<at::Tensor>& residual2, double scale2,
                       c10::string_view isa) {
  check_nhwc(input, "input");
  check_nhwc(output, "output");
  TORCH_CHECK_VALUE(upsample == 1 || upsample == 2, "upsample must be 1 or 2, got ", upsample);
  const int64_t n = input.size(0), cin = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t cout = output.size(1);
  TORCH_CHECK_VALUE(cin % 16 == 0 && cin > 0, "input must have a multiple of 16 channels, got ", cin);
  TORCH_CHECK_VALUE(cout % 16 == 0 && cout > 0, "output must have a multiple of 16 channels, got ", cout);
  TORCH_CHECK_VALUE(h > 0 && w > 0 && n > 0, "input must not be empty, got ", input.sizes());
  TORCH_CHECK_VALUE(output.size(0) == n && output.size(2) == h * upsample && output.size(3) == w * upsample,
                    "output must be (", n, ", ", cout, ", ", h * upsample, ", ", w * upsample, ") for input ",
                    input.sizes(), " and upsample ", upsample, ", got ", output.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, "weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device().is_cpu(), "weights must be on the CPU, got ", weights.device());
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(0) == 36 && weights.size(1) == cin && weights.size(2) == cout,
                    "weights must be the transformed (36, ", cin, ", ", cout, ") of metaf2n.winograd, got ",
                    weights.sizes());
  TORCH_CHECK_VALUE(weights.is_contiguous(), "weights must be contiguous");
  if (bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == cout && bias->is_contiguous(),
                      "bias must be a contiguous (", cout, ",) CPU tensor, got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(!may_overlap(output, input), "output must not overlap input");
  at::assert_no_internal_overlap(output);
  for (const auto& [residual, name] : {std::pair{&residual1, "residual1"}, std::pair{&residual2, "residual2"}}) {
    if (!*residual) continue;
    check_nhwc(**residual, name);
    TORCH_CHECK_VALUE((*residual)->sizes() == output.sizes(), name, " must have the output's shape ",
                      output.sizes(), ", got ", (*residual)->sizes());
    const bool same = (*residual)->data_ptr() == output.data_ptr() && (*residual)->strides() == output.strides();
    TORCH_CHECK_VALUE(same || !may_overlap(output, **residual), name, " must be the output itself or not overlap it");
  }
  winograd::ConvArgs args{};
  args.input = image_of(input);
  args.weights = weights.data_ptr<float>();
  args.bias = bias ? bias->data_ptr<float>() : nullptr;
  args.output = image_of(output);
  if (residual1) args.residual1 = image_of(*residual1);
  if (residual2) args.residual2 = image_of(*residual2);
  args.scale1 = static_cast<float>(scale1);
  args.scale2 = static_cast<float>(scale2);
  args.batch = n;
  args.height = h;
  args.width = w;
  args.in_channels = cin;
  args.out_channels = cout;
  args.upsample = static_cast<int>(upsample);
  args.activation = negative_slope.has_value();
  args.slope = static_cast<float>(negative_slope.value_or(1.0));
  args.threads = at::get_num_threads();

  const std::string requested(isa.data(), isa.size());
  const std::string chosen = requested == "auto" ? default_isa() : requested;
  TORCH_CHECK_VALUE(chosen == "avx512" || chosen == "avx2" || chosen == "generic",
                    "isa must be auto, avx512, avx2 or generic, got ", requested);
  TORCH_CHECK_VALUE(cpu_has(chosen.c_str()), "isa ", chosen, " is not supported by this CPU");
  bool ok = chosen == "avx512" ? winograd::avx512::conv3x3(args)
            : chosen == "avx2" ? winograd::avx2::conv3x3(args)
                               : winograd::generic::conv3x3(args);
  TORCH_CHECK(ok, "winograd_conv3x3_: out of memory for the per-thread scratch");
}

std::string winograd_default_isa() { return default_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(metaf2n, m) {
  m.def(
      "winograd_conv3x3_(Tensor(a!) output, Tensor input, Tensor weights, Tensor? bias, int upsample=1, "
      "float? negative_slope=None, Tensor? residual1=None, float scale1=1.0, Tensor? residual2=None, "
      "float scale2=1.0, str isa=\"auto\") -> ()");
  m.def("winograd_default_isa() -> str", &winograd_default_isa);
}

TORCH_LIBRARY_IMPL(metaf2n, CPU, m) { m.impl("winograd_conv3x3_", &winograd_conv3x3_); }

}  // namespace metaf2n
