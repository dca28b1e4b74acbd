// Torch glue of the CUDA csr_linear (kernels in csr_linear.cu): checks what the kernel needs, prepares x (and, for
// many tokens, x transposed and the rows in descending nnz order), and registers pyprune::_csr_linear_cuda.
// Compiled only in a CUDA build (setup.py adds csrc/cuda/*.cpp with the .cu files): it needs torch's CUDA headers.
// The index values are not checked here (that would cost a device sync per call): the CUDA router of
// pyprune::csr_linear checks them once per structure before it calls this op, which is private for that reason.
// PYPRUNE_CSR_PATH=decode|rows forces a kernel (tests use it to run both on the same shapes).
// Column indices go to the kernels in 16 bits when in_features <= 65536, converted once per col tensor and kept
// (DerivedCache: reused while col is the same tensor at the same version), as is the rows kernel's row order
// (per crow); PYPRUNE_CSR_INDEX=int32 keeps the indices 32-bit (tests and the GPU benchmark compare the two).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>

#include "csr_linear.h"
#include "linear_glue.h"
#include "pyprune/derived_cache.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "_csr_linear_cuda";

gpu::csr::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return gpu::csr::DType::kFloat32;
    case at::kHalf:
      return gpu::csr::DType::kFloat16;
    case at::kBFloat16:
      return gpu::csr::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "pyprune::", kOp, ": argument 'x' must be float16, bfloat16 or float32, got ", t);
  }
}

gpu::csr::Path forced_path() {
  const char* env = std::getenv("PYPRUNE_CSR_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return gpu::csr::Path::kAuto;
  if (std::strcmp(env, "decode") == 0) return gpu::csr::Path::kDecode;
  if (std::strcmp(env, "rows") == 0) return gpu::csr::Path::kRows;
  TORCH_CHECK_VALUE(false, "pyprune::", kOp, ": PYPRUNE_CSR_PATH must be auto, decode or rows, got '", env, "'");
}

// col (int32, values in [0, 65536)) as 16-bit, for the kernels to read as unsigned: columns from 32768 on
// are stored as their value - 65536, whose 16-bit pattern is the column itself. Kept between calls; the cache
// is never destroyed (CUDA tensors freed by a static destructor at exit could outlive the CUDA allocator).
at::Tensor narrow_columns(const at::Tensor& col) {
  static auto* cache = new DerivedCache<at::Tensor>(int64_t(256) << 20);
  return cache->get({col}, {}, [](const std::vector<at::Tensor>& from) {
    const at::Tensor c = from[0].contiguous();
    return at::where(c >= 32768, c - 65536, c).to(at::kShort);
  }, [](const at::Tensor& t) { return static_cast<int64_t>(t.nbytes()); });
}

// The rows by descending nnz (int32): the rows kernel starts the longest first. A device sort, so kept between
// calls like the 16-bit columns.
at::Tensor rows_by_length(const at::Tensor& crow, int64_t n) {
  static auto* cache = new DerivedCache<at::Tensor>(int64_t(64) << 20);
  return cache->get({crow}, {n}, [n](const std::vector<at::Tensor>& from) {
    const at::Tensor c = from[0].contiguous();
    const at::Tensor lengths = c.narrow(0, 1, n) - c.narrow(0, 0, n);
    return std::get<1>(lengths.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).to(at::kInt);
  }, [](const at::Tensor& t) { return static_cast<int64_t>(t.nbytes()); });
}

bool wide_columns_forced() {
  const char* env = std::getenv("PYPRUNE_CSR_INDEX");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(env, "int32") == 0, "pyprune::", kOp,
                    ": PYPRUNE_CSR_INDEX must be auto or int32, got '", env, "'");
  return true;
}

}  // namespace

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_cuda_compressed(kOp, x, crow, col, values, 1, out_features, bias);
  const gpu::csr::DType dt = kernel_dtype(x.scalar_type());
  PYPRUNE_CHECK(crow.numel() == out_features + 1, kOp, "crow_indices", "must have out_features + 1 = ",
                out_features + 1, " entries, got ", crow.numel());
  PYPRUNE_CHECK(col.numel() == values.numel(), kOp, "col_indices", "must have one entry per value (",
                values.numel(), "), got ", col.numel());

  const c10::cuda::CUDAGuard guard(x.device());
  const auto [x2, out_shape] = as_rows(x, out_features);
  const int64_t m = x2.size(0), k = x2.size(1);
  at::Tensor y = at::empty({m, out_features}, x.options());
  if (m == 0 || out_features == 0) return y.reshape(out_shape);

  const int device = x.device().index();
  const gpu::csr::Path path = forced_path();
  const bool decode = gpu::csr::csr_linear_decode_tokens(m, k, dt, device, path) > 0;
  at::Tensor xt, order;
  int64_t ldxt = 0;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), vals_c = values.contiguous();
  if (!decode) {
    // x transposed, each column of tokens padded to a multiple of 16 bytes (zeros) for vector loads
    const int64_t vec = 16 / x.element_size();
    ldxt = (m + vec - 1) / vec * vec;
    xt = at::empty({k, ldxt}, x.options());
    if (ldxt > m) xt.narrow(1, m, ldxt - m).zero_();
    xt.narrow(1, 0, m).copy_(x2.t());
    order = rows_by_length(crow, out_features);
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor col16 = k <= 65536 && col_c.numel() > 0 && !wide_columns_forced() ? narrow_columns(col)
                                                                                     : at::Tensor();

  gpu::csr::CsrLinearParams p{};
  p.dtype = dt;
  p.x = x2.data_ptr();
  p.xt = xt.defined() ? xt.data_ptr() : nullptr;
  p.crow = crow_c.data_ptr<int32_t>();
  p.col = col_c.data_ptr<int32_t>();
  p.col16 = col16.defined() ? reinterpret_cast<const uint16_t*>(col16.data_ptr<int16_t>()) : nullptr;
  p.values = vals_c.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.row_order = order.defined() ? order.data_ptr<int32_t>() : nullptr;
  p.y = y.data_ptr();
  p.m = m;
  p.n = out_features;
  p.k = k;
  p.nnz = col.numel();
  p.ldx = x2.stride(0);
  p.ldxt = ldxt;
  p.ldy = y.stride(0);
  const char* err = gpu::csr::csr_linear_cuda_launch(p, device, path, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "pyprune::", kOp, ": ", err);
  return y.reshape(out_shape);
}

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) { m.impl("_csr_linear_cuda", &csr_linear_cuda); }

}  // namespace pyprune
