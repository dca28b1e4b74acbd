// pyprune::csr_linear on the CPU: y = x W^T + b with W (N x K) in CSR (int32 indices, fp32 values).
//
// Many tokens: x is packed token-minor (see token_tiles.h) and each nonzero w[o][k] does one broadcast FMA
// into a 16..64-token accumulator tile, so the weight stream is read once per tile and the FMA count is
// nnz * M. The tile width is chosen so that xt's slice (K x tile) stays in L2, because the column indices of a
// row jump anywhere in K. Few tokens (decoding): a gather dot product per row, which is bound by the
// weight bytes (8 per nonzero), not by arithmetic.
#include <immintrin.h>

#include <atomic>

#include "pyprune/derived_cache.h"
#include "pyprune/linear.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

constexpr int64_t kRowGroup = 16;   // rows whose token tiles are transposed into y together
constexpr int64_t kGatherMaxTokens = 4;

struct CsrArgs {
  const int32_t* crow;
  const int32_t* col;
  const float* val;
  const float* bias;
  int64_t M, K, N, nnz;
  UnitOrder order;
  std::atomic<bool>* bad;  // set by a kernel that met an index out of range (and read nothing there)
};

// The decode kernels (<= kGatherMaxTokens) check the index values as they read them: a row's entries
// [crow[r], crow[r + 1]) must lie in [0, nnz], and each column in [0, K). A row out of range is read as empty,
// a column as column 0, and the call fails afterwards with validate_compressed_indices' message. (A check kept
// between calls is stale after a write through `.data`, and a fingerprint of the indices on every call, to
// notice such a write, cost 13-20% of a decode call on a 4096 x 4096 weight at 90%.) More tokens amortize the
// fingerprint: check_compressed_indices.
PYPRUNE_INLINE bool row_out_of_range(const CsrArgs& a, int64_t s, int64_t e) { return s < 0 || e < s || e > a.nnz; }

// The bound of a column as unsigned 32 bits: K, or 2^31 when K is larger (a negative column, >= 2^31 as unsigned,
// is out of range either way). 32-bit compares vectorize.
PYPRUNE_INLINE uint32_t col_bound(int64_t K) { return static_cast<uint32_t>(std::min<int64_t>(K, int64_t{1} << 31)); }

// col as an offset into a row of K: in range, or 0 with `bad` set
PYPRUNE_INLINE int64_t checked_col(int32_t c, uint32_t bound, bool& bad) {
  const bool out = static_cast<uint32_t>(c) >= bound;
  bad |= out;
  return out ? 0 : c;
}

// Nonzeros summed in one chain pair before the pair is added into the row's total: a sum of n fp32 terms in one
// chain has an error that grows with n, so chunks keep it to that of kFlush terms plus nnz / kFlush partials
// (at K = 16384-65536, 50% dense: 6-7x less than one chain over the row, near MKL's blocked GEMM).
constexpr int64_t kFlush = 256;

// Two accumulator sets over alternate nonzeros: with 4 vectors that is 8 independent FMA chains, enough to
// cover the FMA latency at one FMA per cycle.
template <class V, int NV>
PYPRUNE_INLINE void row_tile(const int32_t* col, const float* val, int64_t nnz, const float* xt, int64_t ld,
                             float* out) {
  V sum[NV];
  for (int t = 0; t < NV; ++t) sum[t] = V{};
  int64_t j = 0;
  const int64_t pairs_end = nnz & ~int64_t{1};
  while (j < pairs_end) {
    const int64_t chunk_end = std::min(pairs_end, j + kFlush);
    V a[NV], b[NV];
    for (int t = 0; t < NV; ++t) a[t] = b[t] = V{};
    for (; j < chunk_end; j += 2) {
      const float* p0 = xt + static_cast<int64_t>(col[j]) * ld;
      const float* p1 = xt + static_cast<int64_t>(col[j + 1]) * ld;
      const float w0 = val[j], w1 = val[j + 1];
      for (int t = 0; t < NV; ++t) a[t] += w0 * load16<V>(p0 + kLanes * t);
      for (int t = 0; t < NV; ++t) b[t] += w1 * load16<V>(p1 + kLanes * t);
    }
    for (int t = 0; t < NV; ++t) sum[t] += a[t] + b[t];
  }
  if (j < nnz) {
    const float* p0 = xt + static_cast<int64_t>(col[j]) * ld;
    const float w0 = val[j];
    for (int t = 0; t < NV; ++t) sum[t] += w0 * load16<V>(p0 + kLanes * t);
  }
  for (int t = 0; t < NV; ++t) store16(out + kLanes * t, sum[t]);
}

