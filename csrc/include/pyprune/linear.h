// What the CPU linear ops share around their kernels: the bias check and the output tensor.
#pragma once
#include "pyprune/check.h"

namespace pyprune {

// The arguments CSR and BSR share: x (..., K); int32 1-D crow / col indices; values of x's dtype with
// `values_dim` dims; all on the CPU.
inline void check_compressed_args(const at::Tensor& x, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices, const at::Tensor& values, int64_t values_dim,
                                  const char* op) {
  check_compressed_arrays(x, crow_indices, col_indices, values, values_dim, op);
  PYPRUNE_CHECK_CPU(x, op, "x");
}

// bias: None or (N,) of x's dtype on the CPU; returned contiguous (undefined for None).
inline at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t N, const char* op,
                               at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor b = bias->contiguous();
  PYPRUNE_CHECK_DTYPE(b, op, "bias", dtype);
  PYPRUNE_CHECK_CPU(b, op, "bias");
  PYPRUNE_CHECK(b.dim() == 1 && b.numel() == N, op, "bias", "must have shape (", N, "), got ", b.sizes());
  return b;
}

// The rows of x (..., K): the product of its leading sizes (also when K = 0, where numel / K cannot say).
inline int64_t token_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// A tensor of its own over `view`'s memory (an op that returns a view of its own temporary breaks in-place use
// of its output under autograd: "Output 0 of ... is a view and is being modified inplace").
inline at::Tensor unaliased(const at::Tensor& view) {
  return at::empty({0}, view.options()).set_(view.storage(), view.storage_offset(), view.sizes(), view.strides());
}

// at::linear, for the dtypes the kernels lack, into an output of its own (for x of more than 2 dims at::linear
// returns a view of a 2-D product).
inline at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return unaliased(at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt));
}

// The (rows, cols) matrix a BSR weight stores (crow, col int32; val (nnz_blocks, bh, bw), zero past the
// matrix's edges; blocks given twice add up, as in the kernels), for the dense fallbacks.
inline at::Tensor bsr_dense_matrix(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                                   int64_t rows, int64_t cols) {
  const int64_t nnzb = val.size(0), bh = val.size(1), bw = val.size(2);
  const int64_t n_brows = (rows + bh - 1) / bh, n_bcols = (cols + bw - 1) / bw;
  const at::Tensor brow = at::repeat_interleave(at::arange(n_brows, crow.options().dtype(at::kLong)),
                                                crow.diff().to(at::kLong), 0, nnzb);
  at::Tensor grid = at::zeros({n_brows, n_bcols, bh, bw}, val.options());
  grid.index_put_({brow, col.to(at::kLong)}, val, true);
  return grid.permute({0, 2, 1, 3}).reshape({n_brows * bh, n_bcols * bw}).slice(0, 0, rows).slice(1, 0, cols);
}

// y: (..., N) for x: (..., K), uninitialised.
inline at::Tensor linear_output(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

// The result of a weight with nothing stored (or K = 0): the bias broadcast, or zeros.
inline at::Tensor bias_only(at::Tensor& y, const at::Tensor& b) {
  return b.defined() ? y.copy_(b.expand_as(y)) : y.zero_();
}

// bsr_linear's kernel into y (M x N rows, yp) for fp32 x (M x K, the last dim contiguous) with M > 0, N > 0,
// K > 0 and at least one block (crow, col, val contiguous and checked; b the checked bias or undefined); with
// res (laid out as y) added after the bias and the ReLU applied last (cap < 0: none; +inf: plain; else capped
// there): bsr_conv2d's channels_last 1x1 convs. token_rows: the caller's choice of the token-rows tiles (x's
// rows read in place), taken where they apply (AVX-512, 32-row blocks, N a multiple of 16; bsr_linear.cpp).
void bsr_linear_rows(const at::Tensor& x, int64_t M, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& val, int64_t N, const at::Tensor& b, float* yp, const float* res, float cap,
                     bool token_rows);

// The index values of a CSR weight (columns) or a BSR one (block columns), whose kernels read x at them: row
// pointers non-decreasing from 0 to the number of entries, every column in [0, n_cols). Throws naming the
// first argument at fault.
void validate_compressed_indices(const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, const char* op,
                                 const char* n_cols_name);

// validate_compressed_indices once per index tensors and contents: kept while they are the same tensors at the
// same version and fingerprint (derived_cache.h). For BSR, whose fingerprint reads one index per block, and CSR
// with more than a few tokens. (The CSR decode kernel checks each index as it reads it instead: a fingerprint
// of its indices cost 13-20% of a decode call.)
void check_compressed_indices(const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, const char* op,
                              const char* n_cols_name);

}  // namespace pyprune
