// The raw-pointer interface of the CUDA pruned_conv2d kernels (csrc/cuda/pruned_conv2d.cu). No torch headers:
// the .cu compiles with plain `nvcc -c` (CI does it on machines without a GPU or a CUDA build of torch); the
// torch glue (pruned_conv2d_torch.cpp) fills the struct from tensors and registers pyprune::_pruned_conv2d_cuda.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyprune {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y[:, out_index] = relu?(conv2d(x[:, in_index], w) + bias). Strides are in elements, in (N, C, H, W) order for x
// and y and (C_out_kept, C_in_kept / groups, kh, kw) for w; any strides work, the kernels read NCHW and
// channels_last x fastest when w has the matching memory format. Null in_index / out_index / bias: identity /
// compact output / no bias. Channels of y outside out_index are not written (the caller zeroes them).
struct PrunedConv2dParams {
  DType dtype;
  const void* x;
  const void* w;
  const void* bias;
  const int64_t* in_index;
  const int64_t* out_index;
  void* y;
  int64_t batch, height, width, out_h, out_w;
  int64_t cin_g, cout_g, groups;  // kept channels per group; C_out_kept = cout_g * groups
  int kh, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t sx[4], sw[4], sy[4];
  bool relu;
};

// Launches on `stream`; returns nullptr on success, else a message (bad arguments or the launch error).
const char* pruned_conv2d_cuda_launch(const PrunedConv2dParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace pyprune
