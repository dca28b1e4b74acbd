// CUDA channel-pruned conv2d: y[:, out_index] = relu?(conv2d(x[:, in_index], w) + bias), an implicit GEMM.
//
// GEMM view per group g: rows = N * OH * OW output pixels, columns = the group's kept output channels, reduction
// K = cin_g * kh * kw. A block computes a 64 x 64 output tile: each K step gathers a 64 x 32 tile of the
// implicit im2col matrix straight from x (the input channel read through in_index, padding by the bounds test;
// no compacted copy of x) and a 64 x 32 tile of w into shared memory, the loads for step k+1 issued before the
// math of step k. fp16 / bf16 multiply on tensor cores through WMMA 16x16x16 (4 warps, 32 x 32 each) with fp32
// accumulation; fp32 multiplies on CUDA cores (4 x 8 outputs a thread), no TF32. The accumulator tile goes
// through shared memory to an epilogue that adds the bias, applies the ReLU and scatters the output channels
// through out_index, rounding once to the output dtype. Depthwise-like convs (one input channel per group) take
// a direct kernel: a GEMM tile would be mostly padding.
//
// K order follows x's layout so that neighbouring K elements are neighbours in memory: (c, r, s) for NCHW,
// (r, s, c) for channels_last; the glue hands w in the matching memory format. Offsets are int64.
//
// Status: compiled with `nvcc -c` (sm_80, sm_90, and the default arch), never run on a GPU by its author; the
// GPU tests in tests/ops/test_pruned_conv2d_triton.py (backend "cuda") are what will tell whether it is right.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "pruned_conv2d.h"

