// pyprune::sparse24_linear on the CPU: y = x W^T + b with W (N x K) 2:4 sparse along K.
//
// Storage (k-major so that 16 consecutive outputs are one vector load): values (K4/2, N): rows 2g and 2g+1
// hold the two kept weights of group g (inputs 4g..4g+3); meta (K4/8, N) uint8: the byte of group pair p holds
// the in-group positions of group 2p in bits 0-1 and 2-3 and of group 2p+1 in bits 4-5 and 6-7 (2 bits per
// kept value, as in NVIDIA's 2:4 format). K4 is in_features rounded up to a multiple of 8; padding is zero.
//
// Kernel: vectors run over 16 outputs (8 on AVX2). The four inputs of a group are broadcast to every 128-bit
// lane and a per-lane permute (vpermilps, which reads only the low 2 bits of each index, so the meta byte
// needs no masking) picks each output's input: per group and token 2 FMAs instead of the dense 4.
#include <immintrin.h>

#include "pyprune/linear.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

constexpr int kMR = 8;          // tokens per register tile
constexpr int64_t kOutBlock = 64;  // outputs per parallel unit
constexpr int64_t kTokBlock = 64;  // tokens per parallel unit
constexpr int64_t kDecodeMaxTokens = 4;
// Group pairs (4 kept values each) summed in one chain before the chain is added into the output's total: the
// error of an fp32 sum in one chain grows with its length (see csr_linear's kFlush).
constexpr int64_t kFlushPairs = 64;

struct S24Args {
  const float* val;
  const uint8_t* meta;
  const float* bias;
  int64_t M, K4, N;
};

// Plain loops: the baseline ISA and the outputs past the last full vector.
inline void scalar_outputs(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0, int64_t o1,
                           float* y) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * a.K4;
    for (int64_t o = o0; o < o1; ++o) {
      float total = 0.f;
      for (int64_t c = 0; c < a.K4 / 8; c += kFlushPairs) {
        float acc = 0.f;
        for (int64_t p = c; p < std::min(a.K4 / 8, c + kFlushPairs); ++p) {
          const unsigned mb = a.meta[p * a.N + o];
          const float* v = a.val + 4 * p * a.N + o;
          acc += v[0] * xr[8 * p + (mb & 3)] + v[a.N] * xr[8 * p + ((mb >> 2) & 3)] +
                 v[2 * a.N] * xr[8 * p + 4 + ((mb >> 4) & 3)] + v[3 * a.N] * xr[8 * p + 4 + (mb >> 6)];
        }
        total += acc;
      }
      y[m * a.N + o] = total + (a.bias ? a.bias[o] : 0.f);
    }
  }
}

#if PYPRUNE_X86
template <int MR>
PYPRUNE_TARGET_AVX512 void panel_avx512(const S24Args& a, const float* x, int64_t m0, int64_t o0, __mmask16 k,
                                        float* y) {
  __m512 acc[MR];
  alignas(64) float total[MR][16] = {};  // partial sums of kFlushPairs group pairs are added here
  const int64_t N = a.N, pairs = a.K4 / 8;
  for (int64_t c = 0; c < pairs; c += kFlushPairs) {
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t p = c; p < std::min(pairs, c + kFlushPairs); ++p) {
      const __m512i mb = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, a.meta + p * N + o0));
      const __m512i i1 = _mm512_srli_epi32(mb, 2), i2 = _mm512_srli_epi32(mb, 4), i3 = _mm512_srli_epi32(mb, 6);
      const float* v = a.val + 4 * p * N + o0;
      const __m512 v0 = _mm512_maskz_loadu_ps(k, v), v1 = _mm512_maskz_loadu_ps(k, v + N);
      const __m512 v2 = _mm512_maskz_loadu_ps(k, v + 2 * N), v3 = _mm512_maskz_loadu_ps(k, v + 3 * N);
      for (int m = 0; m < MR; ++m) {
        const float* xr = x + (m0 + m) * a.K4 + 8 * p;
        const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(xr));
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xr + 4));
        acc[m] = _mm512_fmadd_ps(v0, _mm512_permutevar_ps(xa, mb), acc[m]);
        acc[m] = _mm512_fmadd_ps(v1, _mm512_permutevar_ps(xa, i1), acc[m]);
        acc[m] = _mm512_fmadd_ps(v2, _mm512_permutevar_ps(xb, i2), acc[m]);
        acc[m] = _mm512_fmadd_ps(v3, _mm512_permutevar_ps(xb, i3), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) _mm512_store_ps(total[m], _mm512_add_ps(_mm512_load_ps(total[m]), acc[m]));
  }
  const __m512 b = a.bias ? _mm512_maskz_loadu_ps(k, a.bias + o0) : _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m)
    _mm512_mask_storeu_ps(y + (m0 + m) * N + o0, k, _mm512_add_ps(_mm512_load_ps(total[m]), b));
}

