// CUDA BSR linear: y = x W^T + bias, W (n x k) a CSR of dense (bh x bw) blocks, x dense (m x k), fp16 / bf16.
//
// One CTA (4 warps) owns one block row of W (bh output features) and a tile of BM tokens (64 or 128). It walks
// the block row's stored blocks in steps of G blocks (G = 2 for bw = 16, else 1: 32+ columns of K per step, so
// the barrier of a step is paid for at least two 16-deep MMAs): for each block it stages the block itself
// (bh x bw, contiguous in `values`) and the matching slice of x (BM tokens x columns col*bw .. col*bw + bw) in
// shared memory, and multiplies them on tensor cores with WMMA 16x16x16 in fp32 accumulators: the tile is
// x_slice @ block^T, the block read as a column-major B operand, so no transposition is needed anywhere.
//
// Staging is a 3-stage cp.async pipeline (sm_80+): the copies for step i + 2 are in flight while step i
// multiplies, with one barrier per step. x goes through 16-byte cp.async when its rows are 16-byte aligned
// (ldx a multiple of 8 elements); the copy's source size zero-fills the columns past k (a ragged last block
// column) and the tokens past m, so the MMAs never see stale shared memory. Otherwise x is staged with plain
// element loads (same schedule, synchronous). Each shared row is padded by 16 bytes (bank spread; WMMA's ldm
// must be a multiple of 16 bytes and every fragment pointer 32-byte aligned, which 16-row fragments and the
// padded stride keep).
//
// Epilogue: the accumulators go through shared memory (aliasing the drained stages) and are written with the
// bias added in fp32, rounded once to the dtype, skipping the tokens past m and the rows past n (ragged last
// block row). A block row with no stored block writes the bias alone. Offsets into x, W and y are int64.
//
// Not done (no GPU measurement yet to ask for it): splitting a long block row over several CTAs (few-token
// decode keeps one CTA per block row, so little memory is in flight), longest-row-first ordering, vector stores.
//
// Status: compiled with `nvcc -c` (sm_80, sm_90, and the default arch), never run on a GPU by its author; the
// GPU tests in tests/ops/test_bsr_linear_cuda.py are what will tell whether it is right.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>

#include "bsr_linear.h"

// cp.async and bf16 WMMA exist from sm_80. Compiled for an older arch, the kernel body is a trap (never launched:
// the launcher refuses devices below compute capability 8.0).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PYPRUNE_BSR_HAS_SM80 0
#else
#define PYPRUNE_BSR_HAS_SM80 1
#endif