template <class V, int NV>
PYPRUNE_INLINE void rows_tile(const CsrArgs& a, const float* xt, int64_t ld, int64_t r0, int64_t r1,
                              int64_t m0, float* buf, float* y) {
  constexpr int64_t ldb = kLanes * NV;
  for (int64_t g = r0; g < r1; g += kRowGroup) {
    const int64_t ge = std::min(r1, g + kRowGroup);
    for (int64_t r = g; r < ge; ++r) {
      const int64_t s = a.crow[r];
      row_tile<V, NV>(a.col + s, a.val + s, a.crow[r + 1] - s, xt, ld, buf + (r - g) * ldb);
    }
    store_transposed<V>(buf, ldb, ge - g, std::min<int64_t>(ldb, a.M - m0), a.bias, y, a.N, g, m0);
  }
}

// Units u in [u0, u1) of the (row part x token tile) grid. Each ISA gets its own copy through the target
// attribute of the wrapper below (a lambda would not inherit it, so parallel_for only calls the wrapper).
// The tiles' slices come from xt, or (xt null) are packed by this range from the row-major x_rows.
template <class V, int NV>
PYPRUNE_INLINE void tile_units(const CsrArgs& a, const float* xt, const float* x_rows, const int64_t* rb,
                               int64_t u0, int64_t u1, float* y) {
  constexpr int64_t tile = kLanes * NV, ld = tile;
  alignas(64) float buf[kRowGroup * tile];
  TileSource<V> src(xt, x_rows, a.M, a.K, tile);
  for (int64_t u = u0; u < u1; ++u) {
    int64_t p, t;
    a.order.decode(u, p, t);
    rows_tile<V, NV>(a, src.slice(t), ld, rb[p], rb[p + 1], t * tile, buf, y);
  }
}

using UnitsFn = void (*)(const CsrArgs&, const float*, const float*, const int64_t*, int64_t, int64_t, float*);

#define PYPRUNE_CSR_UNITS(SUFFIX, TARGET, V)                                                              \
  template <int NV>                                                                                     \
  TARGET void units_##SUFFIX(const CsrArgs& a, const float* xt, const float* x_rows, const int64_t* rb,   \
                             int64_t u0, int64_t u1, float* y) {                                        \
    tile_units<V, NV>(a, xt, x_rows, rb, u0, u1, y);                                                    \
  }

PYPRUNE_CSR_UNITS(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_CSR_UNITS(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_CSR_UNITS(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

// Token-tile width in vectors of 16, capped by the ISA's accumulator budget (2*NV vectors of 16 live: 8 zmm on
// AVX-512 at NV=4, 8 ymm on AVX2 at NV=2 out of 16 registers, 8 xmm on the baseline at NV=1).
UnitsFn pick_units(Isa isa, int nv) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) {
    static constexpr UnitsFn t[] = {units_avx512<1>, units_avx512<2>, units_avx512<3>, units_avx512<4>};
    return t[nv - 1];
  }
  if (isa == Isa::kAvx2) return nv >= 2 ? units_avx2<2> : units_avx2<1>;
#endif
  (void)isa;
  (void)nv;
  return units_baseline<1>;
}

int tile_vecs(Isa isa, int nv) {
  const int cap = isa == Isa::kAvx512 ? 4 : (isa == Isa::kAvx2 ? 2 : 1);
  return std::min(nv, cap);
}

// ---- few tokens: gather dot products over each row's nonzeros ----

template <int MT>
PYPRUNE_INLINE void gather_rows_scalar(const CsrArgs& a, const float* x, int64_t r0, int64_t r1, float* y) {
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    float acc[MT][4] = {};
    int64_t s = a.crow[r], e = a.crow[r + 1];
    if (row_out_of_range(a, s, e)) bad = true, s = e = 0;
    int64_t j = s;
    for (; j + 4 <= e; j += 4)
      for (int q = 0; q < 4; ++q) {
        const int64_t c = checked_col(a.col[j + q], col_bound(a.K), bad);
        for (int m = 0; m < MT; ++m) acc[m][q] += a.val[j + q] * x[m * a.K + c];
      }
    for (; j < e; ++j) {
      const int64_t c = checked_col(a.col[j], col_bound(a.K), bad);
      for (int m = 0; m < MT; ++m) acc[m][0] += a.val[j] * x[m * a.K + c];
    }
    for (int m = 0; m < MT; ++m)
      y[m * a.N + r] = (acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]) + (a.bias ? a.bias[r] : 0.f);
  }
  if (bad) a.bad->store(true, std::memory_order_relaxed);
}