PYPRUNE_TARGET_AVX512 void block_avx512(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0,
                                        int64_t o1, float* y) {
  for (int64_t o = o0; o < o1; o += 16) {
    const __mmask16 k = static_cast<__mmask16>(o1 - o >= 16 ? 0xFFFFu : (1u << (o1 - o)) - 1u);
    int64_t m = m0;
    for (; m + kMR <= m1; m += kMR) panel_avx512<kMR>(a, x, m, o, k, y);
    for (; m < m1; ++m) panel_avx512<1>(a, x, m, o, k, y);
  }
}

template <int MR>
PYPRUNE_TARGET_AVX2 void panel_avx2(const S24Args& a, const float* x, int64_t m0, int64_t o0, float* y) {
  __m256 acc[MR];
  alignas(32) float total[MR][8] = {};  // partial sums of kFlushPairs group pairs are added here
  const int64_t N = a.N, pairs = a.K4 / 8;
  for (int64_t c = 0; c < pairs; c += kFlushPairs) {
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t p = c; p < std::min(pairs, c + kFlushPairs); ++p) {
      const __m256i mb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.meta + p * N + o0)));
      const __m256i i1 = _mm256_srli_epi32(mb, 2), i2 = _mm256_srli_epi32(mb, 4), i3 = _mm256_srli_epi32(mb, 6);
      const float* v = a.val + 4 * p * N + o0;
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + N);
      const __m256 v2 = _mm256_loadu_ps(v + 2 * N), v3 = _mm256_loadu_ps(v + 3 * N);
      for (int m = 0; m < MR; ++m) {
        const float* xr = x + (m0 + m) * a.K4 + 8 * p;
        const __m256 xa = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr));
        const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr + 4));
        acc[m] = _mm256_fmadd_ps(v0, _mm256_permutevar_ps(xa, mb), acc[m]);
        acc[m] = _mm256_fmadd_ps(v1, _mm256_permutevar_ps(xa, i1), acc[m]);
        acc[m] = _mm256_fmadd_ps(v2, _mm256_permutevar_ps(xb, i2), acc[m]);
        acc[m] = _mm256_fmadd_ps(v3, _mm256_permutevar_ps(xb, i3), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) _mm256_store_ps(total[m], _mm256_add_ps(_mm256_load_ps(total[m]), acc[m]));
  }
  const __m256 b = a.bias ? _mm256_loadu_ps(a.bias + o0) : _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(y + (m0 + m) * N + o0, _mm256_add_ps(_mm256_load_ps(total[m]), b));
}

