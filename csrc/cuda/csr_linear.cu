// CUDA CSR linear: y = x W^T + bias, W (n x k) unstructured sparse in CSR (int32 indices), x dense (m x k).
//
// Two kernels, both accumulating in fp32 and rounding once to the output dtype:
//
// decode (m <= 64 tokens): memory-bound on the weight (each nonzero is read once per token tile and used for up
// to 8 tokens). A block stages its tile of MT tokens of x in shared memory, transposed to [k][MT] so that the MT
// values of one input column are one packed load (16 bytes for 8 fp16 tokens); x is read from global memory in
// 16-byte vectors when aligned. Each warp owns one output row at a time: its lanes stride over the row's
// nonzeros (coalesced col / value loads), gather x's column from shared memory, and reduce by shuffles.
// Load balance: blocks split the nonzeros, not the rows, into equal ranges (block b owns the rows whose first
// nonzero lies in [nnz * b / B, nnz * (b + 1) / B), found by binary search in crow), so a few long rows do not
// leave most blocks idle; each block stages x once for all its rows.
//
// rows (more tokens): x is transposed once by the glue to xt (k x m, padded), so the tokens of one input column
// are contiguous. A warp owns (one output row, 32 * VEC tokens): it loads 32 (col, value) pairs at a time,
// broadcasts each by shuffle, and every lane reads VEC consecutive tokens of that column of xt as one 16-byte
// vector (float4 / 4 x half2). Rows are handed out in descending nnz order (row_order, from the glue), so the
// longest rows start first (LPT); Sputnik's row swizzle plays the same role.
//
// Column indices: 32-bit, or 16-bit (p.col16) when the glue has them (k <= 65536); each kernel is instantiated
// for both (index type I).
//
// Status: compiled with `nvcc -c` (sm_80, sm_90, and the default arch), never run on a GPU by its author; the
// GPU tests in tests/ops/test_csr_sparse24_cuda.py are what will tell whether it is right.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "csr_linear.h"

