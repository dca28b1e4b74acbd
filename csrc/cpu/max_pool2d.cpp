// pyprune::max_pool2d on the CPU: F.max_pool2d with dilation 1 and floor mode, in x's memory format. ATen's own
// NCHW max pool runs an order of magnitude slower (ResNet-50's stem pool at batch 1 on the Xeon VM: 4.7 ms, this
// kernel 0.14 ms, ATen on channels_last input 0.40 ms; benchmarks/results/cpu-xeon-emr/max_pool.md).
// pruned_conv2d's fused max pool (its max_pool argument) runs this kernel over the conv's output.
#include "pyprune/max_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pyprune/check.h"
#include "pyprune/cpu_features.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "max_pool2d";

// d = max_pool2d(s) as F.max_pool2d computes it with dilation 1 and floor mode: windows clipped to s, a NaN in
// a window wins. A window's rows are reduced first (runs of whole rows, which vectorize), then along the row.
struct PoolArgs {
  int64_t KH, KW, SH, SW, PH, PW;
  const float* s;  // the input, and its sizes
  int64_t N, C, H, W;
  float* d;  // the output, and its map
  int64_t OH, OW;
  bool channels_last;
};

// max(x, y) with a NaN in either winning, as in F.max_pool2d (the select vectorizes as compare and blend).
PYPRUNE_INLINE float max_nan(float x, float y) { return (y > x || y != y) ? y : x; }

// d[j] = max_nan(d[j], s[j]) for j < n.
PYPRUNE_INLINE void max_into(float* __restrict d, const float* __restrict s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = max_nan(d[j], s[j]);
}

// d[j] = the max_nan of a[j], b[j] and c[j] (c null: of a[j] and b[j]) for j < n: one pass for the
// common 2- and 3-wide windows instead of a copy and one max_into per further row (ResNet-50's stem pool at
// batch 8, alternating processes: 3.16 -> 2.44 ms; batch 1, where reading the conv's output bounds it, 0.32 ms
// either way).
PYPRUNE_INLINE void max_of(float* __restrict d, const float* __restrict a, const float* __restrict b,
                           const float* __restrict c, int64_t n) {
  if (c) {
    for (int64_t j = 0; j < n; ++j) d[j] = max_nan(max_nan(a[j], b[j]), c[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) d[j] = max_nan(a[j], b[j]);
  }
}

// d = the maximum of the m rows s, s + ld, ... (n floats each).
PYPRUNE_INLINE void max_rows(float* d, const float* s, int64_t ld, int64_t m, int64_t n) {
  if (m == 2 || m == 3) {
    max_of(d, s, s + ld, m == 3 ? s + 2 * ld : nullptr, n);
    return;
  }
  std::memcpy(d, s, n * sizeof(float));
  for (int64_t i = 1; i < m; ++i) max_into(d, s + i * ld, n);
}

// Output rows [r0, r1) of one NCHW plane (H x W -> OH x OW). v: the window rows' maximum over the padded
// columns, whose padding stays -inf; h: the stride-1 window maximum along v, of which every SW-th is an
// output. h spans whole vectors (pool_h floats; v KW - 1 more), so that its loops have no scalar tail.
PYPRUNE_INLINE int64_t pool_h(const PoolArgs& p) { return round_up((p.OW - 1) * p.SW + 1, kLanes); }
PYPRUNE_INLINE void pool_plane(const PoolArgs& p, const float* s, float* d, int64_t r0, int64_t r1, float* v,
                               float* h) {
  const int64_t W = p.W, OW = p.OW, hn = pool_h(p);
  const int64_t wn = std::min(W, (OW - 1) * p.SW + p.KW - p.PW);  // the input columns a window reads
  std::fill(v, v + hn + p.KW - 1, -std::numeric_limits<float>::infinity());
  float* vc = v + p.PW;  // input column 0
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i0 = std::max<int64_t>(0, r * p.SH - p.PH), i1 = std::min(p.H, r * p.SH - p.PH + p.KH);
    max_rows(vc, s + i0 * W, W, i1 - i0, wn);
    max_rows(h, v, 1, p.KW, hn);
    float* dr = d + r * OW;
    if (p.SW == 1) {
      std::memcpy(dr, h, OW * sizeof(float));
    } else if (p.SW == 2) {  // a constant stride, which the vectorizer turns into lane permutes
      for (int64_t o = 0; o < OW; ++o) dr[o] = h[2 * o];
    } else {
      for (int64_t o = 0; o < OW; ++o) dr[o] = h[o * p.SW];
    }
  }
}

