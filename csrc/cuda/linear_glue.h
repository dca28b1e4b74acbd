// What the torch glue of the CUDA compressed linear ops (csr_linear_torch.cpp, bsr_linear_torch.cpp) shares: the
// argument checks and x as rows. Host C++ with torch headers, for the glue only (the .cu files stay torch-free).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "pyprune/check.h"

namespace pyprune {

// x (..., k) on a CUDA device; int32 1-D crow / col indices and values of x's dtype with `values_dim` dims, all
// on x's device; out_features >= 0; bias None, or out_features entries of x's dtype on x's device.
inline void check_cuda_compressed(const char* op, const at::Tensor& x, const at::Tensor& crow,
                                  const at::Tensor& col, const at::Tensor& values, int64_t values_dim,
                                  int64_t out_features, const std::optional<at::Tensor>& bias) {
  PYPRUNE_CHECK(x.is_cuda(), op, "x", "must be a CUDA tensor, got ", x.device());
  check_compressed_arrays(x, crow, col, values, values_dim, op);
  PYPRUNE_CHECK(out_features >= 0, op, "out_features", "must be >= 0, got ", out_features);
  if (bias.has_value()) {
    PYPRUNE_CHECK_DTYPE(*bias, op, "bias", x.scalar_type());
    PYPRUNE_CHECK(bias->numel() == out_features && bias->device() == x.device(), op, "bias", "must have ",
                  out_features, " entries on ", x.device());
  }
}

// x (..., k) as contiguous rows (m, k), and the shape of the output (..., out_features).
struct Rows {
  at::Tensor x2;
  std::vector<int64_t> out_shape;
};

inline Rows as_rows(const at::Tensor& x, int64_t out_features) {
  const int64_t k = x.size(-1);
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);  // not reshape(-1, k): k may be 0
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  return {x.reshape({m, k}).contiguous(), std::move(out_shape)};
}

}  // namespace pyprune