namespace pyprune {
namespace gpu {
namespace csr {
namespace {

constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kRowsWarps = 4;
constexpr int kMaxDecodeTokens = 64;
constexpr int kDecodeUnroll = 4;  // nonzeros per lane whose loads the decode kernel issues together
constexpr int kDecodeSmemCap = 96 * 1024;  // x tile in shared memory: leaves room for 2 blocks per SM on sm_90

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements loaded or stored as one vector: alignment = size, capped at 16 bytes
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// the column index array of the width I
template <typename I>
__device__ __forceinline__ const I* col_array(const CsrLinearParams& p);
template <>
__device__ __forceinline__ const int32_t* col_array<int32_t>(const CsrLinearParams& p) { return p.col; }
template <>
__device__ __forceinline__ const uint16_t* col_array<uint16_t>(const CsrLinearParams& p) { return p.col16; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// first r in [0, n) with crow[r] >= target, else n
__device__ __forceinline__ int64_t lower_bound(const int32_t* crow, int64_t n, int64_t target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(crow[mid]) < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename T, int MT, typename I>
__global__ void __launch_bounds__(kDecodeThreads) csr_linear_decode_kernel(const CsrLinearParams p, int vec_x) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [k][MT]
  __shared__ int64_t row_range[2];
  const T* x = static_cast<const T*>(p.x);
  const T* vals = static_cast<const T*>(p.values);
  const T* bias = static_cast<const T*>(p.bias);
  const I* col = col_array<I>(p);
  T* y = static_cast<T*>(p.y);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mt = static_cast<int>(p.m - m0 < MT ? p.m - m0 : MT);

  if (threadIdx.x == 0) {
    const int64_t nb = gridDim.x, b = blockIdx.x;
    const int64_t lo = p.nnz * b / nb, hi = p.nnz * (b + 1) / nb;
    row_range[0] = lower_bound(p.crow, p.n, lo);
    row_range[1] = b == nb - 1 ? p.n : lower_bound(p.crow, p.n, hi);
  }
  // stage x[m0 : m0 + MT, :] transposed; tokens past m are zero
  constexpr int kVec = 16 / sizeof(T);
  if (vec_x) {
    const int64_t kv = p.k / kVec;  // the launcher checked k % kVec == 0 and the alignment
    for (int64_t i = threadIdx.x; i < kv * MT; i += kDecodeThreads) {
      const int t = static_cast<int>(i / kv);
      const int64_t kk = (i - t * kv) * kVec;
      Pack<T, kVec> v;
      if (t < mt) {
        v = *reinterpret_cast<const Pack<T, kVec>*>(x + (m0 + t) * p.ldx + kk);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v.v[e] = from_f<T>(0.f);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) xs[(kk + e) * MT + t] = v.v[e];
    }
  } else {
    for (int64_t i = threadIdx.x; i < p.k * MT; i += kDecodeThreads) {
      const int t = static_cast<int>(i / p.k);
      const int64_t kk = i - t * p.k;
      xs[kk * MT + t] = t < mt ? x[(m0 + t) * p.ldx + kk] : from_f<T>(0.f);
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = row_range[0] + warp; r < row_range[1]; r += kDecodeWarps) {
    const int64_t start = p.crow[r], end = p.crow[r + 1];
    float acc[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] = 0.f;
    // kDecodeUnroll nonzeros per lane in flight: their index and value loads are all issued before the first
    // use (one pair at a time leaves a few KB in flight per SM, far from what hides the memory latency)
    int64_t j = start + lane;
    for (; j + 32 * (kDecodeUnroll - 1) < end; j += 32 * kDecodeUnroll) {
      int64_t c[kDecodeUnroll];
      float v[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        c[u] = col[j + 32 * u];
        v[u] = to_f(vals[j + 32 * u]);
      }
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const Pack<T, MT> xv = *reinterpret_cast<const Pack<T, MT>*>(xs + c[u] * MT);
#pragma unroll
        for (int t = 0; t < MT; ++t) acc[t] = fmaf(v[u], to_f(xv.v[t]), acc[t]);
      }
    }
    for (; j < end; j += 32) {
      const int64_t c = col[j];
      const float v = to_f(vals[j]);
      const Pack<T, MT> xv = *reinterpret_cast<const Pack<T, MT>*>(xs + c * MT);
#pragma unroll
      for (int t = 0; t < MT; ++t) acc[t] = fmaf(v, to_f(xv.v[t]), acc[t]);
    }
    const float b = bias != nullptr ? to_f(bias[r]) : 0.f;
    float mine = 0.f;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const float s = warp_sum(acc[t]);
      if (t == lane) mine = s;
    }
    if (lane < mt) y[(m0 + lane) * p.ldy + r] = from_f<T>(mine + b);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kRowsWarps * 32) csr_linear_rows_kernel(const CsrLinearParams p) {
  constexpr int kVec = 16 / sizeof(T);  // 4 fp32 (float4) or 8 fp16 / bf16 (4 x half2)
  const T* xt = static_cast<const T*>(p.xt);
  const T* vals = static_cast<const T*>(p.values);
  const T* bias = static_cast<const T*>(p.bias);
  const I* col = col_array<I>(p);
  T* y = static_cast<T*>(p.y);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp;
  if (slot >= p.n) return;
  const int64_t r = p.row_order != nullptr ? p.row_order[slot] : slot;
  const int64_t m_lane = static_cast<int64_t>(blockIdx.y) * (32 * kVec) + lane * kVec;
  const bool active = m_lane < p.ldxt;  // xt is zero-padded up to ldxt, a multiple of kVec
  const int64_t start = p.crow[r], end = p.crow[r + 1];
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
  for (int64_t j0 = start; j0 < end; j0 += 32) {
    const int64_t j = j0 + lane;
    const int32_t my_c = j < end ? static_cast<int32_t>(col[j]) : 0;
    const float my_v = j < end ? to_f(vals[j]) : 0.f;
    const int cnt = static_cast<int>(end - j0 < 32 ? end - j0 : 32);
#pragma unroll 4
    for (int q = 0; q < cnt; ++q) {
      const int64_t c = __shfl_sync(0xffffffffu, my_c, q);
      const float v = __shfl_sync(0xffffffffu, my_v, q);
      if (active) {
        const Pack<T, kVec> xv = *reinterpret_cast<const Pack<T, kVec>*>(xt + c * p.ldxt + m_lane);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = fmaf(v, to_f(xv.v[e]), acc[e]);
      }
    }
  }
  const float b = bias != nullptr ? to_f(bias[r]) : 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int64_t m = m_lane + e;
    if (m < p.m) y[m * p.ldy + r] = from_f<T>(acc[e] + b);
  }
}

int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

int decode_smem_limit(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    optin = 48 * 1024;
  }
  optin -= static_cast<int>(2 * sizeof(int64_t));  // the kernel's static shared memory (row_range)
  return optin < kDecodeSmemCap ? optin : kDecodeSmemCap;
}

template <typename T, int MT, typename I>
const char* launch_decode(const CsrLinearParams& p, int device, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.k) * MT * sizeof(T);
  auto kernel = csr_linear_decode_kernel<T, MT, I>;
  // the same limit on every call (smem <= it, see csr_linear_decode_tokens): the attribute is shared by every
  // host thread, and a limit set to this call's smem could drop under another thread's larger launch
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, decode_smem_limit(device)) !=
      cudaSuccess) {
    return cudaGetErrorString(cudaGetLastError());
  }
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDecodeThreads, smem);
  if (sms <= 0) sms = 1;
  if (per_sm <= 0) per_sm = 1;
  const int64_t tiles = (p.m + MT - 1) / MT;
  // enough blocks to fill the GPU once, but no more than one warp per row: each block restages x
  int64_t bx = (static_cast<int64_t>(sms) * per_sm + tiles - 1) / tiles;
  const int64_t by_rows = (p.n + kDecodeWarps - 1) / kDecodeWarps;
  if (bx > by_rows) bx = by_rows;
  if (bx < 1) bx = 1;
  if (tiles > 65535) return "csr_linear decode: too many token tiles";
  constexpr int kVec = 16 / sizeof(T);
  const int vec_x = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (p.ldx % kVec == 0) && (p.k % kVec == 0);
  kernel<<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(tiles)), kDecodeThreads, smem, stream>>>(p, vec_x);
  return nullptr;
}

