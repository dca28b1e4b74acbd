// The 2:4 panels that pyprune::sparse24_linear and sparse24_conv2d share: y (M tokens x N) = x W^T + b with W
// (N x K) 2:4 sparse along K.
//
// Storage (k-major so that 16 consecutive outputs are one vector load): values (K4/2, N): rows 2g and 2g+1
// hold the two kept weights of group g (inputs 4g..4g+3); meta (K4/8, N) uint8: the byte of group pair p holds
// the in-group positions of group 2p in bits 0-1 and 2-3 and of group 2p+1 in bits 4-5 and 6-7 (2 bits per
// kept value, as in NVIDIA's 2:4 format). K4 is in_features rounded up to a multiple of 8; padding is zero.
//
// Kernel: vectors run over 16 outputs (8 on AVX2). The four inputs of a group are broadcast to every 128-bit
// lane and a per-lane permute (vpermilps, which reads only the low 2 bits of each index, so the meta byte
// needs no masking) picks each output's input: per group and token 2 FMAs instead of the dense 4. A token's
// inputs are either a row of x (linear) or, for the conv, 8-float runs of the NHWC input (x or its
// zero-bordered copy) at a per-token base plus a per-pair offset (S24Args::base / koff): the implicit GEMM, no
// patch matrix.
#pragma once
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "pyprune/token_tiles.h"

namespace pyprune {
namespace s24 {

constexpr int kMR = 8;          // tokens per register tile
constexpr int64_t kOutBlock = 64;  // outputs per parallel unit
constexpr int64_t kTokBlock = 64;  // tokens per parallel unit
// Group pairs (4 kept values each) summed in one chain before the chain is added into the output's total: the
// error of an fp32 sum in one chain grows with its length (see csr_linear's kFlush).
constexpr int64_t kFlushPairs = 64;

struct S24Args {
  const float* val;
  const uint8_t* meta;
  const float* bias;
  int64_t M, K4, N;
  // Implicit GEMM (sparse24_conv2d): token m's group pair p is read at x + base[m] + koff[p] (8 floats in one
  // run) instead of x + m * K4 + 8 * p. Both null for the linear op.
  const int64_t* base = nullptr;
  const int64_t* koff = nullptr;
  // sparse24_conv2d's epilogue, after the bias: plus res (laid out as y; null: none), then the ReLU (cap:
  // kNoRelu, +inf or its cap). plane: 0 for a (tokens, N) output (the linear op, channels_last convs); else
  // the pixels of one image of an NCHW output, token m = n * plane + q going to y[(n * N + o) * plane + q].
  const float* res = nullptr;
  float cap = kNoRelu;
  int64_t plane = 0;
};

// Where (token m, output o) lies in y (and in res).
PYPRUNE_INLINE int64_t out_offset(const S24Args& a, int64_t m, int64_t o) {
  return a.plane ? ((m / a.plane) * a.N + o) * a.plane + m % a.plane : m * a.N + o;
}

// y at (token m, output o) = the epilogue of sum + bias.
PYPRUNE_INLINE void store_one(const S24Args& a, float* y, int64_t m, int64_t o, float sum) {
  const int64_t at = out_offset(a, m, o);
  y[at] = epilogue1(sum + (a.bias ? a.bias[o] : 0.f), a.res ? a.res + at : nullptr, a.cap);
}

// Tokens [m0, m1) x outputs [o0, o0 + no) from total (ldt floats a token, output o0 first), one at a time.
inline void store_scalar(const S24Args& a, const float* total, int64_t ldt, int64_t m0, int64_t m1, int64_t o0,
                         int64_t no, float* y) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < no; ++j) store_one(a, y, m, o0 + j, total[(m - m0) * ldt + j]);
}

// Where token m's inputs 8p .. 8p + 7 start.
inline const float* pair_inputs(const S24Args& a, const float* x, int64_t m, int64_t p) {
  return a.koff ? x + a.base[m] + a.koff[p] : x + m * a.K4 + 8 * p;
}

// Plain loops: the baseline ISA and the outputs past the last full vector.
inline void scalar_outputs(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0, int64_t o1,
                           float* y) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t o = o0; o < o1; ++o) {
      float total = 0.f;
      for (int64_t c = 0; c < a.K4 / 8; c += kFlushPairs) {
        float acc = 0.f;
        for (int64_t p = c; p < std::min(a.K4 / 8, c + kFlushPairs); ++p) {
          const unsigned mb = a.meta[p * a.N + o];
          const float* v = a.val + 4 * p * a.N + o;
          const float* xr = pair_inputs(a, x, m, p);
          acc += v[0] * xr[mb & 3] + v[a.N] * xr[(mb >> 2) & 3] + v[2 * a.N] * xr[4 + ((mb >> 4) & 3)] +
                 v[3 * a.N] * xr[4 + (mb >> 6)];
        }
        total += acc;
      }
      store_one(a, y, m, o, total);
    }
  }
}