#if PYPRUNE_X86
template <int MT>
PYPRUNE_TARGET_AVX512 void gather_rows_avx512(const CsrArgs& a, const float* x, int64_t r0, int64_t r1,
                                              float* y) {
  // a lane whose column is out of range (unsigned compare: negatives too) is not gathered
  const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(col_bound(a.K)));
  __mmask16 bad = 0;
  bool bad_row = false;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    int64_t s = a.crow[r], e = a.crow[r + 1];
    if (row_out_of_range(a, s, e)) bad_row = true, s = e = 0;
    int64_t j = s;
    for (; j + 16 <= e; j += 16) {
      const __m512i idx = _mm512_loadu_si512(a.col + j);
      const __mmask16 in = _mm512_cmplt_epu32_mask(idx, kv);
      bad |= static_cast<__mmask16>(~in);
      const __m512 w = _mm512_loadu_ps(a.val + j);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(
            w, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx, x + m * a.K, 4), acc[m]);
    }
    if (j < e) {
      const __mmask16 k = static_cast<__mmask16>((1u << (e - j)) - 1u);
      const __m512i idx = _mm512_maskz_loadu_epi32(k, a.col + j);
      const __mmask16 in = _mm512_mask_cmplt_epu32_mask(k, idx, kv);
      bad |= static_cast<__mmask16>(k & ~in);
      const __m512 w = _mm512_maskz_loadu_ps(k, a.val + j);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(
            w, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx, x + m * a.K, 4), acc[m]);
    }
    for (int m = 0; m < MT; ++m)
      y[m * a.N + r] = _mm512_reduce_add_ps(acc[m]) + (a.bias ? a.bias[r] : 0.f);
  }
  if (bad || bad_row) a.bad->store(true, std::memory_order_relaxed);
}
#endif

template <int MT>
void gather_rows(const CsrArgs& a, const float* x, int64_t r0, int64_t r1, float* y) {
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) return gather_rows_avx512<MT>(a, x, r0, r1, y);
#endif
  gather_rows_scalar<MT>(a, x, r0, r1, y);
}

void csr_gather(const CsrArgs& a, const float* x, const std::vector<int64_t>& rb, float* y) {
  const int64_t n_parts = static_cast<int64_t>(rb.size()) - 1;
  at::parallel_for(0, n_parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t m0 = 0; m0 < a.M; m0 += kGatherMaxTokens) {
        const float* xm = x + m0 * a.K;
        float* ym = y + m0 * a.N;
        switch (std::min<int64_t>(kGatherMaxTokens, a.M - m0)) {
          case 4: gather_rows<4>(a, xm, rb[p], rb[p + 1], ym); break;
          case 3: gather_rows<3>(a, xm, rb[p], rb[p + 1], ym); break;
          case 2: gather_rows<2>(a, xm, rb[p], rb[p + 1], ym); break;
          default: gather_rows<1>(a, xm, rb[p], rb[p + 1], ym); break;
        }
      }
    }
  });
}

}  // namespace

void validate_compressed_indices(const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, const char* op,
                                 const char* n_cols_name) {
  const at::Tensor cr_t = crow.contiguous(), ci_t = col.contiguous();
  const int32_t* cr = cr_t.data_ptr<int32_t>();
  const int32_t* ci = ci_t.data_ptr<int32_t>();
  const int64_t rows = cr_t.numel() - 1, nnz = ci_t.numel();
  for (int64_t r = 0; r < rows; ++r)
    PYPRUNE_CHECK(cr[r] <= cr[r + 1] && cr[r + 1] <= nnz, op, "crow_indices",
                  "must be non-decreasing and at most the number of entries (", nnz, "), got ", cr[r], " then ",
                  cr[r + 1], " at row ", r);
  int32_t lo = 0, hi = 0;
  for (int64_t j = 0; j < nnz; ++j) lo = std::min(lo, ci[j]), hi = std::max(hi, ci[j]);
  PYPRUNE_CHECK(lo >= 0 && (nnz == 0 || hi < n_cols), op, "col_indices", "must lie in [0, ", n_cols_name, " = ",
                n_cols, "), got values in [", lo, ", ", hi, "]");
}

