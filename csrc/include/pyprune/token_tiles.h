// Shared machinery of the CSR and BSR CPU kernels (Fast Sparse ConvNets' layout, Elsen et al. 2020): the
// activations are packed token-minor, xt[k][m], so one sparse weight w[o][k] multiplies a contiguous run of
// tokens with a broadcast FMA, and the weight is read once per token tile instead of once per token. Outputs
// are produced token-minor for a group of rows, then transposed into y[m][o] through a small L1 buffer.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "pyprune/cpu_features.h"

namespace pyprune {

// 16 floats as P native vectors: one zmm on AVX-512 (P = 1), two ymm on AVX2 (2), four xmm on the baseline (4).
// Kernels are templates over the vector type and each ISA's entry point instantiates its own: a single 64-byte
// generic vector would serve all three only on AVX-512, since GCC keeps a generic vector wider than the
// target's registers in memory and routes every operation through the stack (AVX2 kernels measured 25x slower
// than AVX-512 on the same CPU, and slower than the portable baseline). aligned(4) makes plain dereference an
// unaligned load. Broadcasts are written as `scalar * vector`: GCC then fuses them into the FMA as an embedded
// {1to16} memory operand, while a splat helper function gets lowered lane by lane before inlining.
template <int P>
struct Vec16 {
  static constexpr int kParts = P, kWidth = 16 / P;
  typedef float H __attribute__((vector_size(64 / P), aligned(4)));
  typedef int32_t HI __attribute__((vector_size(64 / P)));
  H h[P];
  PYPRUNE_INLINE float operator[](int i) const { return h[i / kWidth][i % kWidth]; }
  PYPRUNE_INLINE Vec16& operator+=(const Vec16& b) {
    for (int p = 0; p < P; ++p) h[p] += b.h[p];
    return *this;
  }
};
template <int P>
PYPRUNE_INLINE Vec16<P> operator+(Vec16<P> a, const Vec16<P>& b) {
  return a += b;
}
template <int P>
PYPRUNE_INLINE Vec16<P> operator+(Vec16<P> a, float s) {
  for (int p = 0; p < P; ++p) a.h[p] += s;
  return a;
}
template <int P>
PYPRUNE_INLINE Vec16<P> operator*(float s, Vec16<P> a) {
  for (int p = 0; p < P; ++p) a.h[p] = s * a.h[p];
  return a;
}
template <int P>
PYPRUNE_INLINE Vec16<P> operator*(Vec16<P> a, const Vec16<P>& b) {
  for (int p = 0; p < P; ++p) a.h[p] *= b.h[p];
  return a;
}
// ReLU capped at `cap` (+inf: plain ReLU; 6: ReLU6). NaN stays NaN, as in F.relu and F.relu6.
template <int P>
PYPRUNE_INLINE Vec16<P> relu16(Vec16<P> a, float cap) {
  using H = typename Vec16<P>::H;
  const H c = H{} + cap;
  for (int p = 0; p < P; ++p) {
    a.h[p] = a.h[p] < 0.f ? H{} : a.h[p];
    a.h[p] = a.h[p] > c ? c : a.h[p];
  }
  return a;
}
// Branch-free (maxss / minss): as a nested conditional GCC compiled the lower bound to a compare and a
// branch, mispredicted on about half of the outputs of a conv whose output signs are random.
PYPRUNE_INLINE float relu1(float v, float cap) {
  const float r = v < 0.f ? 0.f : v;  // NaN stays NaN
  return r > cap ? cap : r;
}
// The plain ReLU (no cap to compare against): one max a vector.
template <int P>
PYPRUNE_INLINE Vec16<P> relu16(Vec16<P> a) {
  using H = typename Vec16<P>::H;
  for (int p = 0; p < P; ++p) a.h[p] = a.h[p] < 0.f ? H{} : a.h[p];  // NaN stays NaN
  return a;
}
PYPRUNE_INLINE float relu1(float v) { return v < 0.f ? 0.f : v; }

// The epilogue's ReLU as one float: kNoRelu none, +inf a plain ReLU, a finite cap > 0 the ReLU capped there
// (6: ReLU6).
constexpr float kNoRelu = -1.f;

using VecAvx512 = Vec16<1>;
using VecAvx2 = Vec16<2>;
using VecBaseline = Vec16<4>;
constexpr int kLanes = 16;
constexpr int kMaxTileVecs = 4;  // up to 64 tokens per tile

template <class V>
PYPRUNE_INLINE V load16(const float* p) {
  V v;
  for (int q = 0; q < V::kParts; ++q) v.h[q] = *reinterpret_cast<const typename V::H*>(p + V::kWidth * q);
  return v;
}
template <int P>
PYPRUNE_INLINE void store16(float* p, const Vec16<P>& v) {
  for (int q = 0; q < P; ++q) *reinterpret_cast<typename Vec16<P>::H*>(p + Vec16<P>::kWidth * q) = v.h[q];
}
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The sparse kernels' epilogue after the bias: plus the residual's matching floats (r null: none), then the ReLU
// (cap: kNoRelu, +inf or the cap; NaN stays NaN, as in F.relu).
template <class V>
PYPRUNE_INLINE V epilogue16(V v, const float* r, float cap) {
  if (r) v += load16<V>(r);
  if (cap == kNoRelu) return v;
  return cap < std::numeric_limits<float>::infinity() ? relu16(v, cap) : relu16(v);
}
PYPRUNE_INLINE float epilogue1(float v, const float* r, float cap) {
  if (r) v += *r;
  if (cap == kNoRelu) return v;
  return cap < std::numeric_limits<float>::infinity() ? relu1(v, cap) : relu1(v);
}

// A non-temporal store of one vector to p (aligned to the vector's width; x86 AVX and up, else a plain store).
// For an output larger than the last-level cache: a plain store first reads each line in (write-allocate), only
// for the output to leave the cache before anything reads it. A unit range that streamed ends with stream_fence.
template <class V>
PYPRUNE_INLINE void stream16(float* p, const V& v) {
#if PYPRUNE_X86
  if constexpr (V::kParts <= 2) {
    using H = typename V::H;
    for (int q = 0; q < V::kParts; ++q)
      asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<H*>(p + V::kWidth * q)) : "v"(v.h[q]));
    return;
  }
