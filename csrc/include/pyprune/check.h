// Argument checks with user-facing messages: each names the op, the argument and what was expected.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once
#include <torch/extension.h>

#define PYPRUNE_CHECK(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, "pyprune::", op, ": argument '", arg, "' ", __VA_ARGS__)

#define PYPRUNE_CHECK_DTYPE(t, op, arg, dt)                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == (dt), "pyprune::", op, ": argument '", arg, "' must be ", \
                   c10::toString(dt), ", got ", (t).scalar_type())

#define PYPRUNE_CHECK_CPU(t, op, arg) \
  PYPRUNE_CHECK((t).device().is_cpu(), op, arg, "must be on the CPU, got ", (t).device())

#define PYPRUNE_CHECK_DIM(t, d, op, arg) \
  PYPRUNE_CHECK((t).dim() == (d), op, arg, "must be ", d, "-D, got shape ", (t).sizes())

namespace pyprune {

// The arrays of a compressed (CSR / BSR) weight for an input x (..., in_features): int32 1-D crow / col indices
// and values of x's dtype with `values_dim` dims, all on x's device. `op` names the op in messages.
inline void check_compressed_arrays(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                    const at::Tensor& values, int64_t values_dim, const char* op) {
  PYPRUNE_CHECK(x.dim() >= 1, op, "x", "must have at least 1 dimension (..., in_features), got a scalar");
  PYPRUNE_CHECK_DTYPE(values, op, "values", x.scalar_type());
  PYPRUNE_CHECK_DTYPE(crow, op, "crow_indices", at::kInt);
  PYPRUNE_CHECK_DTYPE(col, op, "col_indices", at::kInt);
  PYPRUNE_CHECK_DIM(crow, 1, op, "crow_indices");
  PYPRUNE_CHECK_DIM(col, 1, op, "col_indices");
  PYPRUNE_CHECK_DIM(values, values_dim, op, "values");
  for (const at::Tensor* t : {&crow, &col, &values}) {
    PYPRUNE_CHECK(t->device() == x.device(), op, "crow_indices/col_indices/values", "must be on x's device (",
                  x.device(), "), got ", t->device());
  }
}

}  // namespace pyprune