namespace pyprune {
namespace gpu {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kLds = kBK + 8;  // smem row of A / B: 80 bytes in fp16, a multiple of 16 as WMMA's ldm needs
constexpr int kLdc = kBN + 4;  // fp32 accumulator row
constexpr int kRowInvalid = -(1 << 30);  // ih0 of rows past M: every bounds test fails

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

// bf16 WMMA exists from sm_80; fp16 from sm_70. Compiling for an older arch leaves a trap (never launched: the
// launcher refuses bf16 below compute capability 8.0).
template <typename T>
struct HasWmma : std::integral_constant<bool, !std::is_same<T, float>::value> {};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <>
struct HasWmma<__nv_bfloat16> : std::false_type {};
#endif

// K index -> (input channel inside the group, kernel row, kernel column)
template <bool kXMajor>
__device__ __forceinline__ void decode_k(int k, int cin_g, int kh, int kw, int& c, int& r, int& s) {
  int rs;
  if (kXMajor) {  // NCHW: (c, r, s)
    c = k / (kh * kw);
    rs = k - c * (kh * kw);
  } else {  // channels_last: (r, s, c)
    rs = k / cin_g;
    c = k - rs * cin_g;
  }
  r = rs / kw;
  s = rs - r * kw;
}

template <typename T, bool kXMajor, bool kYMajor>
__global__ void __launch_bounds__(kThreads) pruned_conv2d_gemm_kernel(const PrunedConv2dParams p) {
  constexpr int kAbBytes = (kBM + kBN) * kLds * sizeof(T);
  constexpr int kCBytes = kBM * kLdc * sizeof(float);
  __shared__ __align__(128) unsigned char smem[kAbBytes > kCBytes ? kAbBytes : kCBytes];
  __shared__ long long row_x[kBM], row_y[kBM];
  __shared__ int row_ih[kBM], row_iw[kBM];
  T* As = reinterpret_cast<T*>(smem);  // [kBM][kLds], K contiguous
  T* Bs = As + kBM * kLds;             // [kBN][kLds], K contiguous
  float* Cs = reinterpret_cast<float*>(smem);  // [kBM][kLdc], reuses A / B after the main loop

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int tid = threadIdx.x;
  const long long ohw = p.out_h * p.out_w;
  const long long M = p.batch * ohw;
  const int cin_g = static_cast<int>(p.cin_g), cout_g = static_cast<int>(p.cout_g);
  const int K = cin_g * p.kh * p.kw;
  const long long n_ntiles = (cout_g + kBN - 1) / kBN;
  const long long n_mtiles = (M + kBM - 1) / kBM;
  const long long pid = blockIdx.x;
  const int g = static_cast<int>(pid / (n_mtiles * n_ntiles));
  const long long rest = pid % (n_mtiles * n_ntiles);
  const long long m0 = (rest / n_ntiles) * kBM;
  const int n0 = static_cast<int>(rest % n_ntiles) * kBN;

  for (int i = tid; i < kBM; i += kThreads) {
    const long long m = m0 + i;
    if (m < M) {
      const long long img = m / ohw, pix = m - img * ohw;
      const long long oh = pix / p.out_w, ow = pix - oh * p.out_w;
      const int ih0 = static_cast<int>(oh * p.stride_h - p.pad_h);
      const int iw0 = static_cast<int>(ow * p.stride_w - p.pad_w);
      row_ih[i] = ih0;
      row_iw[i] = iw0;
      row_x[i] = img * p.sx[0] + static_cast<long long>(ih0) * p.sx[2] + static_cast<long long>(iw0) * p.sx[3];
      row_y[i] = img * p.sy[0] + oh * p.sy[2] + ow * p.sy[3];
    } else {
      row_ih[i] = kRowInvalid;
      row_iw[i] = kRowInvalid;
      row_x[i] = 0;
      row_y[i] = 0;
    }
  }
  __syncthreads();

  constexpr int kAPer = kBM * kBK / kThreads, kBPer = kBN * kBK / kThreads;
  T a_reg[kAPer], b_reg[kBPer];
  const T zero = from_f<T>(0.f);

  auto load_tiles = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int e = tid + i * kThreads;
      // threads run along x's contiguous dimension: pixels in NCHW, channels in channels_last
      const int mi = kXMajor ? e % kBM : e / kBK;
      const int ki = kXMajor ? e / kBM : e % kBK;
      const int k = k0 + ki;
      T v = zero;
      if (k < K) {
        int c, r, s;
        decode_k<kXMajor>(k, cin_g, p.kh, p.kw, c, r, s);
        const int ih = row_ih[mi] + r * p.dil_h, iw = row_iw[mi] + s * p.dil_w;
        if (ih >= 0 && ih < p.height && iw >= 0 && iw < p.width) {
          long long chan = static_cast<long long>(g) * cin_g + c;
          if (p.in_index != nullptr) chan = p.in_index[chan];
          v = x[row_x[mi] + chan * p.sx[1] + static_cast<long long>(r * p.dil_h) * p.sx[2] +
                static_cast<long long>(s * p.dil_w) * p.sx[3]];
        }
      }
      a_reg[i] = v;
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int e = tid + i * kThreads;
      const int ni = e / kBK, ki = e % kBK;  // w is K-contiguous in the layout the glue picked
      const int k = k0 + ki, n = n0 + ni;
      T v = zero;
      if (k < K && n < cout_g) {
        int c, r, s;
        decode_k<kXMajor>(k, cin_g, p.kh, p.kw, c, r, s);
        const long long co = static_cast<long long>(g) * cout_g + n;
        v = w[co * p.sw[0] + c * p.sw[1] + r * p.sw[2] + s * p.sw[3]];
      }
      b_reg[i] = v;
    }
  };
  auto store_tiles = [&]() {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int e = tid + i * kThreads;
      const int mi = kXMajor ? e % kBM : e / kBK;
      const int ki = kXMajor ? e / kBM : e % kBK;
      As[mi * kLds + ki] = a_reg[i];
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int e = tid + i * kThreads;
      Bs[(e / kBK) * kLds + e % kBK] = b_reg[i];
    }
  };

  const int nk = (K + kBK - 1) / kBK;
  if constexpr (HasWmma<T>::value) {
    using namespace nvcuda;
    const int warp = tid / 32, wm = (warp % 2) * 32, wn = (warp / 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    if (nk > 0) load_tiles(0);
    for (int kt = 0; kt < nk; ++kt) {
      store_tiles();
      __syncthreads();
      if (kt + 1 < nk) load_tiles((kt + 1) * kBK);  // in flight during the MMAs below
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm + i * 16) * kLds + kk, kLds);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn + j * 16) * kLds + kk, kLds);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm + i * 16) * kLdc + wn + j * 16, acc[i][j], kLdc, wmma::mem_row_major);
  } else if constexpr (std::is_same<T, float>::value) {
    const int tm = (tid % 16) * 4, tn = (tid / 16) * 8;
    float acc[4][8] = {};
    if (nk > 0) load_tiles(0);
    for (int kt = 0; kt < nk; ++kt) {
      store_tiles();
      __syncthreads();
      if (kt + 1 < nk) load_tiles((kt + 1) * kBK);
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[(tm + i) * kLds + kk];
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = Bs[(tn + j) * kLds + kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Cs[(tm + i) * kLdc + tn + j] = acc[i][j];
  } else {
    __trap();  // bf16 below sm_80
  }
  __syncthreads();

  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    // threads run along y's contiguous dimension: pixels in NCHW, channels in channels_last
    const int mi = kYMajor ? e % kBM : e / kBN;
    const int ni = kYMajor ? e / kBM : e % kBN;
    const int n = n0 + ni;
    if (m0 + mi >= M || n >= cout_g) continue;
    const long long co = static_cast<long long>(g) * cout_g + n;
    float v = Cs[mi * kLdc + ni];
    if (bias != nullptr) v += to_f(bias[co]);
    if (p.relu && v < 0.f) v = 0.f;  // keeps NaN, as F.relu does (fmaxf does not)
    const long long oc = p.out_index != nullptr ? p.out_index[co] : co;
    y[row_y[mi] + oc * p.sy[1]] = from_f<T>(v);
  }
}