#endif
  store16(p, v);
}
// Whether an output y should leave by stream16: the call's data (x, y and a residual: `bytes`) passes half the
// last-level cache, and y is 64-byte aligned (vmovntps needs it).
inline bool stream_output(int64_t bytes, const void* y) {
  const int64_t llc = last_level_cache_bytes();
  return llc > 0 && 2 * bytes > llc && reinterpret_cast<uintptr_t>(y) % 64 == 0;
}
inline void stream_fence() {
#if PYPRUNE_X86
  asm volatile("sfence" ::: "memory");
#endif
}

// In-register 16x16 transpose by four block-swap stages (B = 8, 4, 2, 1): rows i and i+B exchange their
// off-diagonal BxB blocks. A block at least as wide as a part swaps whole parts; a narrower one goes through
// __builtin_shuffle within each part, so the caller's ISA picks the instructions (vpermt2ps on AVX-512); the
// masks are compile-time constants once the loops unroll.
template <int B, int P>
PYPRUNE_INLINE void swap_stage(Vec16<P>* r) {
  using V = Vec16<P>;
  constexpr int W = V::kWidth;
  for (int i = 0; i < kLanes; ++i) {
    if (i & B) continue;
    if constexpr (B >= W) {  // row i's high-block parts trade places with row i+B's low-block parts
      for (int p = 0; p < P; ++p)
        if ((p * W) & B) std::swap(r[i].h[p], r[i + B].h[p - B / W]);
    } else {
      typename V::HI keep, take;
      for (int l = 0; l < W; ++l) {
        keep[l] = (l & B) ? W + l - B : l;  // row i: own low block, then row i+B's low block
        take[l] = (l & B) ? W + l : l + B;  // row i+B: row i's high block, then its own high block
      }
      for (int p = 0; p < P; ++p) {
        const typename V::H lo = r[i].h[p], hi = r[i + B].h[p];
        r[i].h[p] = __builtin_shuffle(lo, hi, keep);
        r[i + B].h[p] = __builtin_shuffle(lo, hi, take);
      }
    }
  }
}