#if PYPRUNE_X86
// Group pairs [p0, p1) of MR tokens from m0 for 16 outputs from o0, added into tot (MR x 16).
template <int MR, bool CONV>
PYPRUNE_TARGET_AVX512 void chunk_avx512(const S24Args& a, const float* x, int64_t m0, int64_t o0, __mmask16 k,
                                        int64_t p0, int64_t p1, float* tot) {
  __m512 acc[MR];
  const float* xm[MR];  // CONV: each token's first input, its pairs koff[p] further
  if (CONV)
    for (int m = 0; m < MR; ++m) xm[m] = x + a.base[m0 + m];
  const int64_t N = a.N;
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const __m512i mb = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, a.meta + p * N + o0));
    const __m512i i1 = _mm512_srli_epi32(mb, 2), i2 = _mm512_srli_epi32(mb, 4), i3 = _mm512_srli_epi32(mb, 6);
    const float* v = a.val + 4 * p * N + o0;
    const __m512 v0 = _mm512_maskz_loadu_ps(k, v), v1 = _mm512_maskz_loadu_ps(k, v + N);
    const __m512 v2 = _mm512_maskz_loadu_ps(k, v + 2 * N), v3 = _mm512_maskz_loadu_ps(k, v + 3 * N);
    const int64_t kp = CONV ? a.koff[p] : 0;
    for (int m = 0; m < MR; ++m) {
      const float* xr = CONV ? xm[m] + kp : x + (m0 + m) * a.K4 + 8 * p;
      const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(xr));
      const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xr + 4));
      acc[m] = _mm512_fmadd_ps(v0, _mm512_permutevar_ps(xa, mb), acc[m]);
      acc[m] = _mm512_fmadd_ps(v1, _mm512_permutevar_ps(xa, i1), acc[m]);
      acc[m] = _mm512_fmadd_ps(v2, _mm512_permutevar_ps(xb, i2), acc[m]);
      acc[m] = _mm512_fmadd_ps(v3, _mm512_permutevar_ps(xb, i3), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    _mm512_store_ps(tot + 16 * m, _mm512_add_ps(_mm512_load_ps(tot + 16 * m), acc[m]));
}

// Tokens [m0, m1) x the 16 outputs from o0 (lanes k) of total (16 floats a token) into y, bias and epilogue
// applied. A (tokens, N) output takes one masked vector a token; an NCHW output (plane > 0) turns whole 16 x 16
// blocks of one image through transpose16 into 16-pixel runs of each output's plane, and the rest one by one.
PYPRUNE_TARGET_AVX512 PYPRUNE_INLINE void store_avx512(const S24Args& a, const float* total, int64_t m0,
                                                       int64_t m1, int64_t o0, __mmask16 k, float* y) {
  const __m512 b = a.bias ? _mm512_maskz_loadu_ps(k, a.bias + o0) : _mm512_setzero_ps();
  const bool relu = a.cap != kNoRelu;
  const __m512 zero = _mm512_setzero_ps(), cap = _mm512_set1_ps(relu ? a.cap : 0.f);
  if (a.plane == 0) {
    for (int64_t m = m0; m < m1; ++m) {
      __m512 v = _mm512_add_ps(_mm512_load_ps(total + 16 * (m - m0)), b);
      if (a.res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, a.res + m * a.N + o0));
      if (relu) v = _mm512_min_ps(cap, _mm512_max_ps(zero, v));  // NaN (the second operand) stays NaN
      _mm512_mask_storeu_ps(y + m * a.N + o0, k, v);
    }
    return;
  }
  const int64_t no = std::min<int64_t>(16, a.N - o0);
  int64_t m = m0;
  while (m < m1) {
    const int64_t q = m % a.plane, run = std::min(m1 - m, a.plane - q);  // tokens left in m's image
    int64_t j = 0;
    if (no == 16) {
      const int64_t n = m / a.plane;
      for (; j + 16 <= run; j += 16) {
        VecAvx512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = load16<VecAvx512>(total + 16 * (m - m0 + j + i));
        transpose16(r);  // r[i]: output o0 + i over the 16 tokens
        for (int i = 0; i < 16; ++i) {
          const int64_t at = (n * a.N + o0 + i) * a.plane + q + j;
          store16(y + at, epilogue16(r[i] + (a.bias ? a.bias[o0 + i] : 0.f), a.res ? a.res + at : nullptr, a.cap));
        }
      }
    }
    store_scalar(a, total + 16 * (m - m0 + j), 16, m + j, m + run, o0, no, y);
    m += run;
  }
}