// Decoding (few tokens): bound by the weight bytes, so the values are streamed row by row, each row contiguous
// over all N outputs, into a per-thread accumulator acc (MT x N, L1/L2) over a range of group pairs; the
// threads' partial sums are added at the end. (The panel kernel above walks each 16-output column panel
// down all of K instead: 64-byte reads at a 4N-byte stride that starve the prefetchers.)
template <int MT>
PYPRUNE_TARGET_AVX512 void decode_avx512(const S24Args& a, const float* x, int64_t p0, int64_t p1, float* acc) {
  const int64_t N = a.N;
  for (int64_t p = p0; p < p1; ++p) {
    __m512 xa[MT], xb[MT];
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * a.K4 + 8 * p));
      xb[m] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * a.K4 + 8 * p + 4));
    }
    const float* v = a.val + 4 * p * N;
    const uint8_t* mp = a.meta + p * N;
    for (int64_t o = 0; o < N; o += 16) {
      const __mmask16 k = static_cast<__mmask16>(N - o >= 16 ? 0xFFFFu : (1u << (N - o)) - 1u);
      const __m512i mb = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, mp + o));
      const __m512i i1 = _mm512_srli_epi32(mb, 2), i2 = _mm512_srli_epi32(mb, 4), i3 = _mm512_srli_epi32(mb, 6);
      const __m512 v0 = _mm512_maskz_loadu_ps(k, v + o), v1 = _mm512_maskz_loadu_ps(k, v + N + o);
      const __m512 v2 = _mm512_maskz_loadu_ps(k, v + 2 * N + o), v3 = _mm512_maskz_loadu_ps(k, v + 3 * N + o);
      for (int m = 0; m < MT; ++m) {
        __m512 s = _mm512_maskz_loadu_ps(k, acc + m * N + o);
        s = _mm512_fmadd_ps(v0, _mm512_permutevar_ps(xa[m], mb), s);
        s = _mm512_fmadd_ps(v1, _mm512_permutevar_ps(xa[m], i1), s);
        s = _mm512_fmadd_ps(v2, _mm512_permutevar_ps(xb[m], i2), s);
        s = _mm512_fmadd_ps(v3, _mm512_permutevar_ps(xb[m], i3), s);
        _mm512_mask_storeu_ps(acc + m * N + o, k, s);
      }
    }
  }
}

PYPRUNE_TARGET_AVX512 void decode_rows_avx512(const S24Args& a, const float* x, int64_t p0, int64_t p1,
                                              float* acc) {
  switch (a.M) {
    case 4: return decode_avx512<4>(a, x, p0, p1, acc);
    case 3: return decode_avx512<3>(a, x, p0, p1, acc);
    case 2: return decode_avx512<2>(a, x, p0, p1, acc);
    default: return decode_avx512<1>(a, x, p0, p1, acc);
  }
}

// total (M x N, zeroed) = group pairs [p0, p1), each kFlushPairs of them summed in `chunk` (M x N) first.
PYPRUNE_TARGET_AVX512 void decode_range_avx512(const S24Args& a, const float* x, int64_t p0, int64_t p1,
                                               float* total, float* chunk) {
  const int64_t n = a.M * a.N;
  if (p1 - p0 <= kFlushPairs) return decode_rows_avx512(a, x, p0, p1, total);
  for (int64_t c = p0; c < p1; c += kFlushPairs) {
    std::fill(chunk, chunk + n, 0.f);
    decode_rows_avx512(a, x, c, std::min(p1, c + kFlushPairs), chunk);
    int64_t q = 0;
    for (; q + 16 <= n; q += 16)
      _mm512_storeu_ps(total + q, _mm512_add_ps(_mm512_loadu_ps(total + q), _mm512_loadu_ps(chunk + q)));
    for (; q < n; ++q) total[q] += chunk[q];
  }
}

PYPRUNE_TARGET_AVX2 void block_avx2(const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0,
                                    int64_t o1, float* y) {
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    int64_t m = m0;
    for (; m + kMR <= m1; m += kMR) panel_avx2<kMR>(a, x, m, o, y);
    for (; m < m1; ++m) panel_avx2<1>(a, x, m, o, y);
  }
  scalar_outputs(a, x, m0, m1, o, o1, y);
}
#endif

using BlockFn = void (*)(const S24Args&, const float*, int64_t, int64_t, int64_t, int64_t, float*);