// One input channel per group (depthwise and its channel multipliers): one thread per output element.
template <typename T, bool kYMajor>
__global__ void __launch_bounds__(256) pruned_conv2d_dw_kernel(const PrunedConv2dParams p) {
  const long long ohw = p.out_h * p.out_w;
  const long long M = p.batch * ohw;
  const long long c_out = p.cout_g * p.groups;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * c_out) return;
  const long long m = kYMajor ? idx % M : idx / c_out;
  const long long co = kYMajor ? idx / M : idx % c_out;
  const long long img = m / ohw, pix = m - img * ohw;
  const long long oh = pix / p.out_w, ow = pix - oh * p.out_w;
  const long long g = co / p.cout_g;
  const long long chan = p.in_index != nullptr ? p.in_index[g] : g;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const long long xbase = img * p.sx[0] + chan * p.sx[1];
  float acc = 0.f;
  for (int r = 0; r < p.kh; ++r) {
    const long long ih = oh * p.stride_h - p.pad_h + static_cast<long long>(r) * p.dil_h;
    if (ih < 0 || ih >= p.height) continue;
    for (int s = 0; s < p.kw; ++s) {
      const long long iw = ow * p.stride_w - p.pad_w + static_cast<long long>(s) * p.dil_w;
      if (iw < 0 || iw >= p.width) continue;
      acc += to_f(x[xbase + ih * p.sx[2] + iw * p.sx[3]]) * to_f(w[co * p.sw[0] + r * p.sw[2] + s * p.sw[3]]);
    }
  }
  if (p.bias != nullptr) acc += to_f(static_cast<const T*>(p.bias)[co]);
  if (p.relu && acc < 0.f) acc = 0.f;
  const long long oc = p.out_index != nullptr ? p.out_index[co] : co;
  static_cast<T*>(p.y)[img * p.sy[0] + oc * p.sy[1] + oh * p.sy[2] + ow * p.sy[3]] = from_f<T>(acc);
}

template <typename T>
const char* launch(const PrunedConv2dParams& p, cudaStream_t stream) {
  const long long M = p.batch * p.out_h * p.out_w;
  // x's (and y's) densest dimension: width in NCHW, channels in channels_last
  const bool x_major = p.sx[3] <= p.sx[1];
  const bool y_major = p.sy[3] <= p.sy[1];
  if (p.cin_g == 1) {
    const long long total = M * p.cout_g * p.groups;
    const long long blocks = (total + 255) / 256;
    if (blocks > INT_MAX) return "the output is too large for one launch";
    if (y_major)
      pruned_conv2d_dw_kernel<T, true><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
    else
      pruned_conv2d_dw_kernel<T, false><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  } else {
    const long long blocks = p.groups * ((M + kBM - 1) / kBM) * ((p.cout_g + kBN - 1) / kBN);
    if (blocks > INT_MAX) return "the output is too large for one launch";
    const dim3 grid(static_cast<unsigned>(blocks));
    if (x_major && y_major)
      pruned_conv2d_gemm_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(p);
    else if (x_major)
      pruned_conv2d_gemm_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(p);
    else if (y_major)
      pruned_conv2d_gemm_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(p);
    else
      pruned_conv2d_gemm_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* pruned_conv2d_cuda_launch(const PrunedConv2dParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.out_h <= 0 || p.out_w <= 0 || p.cin_g < 0 || p.cout_g < 0 || p.groups < 1 || p.kh < 1 ||
      p.kw < 1)
    return "invalid sizes";
  const long long M = p.batch * p.out_h * p.out_w;
  if (M == 0 || p.cout_g == 0) return nullptr;
  // the kernels index pixels, K and channels of a group in 32-bit
  if (M > INT_MAX || p.cin_g * p.kh * p.kw > INT_MAX || p.cout_g > INT_MAX || p.height > INT_MAX ||
      p.width > INT_MAX)
    return "a dimension passes 2**31 - 1";
  switch (p.dtype) {
    case DType::kFloat32:
      return launch<float>(p, stream);
    case DType::kFloat16:
      return launch<__half>(p, stream);
    case DType::kBFloat16: {
      int dev = 0, major = 0;
      if (cudaGetDevice(&dev) != cudaSuccess ||
          cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        return "could not query the device";
      if (major < 8) return "bfloat16 needs compute capability 8.0 or newer";
      return launch<__nv_bfloat16>(p, stream);
    }
  }
  return "unknown dtype";
}

}  // namespace gpu
}  // namespace pyprune