// Group pairs [p0, p1) of tokens [m0, m1), 8 at a time, into total + 16 * (m - m0). (A function, not a
// lambda: a lambda does not inherit the caller's target ISA.)
template <bool CONV>
PYPRUNE_TARGET_AVX512 PYPRUNE_INLINE void tokens_avx512(const S24Args& a, const float* x, int64_t m0, int64_t m1,
                                                        int64_t o0, __mmask16 k, int64_t p0, int64_t p1,
                                                        float* total) {
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) chunk_avx512<kMR, CONV>(a, x, m, o0, k, p0, p1, total + 16 * (m - m0));
  for (; m < m1; ++m) chunk_avx512<1, CONV>(a, x, m, o0, k, p0, p1, total + 16 * (m - m0));
}

// Tokens [m0, m1) x outputs [o0, o1), kTokBlock tokens and 16 outputs at a time, their sums in `total`. Each
// kFlushPairs chunk of a 16-output weight column (17 KiB with its metadata) runs for every token panel before
// the next chunk, so it is read from L1 by all of them (each panel walking all of K re-read a column of up to
// 600 KiB from L2 per 8 tokens). Measured against that order, in one process (2 threads, Xeon VM, the sums
// bit for bit the same): 2:4 512->512 3x3 @7 convs 1.63-1.67x faster, 128 x 3072 -> 768 and 128 x 768 -> 3072
// linears 1.13-1.20x, ResNet-50's other 3x3 convs and 768 -> 768 0.95-0.99x.
template <bool CONV>
PYPRUNE_TARGET_AVX512 void panels_avx512(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0,
                                         int64_t o1, float* y) {
  alignas(64) float total[kTokBlock * 16];
  const int64_t pairs = a.K4 / 8;
  for (int64_t mb = m0; mb < m1; mb += kTokBlock) {
    const int64_t me = std::min(m1, mb + kTokBlock);
    for (int64_t o = o0; o < o1; o += 16) {
      const __mmask16 k = static_cast<__mmask16>(o1 - o >= 16 ? 0xFFFFu : (1u << (o1 - o)) - 1u);
      std::fill(total, total + (me - mb) * 16, 0.f);
      for (int64_t c = 0; c < pairs; c += kFlushPairs)
        tokens_avx512<CONV>(a, x, mb, me, o, k, c, std::min(pairs, c + kFlushPairs), total);
      store_avx512(a, total, mb, me, o, k, y);
    }
  }
}

PYPRUNE_TARGET_AVX512 inline void block_avx512(const S24Args& a, const float* x, int64_t m0, int64_t m1,
                                               int64_t o0, int64_t o1, float* y) {
  if (a.koff) return panels_avx512<true>(a, x, m0, m1, o0, o1, y);
  panels_avx512<false>(a, x, m0, m1, o0, o1, y);
}

// AVX2: the same chunks and order as the AVX-512 kernel above, over 8 outputs.
template <int MR, bool CONV>
PYPRUNE_TARGET_AVX2 void chunk_avx2(const S24Args& a, const float* x, int64_t m0, int64_t o0, int64_t p0,
                                    int64_t p1, float* tot) {
  __m256 acc[MR];
  const float* xm[MR];  // CONV: each token's first input, its pairs koff[p] further
  if (CONV)
    for (int m = 0; m < MR; ++m) xm[m] = x + a.base[m0 + m];
  const int64_t N = a.N;
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const __m256i mb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.meta + p * N + o0)));
    const __m256i i1 = _mm256_srli_epi32(mb, 2), i2 = _mm256_srli_epi32(mb, 4), i3 = _mm256_srli_epi32(mb, 6);
    const float* v = a.val + 4 * p * N + o0;
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + N);
    const __m256 v2 = _mm256_loadu_ps(v + 2 * N), v3 = _mm256_loadu_ps(v + 3 * N);
    const int64_t kp = CONV ? a.koff[p] : 0;
    for (int m = 0; m < MR; ++m) {
      const float* xr = CONV ? xm[m] + kp : x + (m0 + m) * a.K4 + 8 * p;
      const __m256 xa = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr));
      const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr + 4));
      acc[m] = _mm256_fmadd_ps(v0, _mm256_permutevar_ps(xa, mb), acc[m]);
      acc[m] = _mm256_fmadd_ps(v1, _mm256_permutevar_ps(xa, i1), acc[m]);
      acc[m] = _mm256_fmadd_ps(v2, _mm256_permutevar_ps(xb, i2), acc[m]);
      acc[m] = _mm256_fmadd_ps(v3, _mm256_permutevar_ps(xb, i3), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_store_ps(tot + 8 * m, _mm256_add_ps(_mm256_load_ps(tot + 8 * m), acc[m]));
}