template <int P>
PYPRUNE_INLINE void transpose16(Vec16<P>* r) {
  swap_stage<8>(r);
  swap_stage<4>(r);
  swap_stage<2>(r);
  swap_stage<1>(r);
}

// Token-minor packing in tile-major order: xt[t][k][j] = x[t * tile + j][k] for k in [k0, k1), zero for the
// padding tokens past M (computed, never stored). One token tile's slice (K x tile) is contiguous, so a kernel
// jumping between columns stays within a few pages (a K x M layout puts every column of a tile on its own page
// once M is large: TLB misses cost 10x at M = 2048). Whole 16x16 blocks go through transpose16. x's rows are
// ldx floats apart (ldx >= K).
template <class V>
PYPRUNE_INLINE void pack_token_minor_range(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt,
                                           int64_t tile, int64_t k0, int64_t k1) {
  const int64_t m_end = round_up(M, tile);
  for (int64_t kb = k0; kb < k1; kb += kLanes) {
    const int64_t ke = std::min(k1, kb + kLanes);
    for (int64_t m0 = 0; m0 < m_end; m0 += kLanes) {
      float* dst = xt + (m0 / tile) * K * tile + m0 % tile;  // + k * tile + j
      if (ke - kb == kLanes && m0 + kLanes <= M) {
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(x + (m0 + i) * ldx + kb);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) store16(dst + (kb + j) * tile, r[j]);
      } else {
        for (int64_t k = kb; k < ke; ++k)
          for (int64_t m = 0; m < kLanes; ++m) dst[k * tile + m] = (m0 + m < M) ? x[(m0 + m) * ldx + k] : 0.f;
      }
    }
  }
}

// y[(m0 + m) * N + r0 + r] = buf[r * ldb + m] (+ bias[r0 + r]) for r < rows, m < toks; then, where `res`
// (laid out as y) is not null, plus res at the same offset, and with cap >= 0 the ReLU (NaN stays NaN),
// capped at `cap` unless that is +inf. stream: whole groups of 16 rows leave through stream16 (y 64-byte
// aligned, and N, r0 multiples of 16).
template <class V>
PYPRUNE_INLINE void store_transposed(const float* buf, int64_t ldb, int64_t rows, int64_t toks, const float* bias,
                                     float* y, int64_t N, int64_t r0, int64_t m0, const float* res = nullptr,
                                     float cap = -1.f, bool stream = false) {
  const bool relu = cap >= 0.f, capped = relu && cap < std::numeric_limits<float>::infinity();
  for (int64_t rb = 0; rb < rows; rb += kLanes) {
    const int64_t re = std::min<int64_t>(rows, rb + kLanes);
    int64_t mb = 0;
    if (re - rb == kLanes) {
      const V b = bias ? load16<V>(bias + r0 + rb) : V{};
      for (; mb + kLanes <= toks; mb += kLanes) {
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(buf + (rb + i) * ldb + mb);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) {
          const int64_t at = (m0 + mb + j) * N + r0 + rb;
          V v = r[j] + b;
          if (res) v += load16<V>(res + at);
          v = capped ? relu16(v, cap) : relu ? relu16(v) : v;
          if (stream) stream16(y + at, v);
          else store16(y + at, v);
        }
      }
    }
    for (int64_t m = mb; m < toks; ++m) {
      const int64_t at = (m0 + m) * N + r0;
      for (int64_t r = rb; r < re; ++r) {
        float v = buf[r * ldb + m] + (bias ? bias[r0 + r] : 0.f);
        if (res) v += res[at + r];
        y[at + r] = capped ? relu1(v, cap) : relu ? relu1(v) : v;
      }
    }
  }
}

