// Winograd F(4x4, 3x3) convolution for inference on the CPU: the interface shared by the dispatcher (winograd.cpp)
// and the per-instruction-set kernels (winograd_kernel.inc compiled once per ISA).
// Plain C types only: the kernel translation units are compiled with different -m flags and must not instantiate
// any inline function (ATen, STL) that the linker could merge with another TU's copy.
#pragma once

#include <cstdint>

namespace metaf2n::winograd {

// One 3x3 convolution, stride 1, zero padding 1, on NHWC float32 images whose channel stride is 1 (a channel slice of
// a channels_last tensor qualifies). The input is read as if upsampled by `upsample` (1 or 2, nearest), so the output
// is (upsample * H, upsample * W). Per output pixel and channel:
//   y = conv + bias;  if (activation) y = y >= 0 ? y : slope * y;
//   if (residual1) y = residual1 + scale1 * y;  if (residual2) y = residual2 + scale2 * y.
struct Image {
  float* data;
  int64_t stride_n, stride_h, stride_w;  // in elements; the channel stride is 1
};

struct ConvArgs {
  Image input;           // (N, H, W, in_channels)
  const float* weights;  // transformed: [36][in_channels][out_channels]
  const float* bias;     // [out_channels] or null
  Image output;          // (N, upsample * H, upsample * W, out_channels)
  Image residual1, residual2;  // data null when absent; same size as the output
  float scale1, scale2;
  int64_t batch, height, width, in_channels, out_channels;
  int upsample;
  bool activation;
  float slope;
  int threads;
};

// in_channels and out_channels must be multiples of 16 (checked by the dispatcher). False when the per-thread
// scratch could not be allocated.
namespace avx512 { bool conv3x3(const ConvArgs& args); }
namespace avx2 { bool conv3x3(const ConvArgs& args); }
namespace generic { bool conv3x3(const ConvArgs& args); }

}  // namespace metaf2n::winograd
