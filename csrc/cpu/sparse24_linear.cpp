// pyprune::sparse24_linear on the CPU: y = x W^T + b with W (N x K) 2:4 sparse along K. The storage and the
// panel kernel (vectors over 16 outputs, vpermilps picking each output's input from the metadata) are in
// pyprune/sparse24_panels.h, shared with sparse24_conv2d; decoding (few tokens) is here.
#include <immintrin.h>

#include "pyprune/linear.h"
#include "pyprune/sparse24_panels.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

using namespace s24;

constexpr int64_t kDecodeMaxTokens = 4;

#if PYPRUNE_X86
// Decoding (few tokens): bound by the weight bytes, so the values are streamed row by row, each row contiguous
// over all N outputs, into a per-thread accumulator acc (MT x N, L1/L2) over a range of group pairs; the
// threads' partial sums are added at the end. (The panel kernel walks each 16-output column panel
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

#endif

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
    // The kernel is fp32; float64 (gradcheck), bf16 and fp16 run a dense fallback.
    return dense_linear(x, sparse24_dense_matrix(values, meta, N, K), b);
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
  run_panels(a, xp, yp);
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("sparse24_linear", &sparse24_linear_cpu); }

}  // namespace pyprune