using PackFn = void (*)(const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t);

#define PYPRUNE_PACK_ISA(SUFFIX, TARGET, V)                                                                  \
  TARGET inline void pack_##SUFFIX(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt, int64_t tile, \
                                   int64_t k0, int64_t k1) {                                                  \
    pack_token_minor_range<V>(x, ldx, M, K, xt, tile, k0, k1);                                                \
  }
PYPRUNE_PACK_ISA(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_PACK_ISA(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_PACK_ISA(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

// Packs x (M x K, rows ldx floats apart) into xt (ceil(M / tile) x K x tile), parallel over feature blocks,
// with the widest ISA. With a single tile (tile >= M, a multiple of 16) this is a transpose of x into rows of
// tile floats, zero-padded past M.
inline void pack_token_minor(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt, int64_t tile) {
  PackFn fn = pack_baseline;
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) fn = pack_avx512;
  else if (kernel_isa() == Isa::kAvx2) fn = pack_avx2;
#endif
  at::parallel_for(0, (K + kLanes - 1) / kLanes, 1, [&](int64_t b0, int64_t b1) {
    fn(x, ldx, M, K, xt, tile, b0 * kLanes, std::min(K, b1 * kLanes));
  });
}

// The same packing from a column-major x (element (m, k) at x[k * ldx + m], as x = X.t() for a (K, M) X with
// row stride ldx): the tokens of a tile are already contiguous per k, so each (k, tile) is one copy, no
// transpose (SparseConv2d hands NCHW images to the linear ops so: their (C, pixels) planes, transposed).
inline void pack_token_minor_cols(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt, int64_t tile) {
  const int64_t n_tiles = (M + tile - 1) / tile;
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t m0 = t * tile, len = std::min(tile, M - m0);
        float* dst = xt + t * K * tile + k * tile;
        std::copy(x + k * ldx + m0, x + k * ldx + m0 + len, dst);
        std::fill(dst + len, dst + tile, 0.f);
      }
  });
}

// x (M x K) is a column-major 2-D view: stride 1 along M, each column x.stride(1) >= M floats apart.
inline bool column_major(const at::Tensor& x, int64_t M) {
  return x.dim() == 2 && x.stride(0) == 1 && x.stride(1) >= M && M > 1;
}

// Packs a 2-D or batched x (..., K) for the token-tile kernels: straight from a column-major 2-D view, else
// through x.contiguous() and 16x16 transposes.
inline void pack_tokens(const at::Tensor& x, int64_t M, int64_t K, float* xt, int64_t tile) {
  if (column_major(x, M)) {
    pack_token_minor_cols(x.data_ptr<float>(), x.stride(1), M, K, xt, tile);
    return;
  }
  const at::Tensor xc = x.contiguous();
  pack_token_minor(xc.data_ptr<float>(), K, M, K, xt, tile);
}

// The order of the (row part p, token tile t) work units. Row-part-outer keeps a part's weights hot and
// re-reads xt once per part; tile-outer keeps one tile's slice of xt hot and re-reads the weights once per
// tile: pick whichever re-reads fewer bytes (tile-outer wins for many tokens and few nonzeros).
struct UnitOrder {
  int64_t n_parts = 1, n_tiles = 1;
  bool tile_outer = false;
  int64_t size() const { return n_parts * n_tiles; }
  PYPRUNE_INLINE void decode(int64_t u, int64_t& p, int64_t& t) const {
    if (tile_outer) { t = u / n_parts; p = u % n_parts; }
    else { p = u / n_tiles; t = u % n_tiles; }
  }
};

