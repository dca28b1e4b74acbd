// Torch glue of the CUDA bsr_linear (kernel in bsr_linear.cu): checks what the kernel needs, makes x, values and
// bias contiguous, and registers pyprune::_bsr_linear_cuda. Compiled only in a CUDA build (setup.py adds
// csrc/cuda/*.cpp with the .cu files): it needs torch's CUDA headers.
// The index values are not checked here (that would cost a device sync per call): the CUDA router of
// pyprune::bsr_linear checks them once per structure before it calls this op, which is private for that reason.
// PYPRUNE_BSR_CUDA_TILE=64|128 forces the tokens per CTA (tests use it to run both tiles on the same shapes).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bsr_linear.h"
#include "linear_glue.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "_bsr_linear_cuda";

gpu::bsr::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return gpu::bsr::DType::kFloat16;
    case at::kBFloat16:
      return gpu::bsr::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "pyprune::", kOp, ": argument 'x' must be float16 or bfloat16 (the kernel multiplies ",
                       "on tensor cores; float32 runs on the triton or reference backend), got ", t);
  }
}

int forced_tile() {
  const char* env = std::getenv("PYPRUNE_BSR_CUDA_TILE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return 0;
  if (std::strcmp(env, "64") == 0) return 64;
  if (std::strcmp(env, "128") == 0) return 128;
  TORCH_CHECK_VALUE(false, "pyprune::", kOp, ": PYPRUNE_BSR_CUDA_TILE must be auto, 64 or 128, got '", env, "'");
}

}  // namespace

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_cuda_compressed(kOp, x, crow, col, values, 3, out_features, bias);
  const gpu::bsr::DType dt = kernel_dtype(x.scalar_type());
  const int64_t bh = values.size(1), bw = values.size(2);
  PYPRUNE_CHECK(gpu::bsr::bsr_linear_block_supported(static_cast<int>(bh), static_cast<int>(bw)), kOp, "values",
                "must hold blocks with sides 16, 32 or 64, got ", bh, " x ", bw);
  const int64_t n_brows = (out_features + bh - 1) / bh;
  PYPRUNE_CHECK(crow.numel() == n_brows + 1, kOp, "crow_indices", "must have ceil(out_features / bh) + 1 = ",
                n_brows + 1, " entries, got ", crow.numel());
  PYPRUNE_CHECK(col.numel() == values.size(0), kOp, "col_indices", "must have one entry per block (",
                values.size(0), "), got ", col.numel());

  const c10::cuda::CUDAGuard guard(x.device());
  const auto [x2, out_shape] = as_rows(x, out_features);
  const int64_t m = x2.size(0), k = x2.size(1);
  at::Tensor y = at::empty({m, out_features}, x.options());
  if (m == 0 || out_features == 0) return y.reshape(out_shape);

  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  at::Tensor vals_c = values.contiguous();
  if (reinterpret_cast<uintptr_t>(vals_c.data_ptr()) % 16 != 0) vals_c = vals_c.clone();  // a view at an odd offset
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  gpu::bsr::BsrLinearParams p{};
  p.dtype = dt;
  p.x = x2.data_ptr();
  p.crow = crow_c.data_ptr<int32_t>();
  p.col = col_c.data_ptr<int32_t>();
  p.values = vals_c.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.m = m;
  p.n = out_features;
  p.k = k;
  p.nnz_blocks = values.size(0);
  p.bh = static_cast<int>(bh);
  p.bw = static_cast<int>(bw);
  p.ldx = x2.stride(0);
  p.ldy = y.stride(0);
  const char* err = gpu::bsr::bsr_linear_cuda_launch(p, forced_tile(), x.device().index(),
                                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "pyprune::", kOp, ": ", err);
  return y.reshape(out_shape);
}

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) { m.impl("_bsr_linear_cuda", &bsr_linear_cuda); }

}  // namespace pyprune