namespace pyprune {
namespace gpu {
namespace bsr {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kStages = 3;
constexpr int kPad = 8;  // elements appended to every staged row: 16 bytes

#if PYPRUNE_BSR_HAS_SM80
// device helpers exist only where the kernel body does (no unused-function warnings for older archs)
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes global -> shared; only src_bytes (0..16) are read, the rest of the 16 is written as zeros
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// waits until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // PYPRUNE_BSR_HAS_SM80

// Warps over the (BM tokens x BH outputs) tile: 2 warps along the outputs when BH >= 32, else 1; each warp
// holds FM x FN accumulator fragments of 16 x 16.
template <int BM, int BH>
struct WarpLayout {
  static constexpr int kWarpsN = BH >= 32 ? 2 : 1;
  static constexpr int kWarpsM = (kThreads / 32) / kWarpsN;
  static constexpr int kFM = BM / (16 * kWarpsM);
  static constexpr int kFN = BH / (16 * kWarpsN);
  static_assert(kFM >= 1 && kFM * 16 * kWarpsM == BM, "token tile must split into 16-row fragments");
  static_assert(kFN >= 1 && kFN * 16 * kWarpsN == BH, "block rows must split into 16-column fragments");
};

// Shared memory of one CTA: kStages stages, each G x-slices [BM][kLd] then G W-blocks [BH][kLd]; after the
// main loop, the fp32 accumulator tile [BM][kLdc] reuses the same bytes.
template <typename T, int BM, int BH, int BW>
struct SmemLayout {
  static constexpr int kG = BW >= 32 ? 1 : 2;  // blocks per step
  static constexpr int kLd = BW + kPad;
  static constexpr int kXBlock = BM * kLd;
  static constexpr int kWBlock = BH * kLd;
  static constexpr int kStage = kG * (kXBlock + kWBlock);
  static constexpr int kLdc = BH + 4;
  static constexpr size_t kPipeBytes = static_cast<size_t>(kStages) * kStage * sizeof(T);
  static constexpr size_t kCBytes = static_cast<size_t>(BM) * kLdc * sizeof(float);
  static constexpr size_t kBytes = kPipeBytes > kCBytes ? kPipeBytes : kCBytes;
  static_assert((kLd * sizeof(T)) % 16 == 0, "staged rows must stay 16-byte aligned for cp.async and WMMA");
  static_assert((kXBlock * sizeof(T)) % 32 == 0 && (kWBlock * sizeof(T)) % 32 == 0, "fragments need 32 B");
};

// grid: one CTA per (block row, token tile), token tiles fastest, so CTAs running together share a block row of
// W (read once from DRAM) while x streams through L2; a 1-D grid has no 65535 limit.
template <typename T, int BM, int BH, int BW, bool kVecX>
__global__ void __launch_bounds__(kThreads) bsr_linear_kernel(const BsrLinearParams p, int64_t n_mtiles) {
#if !PYPRUNE_BSR_HAS_SM80
  __trap();
#else
  using namespace nvcuda;
  using L = WarpLayout<BM, BH>;
  using S = SmemLayout<T, BM, BH, BW>;
  constexpr int kG = S::kG;
  constexpr int kChunks = BW / 8;  // 16-byte chunks in a staged row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const stages = reinterpret_cast<T*>(smem_raw);
  float* const cs = reinterpret_cast<float*>(smem_raw);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ vals = static_cast<const T*>(p.values);
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int64_t brow = tile / n_mtiles;
  const int64_t m0 = (tile - brow * n_mtiles) * BM;
  const int64_t n0 = brow * BH;
  const int64_t start = p.crow[brow];
  const int64_t nblk = static_cast<int64_t>(p.crow[brow + 1]) - start;
  const int64_t nsteps = (nblk + kG - 1) / kG;

  // stages the blocks step * kG + g (g < kG) of this block row that exist
  auto load_step = [&](int stage, int64_t step) {
    T* const base = stages + stage * S::kStage;
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const int64_t j = step * kG + g;
      if (j >= nblk) break;
      const int64_t blk = start + j;
      const int64_t k0 = static_cast<int64_t>(p.col[blk]) * BW;
      T* const xdst = base + g * S::kXBlock;
      T* const wdst = base + kG * S::kXBlock + g * S::kWBlock;
      const T* const wsrc = vals + blk * (BH * BW);
#pragma unroll
      for (int e = tid; e < BH * kChunks; e += kThreads) {
        const int r = e / kChunks, c = (e % kChunks) * 8;
        cp_async_16(wdst + r * S::kLd + c, wsrc + r * BW + c, 16);
      }
      if constexpr (kVecX) {
#pragma unroll
        for (int e = tid; e < BM * kChunks; e += kThreads) {
          const int r = e / kChunks, c = (e % kChunks) * 8;
          const int64_t row = m0 + r, kk = k0 + c;
          int bytes = 0;
          const T* src = x;  // not read when bytes == 0
          if (row < p.m && kk < p.k) {
            const int64_t left = p.k - kk;
            bytes = static_cast<int>((left < 8 ? left : 8) * sizeof(T));
            src = x + row * p.ldx + kk;
          }
          cp_async_16(xdst + r * S::kLd + c, src, bytes);
        }
      } else {
        for (int e = tid; e < BM * BW; e += kThreads) {
          const int r = e / BW, c = e % BW;
          const int64_t row = m0 + r, kk = k0 + c;
          xdst[r * S::kLd + c] = (row < p.m && kk < p.k) ? x[row * p.ldx + kk] : from_f<T>(0.f);
        }
      }
    }
  };