// Output row r of one channels_last image (H x W x C -> OH x OW x C): each output pixel's window, channel runs.
PYPRUNE_INLINE void pool_cl_row(const PoolArgs& p, const float* s, float* d, int64_t r) {
  const int64_t W = p.W, C = p.C;
  const int64_t i0 = std::max<int64_t>(0, r * p.SH - p.PH), i1 = std::min(p.H, r * p.SH - p.PH + p.KH);
  for (int64_t o = 0; o < p.OW; ++o) {
    const int64_t j0 = std::max<int64_t>(0, o * p.SW - p.PW), j1 = std::min(W, o * p.SW - p.PW + p.KW);
    float* out = d + (r * p.OW + o) * C;
    std::memcpy(out, s + (i0 * W + j0) * C, C * sizeof(float));
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = i == i0 ? j0 + 1 : j0; j < j1; ++j) max_into(out, s + (i * W + j) * C, C);
  }
}

// Units [u0, u1): output rows (image, row) of channels_last y, else (plane, row) of NCHW y.
PYPRUNE_INLINE void pool_units(const PoolArgs& p, int64_t u0, int64_t u1) {
  const int64_t OH = p.OH, OW = p.OW, H = p.H, W = p.W, C = p.C;
  if (p.channels_last) {
    for (int64_t u = u0; u < u1; ++u)
      pool_cl_row(p, p.s + (u / OH) * H * W * C, p.d + (u / OH) * OH * OW * C, u % OH);
    return;
  }
  const int64_t hn = pool_h(p);
  std::vector<float> buf(2 * hn + p.KW - 1);
  for (int64_t u = u0; u < u1;) {  // the rows of one plane in this range at a time
    const int64_t plane = u / OH, r0 = u % OH, r1 = std::min(OH, r0 + (u1 - u));
    pool_plane(p, p.s + plane * H * W, p.d + plane * OH * OW, r0, r1, buf.data() + hn, buf.data());
    u += r1 - r0;
  }
}

using PoolFn = void (*)(const PoolArgs&, int64_t, int64_t);

// The pool's loops are plain C++ that the compiler vectorizes for each target.
#define PYPRUNE_POOL_ISA(SUFFIX, TARGET) \
  TARGET void pool_##SUFFIX(const PoolArgs& p, int64_t u0, int64_t u1) { pool_units(p, u0, u1); }
PYPRUNE_POOL_ISA(baseline, )
#if PYPRUNE_X86
PYPRUNE_POOL_ISA(avx2, PYPRUNE_TARGET_AVX2)
PYPRUNE_POOL_ISA(avx512, PYPRUNE_TARGET_AVX512)
#endif

PoolFn pick_pool() {
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) return pool_avx512;
  if (kernel_isa() == Isa::kAvx2) return pool_avx2;
#endif
  return pool_baseline;
}

}  // namespace

at::Tensor max_pool2d_checked(const at::Tensor& x, const PoolWindow& w, bool channels_last) {
  const int64_t OH = (x.size(2) + 2 * w.PH - w.KH) / w.SH + 1, OW = (x.size(3) + 2 * w.PW - w.KW) / w.SW + 1;
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (x.scalar_type() != at::kFloat)
    return at::max_pool2d(x, {w.KH, w.KW}, {w.SH, w.SW}, {w.PH, w.PW}).contiguous(fmt);
  at::Tensor y = at::empty({x.size(0), x.size(1), OH, OW}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(fmt);
  PoolArgs p{w.KH, w.KW, w.SH, w.SW, w.PH, w.PW, xc.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.size(3),
             y.data_ptr<float>(), OH, OW, channels_last};
  const PoolFn fn = pick_pool();
  // units of about 16 Ki window reads
  const int64_t per_row = OW * w.KH * w.KW * (channels_last ? p.C : 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, per_row));
  at::parallel_for(0, (channels_last ? p.N : p.N * p.C) * OH, grain, [&](int64_t u0, int64_t u1) { fn(p, u0, u1); });
  return y;
}

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  PYPRUNE_CHECK(x.dim() == 4, kOp, "x", "must be 4-D (N, C, H, W), got shape ", x.sizes());
  PYPRUNE_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, kOp, "kernel_size",
                "must be two ints >= 1, got ", kernel_size);
  PYPRUNE_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, kOp, "stride",
                "must be two ints >= 1, got ", stride);
  PYPRUNE_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel_size[0] &&
                    2 * padding[1] <= kernel_size[1],
                kOp, "padding", "must be two ints in [0, kernel_size / 2], got ", padding, " for kernel_size ",
                kernel_size);
  const PoolWindow w{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  PYPRUNE_CHECK(x.size(2) + 2 * w.PH >= w.KH && x.size(3) + 2 * w.PW >= w.KW, kOp, "x",
                "is too small for the window: ", x.size(2), " x ", x.size(3), " with padding ", padding,
                " gives an empty output for kernel_size ", kernel_size);
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return max_pool2d_checked(x, w, channels_last);
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("max_pool2d", &max_pool2d_cpu); }

}  // namespace pyprune