template <typename T, typename I>
const char* launch_t(const CsrLinearParams& p, int device, Path path, cudaStream_t stream) {
  const int mt = csr_linear_decode_tokens(p.m, p.k, p.dtype, device, path);
  switch (mt) {
    case 1:
      return launch_decode<T, 1, I>(p, device, stream);
    case 2:
      return launch_decode<T, 2, I>(p, device, stream);
    case 4:
      return launch_decode<T, 4, I>(p, device, stream);
    case 8:
      return launch_decode<T, 8, I>(p, device, stream);
    default:
      break;
  }
  constexpr int kVec = 16 / sizeof(T);
  // with k = 0 there are no nonzeros (columns lie in [0, k)) and xt, of 0 bytes, may be null: y is the bias
  if (p.k > 0 && (p.xt == nullptr || p.ldxt % kVec != 0 || p.ldxt < p.m ||
                  reinterpret_cast<uintptr_t>(p.xt) % 16 != 0)) {
    return "csr_linear rows path: xt must be given, 16-byte aligned, with ldxt >= m a multiple of 16 bytes";
  }
  const int64_t tiles = (p.ldxt + 32 * kVec - 1) / (32 * kVec);
  const int64_t bx = (p.n + kRowsWarps - 1) / kRowsWarps;
  if (tiles > 65535 || bx > 0x7fffffff) return "csr_linear rows path: grid too large";
  csr_linear_rows_kernel<T, I>
      <<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(tiles)), kRowsWarps * 32, 0, stream>>>(p);
  return nullptr;
}

}  // namespace

int csr_linear_decode_tokens(int64_t m, int64_t k, DType dtype, int device, Path path) {
  if (path == Path::kRows || (path == Path::kAuto && m > kMaxDecodeTokens) || m <= 0) return 0;
  const int64_t limit = decode_smem_limit(device);
  int mt = 8;
  while (mt > 1 && mt / 2 >= m) mt /= 2;  // no wider than the token count needs
  while (mt >= 1 && k * mt * elem_size(dtype) > limit) mt /= 2;
  return mt;  // 0 when even one token's row of x does not fit
}

const char* csr_linear_cuda_launch(const CsrLinearParams& p, int device, Path path, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.nnz < 0) return "negative size";
  if (p.m == 0 || p.n == 0) return nullptr;
  if (p.crow == nullptr || p.y == nullptr || (p.nnz > 0 && (p.col == nullptr || p.values == nullptr))) {
    return "null pointer";
  }
  if (p.k > 0x7fffffff) return "in_features must be < 2**31 (int32 column indices)";
  if (p.col16 != nullptr && p.k > 65536) return "16-bit column indices need in_features <= 65536";
  const bool narrow = p.col16 != nullptr;
  const char* err = nullptr;
  switch (p.dtype) {
    case DType::kFloat32:
      err = narrow ? launch_t<float, uint16_t>(p, device, path, stream)
                   : launch_t<float, int32_t>(p, device, path, stream);
      break;
    case DType::kFloat16:
      err = narrow ? launch_t<__half, uint16_t>(p, device, path, stream)
                   : launch_t<__half, int32_t>(p, device, path, stream);
      break;
    case DType::kBFloat16:
      err = narrow ? launch_t<__nv_bfloat16, uint16_t>(p, device, path, stream)
                   : launch_t<__nv_bfloat16, int32_t>(p, device, path, stream);
      break;
    default:
      return "dtype must be float32, float16 or bfloat16";
  }
  if (err != nullptr) return err;
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace csr
}  // namespace gpu
}  // namespace pyprune
