// The raw-pointer interface of the CUDA CSR linear kernels (csrc/cuda/csr_linear.cu). No torch headers: the .cu
// compiles with plain `nvcc -c` (CI does it on machines without a GPU); the torch glue (csr_linear_torch.cpp)
// fills the struct from tensors and registers pyprune::_csr_linear_cuda.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyprune {
namespace gpu {
namespace csr {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which kernel runs: decode (few tokens, x staged in shared memory) or rows (many tokens, x read transposed).
enum class Path : int { kAuto = 0, kDecode = 1, kRows = 2 };

// y = x W^T + bias with W (n x k) in CSR: int32 crow (n + 1) and col (nnz), values (nnz); fp32 accumulation,
// one rounding to the dtype. col16, when not null, holds the same column indices in 16 bits (k <= 65536) and the
// kernels read it instead of col: at decode the weight's bytes are the cost, and 16-bit indices take fp16's 6
// bytes a nonzero down to 4. x (m x k) has unit column stride and row stride ldx; y (m x n) row stride ldy.
// The rows path reads xt, x transposed (k x ldxt, ldxt >= m a multiple of 16 / sizeof(T), zero past m, 16-byte
// aligned), and row_order (n int32, the rows by descending nnz) when not null.
struct CsrLinearParams {
  DType dtype;
  const void* x;
  const void* xt;
  const int32_t* crow;
  const int32_t* col;
  const uint16_t* col16;  // or null
  const void* values;
  const void* bias;  // (n,) or null
  const int32_t* row_order;
  void* y;
  int64_t m, n, k, nnz;
  int64_t ldx, ldxt, ldy;
};

// Tokens per tile of the decode path for these sizes on `device` (1, 2, 4 or 8), or 0 when the rows path runs
// (more than 64 tokens, or k too long for x to fit in shared memory). `path` forces one (decode: 0 only when x
// cannot fit). The glue calls this first: the rows path needs xt and row_order.
int csr_linear_decode_tokens(int64_t m, int64_t k, DType dtype, int device, Path path);

// Launches on `stream`; returns nullptr on success, else a message (bad arguments or the launch error).
const char* csr_linear_cuda_launch(const CsrLinearParams& p, int device, Path path, cudaStream_t stream);

}  // namespace csr
}  // namespace gpu
}  // namespace pyprune
