// The raw-pointer interface of the CUDA BSR linear kernel (csrc/cuda/bsr_linear.cu). No torch headers: the .cu
// compiles with plain `nvcc -c` (CI does it on machines without a GPU); the torch glue (bsr_linear_torch.cpp)
// fills the struct from tensors and registers pyprune::_bsr_linear_cuda.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyprune {
namespace gpu {
namespace bsr {

// 16-bit inputs only: the kernel multiplies on tensor cores (fp32 accumulation); fp32 stays with Triton.
enum class DType : int { kFloat16 = 1, kBFloat16 = 2 };

// y = x W^T + bias with W (n x k) a CSR of (bh x bw) blocks: int32 crow (ceil(n / bh) + 1) and col (nnz_blocks,
// block columns in [0, ceil(k / bw))), values (nnz_blocks, bh, bw) contiguous and 16-byte aligned. The parts of
// the edge blocks past n or k are never used (x is read as zero past k, rows past n are not written).
// x (m x k) has unit column stride and row stride ldx; y (m x n) row stride ldy. bh, bw in {16, 32, 64}.
struct BsrLinearParams {
  DType dtype;
  const void* x;
  const int32_t* crow;
  const int32_t* col;
  const void* values;
  const void* bias;  // (n,) or null
  void* y;
  int64_t m, n, k, nnz_blocks;
  int bh, bw;
  int64_t ldx, ldy;
};

// True when the kernel has an instantiation for (bh x bw) blocks.
bool bsr_linear_block_supported(int bh, int bw);

// Launches on `stream`; tile_m is the number of tokens per CTA (64 or 128; 0 picks one from the sizes and the
// device's SM count). Returns nullptr on success, else a message (bad arguments, a device older than sm_80, or
// the launch error).
const char* bsr_linear_cuda_launch(const BsrLinearParams& p, int tile_m, int device, cudaStream_t stream);

}  // namespace bsr
}  // namespace gpu
}  // namespace pyprune