inline UnitOrder unit_order(int64_t n_parts, int64_t n_tiles, int64_t weight_bytes, int64_t xt_bytes) {
  return {n_parts, n_tiles, n_tiles * weight_bytes < n_parts * xt_bytes};
}

// The activations of a token-tile kernel and its unit order. x is packed token-minor up front (xt), except past
// 8 MiB of x, where that copy would make a round trip through memory: then x stays row-major (rows) and each
// unit range packs the tiles it reaches (TileSource), units tile-outer so that a range packs a tile once
// (channels_last SparseConv2d on a 56x56 map at batch 8 hands the linear ops 25.7 MB: 1.3-1.9x faster).
struct TokenOperand {
  at::Tensor xt, rows;
  UnitOrder order;
  const float* xt_data() const { return xt.defined() ? xt.data_ptr<float>() : nullptr; }
  const float* rows_data() const { return rows.defined() ? rows.data_ptr<float>() : nullptr; }
};

inline TokenOperand token_operand(const at::Tensor& x, int64_t M, int64_t K, int64_t tile, int64_t n_parts,
                                  int64_t weight_bytes) {
  TokenOperand op;
  const int64_t n_tiles = (M + tile - 1) / tile;
  if (K * M * 4 > (8 << 20) && !column_major(x, M)) {
    op.rows = x.contiguous();
    op.order = UnitOrder{n_parts, n_tiles, true};
  } else {
    op.xt = at::empty({round_up(M, tile), K}, x.options());
    pack_tokens(x, M, K, op.xt.data_ptr<float>(), tile);
    op.order = unit_order(n_parts, n_tiles, weight_bytes, K * M * 4);
  }
  return op;
}

// Token tile t's slice (K x tile, rows `tile` floats apart) for one unit range: a view into xt, or packed into
// the range's own buffer from the row-major x (again only when t changes).
template <class V>
class TileSource {
 public:
  TileSource(const float* xt, const float* rows, int64_t M, int64_t K, int64_t tile)
      : xt_(xt), rows_(rows), M_(M), K_(K), tile_(tile), own_(xt ? 0 : K * tile) {}
  PYPRUNE_INLINE const float* slice(int64_t t) {
    if (xt_) return xt_ + t * K_ * tile_;
    if (t != packed_) {
      const int64_t m0 = t * tile_;
      pack_token_minor_range<V>(rows_ + m0 * K_, K_, std::min(tile_, M_ - m0), K_, own_.data(), tile_, 0, K_);
      packed_ = t;
    }
    return own_.data();
  }

 private:
  const float* xt_;
  const float* rows_;
  int64_t M_, K_, tile_;
  std::vector<float> own_;
  int64_t packed_ = -1;
};

// Splits [0, n_units) into at most `parts` contiguous ranges of nearly equal cost, where cost(u) is
// prefix[u + 1] - prefix[u] plus a fixed overhead per unit (so empty rows still count a little).
// Load balance for skewed rows (Sputnik's concern, Gale et al. 2020), done as a static partition on the CPU.
template <typename PrefixFn>
std::vector<int64_t> balanced_split(int64_t n_units, int64_t parts, PrefixFn prefix, int64_t unit_overhead) {
  std::vector<int64_t> bounds{0};
  if (n_units == 0) return {0, 0};
  const int64_t total = prefix(n_units) - prefix(0) + unit_overhead * n_units;
  parts = std::max<int64_t>(1, std::min(parts, n_units));
  int64_t u = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    // first unit boundary whose cumulative cost reaches the target
    int64_t lo = u, hi = n_units;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (prefix(mid) - prefix(0) + unit_overhead * mid < target) lo = mid + 1; else hi = mid;
    }
    if (lo > bounds.back() && lo < n_units) bounds.push_back(lo);
    u = lo;
  }
  bounds.push_back(n_units);
  return bounds;
}

}  // namespace pyprune
