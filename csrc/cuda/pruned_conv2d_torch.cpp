// Torch glue of the CUDA pruned_conv2d (kernels in pruned_conv2d.cu): checks what the kernel needs, lays the
// weight out to match x, allocates the output in x's memory format and registers pyprune::_pruned_conv2d_cuda.
// Compiled only in a CUDA build (setup.py adds csrc/cuda/*.cpp with the .cu files): it needs torch's CUDA headers.
// The index values are not checked here (that would cost a device sync): the CUDA router of pyprune::pruned_conv2d
// checks them before it calls this op, which is private for that reason.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "pruned_conv2d.h"
#include "pyprune/check.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "_pruned_conv2d_cuda";

bool channels_last(const at::Tensor& x) {
  // F.conv2d's rule: channels_last unless also plainly contiguous
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

gpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return gpu::DType::kFloat32;
    case at::kHalf:
      return gpu::DType::kFloat16;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "pyprune::", kOp, ": argument 'x' must be float16, bfloat16 or float32, got ", t);
  }
}

void check_index(const std::optional<at::Tensor>& idx, int64_t n, const at::Tensor& x, const char* name) {
  if (!idx.has_value()) return;
  PYPRUNE_CHECK_DTYPE(*idx, kOp, name, at::kLong);
  PYPRUNE_CHECK_DIM(*idx, 1, kOp, name);
  PYPRUNE_CHECK(idx->numel() == n, kOp, name, "must have ", n, " entries, got ", idx->numel());
  PYPRUNE_CHECK(idx->device() == x.device(), kOp, name, "must be on ", x.device(), ", got ", idx->device());
}

}  // namespace

at::Tensor pruned_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                              int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, bool relu) {
  PYPRUNE_CHECK(x.is_cuda(), kOp, "x", "must be a CUDA tensor, got ", x.device());
  PYPRUNE_CHECK_DIM(x, 4, kOp, "x");
  PYPRUNE_CHECK_DIM(weight, 4, kOp, "weight");
  const gpu::DType dt = kernel_dtype(x.scalar_type());
  PYPRUNE_CHECK_DTYPE(weight, kOp, "weight", x.scalar_type());
  PYPRUNE_CHECK(weight.device() == x.device(), kOp, "weight", "must be on ", x.device());
  PYPRUNE_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp, "stride",
                "padding and dilation must be pairs");
  PYPRUNE_CHECK(groups >= 1, kOp, "groups", "must be >= 1, got ", groups);
  const int64_t c_out = weight.size(0), cin_g = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  PYPRUNE_CHECK(c_out % groups == 0, kOp, "groups", "must divide the kept output channels (", c_out, ")");
  const int64_t c_in = in_index.has_value() ? in_index->numel() : x.size(1);
  PYPRUNE_CHECK(cin_g * groups == c_in, kOp, "weight", "must have C_in_kept / groups = ", c_in / groups,
                " input channels, got ", cin_g);
  check_index(in_index, c_in, x, "in_index");
  check_index(out_index, c_out, x, "out_index");
  PYPRUNE_CHECK(out_index.has_value() || out_channels == c_out, kOp, "out_channels", "must equal weight.size(0)");
  if (bias.has_value()) {
    PYPRUNE_CHECK_DTYPE(*bias, kOp, "bias", x.scalar_type());
    PYPRUNE_CHECK(bias->numel() == c_out && bias->device() == x.device(), kOp, "bias", "must have ", c_out,
                  " entries on ", x.device());
  }
  for (int i = 0; i < 2; ++i) {
    PYPRUNE_CHECK(stride[i] >= 1 && padding[i] >= 0 && dilation[i] >= 1, kOp, "stride",
                  "stride and dilation must be >= 1, padding >= 0");
  }
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  PYPRUNE_CHECK(oh > 0 && ow > 0, kOp, "x", "gives an empty output (", oh, " x ", ow, ")");

  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({x.size(0), out_channels, oh, ow}, x.options().memory_format(fmt));
  if (out_index.has_value() && c_out < out_channels) y.zero_();  // channels outside out_index
  if (y.numel() == 0 || c_out == 0) return y;
  // w's K order must match x's (see pruned_conv2d.cu): NCHW weight for NCHW-like x, channels_last otherwise
  const bool x_major = x.stride(3) <= x.stride(1);
  const at::Tensor w = weight.contiguous(x_major ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor ii = in_index.has_value() ? in_index->contiguous() : at::Tensor();
  const at::Tensor oi = out_index.has_value() ? out_index->contiguous() : at::Tensor();

  gpu::PrunedConv2dParams p{};
  p.dtype = dt;
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.in_index = ii.defined() ? ii.data_ptr<int64_t>() : nullptr;
  p.out_index = oi.defined() ? oi.data_ptr<int64_t>() : nullptr;
  p.y = y.data_ptr();
  p.batch = x.size(0);
  p.height = x.size(2);
  p.width = x.size(3);
  p.out_h = oh;
  p.out_w = ow;
  p.cin_g = cin_g;
  p.cout_g = c_out / groups;
  p.groups = groups;
  p.kh = static_cast<int>(kh);
  p.kw = static_cast<int>(kw);
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  for (int i = 0; i < 4; ++i) {
    p.sx[i] = x.stride(i);
    p.sw[i] = w.stride(i);
    p.sy[i] = y.stride(i);
  }
  p.relu = relu;
  const char* err = gpu::pruned_conv2d_cuda_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "pyprune::", kOp, ": ", err);
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) { m.impl("_pruned_conv2d_cuda", &pruned_conv2d_cuda); }

}  // namespace pyprune
