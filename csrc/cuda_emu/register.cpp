// The emulated CUDA entry points (csrc/cuda/ssg_kernel.cu run on the CPU emulator) as the operators
// torch.ops.metaf2n_cuda_emu.*, for the tests; dense=True runs the dense path's kernels. They take CPU tensors and
// check the scalar parameters as the real ops do (ssg_args.cpp), but not the tensors: positions outside the batch
// must reach the kernels, as they can on CUDA, where they are not read back.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "ssg.h"

namespace {

using metaf2n::make_params;
using metaf2n::make_weights;

// As the real ops do (csrc/ssg.cpp): the kernels read positions as contiguous int64 rows.
at::Tensor rows_of(const at::Tensor& positions) { return positions.to(at::kLong).contiguous(); }

at::Tensor graph_forward(const at::Tensor& image, const at::Tensor& positions, int64_t search, int64_t patch, double h,
                         const std::string& padding, bool dense) {
  return metaf2n::cuda::graph_forward(image, rows_of(positions), make_params(search, patch, h, padding), dense);
}

at::Tensor graph_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& image,
                          const at::Tensor& positions, int64_t search, int64_t patch, double h,
                          const std::string& padding, bool dense) {
  return metaf2n::cuda::graph_backward(grad_rows, rows, image, rows_of(positions),
                                       make_params(search, patch, h, padding), dense);
}

at::Tensor loss_forward(const at::Tensor& sr, const at::Tensor& hr, const at::Tensor& positions, int64_t search,
                        int64_t patch, double h, double kl, double l1, const std::string& padding, bool dense) {
  return metaf2n::cuda::loss_forward(sr, hr, rows_of(positions), make_params(search, patch, h, padding),
                                     make_weights(kl, l1), dense);
}

at::Tensor loss_backward(const at::Tensor& grad, const at::Tensor& sr, const at::Tensor& hr,
                         const at::Tensor& positions, int64_t search, int64_t patch, double h, double kl, double l1,
                         const std::string& padding, bool dense) {
  return metaf2n::cuda::loss_backward(grad, sr, hr, rows_of(positions), make_params(search, patch, h, padding),
                                      make_weights(kl, l1), dense);
}

std::tuple<at::Tensor, at::Tensor> loss_with_grad(const at::Tensor& sr, const at::Tensor& hr,
                                                  const at::Tensor& positions, int64_t search, int64_t patch, double h,
                                                  double kl, double l1, const std::string& padding, bool dense) {
  return metaf2n::cuda::loss_with_grad(sr, hr, rows_of(positions), make_params(search, patch, h, padding),
                                       make_weights(kl, l1), dense);
}

std::vector<int64_t> shared_memory_plan(int64_t channels, int64_t search, int64_t patch, const std::string& padding,
                                        int64_t mode, bool fast_grad, int64_t elem_bytes, int64_t static_bytes,
                                        int64_t optin) {
  return metaf2n::cuda::shared_memory_plan(channels, search, patch, make_params(search, patch, 1.0, padding), mode,
                                           fast_grad, elem_bytes, static_bytes, optin);
}

}  // namespace

TORCH_LIBRARY(metaf2n_cuda_emu, m) {
  m.def("graph_forward(Tensor image, Tensor positions, int search, int patch, float h, str padding, "
        "bool dense=False) -> Tensor",
        &graph_forward);
  m.def("graph_backward(Tensor grad_rows, Tensor rows, Tensor image, Tensor positions, int search, int patch, "
        "float h, str padding, bool dense=False) -> Tensor",
        &graph_backward);
  m.def("loss_forward(Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, float kl, float l1, "
        "str padding, bool dense=False) -> Tensor",
        &loss_forward);
  m.def("loss_backward(Tensor grad, Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, "
        "float kl, float l1, str padding, bool dense=False) -> Tensor",
        &loss_backward);
  m.def("loss_with_grad(Tensor sr, Tensor hr, Tensor positions, int search, int patch, float h, float kl, float l1, "
        "str padding, bool dense=False) -> (Tensor, Tensor)",
        &loss_with_grad);
  m.def("shared_memory_plan(int channels, int search, int patch, str padding, int mode, bool fast_grad, "
        "int elem_bytes, int static_bytes, int optin) -> int[]",
        &shared_memory_plan);
}

static struct PyModuleDef emu_module = {PyModuleDef_HEAD_INIT, "_C_cuda_emu", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda_emu(void) { return PyModule_Create(&emu_module); }
