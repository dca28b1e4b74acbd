// Shared machinery of the CSR and BSR CPU kernels (Fast Sparse ConvNets' layout, Elsen et al. 2020): the
// activations are packed token-minor, xt[k][m], so one sparse weight w[o][k] multiplies a contiguous run of
// tokens with a broadcast FMA, and the weight is read once per token tile instead of once per token. Outputs
// are produced token-minor for a group of rows, then transposed into y[m][o] through a small L1 buffer.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pyprune/cpu_features.h"

namespace pyprune {

// 16 floats: one zmm on AVX-512, two ymm on AVX2, four xmm on the baseline. The same source serves all three:
// the caller's target attribute decides how GCC lowers it. aligned(4) makes plain dereference an unaligned load.
// Broadcasts are written as `scalar * vector`: GCC then fuses them into the FMA as an embedded {1to16} memory
// operand, while a splat helper function gets lowered lane by lane (16 masked broadcasts) before inlining.
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
constexpr int kMaxTileVecs = 4;  // up to 64 tokens per tile

PYPRUNE_INLINE vf16 load16(const float* p) { return *reinterpret_cast<const vf16*>(p); }
PYPRUNE_INLINE void store16(float* p, vf16 v) { *reinterpret_cast<vf16*>(p) = v; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

typedef int32_t vi16 __attribute__((vector_size(64)));

// In-register 16x16 transpose by four block-swap stages (B = 8, 4, 2, 1): rows i and i+B exchange their
// off-diagonal BxB blocks. Written with __builtin_shuffle so the caller's ISA picks the instructions
// (vpermt2ps on AVX-512); the masks are compile-time constants once the loops unroll.
template <int B>
PYPRUNE_INLINE void swap_stage(vf16* r) {
  vi16 keep, take;
  for (int l = 0; l < kLanes; ++l) {
    keep[l] = (l & B) ? kLanes + l - B : l;  // row i: own low block, then row i+B's low block
    take[l] = (l & B) ? kLanes + l : l + B;  // row i+B: row i's high block, then its own high block
  }
  for (int i = 0; i < kLanes; ++i) {
    if (i & B) continue;
    const vf16 lo = r[i], hi = r[i + B];
    r[i] = __builtin_shuffle(lo, hi, keep);
    r[i + B] = __builtin_shuffle(lo, hi, take);
  }
}

PYPRUNE_INLINE void transpose16(vf16* r) {
  swap_stage<8>(r);
  swap_stage<4>(r);
  swap_stage<2>(r);
  swap_stage<1>(r);
}

// Token-minor packing in tile-major order: xt[t][k][j] = x[t * tile + j][k] for k in [k0, k1), zero for the
// padding tokens past M (computed, never stored). One token tile's slice (K x tile) is contiguous, so a kernel
// jumping between columns stays within a few pages (a K x M layout puts every column of a tile on its own page
// once M is large: TLB misses cost 10x at M = 2048). Whole 16x16 blocks go through transpose16.
PYPRUNE_INLINE void pack_token_minor_range(const float* x, int64_t M, int64_t K, float* xt, int64_t tile,
                                           int64_t k0, int64_t k1) {
  const int64_t m_end = round_up(M, tile);
  for (int64_t kb = k0; kb < k1; kb += kLanes) {
    const int64_t ke = std::min(k1, kb + kLanes);
    for (int64_t m0 = 0; m0 < m_end; m0 += kLanes) {
      float* dst = xt + (m0 / tile) * K * tile + m0 % tile;  // + k * tile + j
      if (ke - kb == kLanes && m0 + kLanes <= M) {
        vf16 r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16(x + (m0 + i) * K + kb);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) store16(dst + (kb + j) * tile, r[j]);
      } else {
        for (int64_t k = kb; k < ke; ++k)
          for (int64_t m = 0; m < kLanes; ++m) dst[k * tile + m] = (m0 + m < M) ? x[(m0 + m) * K + k] : 0.f;
      }
    }
  }
}

// y[(m0 + m) * N + r0 + r] = buf[r * ldb + m] (+ bias[r0 + r]) for r < rows, m < toks.
PYPRUNE_INLINE void store_transposed(const float* buf, int64_t ldb, int64_t rows, int64_t toks, const float* bias,
                                     float* y, int64_t N, int64_t r0, int64_t m0) {
  for (int64_t rb = 0; rb < rows; rb += kLanes) {
    const int64_t re = std::min<int64_t>(rows, rb + kLanes);
    int64_t mb = 0;
    if (re - rb == kLanes) {
      const vf16 b = bias ? load16(bias + r0 + rb) : vf16{};
      for (; mb + kLanes <= toks; mb += kLanes) {
        vf16 r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16(buf + (rb + i) * ldb + mb);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) store16(y + (m0 + mb + j) * N + r0 + rb, r[j] + b);
      }
    }
    for (int64_t m = mb; m < toks; ++m) {
      float* dst = y + (m0 + m) * N + r0;
      for (int64_t r = rb; r < re; ++r) dst[r] = buf[r * ldb + m] + (bias ? bias[r0 + r] : 0.f);
    }
  }
}

using PackFn = void (*)(const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);

#define PYPRUNE_PACK_ISA(SUFFIX, TARGET)                                                                      \
  TARGET inline void pack_##SUFFIX(const float* x, int64_t M, int64_t K, float* xt, int64_t tile, int64_t k0, \
                                   int64_t k1) {                                                             \
    pack_token_minor_range(x, M, K, xt, tile, k0, k1);                                                       \
  }
PYPRUNE_PACK_ISA(baseline, )
#if PYPRUNE_X86
PYPRUNE_PACK_ISA(avx2, PYPRUNE_TARGET_AVX2)
PYPRUNE_PACK_ISA(avx512, PYPRUNE_TARGET_AVX512)
#endif

// Packs x (M x K) into xt (ceil(M / tile) x K x tile), parallel over feature blocks, with the widest ISA.
inline void pack_token_minor(const float* x, int64_t M, int64_t K, float* xt, int64_t tile) {
  PackFn fn = pack_baseline;
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) fn = pack_avx512;
  else if (kernel_isa() == Isa::kAvx2) fn = pack_avx2;
#endif
  at::parallel_for(0, (K + kLanes - 1) / kLanes, 1, [&](int64_t b0, int64_t b1) {
    fn(x, M, K, xt, tile, b0 * kLanes, std::min(K, b1 * kLanes));
  });
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