template <bool CONV>
PYPRUNE_TARGET_AVX2 PYPRUNE_INLINE void tokens_avx2(const S24Args& a, const float* x, int64_t m0, int64_t m1,
                                                    int64_t o0, int64_t p0, int64_t p1, float* total) {
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) chunk_avx2<kMR, CONV>(a, x, m, o0, p0, p1, total + 8 * (m - m0));
  for (; m < m1; ++m) chunk_avx2<1, CONV>(a, x, m, o0, p0, p1, total + 8 * (m - m0));
}

template <bool CONV>
PYPRUNE_TARGET_AVX2 void panels_avx2(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0,
                                     int64_t o1, float* y) {
  alignas(32) float total[kTokBlock * 8];
  const int64_t pairs = a.K4 / 8;
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    for (int64_t mb = m0; mb < m1; mb += kTokBlock) {
      const int64_t me = std::min(m1, mb + kTokBlock);
      std::fill(total, total + (me - mb) * 8, 0.f);
      for (int64_t c = 0; c < pairs; c += kFlushPairs)
        tokens_avx2<CONV>(a, x, mb, me, o, c, std::min(pairs, c + kFlushPairs), total);
      if (a.plane || a.res || a.cap != kNoRelu) {  // the conv's epilogue or NCHW output: one at a time
        store_scalar(a, total, 8, mb, me, o, 8, y);
        continue;
      }
      const __m256 b = a.bias ? _mm256_loadu_ps(a.bias + o) : _mm256_setzero_ps();
      for (int64_t m = mb; m < me; ++m)
        _mm256_storeu_ps(y + m * a.N + o, _mm256_add_ps(_mm256_load_ps(total + 8 * (m - mb)), b));
    }
  }
  scalar_outputs(a, x, m0, m1, o, o1, y);
}

PYPRUNE_TARGET_AVX2 inline void block_avx2(const S24Args& a, const float* x, int64_t m0, int64_t m1,
                                           int64_t o0, int64_t o1, float* y) {
  if (a.koff) return panels_avx2<true>(a, x, m0, m1, o0, o1, y);
  panels_avx2<false>(a, x, m0, m1, o0, o1, y);
}
#endif

using BlockFn = void (*)(const S24Args&, const float*, int64_t, int64_t, int64_t, int64_t, float*);

inline BlockFn pick_block(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return block_avx512;
  if (isa == Isa::kAvx2) return block_avx2;
#endif
  (void)isa;
  return [](const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0, int64_t o1, float* y) {
    scalar_outputs(a, x, m0, m1, o0, o1, y);
  };
}

// y (M x N) for every token and output: units of kTokBlock tokens x kOutBlock outputs over the threads.
inline void run_panels(const S24Args& a, const float* x, float* y) {
  const BlockFn fn = pick_block(kernel_isa());
  const int64_t n_ob = (a.N + kOutBlock - 1) / kOutBlock, n_tb = (a.M + kTokBlock - 1) / kTokBlock;
  at::parallel_for(0, n_ob * n_tb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ob = u / n_tb, tb = u % n_tb;
      fn(a, x, tb * kTokBlock, std::min(a.M, (tb + 1) * kTokBlock), ob * kOutBlock,
         std::min(a.N, (ob + 1) * kOutBlock), y);
    }
  });
}

// The dense (N, K) matrix of a 2:4 weight, for the dense fallbacks (float64 for gradcheck, fp16, bf16): each
// kept value's column is its group's first input plus its 2-bit position from the metadata.
inline at::Tensor sparse24_dense_matrix(const at::Tensor& values, const at::Tensor& meta, int64_t N, int64_t K) {
  const int64_t K4 = round_up(K, 8);
  const at::Tensor shifts = at::arange(0, 8, 2, meta.options().dtype(at::kInt));
  const at::Tensor pos = meta.to(at::kInt).unsqueeze(1).bitwise_right_shift(shifts.view({1, 4, 1})).bitwise_and(3);
  const at::Tensor cols = pos.reshape({K4 / 2, N}) +
                          at::arange(K4 / 2, pos.options()).floor_divide(2).mul(4).unsqueeze(1);
  return at::zeros({N, K4}, values.options()).scatter_add_(1, cols.t().to(at::kLong), values.t()).slice(1, 0, K);
}

}  // namespace s24
}  // namespace pyprune
