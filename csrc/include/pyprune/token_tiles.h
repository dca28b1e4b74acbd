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

// xt[k * ld + m] = x[m * K + k] for m < M, 0 for the padding M <= m < ld (padding lanes are computed, never
// stored). Blocked 16x16 so both the reads and the writes stay within a few cache lines.
inline void pack_token_minor(const float* x, int64_t M, int64_t K, float* xt, int64_t ld) {
  at::parallel_for(0, (K + 15) / 16, 1, [&](int64_t kb0, int64_t kb1) {
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t k0 = kb * 16, k1 = std::min(K, k0 + 16);
      for (int64_t m0 = 0; m0 < ld; m0 += 16) {
        for (int64_t k = k0; k < k1; ++k) {
          float* dst = xt + k * ld + m0;
          for (int64_t m = 0; m < 16; ++m) dst[m] = (m0 + m < M) ? x[(m0 + m) * K + k] : 0.f;
        }
      }
    }
  });
}

// y[(m0 + m) * N + r0 + r] = buf[r * ldb + m] (+ bias[r0 + r]) for r < rows, m < toks.
inline void store_transposed(const float* buf, int64_t ldb, int64_t rows, int64_t toks, const float* bias,
                             float* y, int64_t N, int64_t r0, int64_t m0) {
  for (int64_t rb = 0; rb < rows; rb += 16) {
    const int64_t re = std::min<int64_t>(rows, rb + 16);
    for (int64_t m = 0; m < toks; ++m) {
      float* dst = y + (m0 + m) * N + r0;
      if (bias) {
        for (int64_t r = rb; r < re; ++r) dst[r] = buf[r * ldb + m] + bias[r0 + r];
      } else {
        for (int64_t r = rb; r < re; ++r) dst[r] = buf[r * ldb + m];
      }
    }
  }
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