void check_compressed_indices(const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, const char* op,
                              const char* n_cols_name) {
  static DerivedCache<bool> checked(4096);  // one "byte" per entry: the newest 4096 index pairs kept
  checked.get({crow, col}, {crow.contiguous(), col.contiguous()}, {n_cols}, [&](const std::vector<at::Tensor>& from) {
    validate_compressed_indices(from[0], from[1], n_cols, op, n_cols_name);
    return true;
  }, [](bool) { return int64_t(1); });
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "csr_linear";
  check_compressed_args(x, crow_indices, col_indices, values, 1, op);
  PYPRUNE_CHECK(out_features >= 0, op, "out_features", "must be >= 0, got ", out_features);
  PYPRUNE_CHECK(crow_indices.numel() == out_features + 1, op, "crow_indices",
                "must have out_features + 1 = ", out_features + 1, " entries, got ", crow_indices.numel());
  PYPRUNE_CHECK(col_indices.numel() == values.numel(), op, "col_indices",
                "must have as many entries as values (", values.numel(), "), got ", col_indices.numel());
  const int64_t N = out_features, K = x.size(-1), M = token_rows(x);
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous(), val = values.contiguous();
  const int64_t nnz = val.numel();
  PYPRUNE_CHECK(crow.data_ptr<int32_t>()[0] == 0 && crow.data_ptr<int32_t>()[N] == nnz, op, "crow_indices",
                "must start at 0 and end at nnz = ", nnz, ", got ", crow.data_ptr<int32_t>()[0], " and ",
                crow.data_ptr<int32_t>()[N]);
  const at::Tensor b = checked_bias(bias, N, op, x.scalar_type());
  if (x.scalar_type() != at::kFloat) {
    validate_compressed_indices(crow, col, K, op, "in_features");
    // The kernel is fp32; float64 (gradcheck), bf16 and fp16 run a dense fallback.
    const at::Tensor rows = at::repeat_interleave(at::arange(N, crow.options().dtype(at::kLong)),
                                                  crow.diff().to(at::kLong), 0, nnz);
    const at::Tensor w = at::zeros({N, K}, val.options()).index_put_({rows, col.to(at::kLong)}, val, true);
    return dense_linear(x, w, b);
  }
  at::Tensor y = linear_output(x, N);
  if (M == 0 || N == 0) return y;
  if (K == 0 || nnz == 0) return bias_only(y, b);

  std::atomic<bool> bad{false};
  CsrArgs a{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(),
            b.defined() ? b.data_ptr<float>() : nullptr, M, K, N, nnz, UnitOrder{}, &bad};
  const int32_t* cr = a.crow;
  auto prefix = [cr](int64_t r) { return static_cast<int64_t>(cr[r]); };
  const int64_t threads = at::get_num_threads();
  const Isa isa = kernel_isa();

  if (M <= kGatherMaxTokens) {
    const auto rb = balanced_split(N, threads * 8, prefix, 8);
    const at::Tensor xc = x.contiguous();
    csr_gather(a, xc.data_ptr<float>(), rb, y.data_ptr<float>());
    if (bad.load()) {  // the kernel met an index out of range: say which
      validate_compressed_indices(crow, col, K, op, "in_features");
      TORCH_CHECK(false, "pyprune::", op, ": an index out of range that validation did not find");
    }
    return y;
  }
  // Many tokens: the indices are checked once per index tensors and contents (a check inside this kernel's FMA
  // loop cost 1.00-1.07x at 128 tokens on BERT-base's shapes, the fingerprint 1.00-1.02x)
  check_compressed_indices(crow_indices, col_indices, K, op, "in_features");
  // Largest tile whose slice of xt fits in ~512 KiB of L2 (the column indices of a row are scattered over K).
  // Tile width: no wider than the tokens (a 64-token tile at M = 32 computes half padding), and xt's slice
  // (K x tile) within ~512 KiB of L2, since the column indices of a row jump anywhere in K.
  const int64_t l2_vecs = std::clamp<int64_t>((512 * 1024) / (K * kLanes * 4), 1, kMaxTileVecs);
  const int nv = tile_vecs(isa, static_cast<int>(std::min<int64_t>(l2_vecs, (M + kLanes - 1) / kLanes)));
  const int64_t tile = kLanes * nv;
  const auto rb = balanced_split(N, threads * 8, prefix, 16);
  const UnitsFn fn = pick_units(isa, nv);
  const TokenOperand xo = token_operand(x, M, K, tile, static_cast<int64_t>(rb.size()) - 1, nnz * 8);
  a.order = xo.order;
  const int64_t n_units = a.order.size();
  const float* xtp = xo.xt_data();
  const float* xrp = xo.rows_data();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_units, 1, [&](int64_t u0, int64_t u1) { fn(a, xtp, xrp, rb.data(), u0, u1, yp); });
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("csr_linear", &csr_linear_cpu); }

}  // namespace pyprune