BlockFn pick_block(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return block_avx512;
  if (isa == Isa::kAvx2) return block_avx2;
#endif
  (void)isa;
  return [](const S24Args& a, const float* x, int64_t m0, int64_t m1, int64_t o0, int64_t o1, float* y) {
    scalar_outputs(a, x, m0, m1, o0, o1, y);
  };
}

}  // namespace

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_linear";
  PYPRUNE_CHECK(x.dim() >= 1, op, "x", "must have at least 1 dimension (..., in_features), got a scalar");
  PYPRUNE_CHECK_DTYPE(values, op, "values", x.scalar_type());
  PYPRUNE_CHECK_DTYPE(meta, op, "meta", at::kByte);
  PYPRUNE_CHECK_DIM(values, 2, op, "values");
  PYPRUNE_CHECK_DIM(meta, 2, op, "meta");
  for (const auto* t : {&x, &values, &meta}) PYPRUNE_CHECK_CPU(*t, op, "x/values/meta");
  const int64_t N = out_features, K = x.size(-1), M = token_rows(x);
  const int64_t K4 = round_up(K, 8);
  PYPRUNE_CHECK(values.size(0) == K4 / 2 && values.size(1) == N, op, "values", "must have shape (", K4 / 2, ", ",
                N, ") for in_features ", K, " and out_features ", N, ", got ", values.sizes());
  PYPRUNE_CHECK(meta.size(0) == K4 / 8 && meta.size(1) == N, op, "meta", "must have shape (", K4 / 8, ", ", N,
                "), got ", meta.sizes());
  const at::Tensor b = checked_bias(bias, N, op, x.scalar_type());
  if (x.scalar_type() != at::kFloat) {
    // The kernel is fp32; float64 (gradcheck), bf16 and fp16 run a dense fallback. Position of each kept value
    // within its group: 2 bits each, 4 per meta byte (see the storage note above).
    const at::Tensor shifts = at::arange(0, 8, 2, meta.options().dtype(at::kInt));
    const at::Tensor pos = meta.to(at::kInt).unsqueeze(1).bitwise_right_shift(shifts.view({1, 4, 1})).bitwise_and(3);
    const at::Tensor cols = pos.reshape({K4 / 2, N}) +
                            at::arange(K4 / 2, pos.options()).floor_divide(2).mul(4).unsqueeze(1);
    const at::Tensor w = at::zeros({N, K4}, values.options())
                             .scatter_add_(1, cols.t().to(at::kLong), values.t()).slice(1, 0, K);
    return dense_linear(x, w, b);
  }
  at::Tensor y = linear_output(x, N);
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias_only(y, b);

  // The kernel reads whole group pairs: pad the rows of x to K4 with zeros when K is not a multiple of 8. A
  // column-major x (SparseConv2d's transposed views of NCHW images) is transposed into rows through 16x16
  // register transposes when K4 is whole vectors.
  at::Tensor xc;
  if (column_major(x, M) && K4 % kLanes == 0) {
    xc = at::empty({M, K4}, x.options());
    pack_token_minor(x.data_ptr<float>(), x.stride(1), K, M, xc.data_ptr<float>(), K4);
  } else {
    xc = x.reshape({M, K});
    xc = K4 == K ? xc.contiguous() : at::constant_pad_nd(xc, {0, K4 - K}, 0.0);
  }
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  const S24Args a{v.data_ptr<float>(), mt.data_ptr<uint8_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
                  M, K4, N};
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if PYPRUNE_X86
  if (M <= kDecodeMaxTokens && kernel_isa() == Isa::kAvx512) {
    const int64_t pairs = K4 / 8, parts = std::min<int64_t>(at::get_num_threads(), pairs);
    at::Tensor partial = at::zeros({parts, M, N}, x.options());
    float* pp = partial.data_ptr<float>();
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      std::vector<float> chunk(M * N);
      for (int64_t q = q0; q < q1; ++q)
        decode_range_avx512(a, xp, pairs * q / parts, pairs * (q + 1) / parts, pp + q * M * N, chunk.data());
    });
    at::Tensor out = partial.sum(0);
    if (b.defined()) out.add_(b);
    return y.copy_(out.view(y.sizes()));
  }
#endif
  const BlockFn fn = pick_block(kernel_isa());
  const int64_t n_ob = (N + kOutBlock - 1) / kOutBlock, n_tb = (M + kTokBlock - 1) / kTokBlock;
  at::parallel_for(0, n_ob * n_tb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ob = u / n_tb, tb = u % n_tb;
      fn(a, xp, tb * kTokBlock, std::min(M, (tb + 1) * kTokBlock), ob * kOutBlock,
         std::min(N, (ob + 1) * kOutBlock), yp);
    }
  });
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("sparse24_linear", &sparse24_linear_cpu); }

}  // namespace pyprune