  const int warp = tid / 32;
  const int wm = (warp % L::kWarpsM) * (16 * L::kFM);  // first token of this warp's fragments
  const int wn = (warp / L::kWarpsM) * (16 * L::kFN);  // first output (row of the block)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[L::kFM][L::kFN];
#pragma unroll
  for (int i = 0; i < L::kFM; ++i)
#pragma unroll
    for (int j = 0; j < L::kFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // prologue: steps 0 .. kStages-2 in flight, one commit group each (empty past the last step), so that
  // before step i the groups committed number i + kStages - 1 and waiting down to kStages - 2 lands step i
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) load_step(s, s);
    cp_async_commit();
  }
  for (int64_t i = 0; i < nsteps; ++i) {
    cp_async_wait<kStages - 2>();
    // step i is visible to every thread, and every warp is done with step i - 1, whose stage is refilled next
    __syncthreads();
    const int64_t next = i + kStages - 1;
    if (next < nsteps) load_step(static_cast<int>(next % kStages), next);
    cp_async_commit();

    const T* const base = stages + static_cast<int>(i % kStages) * S::kStage;
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (i * kG + g >= nblk) break;  // the last step of an odd block count under G = 2; uniform over the CTA
      const T* const xa = base + g * S::kXBlock;
      const T* const wb = base + kG * S::kXBlock + g * S::kWBlock;
#pragma unroll
      for (int kk = 0; kk < BW; kk += 16) {
        // A: x_slice (tokens x K) row-major; B: block^T (K x outputs), i.e. the row-major block read col-major
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[L::kFM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[L::kFN];
#pragma unroll
        for (int fi = 0; fi < L::kFM; ++fi) wmma::load_matrix_sync(fa[fi], xa + (wm + fi * 16) * S::kLd + kk, S::kLd);
#pragma unroll
        for (int fj = 0; fj < L::kFN; ++fj) wmma::load_matrix_sync(fb[fj], wb + (wn + fj * 16) * S::kLd + kk, S::kLd);
#pragma unroll
        for (int fi = 0; fi < L::kFM; ++fi)
#pragma unroll
          for (int fj = 0; fj < L::kFN; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; drained before the stages are reused
  __syncthreads();
#pragma unroll
  for (int fi = 0; fi < L::kFM; ++fi)
#pragma unroll
    for (int fj = 0; fj < L::kFN; ++fj)
      wmma::store_matrix_sync(cs + (wm + fi * 16) * S::kLdc + wn + fj * 16, acc[fi][fj], S::kLdc,
                              wmma::mem_row_major);
  __syncthreads();

  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  // threads along the outputs: y's contiguous dimension
  for (int e = tid; e < BM * BH; e += kThreads) {
    const int r = e / BH, c = e % BH;
    const int64_t row = m0 + r, out = n0 + c;
    if (row >= p.m || out >= p.n) continue;
    float v = cs[r * S::kLdc + c];
    if (bias != nullptr) v += to_f(bias[out]);
    y[row * p.ldy + out] = from_f<T>(v);
  }
#endif
}

template <typename T, int BM, int BH, int BW, bool kVecX>
const char* launch_kernel(const BsrLinearParams& p, cudaStream_t stream) {
  using S = SmemLayout<T, BM, BH, BW>;
  auto kernel = bsr_linear_kernel<T, BM, BH, BW, kVecX>;
  const int smem = static_cast<int>(S::kBytes);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return cudaGetErrorString(cudaGetLastError());
  }
  const int64_t n_mtiles = (p.m + BM - 1) / BM;
  const int64_t n_brows = (p.n + BH - 1) / BH;
  const int64_t grid = n_mtiles * n_brows;
  if (grid > INT_MAX) return "bsr_linear: too many (block row, token tile) pairs for one grid";
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p, n_mtiles);
  return nullptr;
}

template <typename T, int BM, bool kVecX>
const char* launch_block(const BsrLinearParams& p, cudaStream_t stream) {
#define PYPRUNE_BSR_CASE(H, W) \
  if (p.bh == H && p.bw == W) return launch_kernel<T, BM, H, W, kVecX>(p, stream);
  PYPRUNE_BSR_CASE(16, 16)
  PYPRUNE_BSR_CASE(16, 32)
  PYPRUNE_BSR_CASE(16, 64)
  PYPRUNE_BSR_CASE(32, 16)
  PYPRUNE_BSR_CASE(32, 32)
  PYPRUNE_BSR_CASE(32, 64)
  PYPRUNE_BSR_CASE(64, 16)
  PYPRUNE_BSR_CASE(64, 32)
  PYPRUNE_BSR_CASE(64, 64)
#undef PYPRUNE_BSR_CASE
  return "bsr_linear: block sides must be 16, 32 or 64";
}

template <typename T>
const char* launch_t(const BsrLinearParams& p, int tile_m, bool vec_x, cudaStream_t stream) {
  if (tile_m == 128) {
    return vec_x ? launch_block<T, 128, true>(p, stream) : launch_block<T, 128, false>(p, stream);
  }
  return vec_x ? launch_block<T, 64, true>(p, stream) : launch_block<T, 64, false>(p, stream);
}

bool side_ok(int s) { return s == 16 || s == 32 || s == 64; }

}  // namespace

bool bsr_linear_block_supported(int bh, int bw) { return side_ok(bh) && side_ok(bw); }

const char* bsr_linear_cuda_launch(const BsrLinearParams& p, int tile_m, int device, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.nnz_blocks < 0) return "negative size";
  if (!bsr_linear_block_supported(p.bh, p.bw)) return "block sides must be 16, 32 or 64";
  if (tile_m != 0 && tile_m != 64 && tile_m != 128) return "tile_m must be 0 (auto), 64 or 128";
  if (p.m == 0 || p.n == 0) return nullptr;
  if (p.crow == nullptr || p.y == nullptr || (p.nnz_blocks > 0 && (p.col == nullptr || p.values == nullptr))) {
    return "null pointer";
  }
  if (reinterpret_cast<uintptr_t>(p.values) % 16 != 0) return "values must be 16-byte aligned";
  int major = 0, sms = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return cudaGetErrorString(cudaGetLastError());
  }
  if (major < 8) return "the BSR kernel needs compute capability 8.0 or newer (cp.async, bf16 tensor cores)";
  if (tile_m == 0) {
    // 128-token tiles halve the W traffic per token but halve the CTA count: only while at least two CTAs per SM
    // remain. A guess, not a measurement.
    const int64_t n_brows = (p.n + p.bh - 1) / p.bh;
    tile_m = (p.m > 64 && (p.m + 127) / 128 * n_brows >= 2 * static_cast<int64_t>(sms)) ? 128 : 64;
  }
  constexpr int kVec = 8;  // 16 bytes of fp16 / bf16
  const bool vec_x = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.ldx % kVec == 0;
  const char* err = nullptr;
  switch (p.dtype) {
    case DType::kFloat16:
      err = launch_t<__half>(p, tile_m, vec_x, stream);
      break;
    case DType::kBFloat16:
      err = launch_t<__nv_bfloat16>(p, tile_m, vec_x, stream);
      break;
    default:
      return "dtype must be float16 or bfloat16";
  }
  if (err != nullptr) return err;
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace bsr
}  // namespace gpu
}  // namespace pyprune
