// pyprune::pruned_conv2d on the CPU: y[:, out_index] = relu?(conv2d(x[:, in_index], weight, bias)), the ReLU
// optionally capped at relu_max (ReLU6).
//
// Implicit GEMM per group: Y_g (C_out_g x pixels) = W_g (C_out_g x K_g) * X_g (K_g x pixels), K_g = C_in_g * kh * kw.
// The gather is fused everywhere: kept channels are read through the index, and x[:, in_index] never exists as
// a separate tensor (on NCHW x, the pixels-as-rows tiles of kxk convs of >= 16 Mi multiply-adds, stride 1 or
// from 128 kept inputs, restage the kept channels as channels_last first, the gather done by the same pass).
// Two orientations:
// - Vectors over output pixels (NCHW, larger maps): 64 pixels per tile (pixels of consecutive images share a
//   tile), weights broadcast straight from their rows (one broadcast feeds 4 FMAs, no weight packing), register
//   tile 6 output channels x 4 vectors. X_g comes from the input rows in place (1x1 stride 1), from
//   zero-bordered planes of the kept channels (stride-1 kxk; each thread stages the band of rows its own tiles
//   read, inside the same parallel region), or from im2col tiles.
// - Pixels as GEMM rows (channels_last, small NCHW maps, plain 3x3 convs and ResNet-like stems on NCHW): 6-8
//   pixels x 16-64 output channels, each input value broadcast in place, the weight transposed once and kept
//   (see transposed_weight). 3-wide stride-1 kernels take row windows of 7-14 pixels x up to 48 channels, where
//   each broadcast serves the three taps that read it (cl_row_micro), and stride-1 1x1 convs on channels_last x
//   with at most 32 output channels 14-pixel runs addressed from one pointer (cl_micro's RUN). kxk tiles whose
//   windows lie inside x take one pointer per pixel and one loop over every tap (cl_micro's WIN). Such 1x1 convs
//   with one or two output channels (up to four from 32 inputs) take pixels as the lanes instead (few_out_units).
// The epilogue adds the bias (and a residual), applies the ReLU and writes each row to its output channel
// (out_index) in NCHW or channels_last. Depthwise convs take vectors over channels on channels_last x (and on
// NCHW x restaged, for rows under 128 pixels; dw_cl_units); other convs with one input channel per group a
// direct stencil loop. An optional max pool (max_pool) runs over the finished output in a second parallel pass
// (max_pool2d's kernel, csrc/cpu/max_pool2d.cpp).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "pyprune/check.h"
#include "pyprune/cpu_features.h"
#include "pyprune/derived_cache.h"
#include "pyprune/max_pool.h"
#include "pyprune/scratch.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "pruned_conv2d";
constexpr int kMR = 6;                // output channels per register tile
static_assert(kMR <= 6, "micro_rows instantiates tiles of 1 to 6 rows");
constexpr int kNV = 4;                // pixel vectors per register tile
constexpr int64_t kNR = kNV * kLanes;  // pixels per tile
constexpr int64_t kL1Ahead = 16;       // rows ahead that micro's L1 variant prefetches
constexpr int64_t kTileBatch = 32;     // pixels-as-rows tiles that share a pass over a chunk of taps
constexpr int kMaxRowPixels = 14;      // pixels of the widest pixels-as-rows tile (RUN, row windows)
constexpr int kStageRows = 16;         // pixels a pixels-as-rows stage holds: one 16x16 transpose's rows
static_assert(kMaxRowPixels <= kStageRows, "a stage holds at least one tile");

struct ConvArgs {
  const float* x;
  const float* w;
  const float* bias;
  float* y;
  const int64_t* in_idx;  // x's channel of every kept input channel
  const int64_t* out_ch;  // y's channel of every weight row
  int64_t N, H, W, sN, sC, sH, sW;
  int64_t KH, KW, SH, SW, PH, PW, DH, DW, OH, OW, P;
  int64_t G, Cig, Cog, Kg;
  int64_t oN, oC, oP;  // y strides: image, channel, pixel (pixels are contiguous among themselves)
  bool relu;
  float relu_max;  // the ReLU's cap (+inf: none)
  // a residual laid out as y (null: none), added before the ReLU: y = relu?(conv + bias + res); the value for
  // y[i] is res[i], read where the epilogue writes y (the GEMM and pixels-as-rows paths; the others add it after)
  const float* res;
  // y past half the LLC with x (and the residual): whole aligned vectors of the pixels-as-rows tiles' channels_last
  // stores and of the GEMM tiles' NCHW rows (1x1 convs) leave by non-temporal stores (stream16); a unit range
  // that streamed ends with stream_fence
  bool stream_y;
  // work decomposition of the GEMM path: unit = (tile, group, slice of C_out_g)
  int64_t n_tiles, n_slices, rows_per_slice;
  // staged path (stride 1, kxk): the kept channels copied into zero-bordered planes of width Wp, so the kernel
  // reads every tap as a shifted contiguous row (outputs are computed on the Wp-wide grid, and the Wp - OW extra
  // columns per row are dropped at the store). Each thread stages only the band of rows its own tiles read.
  bool staged;
  int64_t Hp, Wp, tiles_per_image;
};

// A run of pixels of one output row inside a tile: image n, output row oh, columns [ow0, ow0 + len), lanes from j0.
struct Segment {
  int64_t n, oh, ow0, len, j0;
};

PYPRUNE_INLINE int tile_segments(const ConvArgs& a, int64_t q0, int64_t cnt, Segment* seg) {
  int ns = 0;
  for (int64_t j = 0; j < cnt;) {
    const int64_t q = q0 + j, n = q / a.P, p = q % a.P, oh = p / a.OW, ow = p % a.OW;
    const int64_t len = std::min(cnt - j, a.OW - ow);
    seg[ns++] = {n, oh, ow, len, j};
    j += len;
  }
  return ns;
}

// buf[k][j] (k = (c, kh, kw) of group g, j < NR) = x[n_j, in_idx[g * Cig + c], ih, iw] or 0 in the padding.
// The column bounds of each (segment, kw) and the row of each (segment, kh) are worked out once per tile, so
// the loop over kept channels only copies runs and zero-fills the padding.
PYPRUNE_INLINE void pack_tile(const ConvArgs& a, int64_t g, const Segment* seg, int ns, int64_t cnt, int64_t width,
                              float* buf) {
  constexpr int kMaxK = 16;  // kernels up to 16x16 take this path (larger ones fall back to per-row bounds)
  int64_t lo[kMaxK], hi[kMaxK], src_off[kMaxK], row_off[kMaxK];
  const bool tabled = a.KW <= kMaxK && a.KH <= kMaxK;
  for (int s = 0; s < ns; ++s) {
    const Segment& sg = seg[s];
    for (int64_t kw = 0; tabled && kw < a.KW; ++kw) {
      // columns i with 0 <= (ow0 + i) * SW + off_w < W
      const int64_t off_w = kw * a.DW - a.PW, start = sg.ow0 * a.SW + off_w;
      const int64_t first = start >= 0 ? 0 : (-start + a.SW - 1) / a.SW;
      const int64_t past = (a.W - off_w - 1) >= 0 ? (a.W - off_w - 1) / a.SW + 1 - sg.ow0 : 0;
      lo[kw] = std::min(first, sg.len);
      hi[kw] = std::max(lo[kw], std::min(past, sg.len));
      src_off[kw] = start * a.sW;
    }
    for (int64_t kh = 0; tabled && kh < a.KH; ++kh) {
      const int64_t ih = sg.oh * a.SH - a.PH + kh * a.DH;
      row_off[kh] = (ih < 0 || ih >= a.H) ? -1 : sg.n * a.sN + ih * a.sH;
    }
    for (int64_t c = 0; c < a.Cig; ++c) {
      const float* plane = a.x + a.in_idx[g * a.Cig + c] * a.sC;
      for (int64_t kh = 0; kh < a.KH; ++kh) {
        for (int64_t kw = 0; kw < a.KW; ++kw) {
          float* d = buf + ((c * a.KH + kh) * a.KW + kw) * kNR + sg.j0;
          int64_t ro, l, h, so;
          if (tabled) {
            ro = row_off[kh], l = lo[kw], h = hi[kw], so = src_off[kw];
          } else {
            const int64_t ih = sg.oh * a.SH - a.PH + kh * a.DH, start = sg.ow0 * a.SW + kw * a.DW - a.PW;
            ro = (ih < 0 || ih >= a.H) ? -1 : sg.n * a.sN + ih * a.sH;
            l = std::min(sg.len, start >= 0 ? 0 : (-start + a.SW - 1) / a.SW);
            const int64_t last = a.W - 1 - (start - sg.ow0 * a.SW);
            h = std::max(l, std::min(sg.len, last >= 0 ? last / a.SW + 1 - sg.ow0 : 0));
            so = start * a.sW;
          }
          if (ro < 0) {
            for (int64_t i = 0; i < sg.len; ++i) d[i] = 0.f;
            continue;
          }
          const float* src = plane + ro + so;  // column i reads src[i * SW * sW]
          for (int64_t i = 0; i < l; ++i) d[i] = 0.f;
          if (a.SW == 1 && a.sW == 1) {
            for (int64_t i = l; i < h; ++i) d[i] = src[i];
          } else {
            const int64_t step = a.SW * a.sW;
            for (int64_t i = l; i < h; ++i) d[i] = src[i * step];
          }
          for (int64_t i = h; i < sg.len; ++i) d[i] = 0.f;
        }
      }
    }
  }
  for (int64_t k = 0; k < a.Kg; ++k)
    for (int64_t j = cnt; j < width; ++j) buf[k * kNR + j] = 0.f;
}

// acc[r][v] = sum_k w[r][k] * b[k][16 v ...]: the weight scalar is broadcast from its row.
// PF: also prefetch each row's next tile (brow[k] + NR) into L2, for operands read in place from x or the staged
// planes, where one tile touches K rows at a large stride (too many streams for the hardware prefetcher); into L2,
// not L1, so that the current tile's rows stay in L1 for the tile's other panels (A/B in one process, 2 threads:
// 256->64 1x1 @56 batch 8 3-8% faster, the rest within 1%). L1: also prefetch the row kL1Ahead rows on into L1,
// for tiles too large to stay there (brow holds K + kL1Ahead rows; the rule: gemm_units).
// Row r of the result goes to out + r * ldo + c0: the store stage (ldo = kNR), or y itself (see gemm_units).
template <class V, int MR, int NV, bool PF, bool L1 = false>
PYPRUNE_INLINE void micro(const float* w, int64_t ldw, const float* const* brow, int64_t K, const float* bias,
                          bool relu, float cap, float* out, int64_t ldo, int64_t c0) {
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{} + (bias ? bias[r] : 0.f);
  const float* wr[MR];
  for (int r = 0; r < MR; ++r) wr[r] = w + r * ldw;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = brow[k] + c0;
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load16<V>(b + v * kLanes);
    if (PF)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(b + kNR + v * kLanes, 0, 2);
    if (L1)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(brow[k + kL1Ahead] + c0 + v * kLanes, 0, 3);
    for (int r = 0; r < MR; ++r) {
      const float s = wr[r][k];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
  // (unrolled by pragma: with ldo a variable, GCC 12 kept acc in memory too and stored it on every k, which
  // took 1.85x the time)
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      store16(out + r * ldo + c0 + v * kLanes, relu ? relu16(acc[r][v], cap) : acc[r][v]);
    }
}

// Full 6-row panels of a tile read in place (64 pixels) are the hot case and get the prefetching variants;
// partial ones (the last rows of a group) and packed tiles do without, which keeps the instantiations (and
// the compile time) down.
template <class V, int NV>
PYPRUNE_INLINE void micro_rows(int mr, bool pf, bool l1, const float* w, int64_t ldw, const float* const* brow,
                               int64_t K, const float* bias, bool relu, float cap, float* out, int64_t ldo,
                               int64_t c0) {
  if (mr == kMR && l1) {
    if (pf) micro<V, kMR, NV, true, true>(w, ldw, brow, K, bias, relu, cap, out, ldo, c0);
    else micro<V, kMR, NV, false, true>(w, ldw, brow, K, bias, relu, cap, out, ldo, c0);
    return;
  }
  if (mr == kMR && pf) {
    micro<V, kMR, NV, true>(w, ldw, brow, K, bias, relu, cap, out, ldo, c0);
    return;
  }
  switch (mr) {
#define PYPRUNE_MR_CASE(R) \
  case R: micro<V, R, NV, false>(w, ldw, brow, K, bias, relu, cap, out, ldo, c0); break;
    PYPRUNE_MR_CASE(1) PYPRUNE_MR_CASE(2) PYPRUNE_MR_CASE(3)
    PYPRUNE_MR_CASE(4) PYPRUNE_MR_CASE(5) PYPRUNE_MR_CASE(6)
#undef PYPRUNE_MR_CASE
  }
}

// d[i] = relu?(s[i] + b[i] + r[i]) for i < n (b null: no bias), the residual's epilogue on a contiguous run (y
// is a new tensor: d aliases none of the others).
PYPRUNE_INLINE void add_residual_run(float* __restrict d, const float* __restrict s, const float* __restrict b,
                                     const float* __restrict r, int64_t n, bool relu, float cap) {
  if (b && relu) {
    for (int64_t i = 0; i < n; ++i) d[i] = relu1(s[i] + b[i] + r[i], cap);
  } else if (b) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i] + b[i] + r[i];
  } else if (relu) {
    for (int64_t i = 0; i < n; ++i) d[i] = relu1(s[i] + r[i], cap);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i] + r[i];
  }
}

// stage rows -> y: one output channel per row, the tile's pixels through its segments.
template <class V>
PYPRUNE_INLINE void store_rows(const ConvArgs& a, const float* stage, int mr, int64_t row0, const Segment* seg,
                               int ns) {
  if (!a.res && a.oC == 1 && a.out_ch[row0 + mr - 1] - a.out_ch[row0] == mr - 1) {
    // channels_last, consecutive channels: each pixel's mr outputs are one short contiguous run
    for (int s = 0; s < ns; ++s) {
      const Segment& sg = seg[s];
      float* d = a.y + sg.n * a.oN + (sg.oh * a.OW + sg.ow0) * a.oP + a.out_ch[row0];
      for (int64_t i = 0; i < sg.len; ++i)
        for (int r = 0; r < mr; ++r) d[i * a.oP + r] = stage[r * kNR + sg.j0 + i];
    }
    return;
  }
  const bool relu = a.relu;  // (with a residual: y = relu?(stage + the residual where y is written))
  const float cap = a.relu_max;
  const int64_t oP = a.oP;
  for (int r = 0; r < mr; ++r) {
    float* yc = a.y + a.out_ch[row0 + r] * a.oC;
    const float* src = stage + r * kNR;
    for (int s = 0; s < ns; ++s) {
      const Segment& sg = seg[s];
      float* d = yc + sg.n * a.oN + (sg.oh * a.OW + sg.ow0) * oP;
      const float* res = a.res ? a.res + (d - a.y) : nullptr;
      if (res && oP == 1) {
        add_residual_run(d, src + sg.j0, nullptr, res, sg.len, relu, cap);
      } else if (res) {
        for (int64_t i = 0; i < sg.len; ++i) {
          const float v = src[sg.j0 + i] + res[i * oP];
          d[i * oP] = relu ? relu1(v, cap) : v;
        }
      } else if (oP == 1 && a.stream_y) {  // whole aligned vectors by non-temporal stores
        int64_t i = 0;
        for (; i < sg.len && reinterpret_cast<uintptr_t>(d + i) % 64 != 0; ++i) d[i] = src[sg.j0 + i];
        for (; i + kLanes <= sg.len; i += kLanes) stream16(d + i, load16<V>(src + sg.j0 + i));
        for (; i < sg.len; ++i) d[i] = src[sg.j0 + i];
      } else if (oP == 1) {
        std::memcpy(d, src + sg.j0, sg.len * sizeof(float));
      } else {
        for (int64_t i = 0; i < sg.len; ++i) d[i * oP] = src[sg.j0 + i];
      }
    }
  }
}

// The runs of a staged tile (pixels q0 .. q0 + cnt of image n on the Wp-wide grid) that land in the output.
PYPRUNE_INLINE int staged_segments(const ConvArgs& a, int64_t n, int64_t q0, int64_t cnt, Segment* seg) {
  int ns = 0;
  for (int64_t j = 0; j < cnt;) {
    const int64_t q = q0 + j, oh = q / a.Wp, ow = q % a.Wp;
    const int64_t len = std::min(cnt - j, a.Wp - ow);
    if (ow < a.OW) seg[ns++] = {n, oh, ow, std::min(len, a.OW - ow), j};
    j += len;
  }
  return ns;
}

// Rows [r0, r1) of image n's zero-bordered planes (padded row r is input row r - PH), every kept channel, into
// band[c][(r - r0) * Wp + ...] (plane stride ld), then zeros to the end of each plane: the last tile's taps read
// past the band (lanes that are never stored, but must not hold denormals or NaN).
PYPRUNE_INLINE void stage_band(const ConvArgs& a, int64_t n, int64_t r0, int64_t r1, float* band, int64_t ld) {
  const int64_t c_in = a.G * a.Cig;
  for (int64_t c = 0; c < c_in; ++c) {
    const float* src = a.x + n * a.sN + a.in_idx[c] * a.sC;
    float* plane = band + c * ld;
    for (int64_t r = r0; r < r1; ++r) {
      float* d = plane + (r - r0) * a.Wp;
      const int64_t h = r - a.PH;
      if (h < 0 || h >= a.H) {
        std::memset(d, 0, a.Wp * sizeof(float));
        continue;
      }
      const float* sr = src + h * a.sH;
      for (int64_t i = 0; i < a.PW; ++i) d[i] = 0.f;
      if (a.sW == 1) {
        std::memcpy(d + a.PW, sr, a.W * sizeof(float));
      } else {
        for (int64_t i = 0; i < a.W; ++i) d[a.PW + i] = sr[i * a.sW];
      }
      for (int64_t i = a.PW + a.W; i < a.Wp; ++i) d[i] = 0.f;
    }
    std::memset(plane + (r1 - r0) * a.Wp, 0, (ld - (r1 - r0) * a.Wp) * sizeof(float));
  }
}

template <class V>
PYPRUNE_INLINE void gemm_units(const ConvArgs& a, int64_t u0, int64_t u1) {
  const bool direct_ok = a.KH == 1 && a.KW == 1 && a.SH == 1 && a.SW == 1 && a.PH == 0 && a.PW == 0 &&
                         a.sW == 1 && a.sH == a.W;
  // im2col tile (every lane micro reads is written by pack_tile first) and the store stage: not cleared
  const Scratch storage(kScratchTile, (a.staged ? 0 : a.Kg * kNR) + kMR * kNR);
  float* buf = storage.get();
  float* stage = buf + (a.staged ? 0 : a.Kg * kNR);
  // staged path: this range's band of the current image's planes (rows band_r0 ..), plane stride band_ld
  Scratch band;
  int64_t band_size = 0, band_n = -1, band_r0 = 0, band_ld = 0;
  const int64_t t_lo = u0 / a.n_slices / a.G, t_hi = (u1 - 1) / a.n_slices / a.G;  // this range's tiles
  // (past the last row, kL1Ahead copies of it: micro's L1 variant prefetches that far ahead)
  std::vector<const float*> brow(std::max<int64_t>(a.Kg, 1) + kL1Ahead);
  // A tile's rows past 24 KiB leave L1 before its next panel reads them again, and on gathered rows (kept
  // channels with gaps between their planes) no hardware prefetcher sees a stride to fetch them back: the full
  // panels of in-place tiles prefetch row k + kL1Ahead into L1 (A/B in one process, 2 threads, Zen 4 VM, NCHW
  // 1x1, batch 8: 256->64 @56 keep 0.75 / 0.5 0.96-0.97x / 0.94-0.96x the time over two processes, gather cost
  // +6-10% -> +2-6%; 512->128 and 1024->256 @28 keep 0.75 0.97-0.99x; contiguous channels, batch 1 and
  // staged kxk tiles within 1%; not measured on AVX2)
  const bool l1_ahead = a.Kg * kNR * 4 > (24 << 10);
  Segment seg[kNR];
  int64_t packed = -1;  // (tile, group) whose operand is in brow
  bool in_place = false;  // brow points into x or the staged planes (not the im2col buffer)
  int ns = 0;
  int64_t cnt = 0;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t s = u % a.n_slices, tg = u / a.n_slices, g = tg % a.G, t = tg / a.G;
    if (tg != packed) {
      if (a.staged) {
        const int64_t tpi = a.tiles_per_image, n = t / tpi, q0 = (t % tpi) * kNR;
        cnt = std::min(kNR, a.OH * a.Wp - q0);
        if (n != band_n) {  // the rows this range's tiles of image n read: from the first tile's row on
          const int64_t q_lo = (std::max(t_lo, n * tpi) - n * tpi) * kNR;
          const int64_t q_hi = std::min((std::min(t_hi, n * tpi + tpi - 1) - n * tpi + 1) * kNR, a.OH * a.Wp);
          band_r0 = q_lo / a.Wp;
          const int64_t r1 = std::min(a.Hp, (q_hi - 1) / a.Wp + (a.KH - 1) * a.DH + 1);
          // slack for the taps of the last tile (a full tile past the rows, plus a row's reach), whole vectors
          band_ld = round_up((r1 - band_r0) * a.Wp + kNR + a.Wp, kLanes);
          if (band_ld % 1024 == 0) band_ld += kLanes;  // planes 4 KiB apart would share L1 sets
          if (a.G * a.Cig * band_ld > band_size) {
            band_size = a.G * a.Cig * band_ld;
            band = Scratch(kScratchBand, band_size);
          }
          stage_band(a, n, band_r0, r1, band.get(), band_ld);
          band_n = n;
        }
        ns = staged_segments(a, n, q0, cnt, seg);
        const float* base = band.get() + g * a.Cig * band_ld + q0 - band_r0 * a.Wp;
        for (int64_t c = 0, k = 0; c < a.Cig; ++c)
          for (int64_t kh = 0; kh < a.KH; ++kh)
            for (int64_t kw = 0; kw < a.KW; ++kw, ++k) brow[k] = base + c * band_ld + kh * a.DH * a.Wp + kw * a.DW;
        in_place = true;
      } else {
        const int64_t q0 = t * kNR;
        cnt = std::min(kNR, a.N * a.P - q0);
        ns = tile_segments(a, q0, cnt, seg);
        const int64_t width = round_up(cnt, kLanes);
        if (direct_ok && ns >= 1 && seg[0].n == seg[ns - 1].n && cnt == kNR) {
          const float* base = a.x + seg[0].n * a.sN + (q0 % a.P);
          for (int64_t k = 0; k < a.Kg; ++k) brow[k] = base + a.in_idx[g * a.Cig + k] * a.sC;
          in_place = true;
        } else {
          pack_tile(a, g, seg, ns, cnt, width, buf);
          for (int64_t k = 0; k < a.Kg; ++k) brow[k] = buf + k * kNR;
          in_place = false;
        }
      }
      for (int64_t k = a.Kg; k < a.Kg + kL1Ahead; ++k) brow[k] = brow[a.Kg - 1];
      packed = tg;
    }
    const int nv = static_cast<int>((cnt + kLanes - 1) / kLanes);
    // (non-temporal stores and residuals go through store_rows; staged tiles are on the Wp-wide grid)
    const bool direct_tile =
        !a.staged && !a.res && !a.stream_y && a.oP == 1 && cnt == kNR && seg[0].n == seg[ns - 1].n;
    float* const y_run = direct_tile ? a.y + seg[0].n * a.oN + (seg[0].oh * a.OW + seg[0].ow0) : nullptr;
    const int64_t r_begin = s * a.rows_per_slice, r_end = std::min(a.Cog, r_begin + a.rows_per_slice);
    for (int64_t r = r_begin; r < r_end; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, r_end - r));
      const int64_t row = g * a.Cog + r;
      const float* w = a.w + row * a.Kg;
      const float* b = a.bias ? a.bias + row : nullptr;
      const bool pf = in_place && r == r_begin;  // the first panel of a tile fetches the next tile's rows
      const bool l1 = in_place && l1_ahead && V::kParts == 1;  // AVX-512 (measured there), full panels only
      const bool relu = a.relu && !a.res;  // with a residual, the ReLU comes after it, in store_rows
      // A full tile of one image on NCHW y is one run of each output plane: a panel of consecutive output
      // channels goes from the registers to y, without the stage and its copy (old and new builds in
      // alternating processes, 2 threads, Zen 4 VM, 256->64 1x1 @56 batch 1: keep 0.25 0.81-0.96x the time,
      // keep 0.75 0.91-1.00x, keep 0.5 0.92-1.04x)
      const bool direct = direct_tile && a.out_ch[row + mr - 1] - a.out_ch[row] == mr - 1;
      float* const out = direct ? y_run + a.out_ch[row] * a.oC : stage;
      const int64_t ldo = direct ? a.oC : kNR;
      if constexpr (V::kParts > 1) {  // AVX2, baseline: 6 x 1 tiles per 16 pixels (6 x 4 would spill)
        for (int v = 0; v < nv; ++v)
          micro_rows<V, 1>(mr, pf, l1, w, a.Kg, brow.data(), a.Kg, b, relu, a.relu_max, out, ldo, v * kLanes);
      } else if (nv == 4) {
        micro_rows<V, 4>(mr, pf, l1, w, a.Kg, brow.data(), a.Kg, b, relu, a.relu_max, out, ldo, 0);
      } else if (nv == 3) {
        micro_rows<V, 3>(mr, pf, l1, w, a.Kg, brow.data(), a.Kg, b, relu, a.relu_max, out, ldo, 0);
      } else if (nv == 2) {
        micro_rows<V, 2>(mr, pf, l1, w, a.Kg, brow.data(), a.Kg, b, relu, a.relu_max, out, ldo, 0);
      } else {
        micro_rows<V, 1>(mr, pf, l1, w, a.Kg, brow.data(), a.Kg, b, relu, a.relu_max, out, ldo, 0);
      }
      if (!direct) store_rows<V>(a, stage, mr, row, seg, ns);
    }
  }
}

// One input channel per group: each output plane is a stencil over one input plane. Unit = (image, out row).
PYPRUNE_INLINE void depthwise_units(const ConvArgs& a, int64_t u0, int64_t u1) {
  std::vector<float> acc(a.OW);
  const int64_t C_out = a.G * a.Cog;
  // the epilogue's settings as locals: read through `a` inside the store loop, which may alias it for all the
  // compiler knows, they were reloaded for every output, and the loop stayed scalar
  const bool relu = a.relu;
  const float cap = a.relu_max;
  const int64_t OW = a.OW, oP = a.oP;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / C_out, row = u % C_out, g = row / a.Cog;
    const float* plane = a.x + n * a.sN + a.in_idx[g] * a.sC;
    const float* w = a.w + row * a.Kg;
    float* yc = a.y + n * a.oN + a.out_ch[row] * a.oC;
    const float b = a.bias ? a.bias[row] : 0.f;
    for (int64_t oh = 0; oh < a.OH; ++oh) {
      for (int64_t i = 0; i < a.OW; ++i) acc[i] = b;
      for (int64_t kh = 0; kh < a.KH; ++kh) {
        const int64_t ih = oh * a.SH - a.PH + kh * a.DH;
        if (ih < 0 || ih >= a.H) continue;
        const float* src = plane + ih * a.sH;
        for (int64_t kw = 0; kw < a.KW; ++kw) {
          const float wv = w[kh * a.KW + kw];
          const int64_t off_w = kw * a.DW - a.PW;
          const int64_t lo = off_w >= 0 ? 0 : std::min(a.OW, (-off_w + a.SW - 1) / a.SW);
          const int64_t hi = std::max(lo, std::min(a.OW, a.W - off_w - 1 >= 0 ? (a.W - off_w - 1) / a.SW + 1 : 0));
          float* ac = acc.data();
          if (a.SW == 1 && a.sW == 1) {
            const float* s1 = src + off_w;
            for (int64_t i = lo; i < hi; ++i) ac[i] += wv * s1[i];
          } else {
            for (int64_t i = lo; i < hi; ++i) ac[i] += wv * src[(i * a.SW + off_w) * a.sW];
          }
        }
      }
      float* d = yc + oh * a.OW * a.oP;
      if (relu)
        for (int64_t i = 0; i < OW; ++i) d[i * oP] = relu1(acc[i], cap);
      else
        for (int64_t i = 0; i < OW; ++i) d[i * oP] = acc[i];
    }
  }
}

// ---- channels_last input: vectors over output channels, pixels broadcast ----------------------------------
// Depthwise convs (one input and one output channel per group) on a channels_last input: vectors over 16
// channels, each output pixel the sum over its taps of a weight vector times the input pixel's vector. x holds
// the kept channels as one run per pixel (x itself when they are consecutive, else a compacted copy), channel
// g of pixel (n, h, w) at x + n * sN + h * sH + w * sW + g; wt is the weight transposed, (taps, G), so that a
// tap's weights of 16 channels are one vector. Unit = (image, output row, block of kDwBlock channels).
struct DwArgs {
  const float* x;
  int64_t sN, sH, sW;
  const float* wt;
  bool nchw_out;  // y is NCHW (x restaged): a row's outputs gather in a stage, then go out through transposes
};
constexpr int64_t kDwStagePixels = 128;  // NCHW output rows take this path only when shorter
constexpr int64_t kDwBlock = 64;

#if PYPRUNE_X86
// Lanes [lo, hi) of an AVX-512 vector into d[lo, hi) as one masked store (the masked-off lanes' memory is not
// touched and never faults).
PYPRUNE_INLINE void store_lanes(float* d, const VecAvx512& v, int64_t lo, int64_t hi) {
  const unsigned mask = ((1u << hi) - 1) & ~((1u << lo) - 1);
  __builtin_ia32_storeups512_mask(d, v.h[0], static_cast<uint16_t>(mask));
}
// Lanes [lo, hi) of s[0, 16) as one masked load, the others zero (their memory not touched).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
PYPRUNE_INLINE VecAvx512 load_lanes(const float* s, int64_t lo, int64_t hi) {
  const unsigned mask = ((1u << hi) - 1) & ~((1u << lo) - 1);
  VecAvx512 v;
  v.h[0] = __builtin_ia32_loadups512_mask(s, VecAvx512::H{}, static_cast<uint16_t>(mask));
  return v;
}
#pragma GCC diagnostic pop
#endif

// 16 floats from p; with MASK (AVX-512 only) lanes [0, nl) of them, as one masked load (the lanes past nl are
// zero, their memory never touched: no fault past the end of x). Always inlined into the AVX-512 entry point:
// GCC's note that a 64-byte vector return without AVX-512 changes the ABI does not apply (-Wpsabi).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <class V, bool MASK>
PYPRUNE_INLINE V dw_load(const float* p, int nl) {
#if PYPRUNE_X86
  if constexpr (MASK) {
    V v;
    v.h[0] = __builtin_ia32_loadups512_mask(p, typename V::H{}, static_cast<uint16_t>((1u << nl) - 1));
    return v;
  }
#endif
  (void)nl;
  return load16<V>(p);
}
#pragma GCC diagnostic pop

// Channels [c0, c0 + nl) of output row (n, oh): nl = 16, or with MASK (AVX-512) the last 1-15 channels, in
// masked loads and stores. K3: a 3x3 kernel, its 9 weight vectors kept in registers. The settings are locals:
// read through `a` they were reloaded after every store (which may alias it for all the compiler knows).
// Output pixels whose taps all lie inside the row (the interior) run without bounds checks.
template <class V, bool K3, bool MASK = false>
PYPRUNE_INLINE void dw_cl_vector(const ConvArgs& a, const DwArgs& d, int64_t n, int64_t oh, int64_t c0,
                                 int nl = kLanes) {
  const int64_t KH = K3 ? 3 : a.KH, KW = K3 ? 3 : a.KW, SW = a.SW, PW = a.PW, DW = a.DW, W = a.W, OW = a.OW;
  const int64_t G = a.G, sW = d.sW, oP = a.oP;
  const bool relu = a.relu;
  const float cap = a.relu_max;
  const float* wt = d.wt + c0;
  V wv[K3 ? 9 : 1];
  if constexpr (K3)
    for (int t = 0; t < 9; ++t) wv[t] = dw_load<V, MASK>(wt + t * G, nl);
  const V bias = a.bias ? dw_load<V, MASK>(a.bias + c0, nl) : V{};
  // the 3 rows the taps read, for the blocks below, which run only when all of them lie inside x
  const float* row[3] = {};
  bool all_rows = K3;
  for (int64_t kh = 0; K3 && kh < 3; ++kh) {
    const int64_t ih = oh * a.SH - a.PH + kh * a.DH;
    all_rows = all_rows && ih >= 0 && ih < a.H;
    if (all_rows) row[kh] = d.x + n * d.sN + ih * d.sH + c0;
  }
  const bool run = a.out_ch[c0 + nl - 1] - a.out_ch[c0] == nl - 1;  // the outputs are one run
  float* yrow = a.y + n * a.oN + oh * OW * oP;
  float* yrun = yrow + a.out_ch[c0];
  // interior: 0 <= ow * SW - PW and ow * SW - PW + (KW - 1) * DW < W
  const int64_t lo = std::min(OW, (PW + SW - 1) / SW);
  const int64_t last = W - 1 + PW - (KW - 1) * DW;
  const int64_t hi = std::max(lo, std::min(OW, last >= 0 ? last / SW + 1 : 0));
  // NCHW output: the row's pixels, 16 channels each (the host takes this path only for OW < kDwStagePixels)
  alignas(64) float stage[kDwStagePixels * kLanes];
  auto finish = [&](V acc, int64_t ow) {
    if (relu) acc = relu16(acc, cap);
    if (d.nchw_out) {
      store16(stage + ow * kLanes, acc);
      return;
    }
    if (run) {
#if PYPRUNE_X86
      if constexpr (MASK) {
        store_lanes(yrun + ow * oP, acc, 0, nl);
        return;
      }
#endif
      store16(yrun + ow * oP, acc);
    } else {
      float* yp = yrow + ow * oP;
      alignas(64) float t[kLanes];
      store16(t, acc);
      for (int j = 0; j < nl; ++j) yp[a.out_ch[c0 + j]] = t[j];
    }
  };
  int64_t blk_hi = lo;  // [lo, blk_hi): computed in blocks below
  if constexpr (K3) {
    // R output pixels at a time in the interior: R independent chains of 9 FMAs, where one chain a pixel left
    // the FMAs waiting on each other's latency (A/B, 2 threads, Xeon VM, 3x3 + ReLU6 channels_last, against one
    // pixel at a time: 144 channels @56 0.66x the time, batch 8 0.60x, stride 2 0.74x; 384 @14 0.86x; 32 @112
    // 0.50x; 96 @112 stride 2 0.76x; 960 @7 0.94x): blocks of 8, then of 4 (AVX2, the baseline: 2)
    auto blocks = [&](auto r_const) {
      constexpr int R = decltype(r_const)::value;
      for (; all_rows && blk_hi + R <= hi; blk_hi += R) {
        V acc[R];
        for (int r = 0; r < R; ++r) acc[r] = bias;
        const int64_t off = (blk_hi * SW - PW) * sW, step = SW * sW;
#pragma GCC unroll 3
        for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw) {
            const float* p = row[kh] + off + kw * DW * sW;
            for (int r = 0; r < R; ++r) acc[r] += wv[kh * 3 + kw] * dw_load<V, MASK>(p + r * step, nl);
          }
        for (int r = 0; r < R; ++r) finish(acc[r], blk_hi + r);
      }
    };
    if constexpr (V::kParts == 1) {
      blocks(std::integral_constant<int, 8>{});
      blocks(std::integral_constant<int, 4>{});
    } else {
      blocks(std::integral_constant<int, 2>{});
    }
  }
  // the rest (borders, the interior's remainder) one pixel at a time, with bounds checks
  for (int64_t ow = 0; ow < OW; ++ow) {
    if (ow >= lo && ow < blk_hi) continue;
    V acc = bias;
    const int64_t iw0 = ow * SW - PW;
    for (int64_t kh = 0; kh < KH; ++kh) {
      const int64_t ih = oh * a.SH - a.PH + kh * a.DH;
      if (ih < 0 || ih >= a.H) continue;
      const float* xr = d.x + n * d.sN + ih * d.sH + c0;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = iw0 + kw * DW;
        if (iw < 0 || iw >= W) continue;
        // (wv[] stays in registers)
        acc += dw_load<V, MASK>(wt + (kh * KW + kw) * G, nl) * dw_load<V, MASK>(xr + iw * sW, nl);
      }
    }
    finish(acc, ow);
  }
  if (!d.nchw_out) return;
  // 16 pixels at a time: 16 x 16 transposed, channel j's pixels then one run of its NCHW row (a vector per
  // channel instead of one scalar store per output)
  for (int64_t ow0 = 0; ow0 < OW; ow0 += kLanes) {
    const int64_t cnt = std::min<int64_t>(kLanes, OW - ow0);
    V r[kLanes];
    for (int i = 0; i < kLanes; ++i) r[i] = i < cnt ? load16<V>(stage + (ow0 + i) * kLanes) : V{};
    transpose16(r);
    for (int j = 0; j < nl; ++j) {
      float* dst = a.y + n * a.oN + a.out_ch[c0 + j] * a.oC + oh * OW + ow0;
#if PYPRUNE_X86
      if constexpr (V::kParts == 1) {
        store_lanes(dst, r[j], 0, cnt);
        continue;
      }
#endif
      if (cnt == kLanes) {
        store16(dst, r[j]);
      } else {
        alignas(64) float t[kLanes];
        store16(t, r[j]);
        std::copy(t, t + cnt, dst);
      }
    }
  }
}

// Channel g of output row (n, oh), the channels past the last whole vector.
PYPRUNE_INLINE void dw_cl_scalar(const ConvArgs& a, const DwArgs& d, int64_t n, int64_t oh, int64_t g) {
  for (int64_t ow = 0; ow < a.OW; ++ow) {
    float acc = a.bias ? a.bias[g] : 0.f;
    for (int64_t kh = 0; kh < a.KH; ++kh) {
      const int64_t ih = oh * a.SH - a.PH + kh * a.DH;
      if (ih < 0 || ih >= a.H) continue;
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const int64_t iw = ow * a.SW - a.PW + kw * a.DW;
        if (iw >= 0 && iw < a.W) acc += d.wt[(kh * a.KW + kw) * a.G + g] * d.x[n * d.sN + ih * d.sH + iw * d.sW + g];
      }
    }
    a.y[n * a.oN + a.out_ch[g] * a.oC + (oh * a.OW + ow) * a.oP] = a.relu ? relu1(acc, a.relu_max) : acc;
  }
}

// The kept channels of channels_last x as one run per pixel: dst[p * Ck + j] = x[pixel p, in_idx[j]] for pixels
// [p0, p1). keep[b]: which of channels 16 b .. 16 b + 15 are kept. AVX-512 compresses each block's kept lanes
// into place (a masked load, a compress and a masked store per 16 channels); the other ISAs copy one by one.
// Locals, not a's fields: read through `a` they were reloaded after every store (some 2 ns an element).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // (inlined into the AVX-512 entry point: see dw_load)
template <class V>
PYPRUNE_INLINE void compact_cl_units(const ConvArgs& a, const uint16_t* keep, int64_t Ck, float* dst, int64_t p0,
                                     int64_t p1) {
  const int64_t W = a.W, HW = a.H * a.W, sN = a.sN, sH = a.sH, sW = a.sW;
  const float* xs = a.x;
  const int64_t* idx = a.in_idx;
  const int64_t blocks = idx[Ck - 1] / kLanes + 1;  // up to the last kept channel's
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict src = xs + (p / HW) * sN + (p % HW / W) * sH + (p % W) * sW;
    float* __restrict d = dst + p * Ck;
#if PYPRUNE_X86
    if constexpr (V::kParts == 1) {
      for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t m = keep[b];
        if (!m) continue;
        const int nb = __builtin_popcount(m);
        // (the masked load reads no lane past the last kept channel, so never past the end of x)
        const auto v = __builtin_ia32_loadups512_mask(src + b * kLanes, VecAvx512::H{}, m);
        const auto c = __builtin_ia32_compresssf512_mask(v, VecAvx512::H{}, m);
        __builtin_ia32_storeups512_mask(d, c, static_cast<uint16_t>((1u << nb) - 1));
        d += nb;
      }
      continue;
    }
#endif
    (void)keep, (void)blocks;
    for (int64_t j = 0; j < Ck; ++j) d[j] = src[idx[j]];
  }
}
#pragma GCC diagnostic pop

template <class V>
PYPRUNE_INLINE void dw_cl_units(const ConvArgs& a, const DwArgs& d, int64_t u0, int64_t u1) {
  const int64_t blocks = (a.G + kDwBlock - 1) / kDwBlock;
  const bool k3 = a.KH == 3 && a.KW == 3;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u % blocks, row = u / blocks, n = row / a.OH, oh = row % a.OH;
    const int64_t c_end = std::min(a.G, (b + 1) * kDwBlock);
    int64_t c = b * kDwBlock;
    // (each channel vector runs along the whole row; in chunks of 8 or 16 pixels, every vector in turn, it took
    // 0.87-1.51x the time, mostly more)
    for (; c + kLanes <= c_end; c += kLanes) {
      if (k3) dw_cl_vector<V, true>(a, d, n, oh, c);
      else dw_cl_vector<V, false>(a, d, n, oh, c);
    }
#if PYPRUNE_X86
    if constexpr (V::kParts == 1) {  // AVX-512: the last 1-15 channels as one masked vector
      const int nl = static_cast<int>(c_end - c);
      if (nl > 0 && k3) dw_cl_vector<V, true, true>(a, d, n, oh, c, nl);
      else if (nl > 0) dw_cl_vector<V, false, true>(a, d, n, oh, c, nl);
      continue;
    }
#endif
    for (; c < c_end; ++c) dw_cl_scalar(a, d, n, oh, c);
  }
}

// A channels_last x holds each pixel's channels contiguously, which is the layout of a GEMM with pixels as rows:
// acc[pixel r][channel vector v] += x[pixel r, tap, in_idx[c]] * wt[tap][c][16 v ...]. The activation is read
// in place through the kept-channel index as an embedded broadcast (taps in the padding point at a zero row),
// so nothing is staged or packed per pixel; only the weight is transposed to wt (K x Cog16, one channel block
// after another), once and kept (transposed_weight).
struct ClArgs {
  const float* wt;     // per group, its channel blocks, each (KH * KW * Cig) x its width: see block_weight
  const float* zeros;  // a row of zeros covering every channel index (null when no tap lies in the padding)
  int64_t Cog16, MR, NVmax;  // register tile: MR pixels x up to NVmax channel vectors
  int64_t wblock;            // columns per weight block (see block_weight)
  bool rows;                 // row windows (cl_row_micro): MR divides OW
  bool one_run;              // stride-1 unpadded 1x1 on channels_last x: a tile's pixels are one run of x
  bool run;                  // ... and the full tiles take cl_micro's RUN addressing (AVX-512, <= 32 channels)
  bool ahead;                // ... and each tile prefetches the next tile's run (the rule: conv_forward)
  int64_t k_chunk;           // inputs (tap-major: t * Cig + ci) per pass over a batch of tiles
  const int64_t* tap_off;    // (taps): tap (kh, kw)'s offset from a pixel's window origin
  // kxk (not row windows): (G, taps * Cig) offsets of input k = (t, ci) from a pixel's window origin,
  // tap_off[t] + in_idx[g * Cig + ci] * sC; a tile whose pixels' windows all lie inside x reads through them,
  // one pointer per pixel (cl_micro's WIN); null otherwise
  const int64_t* koff;
};

// The weights of the channel block from co0 (a multiple of NVmax * 16) of group g: row k = t * Cig + ci at
// w + k * ld, with ld the block's width (NVmax * 16, less for the group's last block). Each block is one
// contiguous K x ld matrix: with the blocks' rows interleaved (one K x Cog16 matrix), a block's row stride
// was Cog16 floats, and the rows of the block a thread works on were spread over Cog16 / (NVmax * 16) times
// the memory, and the streaming prefetchers fetched the other blocks' rows along with them (A/B in one process,
// 2 threads, Xeon VM, batch 8: 512->512 3x3 @7 keep 0.75 NCHW and channels_last 0.91x the time, keep 0.5
// NCHW 0.92x; 2048->512 1x1 @7 keep 0.5 0.96x; 1024->256 1x1 @14 and 3x3 convs on 14x14 / 28x28 maps within 2%.
// The AVX2 path, whose blocks are 16 channels wide, gained more: old and new builds alternating, 512->512 3x3
// @7 batch 8 keep 0.75 NCHW 0.72x, channels_last 256->256 3x3 @14 batch 1 keep 0.5 0.75x, 128->128 3x3 @28
// batch 8 0.88x).
struct BlockWeight {
  const float* w;
  int64_t ld;
};
PYPRUNE_INLINE BlockWeight block_weight(const ConvArgs& a, const ClArgs& c, int64_t g, int64_t co0) {
  const int64_t K = a.KH * a.KW * a.Cig;
  const int64_t start = co0 / c.wblock * c.wblock;
  return {c.wt + (g * c.Cog16 + start) * K + co0 - start, std::min(c.wblock, c.Cog16 - start)};
}

// The next tile's input, prefetched while a tile computes: `lines` cache lines from p, `per` of them after each
// input channel's FMAs (p null: none). next_line: with each input channel, the line of its row 16 floats past
// the tile's last pixel (a 1x1 conv on NCHW x: the line that the tiles after this one read).
struct Ahead {
  const char* p;
  int64_t lines, per;
  bool next_line;
};

// RUN: a full tile of a stride-1 unpadded 1x1 conv on channels_last x, whose MR pixels are one run sW floats
// apart: addressed from its first pixel's pointer alone instead of MR pointers, which leaves the registers for
// MR = 14 (28 accumulators at two channel vectors, against 8 x 2).
// WIN: a kxk tile whose pixels' windows lie inside x: px holds one pointer per pixel (its window origin) and one
// loop runs over every input k through c.koff, with no per-tap pointers to set up or loops to restart.
template <class V, int MR, int NV, bool RUN = false, bool WIN = false>
PYPRUNE_INLINE void cl_micro(const ConvArgs& a, const ClArgs& c, const float* const* px, int64_t g, int64_t co0,
                             int64_t k0, int64_t k1, const float* init, float* stage, const Ahead& ahead) {
  V acc[MR][NV];
  const char* pf = ahead.p;
  const char* const pf_end = pf + 64 * ahead.lines;
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = init ? load16<V>(init + r * 64 + v * kLanes) : V{};
  const int64_t* idx = a.in_idx + g * a.Cig;
  const int64_t taps = a.KH * a.KW;
  if constexpr (WIN) {
    const float* p[MR];
    for (int r = 0; r < MR; ++r) p[r] = px[r];
    const int64_t* ko = c.koff + g * taps * a.Cig;
    const BlockWeight bw = block_weight(a, c, g, co0);
    const float* w = bw.w + k0 * bw.ld;
    for (int64_t k = k0; k < k1; ++k, w += bw.ld) {
      const int64_t off = ko[k];
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load16<V>(w + v * kLanes);
      for (int r = 0; r < MR; ++r) {
        const float xs = p[r][off];
        for (int v = 0; v < NV; ++v) acc[r][v] += xs * wv[v];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) store16(stage + r * 64 + v * kLanes, acc[r][v]);
    return;
  }
  const BlockWeight bw = block_weight(a, c, g, co0);
  for (int64_t t = k0 / a.Cig; t * a.Cig < k1; ++t) {
    const float* const* pt = px + t * c.MR;  // (px holds c.MR pointers a tap: MR < c.MR in a short tile)
    const float* p[MR];
    for (int r = 0; r < (RUN ? 1 : MR); ++r) p[r] = pt[r];
    const int64_t ci0 = std::max<int64_t>(0, k0 - t * a.Cig), ci1 = std::min(a.Cig, k1 - t * a.Cig);
    const float* w = bw.w + (t * a.Cig + ci0) * bw.ld;
    for (int64_t ci = ci0; ci < ci1; ++ci, w += bw.ld) {
      const int64_t off = idx[ci] * a.sC;
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load16<V>(w + v * kLanes);
      for (int64_t e = 0; e < ahead.per && pf < pf_end; ++e, pf += 64) __builtin_prefetch(pf, 0, 2);
      if constexpr (!RUN) {  // (RUN tiles are channels_last)
        if (ahead.next_line) __builtin_prefetch(p[MR - 1] + off + kLanes, 0, 2);
      }
      for (int r = 0; r < MR; ++r) {
        float xs;
        if constexpr (RUN) xs = p[0][off + r * a.sW];
        else xs = p[r][off];
        for (int v = 0; v < NV; ++v) acc[r][v] += xs * wv[v];
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store16(stage + r * 64 + v * kLanes, acc[r][v]);
}

template <class V, int MR, bool WIN>
PYPRUNE_INLINE void cl_micro_nv(int nv, const ConvArgs& a, const ClArgs& c, const float* const* px, int64_t g,
                                int64_t co0, int64_t k0, int64_t k1, const float* init, float* stage,
                                const Ahead& ahead) {
  if constexpr (V::kParts > 1) {  // AVX2, baseline: one channel vector per tile (the host sets NVmax = 1)
    cl_micro<V, MR, 1, false, WIN>(a, c, px, g, co0, k0, k1, init, stage, ahead);
    return;
  }
  if (nv >= 4) cl_micro<V, MR, (MR <= 6 ? 4 : 1), false, WIN>(a, c, px, g, co0, k0, k1, init, stage, ahead);
  else if (nv == 3) cl_micro<V, MR, (MR <= 8 ? 3 : 1), false, WIN>(a, c, px, g, co0, k0, k1, init, stage, ahead);
  else if (nv == 2) cl_micro<V, MR, 2, false, WIN>(a, c, px, g, co0, k0, k1, init, stage, ahead);
  else cl_micro<V, MR, 1, false, WIN>(a, c, px, g, co0, k0, k1, init, stage, ahead);
}

// Row windows (KW = 3, stride and dilation 1 along the row, PW <= 1), first for at most 32 output channels, where
// one broadcast per FMA vector leaves the loads, not the FMAs, as the bound, and then for wider blocks too,
// where the fewer loads per FMA pay as well (see the host's rule): a tile is MR consecutive pixels of one
// output row, and each input value of its window (MR + 2 columns) is broadcast once for the three taps kw that
// read it (3 * NV FMAs per broadcast). L / R: the window's first / last column lies in the padding (skipped).
template <class V, int MR, int NV, bool L, bool R>
PYPRUNE_INLINE void cl_row_micro(const ConvArgs& a, const ClArgs& c, int64_t n, int64_t oh, int64_t ow0, int64_t g,
                                 int64_t co0, float* stage) {
  constexpr int KW = 3, J = MR + KW - 1;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  const int64_t* idx = a.in_idx + g * a.Cig;
  const BlockWeight bw = block_weight(a, c, g, co0);
  const int64_t tap_stride = a.Cig * bw.ld, sW = a.sW;
  for (int64_t kh = 0; kh < a.KH; ++kh) {
    const int64_t ih = oh * a.SH - a.PH + kh * a.DH;
    if (ih < 0 || ih >= a.H) continue;  // a row of padding adds nothing
    const float* row = a.x + n * a.sN + ih * a.sH + (ow0 - a.PW + L) * sW;  // window column L
    const float* w = bw.w + kh * KW * a.Cig * bw.ld;
    for (int64_t ci = 0; ci < a.Cig; ++ci, w += bw.ld) {
      V wv[KW][NV];
      for (int kw = 0; kw < KW; ++kw)
        for (int v = 0; v < NV; ++v) wv[kw][v] = load16<V>(w + kw * tap_stride + v * kLanes);
      const float* q = row + idx[ci] * a.sC;
#pragma GCC unroll 32
      for (int j = L; j < J - R; ++j, q += sW) {
        const float xs = *q;
#pragma GCC unroll 3
        for (int kw = 0; kw < KW; ++kw) {
          const int r = j - kw;
          if (r >= 0 && r < MR)
            for (int v = 0; v < NV; ++v) acc[r][v] += xs * wv[kw][v];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store16(stage + r * 64 + v * kLanes, acc[r][v]);
}

template <class V, int MR, int NV>
PYPRUNE_INLINE void cl_row_lr(bool l, bool r, const ConvArgs& a, const ClArgs& c, int64_t n, int64_t oh,
                              int64_t ow0, int64_t g, int64_t co0, float* stage) {
  if (l && r) cl_row_micro<V, MR, NV, true, true>(a, c, n, oh, ow0, g, co0, stage);
  else if (l) cl_row_micro<V, MR, NV, true, false>(a, c, n, oh, ow0, g, co0, stage);
  else if (r) cl_row_micro<V, MR, NV, false, true>(a, c, n, oh, ow0, g, co0, stage);
  else cl_row_micro<V, MR, NV, false, false>(a, c, n, oh, ow0, g, co0, stage);
}

// One row-window tile of MR (14, 8 or 7) pixels and nv (1 or 2; 3 at 7 pixels) channel vectors. Instantiated
// for AVX-512 only, the one ISA the host enables them on: 14 accumulators plus 3 weight vectors exceed AVX2's
// 16 registers once each vector takes two.
template <class V>
PYPRUNE_INLINE void cl_row_tile(int64_t mr, int nv, const ConvArgs& a, const ClArgs& c, int64_t n, int64_t oh,
                                int64_t ow0, int64_t g, int64_t co0, float* stage) {
  if constexpr (V::kParts == 1) {
    const bool l = ow0 < a.PW, r = ow0 - a.PW + mr + 2 > a.W;
    if (mr == 14) cl_row_lr<V, 14, 1>(l, r, a, c, n, oh, ow0, g, co0, stage);
    else if (mr == 8 && nv == 1) cl_row_lr<V, 8, 1>(l, r, a, c, n, oh, ow0, g, co0, stage);
    else if (mr == 8) cl_row_lr<V, 8, 2>(l, r, a, c, n, oh, ow0, g, co0, stage);
    else if (nv == 1) cl_row_lr<V, 7, 1>(l, r, a, c, n, oh, ow0, g, co0, stage);
    else if (nv == 2) cl_row_lr<V, 7, 2>(l, r, a, c, n, oh, ow0, g, co0, stage);
    else cl_row_lr<V, 7, 3>(l, r, a, c, n, oh, ow0, g, co0, stage);
  }
}

// A pointer the vectorizer cannot see through, so that the loops storing a tile's pointers stay scalar:
// cl_micro reloads them one at a time, and a load from inside a wider vector store is not forwarded (with the
// stores vectorized, channels_last 256->64 1x1 @56 batch 8 spent ~18% of the kernel's samples on those loads).
PYPRUNE_INLINE const float* opaque(const float* p) {
  asm("" : "+r"(p));
  return p;
}

// The pointers of the MR pixels from q0 (cnt of them real; past cnt, the last one again, never stored) into px
// and their image and output pixel into pix_n / pix_p. With c.koff, a tile whose pixels' windows all lie inside
// x takes one pointer per pixel, its window origin (returns true: cl_micro's WIN); otherwise px holds one
// pointer per tap and pixel, taps in the padding pointing at c.zeros.
PYPRUNE_INLINE bool tile_windows(const ConvArgs& a, const ClArgs& c, int64_t q0, int64_t cnt, const float** px,
                                 int64_t* pix_n, int64_t* pix_p) {
  const int64_t taps = a.KH * a.KW, MR = c.MR;
  // walk the tile's pixels without dividing per pixel
  int64_t n = q0 / a.P, oh = (q0 % a.P) / a.OW, ow = (q0 % a.P) % a.OW;
  const float* base[kMaxRowPixels];
  bool inside[kMaxRowPixels], all_in = c.koff != nullptr;
  int64_t ih0[kMaxRowPixels], iw0[kMaxRowPixels];
  for (int64_t r = 0; r < MR; ++r) {
    if (r > 0 && r < cnt && ++ow == a.OW) {
      ow = 0;
      if (++oh == a.OH) oh = 0, ++n;
    }
    pix_n[r] = n;
    pix_p[r] = oh * a.OW + ow;
    ih0[r] = oh * a.SH - a.PH, iw0[r] = ow * a.SW - a.PW;
    inside[r] = ih0[r] >= 0 && ih0[r] + (a.KH - 1) * a.DH < a.H && iw0[r] >= 0 && iw0[r] + (a.KW - 1) * a.DW < a.W;
    base[r] = a.x + n * a.sN + ih0[r] * a.sH + iw0[r] * a.sW;
    all_in = all_in && inside[r];
  }
  if (all_in) {
    for (int64_t r = 0; r < MR; ++r) px[r] = opaque(base[r]);
  } else {
    for (int64_t r = 0; r < MR; ++r) {
      if (inside[r]) {  // every tap inside the input
        for (int64_t tap = 0; tap < taps; ++tap) px[tap * MR + r] = opaque(base[r] + c.tap_off[tap]);
        continue;
      }
      for (int64_t kh = 0; kh < a.KH; ++kh) {
        const int64_t ih = ih0[r] + kh * a.DH;
        for (int64_t kw = 0; kw < a.KW; ++kw) {
          const int64_t iw = iw0[r] + kw * a.DW;
          const bool in = ih >= 0 && ih < a.H && iw >= 0 && iw < a.W;
          px[(kh * a.KW + kw) * MR + r] = in ? base[r] + c.tap_off[kh * a.KW + kw] : c.zeros;
        }
      }
    }
  }
  return all_in;
}

// Tile t of one channel block, inputs [k0, k1) (tap-major): the pixels' tap pointers into px (pix_n / pix_p:
// their image and output pixel), then the register tile, started from `part` after the first chunk and left
// there before the last (which leaves the result in `stage`). Returns the tile's pixel count.
template <class V>
PYPRUNE_INLINE int64_t cl_tile(const ConvArgs& a, const ClArgs& c, int64_t t, int64_t g, int64_t co0, int nv,
                               int64_t k0, int64_t k1, float* part, const float** px,
                               bool ahead_ok, float* stage, int64_t* pix_n, int64_t* pix_p) {
  const int64_t taps = a.KH * a.KW, MR = c.MR;
  const int64_t q0 = t * MR, cnt = std::min<int64_t>(MR, a.N * a.P - q0);
  if (c.rows) {  // MR divides OW: the tile is part of one output row
    const int64_t n = q0 / a.P, oh = (q0 % a.P) / a.OW, ow = (q0 % a.P) % a.OW;
    for (int64_t r = 0; r < MR; ++r) pix_n[r] = n, pix_p[r] = oh * a.OW + ow + r;
    cl_row_tile<V>(MR, nv, a, c, n, oh, ow, g, co0, stage);
    return cnt;
  }
  bool all_in = false;
  if (c.one_run && a.oN == a.P * a.oP) {
    // the batch's pixels are one run of x, and of y: pixel q is x + q * sW and y + q * oP, with no walk over
    // images and rows (A/B in one process, 2 threads: channels_last 256->64 1x1 @56 keep 0.5 8-9% faster at
    // batch 1 and 18-28% at batch 8, wider 1x1 convs 1-3%)
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t q = q0 + std::min<int64_t>(r, cnt - 1);
      pix_n[r] = 0, pix_p[r] = q, px[r] = opaque(a.x + q * a.sW);
    }
  } else {
    all_in = tile_windows(a, c, q0, cnt, px, pix_n, pix_p);
  }
  // A 1x1 conv on NCHW x reads one line of each kept channel's row per tile, hundreds of streams that the
  // hardware prefetcher does not follow: each channel's next line is prefetched into L2 as the tile reads the
  // channel (A/B in one process, 2 threads, Xeon VM: 1024->256 1x1 @14 keep 0.75 batch 8 0.72x the time, batch
  // 1 0.85x; 2048->512 @7, whose rows fit in three lines, within 2%; kxk convs on 7x7-28x28 maps within 5%
  // either way, so they go without)
  Ahead ahead{nullptr, 0, 0, taps == 1 && a.sW == 1 && a.sC != 1};
  if (ahead_ok) {
    ahead.p = reinterpret_cast<const char*>(px[0] + MR * a.sW);
    ahead.lines = (MR * a.sW * 4 + 63) / 64;
    ahead.per = (ahead.lines + a.Cig - 1) / a.Cig;
  }
  const float* init = k0 > 0 ? part : nullptr;
  float* out = k1 < taps * a.Cig ? part : stage;
  if constexpr (V::kParts == 1) {  // runs: AVX-512 only (the host sets them there)
    if (c.run) {
      if (cnt == MR && nv == 2) cl_micro<V, 14, 2, true>(a, c, px, g, co0, k0, k1, init, out, ahead);
      else if (cnt == MR) cl_micro<V, 14, 1, true>(a, c, px, g, co0, k0, k1, init, out, ahead);
      else if (nv == 2) cl_micro<V, 14, 2>(a, c, px, g, co0, k0, k1, init, out, ahead);
      else cl_micro<V, 14, 1>(a, c, px, g, co0, k0, k1, init, out, ahead);
      return cnt;
    }
  }
  // A short tile (the last of the map, cnt < MR) runs the smallest instantiated tile that holds its pixels
  // (A/B in one process, 2 threads, Zen 4 VM, batch 1: 2048->512 1x1 @7, 49 pixels = 8 tiles of 6 and one of 1,
  // keep 0.25 / 0.5 0.95-0.96x the time in either format; 1024->256 @14, a last tile of 4, within 1%)
  const int64_t mr = std::min(MR, cnt <= 2 ? int64_t(2) : cnt <= 4 ? int64_t(4) : cnt <= 6 ? int64_t(6) : MR);
  if (mr == 2 && all_in) cl_micro_nv<V, 2, true>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (mr == 2) cl_micro_nv<V, 2, false>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (mr == 4 && all_in) cl_micro_nv<V, 4, true>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (mr == 4) cl_micro_nv<V, 4, false>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (mr == 6 && all_in) cl_micro_nv<V, 6, true>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (mr == 6) cl_micro_nv<V, 6, false>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else if (all_in) cl_micro_nv<V, 8, true>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  else cl_micro_nv<V, 8, false>(nv, a, c, px, g, co0, k0, k1, init, out, ahead);
  return cnt;
}

// Finished outputs (stage[r * 64 + j]: pixel r < cnt <= kStageRows, channel row0 + j of nco) into y, with bias
// and ReLU.
template <class V>
PYPRUNE_INLINE void cl_store(const ConvArgs& a, const float* stage, int64_t cnt, const int64_t* pix_n,
                             const int64_t* pix_p, int64_t row0, int64_t nco, bool consecutive) {
#if PYPRUNE_X86
  if constexpr (V::kParts == 1) {  // AVX-512 (on AVX2 the lane-by-lane stores were 1.05-1.12x the time)
    if (consecutive) {
      // channels_last output, one run of nco channels per pixel: a vector (the last one masked) per 16
      // channels, bias, residual and ReLU included. The scalar loop below (nco iterations a pixel) took up to
      // a third of small convs' samples (A/B in one process, 2 threads, Xeon VM, channels_last with ReLU:
      // 15->4, 4->15, 15->8 1x1 and 4->4 3x3 @56 0.70-0.89x the time, 64->256 1x1 @56 0.87x, wider convs
      // within 2%; channel-pyprune ResNet-50 0.96-0.99x, MobileNetV2 0.95-0.99x)
      const int64_t nvec = (nco + kLanes - 1) / kLanes;
      V bias[4];
      for (int64_t v = 0; v < nvec; ++v)
        bias[v] = a.bias ? load_lanes(a.bias + row0 + v * kLanes, 0, std::min<int64_t>(kLanes, nco - v * kLanes))
                         : V{};
      const int64_t c0 = a.out_ch[row0];
      const bool relu = a.relu;
      const float cap = a.relu_max;
      const float* res = a.res;
      for (int64_t r = 0; r < cnt; ++r) {
        float* d = a.y + pix_n[r] * a.oN + pix_p[r] * a.oP + c0;
        for (int64_t v = 0; v < nvec; ++v) {
          const int64_t hi = std::min<int64_t>(kLanes, nco - v * kLanes);
          V x = load16<V>(stage + r * 64 + v * kLanes) + bias[v];
          if (res) x = x + load_lanes(res + (d - a.y) + v * kLanes, 0, hi);
          if (relu) x = relu16(x, cap);
          float* dv = d + v * kLanes;
          if (a.stream_y && hi == kLanes && reinterpret_cast<uintptr_t>(dv) % 64 == 0) stream16(dv, x);
          else store_lanes(dv, x, 0, hi);
        }
      }
      return;
    }
    if (!consecutive && a.oP == 1) {
      // NCHW output: 16 channels at a time, the tile's pixels transposed into one vector per channel, whose runs
      // of pixels in one image go out as one store each. One scalar store per output (an index load, a multiply
      // and a store to another line each) had ~17% of the kernel's samples on 1024->256 1x1 @14 batch 8 keep
      // 0.25 (A/B in one process, 2 threads, Xeon VM, NCHW: that conv 0.91x the time, keep 0.5 0.95x, batch 1
      // 0.95x; 128->128 3x3 @28 batch 1 keep 0.25 0.91x, batch 8 keep 0.5 0.96x; 2048->512 1x1 @7 and the 3x3
      // convs on 7x7 / 14x14 maps 0.98-0.99x)
      for (int64_t jb = 0; jb < nco; jb += kLanes) {
        const int64_t nj = std::min<int64_t>(kLanes, nco - jb);
        alignas(64) float bias[kLanes] = {};
        if (a.bias) std::copy(a.bias + row0 + jb, a.bias + row0 + jb + nj, bias);
        const V b = load16<V>(bias);
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) {
          r[i] = i < cnt ? load16<V>(stage + i * 64 + jb) + b : V{};
          if (a.relu && !a.res) r[i] = relu16(r[i], a.relu_max);
        }
        transpose16(r);
        for (int64_t r0 = 0; r0 < cnt;) {
          int64_t r1 = r0 + 1;
          while (r1 < cnt && pix_n[r1] == pix_n[r0] && pix_p[r1] == pix_p[r1 - 1] + 1) ++r1;
          float* base = a.y + pix_n[r0] * a.oN + pix_p[r0] - r0;  // pixel r at base[r]
          for (int64_t j = 0; j < nj; ++j) {
            float* d = base + a.out_ch[row0 + jb + j] * a.oC;
            if (a.res) {  // the residual's lanes where y's are written, then the ReLU
              V v = r[j] + load_lanes(a.res + (d - a.y), r0, r1);
              store_lanes(d, a.relu ? relu16(v, a.relu_max) : v, r0, r1);
            } else {
              store_lanes(d, r[j], r0, r1);
            }
          }
          r0 = r1;
        }
      }
      return;
    }
  }
#endif
  const float cap = a.relu_max;  // a local: the stores below may alias `a` for all the compiler knows
  if (a.res) {  // y = relu?(stage + bias + the residual where y is written)
    const bool relu = a.relu;
    for (int64_t r = 0; r < cnt; ++r) {
      float* d = a.y + pix_n[r] * a.oN + pix_p[r] * a.oP;
      const float* src = stage + r * 64;
      const float* res = a.res + (d - a.y);
      const float* b = a.bias ? a.bias + row0 : nullptr;
      if (consecutive) {  // one contiguous run from channel out_ch[row0]
        const int64_t c0 = a.out_ch[row0];
        add_residual_run(d + c0, src, b, res + c0, nco, relu, cap);
      } else {
        for (int64_t j = 0; j < nco; ++j) {
          const int64_t o = a.out_ch[row0 + j] * a.oC;
          const float v = src[j] + (b ? b[j] : 0.f) + res[o];
          d[o] = relu ? relu1(v, cap) : v;
        }
      }
    }
    return;
  }
  for (int64_t r = 0; r < cnt; ++r) {
    float* d = a.y + pix_n[r] * a.oN + pix_p[r] * a.oP;
    const float* src = stage + r * 64;
    if (consecutive) {  // channels_last output: one contiguous run (a.oC == 1)
      d += a.out_ch[row0];
      const float* b = a.bias ? a.bias + row0 : nullptr;
      if (b && a.relu) {
        for (int64_t j = 0; j < nco; ++j) d[j] = relu1(src[j] + b[j], cap);
      } else if (b) {
        for (int64_t j = 0; j < nco; ++j) d[j] = src[j] + b[j];
      } else if (a.relu) {
        for (int64_t j = 0; j < nco; ++j) d[j] = relu1(src[j], cap);
      } else {
        for (int64_t j = 0; j < nco; ++j) d[j] = src[j];
      }
    } else {
      for (int64_t j = 0; j < nco; ++j) {
        const float v = src[j] + (a.bias ? a.bias[row0 + j] : 0.f);
        d[a.out_ch[row0 + j] * a.oC] = a.relu ? relu1(v, cap) : v;
      }
    }
  }
}

// Work item f = (group and block of NVmax * 16 output channels, tile of MR consecutive output pixels, which may
// span images; with row windows, MR divides OW and a tile is part of one row), block-major: a thread's range of
// items shares one weight block (K x 64 floats, 256 KB at K = 1024), which then stays in L2 while the tiles'
// pixels stream past it. Items [f0, f1).
template <class V>
PYPRUNE_INLINE void cl_units(const ConvArgs& a, const ClArgs& c, int64_t f0, int64_t f1) {
  const int64_t taps = a.KH * a.KW, MR = c.MR;
  const int64_t bw = c.NVmax * kLanes, blocks_per_group = (a.Cog + bw - 1) / bw;
  const int64_t n_tiles = (a.N * a.P + MR - 1) / MR;
  std::vector<const float*> px(taps * MR);
  alignas(64) float stage[kStageRows * 64];
  int64_t pix_n[kStageRows], pix_p[kStageRows];
  // inputs in chunks (c.k_chunk < K): a batch of tiles takes each chunk in turn, its partial sums waiting in
  // `partial`, so that a chunk's weights stay in cache for the whole batch
  const int64_t K = taps * a.Cig;
  const bool chunked = c.k_chunk < K;
  std::vector<float> partial(chunked ? kTileBatch * MR * 64 : 0);
  for (int64_t f = f0; f < f1;) {
    const int64_t blk = f / n_tiles;
    const int64_t g = blk / blocks_per_group, co0 = (blk % blocks_per_group) * bw;
    const int nv = static_cast<int>(std::min<int64_t>(c.NVmax, (a.Cog - co0 + kLanes - 1) / kLanes));
    const int64_t nco = std::min<int64_t>(nv * kLanes, a.Cog - co0);
    const int64_t row0 = g * a.Cog + co0;
    const bool consecutive = a.oC == 1 && a.out_ch[row0 + nco - 1] - a.out_ch[row0] == nco - 1;
    // NCHW y on AVX-512 (cl_store's transposed stores): consecutive tiles gather in the stage until the next
    // would pass 16 pixels, so that a 16x16 transpose carries 12-16 of them instead of one tile's 6-8 (A/B in
    // one process, 2 threads, Xeon VM, new / old time: 30->2048 1x1 @7 batch 1 and 8 0.87-0.89x, 59->2048 1x1
    // @14 0.91x, 3x3 convs on 14x14 / 28x28 maps 0.96-0.99x, the rest within 2%)
    const int64_t cap = V::kParts == 1 && PYPRUNE_X86 && !consecutive && a.oP == 1 ? kStageRows : MR;
    const int64_t t_begin = f % n_tiles, t_end = std::min(n_tiles, t_begin + f1 - f);
    f += t_end - t_begin;
    const int64_t batch = chunked ? kTileBatch : t_end - t_begin;
    for (int64_t tb = t_begin; tb < t_end; tb += batch) {
      const int64_t te = std::min(t_end, tb + batch);
      for (int64_t k0 = 0; k0 < K; k0 += c.k_chunk) {
        const int64_t k1 = std::min(K, k0 + c.k_chunk);
        int64_t held = 0;  // pixels in the stage
        for (int64_t t = tb; t < te; ++t) {
          if (held + MR > cap) {
            cl_store<V>(a, stage, held, pix_n, pix_p, row0, nco, consecutive);
            held = 0;
          }
          float* part = chunked ? partial.data() + (t - tb) * MR * 64 : nullptr;
          const int64_t cnt = cl_tile<V>(a, c, t, g, co0, nv, k0, k1, part, px.data(), c.ahead && !chunked,
                                         stage + held * 64, pix_n + held, pix_p + held);
          if (k1 == K) held += cnt;
        }
        if (held > 0) cl_store<V>(a, stage, held, pix_n, pix_p, row0, nco, consecutive);
      }
    }
  }
}

// Stride-1 unpadded 1x1 convs on channels_last x (one run of pixels, y channels_last) with at most kFewOut
// output channels and the kept input channels one run: pixels as the vectors' lanes instead of channels (one
// to four output channels filled 1-4 of a tile vector's 16 lanes). 16 pixels' kept channels go through 16x16
// transposes (one vector per input channel over the 16 pixels), each output channel takes one FMA per input
// channel, and the epilogue (bias, residual, ReLU) writes the pixels one by one. Unit = 16 pixels of the run.
constexpr int64_t kFewOut = 4;

template <class V, int O>
PYPRUNE_INLINE void few_out_block(const ConvArgs& a, int64_t p0, int64_t n) {
  const int64_t C = a.Cig, sW = a.sW;
  const float* x0 = a.x + a.in_idx[0];
  V acc[O];
  for (int o = 0; o < O; ++o) acc[o] = V{};
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    const int64_t nc = std::min<int64_t>(kLanes, C - c0);
    V r[kLanes];
    if (n == kLanes && nc == kLanes) {
      for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(x0 + (p0 + i) * sW + c0);
    } else if constexpr (V::kParts == 1 && PYPRUNE_X86) {  // AVX-512: masked loads (no read past the run)
      for (int64_t i = 0; i < kLanes; ++i)
        r[i] = i < n ? dw_load<V, true>(x0 + (p0 + i) * sW + c0, static_cast<int>(nc)) : V{};
    } else {  // a partial block: through a zeroed buffer (no read past the run)
      alignas(64) float t[kLanes][kLanes] = {};
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < nc; ++j) t[i][j] = x0[(p0 + i) * sW + c0 + j];
      for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(t[i]);
    }
    transpose16(r);  // r[j]: input channel c0 + j of the 16 pixels
    for (int o = 0; o < O; ++o) {
      const float* wo = a.w + o * C + c0;
      for (int64_t j = 0; j < nc; ++j) acc[o] += wo[j] * r[j];
    }
  }
  alignas(64) float out[O][kLanes];
  for (int o = 0; o < O; ++o) store16(out[o], acc[o]);
  // the settings as locals: read through `a` they were reloaded after every store (which may alias it)
  const bool relu = a.relu;
  const float cap = a.relu_max;
  float* const y = a.y;
  const float* const res = a.res;
  const int64_t oP = a.oP;
  int64_t off[O];
  float bias[O];
  for (int o = 0; o < O; ++o) off[o] = a.out_ch[o] * a.oC, bias[o] = a.bias ? a.bias[o] : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = (p0 + i) * oP;
    for (int o = 0; o < O; ++o) {
      float v = out[o][i] + bias[o];
      if (res) v += res[q + off[o]];
      y[q + off[o]] = relu ? relu1(v, cap) : v;
    }
  }
}

template <class V>
PYPRUNE_INLINE void few_out_units(const ConvArgs& a, int64_t b0, int64_t b1) {
  const int64_t pixels = a.N * a.P;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p0 = b * kLanes, n = std::min<int64_t>(kLanes, pixels - p0);
    switch (a.Cog) {
      case 1: few_out_block<V, 1>(a, p0, n); break;
      case 2: few_out_block<V, 2>(a, p0, n); break;
      case 3: few_out_block<V, 3>(a, p0, n); break;
      default: few_out_block<V, 4>(a, p0, n);
    }
  }
}

// NCHW x restaged as channels_last of its kept channels: xt[(n * HW + p) * Ck + c] = x[n, in_idx[c], p] for the
// input pixels p of blocks [b0, b1) (16 pixels of one image each), through in-register 16x16 transposes.
template <class V>
PYPRUNE_INLINE void restage_units(const ConvArgs& a, int64_t Ck, float* xt, int64_t b0, int64_t b1) {
  const int64_t HW = a.H * a.W, per_image = (HW + kLanes - 1) / kLanes;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b / per_image, p0 = (b % per_image) * kLanes, np = std::min<int64_t>(kLanes, HW - p0);
    const float* src = a.x + n * a.sN + p0;
    float* dst = xt + (n * HW + p0) * Ck;
    int64_t c = 0;
    if (np == kLanes) {
      for (; c + kLanes <= Ck; c += kLanes) {
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(src + a.in_idx[c + i] * a.sC);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) store16(dst + j * Ck + c, r[j]);
      }
    }
    for (; c < Ck; ++c) {
      const float* s = src + a.in_idx[c] * a.sC;
      for (int64_t j = 0; j < np; ++j) dst[j * Ck + c] = s[j];
    }
  }
}

using UnitFn = void (*)(const ConvArgs&, int64_t, int64_t);
using ClFn = void (*)(const ConvArgs&, const ClArgs&, int64_t, int64_t);
using RestageFn = void (*)(const ConvArgs&, int64_t, float*, int64_t, int64_t);

#define PYPRUNE_CONV_ISA(SUFFIX, TARGET, V)                                                                 \
  TARGET void gemm_##SUFFIX(const ConvArgs& a, int64_t u0, int64_t u1) { gemm_units<V>(a, u0, u1); }        \
  TARGET void depthwise_##SUFFIX(const ConvArgs& a, int64_t u0, int64_t u1) { depthwise_units(a, u0, u1); } \
  TARGET void dw_cl_##SUFFIX(const ConvArgs& a, const DwArgs& d, int64_t u0, int64_t u1) {                  \
    dw_cl_units<V>(a, d, u0, u1);                                                                           \
  }                                                                                                         \
  TARGET void compact_cl_##SUFFIX(const ConvArgs& a, const uint16_t* keep, int64_t Ck, float* dst, int64_t p0, \
                                  int64_t p1) {                                                             \
    compact_cl_units<V>(a, keep, Ck, dst, p0, p1);                                                          \
  }                                                                                                         \
  TARGET void cl_##SUFFIX(const ConvArgs& a, const ClArgs& c, int64_t u0, int64_t u1) {                     \
    cl_units<V>(a, c, u0, u1);                                                                              \
  }                                                                                                         \
  TARGET void few_out_##SUFFIX(const ConvArgs& a, int64_t u0, int64_t u1) { few_out_units<V>(a, u0, u1); }   \
  TARGET void restage_##SUFFIX(const ConvArgs& a, int64_t Ck, float* xt, int64_t b0, int64_t b1) {          \
    restage_units<V>(a, Ck, xt, b0, b1);                                                                    \
  }
PYPRUNE_CONV_ISA(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_CONV_ISA(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_CONV_ISA(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

void check_index(const std::optional<at::Tensor>& idx, const char* name, int64_t bound, const char* bound_name) {
  if (!idx.has_value()) return;
  const at::Tensor& t = *idx;
  PYPRUNE_CHECK_DTYPE(t, kOp, name, at::kLong);
  PYPRUNE_CHECK_DIM(t, 1, kOp, name);
  PYPRUNE_CHECK_CPU(t, kOp, name);
  const at::Tensor c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    PYPRUNE_CHECK(p[i] >= 0 && p[i] < bound, kOp, name, "must hold channels in [0, ", bound, ") (", bound_name,
                  "), got ", p[i], " at position ", i);
    PYPRUNE_CHECK(i == 0 || p[i] > p[i - 1], kOp, name, "must be sorted and free of duplicates, got ", p[i - 1],
                  " then ", p[i], " at position ", i);
  }
}

// wt (see block_weight: blocks of bw channels) from w (G * Cog, Cig, taps), zero past Cog: 16 output channels
// at a time, so every write is a contiguous vector and the reads are 16 row streams.
void transpose_weight(const float* w, float* wt, int64_t G, int64_t Cog, int64_t Cig, int64_t taps, int64_t cog16,
                      int64_t bw) {
  const int64_t blocks = cog16 / kLanes, K = taps * Cig;
  at::parallel_for(0, G * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / blocks, co0 = (b % blocks) * kLanes, n = std::min<int64_t>(kLanes, Cog - co0);
      const int64_t start = co0 / bw * bw, ld = std::min(bw, cog16 - start);  // its block's first column, width
      const float* src = w + (g * Cog + co0) * Cig * taps;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < Cig; ++c) {
          float* d = wt + (g * cog16 + start) * K + (t * Cig + c) * ld + co0 - start;
          for (int64_t j = 0; j < n; ++j) d[j] = src[(j * Cig + c) * taps + t];
          for (int64_t j = n; j < kLanes; ++j) d[j] = 0.f;
        }
    }
  });
}

// Transposed weights are kept between calls, checked against the weight's contents on every call (see
// derived_cache.h for when one is reused: a write through `.data` moves no version counter).
at::Tensor transposed_weight(const at::Tensor& weight, const at::Tensor& wc, int64_t G, int64_t Cog, int64_t Cig,
                             int64_t taps, int64_t cog16, int64_t bw) {
  static DerivedCache<at::Tensor> cache(int64_t(256) << 20);
  // the shape too: `p.data = p.data.view(...)` keeps the tensor, its version and its bytes
  return cache.get({weight}, {wc}, {G, weight.size(0), weight.size(1), weight.size(2), weight.size(3), bw},
                   [&](const std::vector<at::Tensor>& from) {
    at::Tensor wt = at::empty({G * taps * Cig * cog16}, wc.options());
    transpose_weight(from[0].data_ptr<float>(), wt.data_ptr<float>(), G, Cog, Cig, taps, cog16, bw);
    return wt;
  }, [](const at::Tensor& wt) { return static_cast<int64_t>(wt.nbytes()); });
}

// At least n fp32 zeros, kept for the next call (a bigger request replaces the buffer; a call in flight holds
// its own reference to the old one).
at::Tensor shared_zeros(int64_t n) {
  static std::mutex mu;
  static at::Tensor zeros;
  std::lock_guard<std::mutex> lock(mu);
  if (!zeros.defined() || zeros.numel() < n) zeros = at::zeros({n}, at::kFloat);
  return zeros;
}

// The channels of y (N, C, H, W) that out_ids (sorted) leaves out, set to zero before the kernel writes the
// others. NCHW: one memset per image and run of such channels. channels_last: all of y, one contiguous
// memset, which the kernel then overwrites (y.index_fill_ walked it element by element: channels_last 64
// channels @56 batch 8, 48 of them filled, 1.45 ms against 0.15 ms for the whole memset).
void zero_unwritten(at::Tensor& y, const std::vector<int64_t>& out_ids, bool channels_last) {
  float* p = y.data_ptr<float>();
  if (channels_last) {
    const int64_t n = y.numel(), chunk = int64_t(1) << 16;
    at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      std::memset(p + c0 * chunk, 0, (std::min(n, c1 * chunk) - c0 * chunk) * sizeof(float));
    });
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> runs;  // [first, end) channels nobody writes
  for (int64_t ch = 0, i = 0; ch < y.size(1);) {
    const int64_t next = i < static_cast<int64_t>(out_ids.size()) ? out_ids[i] : y.size(1);
    if (ch < next) runs.emplace_back(ch, next);
    ch = next + 1, ++i;
  }
  const int64_t plane = y.size(2) * y.size(3), nr = static_cast<int64_t>(runs.size());
  const int64_t per_run = (y.size(1) - static_cast<int64_t>(out_ids.size())) * plane / nr;  // floats, on average
  // a thread's share at least 64 Ki floats: waking the other thread costs more than a smaller memset
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_run);
  at::parallel_for(0, y.size(0) * nr, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const auto& r = runs[u % nr];
      std::memset(p + (u / nr) * y.stride(0) + r.first * plane, 0, (r.second - r.first) * plane * sizeof(float));
    }
  });
}

// NCHW x's kept channels restaged as channels_last into xt, (N * H * W, c_in), in one parallel pass.
void restage_kept(const ConvArgs& a, int64_t c_in, float* xt) {
  const RestageFn rf = PYPRUNE_ISA_ENTRY(restage);
  const int64_t nb = a.N * ((a.H * a.W + kLanes - 1) / kLanes);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) { rf(a, c_in, xt, b0, b1); });
}

at::Tensor capped_relu(const at::Tensor& y, double cap) {
  return cap < std::numeric_limits<double>::infinity() ? at::relu(y).clamp_max(cap) : at::relu(y);
}

// y = relu?(y + res) in place: the residual for the paths whose epilogue does not add it (y computed without
// the ReLU, its unkept channels zero).
void add_residual(at::Tensor& y, const at::Tensor& res, bool relu, double cap) {
  y.add_(res);
  if (relu) {
    y.clamp_min_(0);
    if (cap < std::numeric_limits<double>::infinity()) y.clamp_max_(cap);
  }
}

// The convolution, bias, ReLU and scatter: y before the max pool.
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                        int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, double relu_max,
                        const at::Tensor& residual) {
  PYPRUNE_CHECK(x.dim() == 4, kOp, "x", "must be 4-D (N, C, H, W), got shape ", x.sizes());
  PYPRUNE_CHECK(weight.dim() == 4, kOp, "weight", "must be 4-D (C_out, C_in / groups, kh, kw), got shape ",
                weight.sizes());
  PYPRUNE_CHECK_DTYPE(weight, kOp, "weight", x.scalar_type());
  PYPRUNE_CHECK_CPU(x, kOp, "x");
  PYPRUNE_CHECK_CPU(weight, kOp, "weight");
  PYPRUNE_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, kOp, "stride", "must be two ints >= 1, got ",
                stride);
  PYPRUNE_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, kOp, "padding",
                "must be two ints >= 0, got ", padding);
  PYPRUNE_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, kOp, "dilation",
                "must be two ints >= 1, got ", dilation);
  PYPRUNE_CHECK(groups >= 1, kOp, "groups", "must be >= 1, got ", groups);
  PYPRUNE_CHECK(out_channels >= 0, kOp, "out_channels", "must be >= 0, got ", out_channels);
  const int64_t C = x.size(1);
  check_index(in_index, "in_index", C, "x's channels");
  check_index(out_index, "out_index", out_channels, "out_channels");
  const int64_t c_in = in_index.has_value() ? in_index->numel() : C;
  const int64_t c_out = weight.size(0);
  PYPRUNE_CHECK(c_in % groups == 0 && c_out % groups == 0, kOp, "groups", "(", groups,
                ") must divide the kept input channels (", c_in, ") and the output channels (", c_out, ")");
  PYPRUNE_CHECK(weight.size(1) * groups == c_in, kOp, "weight", "must have C_in_kept / groups = ", c_in / groups,
                " input channels (C_in_kept = ", c_in, "), got shape ", weight.sizes());
  if (out_index.has_value()) {
    PYPRUNE_CHECK(out_index->numel() == c_out, kOp, "out_index", "must have one entry per weight row (", c_out,
                  "), got ", out_index->numel());
  } else {
    PYPRUNE_CHECK(out_channels == c_out, kOp, "out_channels", "must equal weight.shape[0] (", c_out,
                  ") when out_index is None, got ", out_channels);
  }
  if (bias.has_value()) {
    PYPRUNE_CHECK_DTYPE(*bias, kOp, "bias", x.scalar_type());
    PYPRUNE_CHECK_CPU(*bias, kOp, "bias");
    PYPRUNE_CHECK(bias->dim() == 1 && bias->numel() == c_out, kOp, "bias", "must have shape (", c_out, "), got ",
                  bias->sizes());
  }
  const int64_t KH = weight.size(2), KW = weight.size(3);
  const int64_t OH = (x.size(2) + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t OW = (x.size(3) + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  PYPRUNE_CHECK(OH > 0 && OW > 0, kOp, "x", "gives an empty output (", OH, " x ", OW, ") for kernel ", KH, "x", KW,
                ", stride ", stride, ", padding ", padding, ", dilation ", dilation, "; got shape ", x.sizes());

  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool has_res = residual.defined();
  if (has_res) {
    PYPRUNE_CHECK_DTYPE(residual, kOp, "residual", x.scalar_type());
    PYPRUNE_CHECK_CPU(residual, kOp, "residual");
    PYPRUNE_CHECK(residual.sizes() == at::IntArrayRef({x.size(0), out_channels, OH, OW}), kOp, "residual",
                  "must have the output's shape (", x.size(0), ", ", out_channels, ", ", OH, ", ", OW, "), got ",
                  residual.sizes());
  }
  // the residual in y's layout, so that y[i] and rc[i] are the same element
  const at::Tensor rc = has_res ? residual.contiguous(fmt) : at::Tensor();

  if (x.scalar_type() != at::kFloat) {
    // The kernel computes fp32; other dtypes take ATen's convolution on the gathered input.
    at::Tensor xs = in_index.has_value() ? x.index_select(1, *in_index) : x;
    at::Tensor y = at::conv2d(xs, weight, bias, stride, padding, dilation, groups);
    if (relu && !has_res) y = capped_relu(y, relu_max);
    if (out_index.has_value()) {
      at::Tensor full = at::zeros({x.size(0), out_channels, OH, OW}, y.options());
      y = full.index_copy_(1, *out_index, y);
    }
    y = y.contiguous(fmt);
    if (has_res) add_residual(y, rc, relu, relu_max);
    return y;
  }

  if (has_res && (x.size(0) == 0 || c_out == 0 || c_in == 0)) {  // the residual through the other cases
    at::Tensor y0 = conv_forward(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation,
                                 groups, false, relu_max, at::Tensor());
    add_residual(y0, rc, relu, relu_max);
    return y0;
  }
  at::Tensor xc = x.is_contiguous() || channels_last ? x : x.contiguous();
  at::Tensor wc = weight.contiguous();
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), out_channels, OH, OW}, x.options().memory_format(fmt));
  std::vector<int64_t> in_ids, out_ids;
  if (!in_index.has_value()) {
    in_ids.resize(C);
    for (int64_t i = 0; i < C; ++i) in_ids[i] = i;
  } else {
    at::Tensor c = in_index->contiguous();
    in_ids.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  }
  if (!out_index.has_value()) {
    out_ids.resize(c_out);
    for (int64_t i = 0; i < c_out; ++i) out_ids[i] = i;
  } else {
    at::Tensor c = out_index->contiguous();
    out_ids.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
    if (c_out < out_channels) zero_unwritten(y, out_ids, channels_last);
  }
  if (x.size(0) == 0 || c_out == 0) return y;
  if (c_in == 0) {  // no input channel kept: every output is the bias (or zero), through the ReLU
    const std::vector<int64_t> shape{x.size(0), c_out, OH, OW};
    at::Tensor v = bias.has_value() ? bc.view({1, c_out, 1, 1}).expand(shape) : at::zeros(shape, y.options());
    if (relu) v = capped_relu(v, relu_max);
    return out_index.has_value() ? y.index_copy_(1, *out_index, v.contiguous(fmt)) : y.copy_(v);
  }

  ConvArgs a{};
  a.x = xc.data_ptr<float>();
  a.w = wc.data_ptr<float>();
  a.bias = bc.defined() ? bc.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.in_idx = in_ids.data();
  a.out_ch = out_ids.data();
  a.N = x.size(0);
  a.H = x.size(2);
  a.W = x.size(3);
  a.sN = xc.stride(0);
  a.sC = xc.stride(1);
  a.sH = xc.stride(2);
  a.sW = xc.stride(3);
  a.KH = KH;
  a.KW = KW;
  a.SH = stride[0];
  a.SW = stride[1];
  a.PH = padding[0];
  a.PW = padding[1];
  a.DH = dilation[0];
  a.DW = dilation[1];
  a.OH = OH;
  a.OW = OW;
  a.P = OH * OW;
  a.G = groups;
  a.Cig = c_in / groups;
  a.Cog = c_out / groups;
  a.Kg = a.Cig * KH * KW;
  a.oN = y.stride(0);
  a.oC = y.stride(1);
  a.oP = y.stride(3);
  a.relu = relu;
  a.relu_max = static_cast<float>(relu_max);
  // The GEMM and pixels-as-rows epilogues add the residual (a.res); the depthwise paths compute without the
  // ReLU and add it after. Either way the unkept channels (zero) get it after the kernel.
  a.res = has_res ? rc.data_ptr<float>() : nullptr;
  auto finish = [&](bool fused) {
    if (!has_res) return y;
    if (!fused) {
      add_residual(y, rc, relu, relu_max);
    } else if (c_out < out_channels) {
      std::vector<int64_t> unkept;
      for (int64_t ch = 0, i = 0; ch < out_channels; ++ch) {
        if (i < c_out && out_ids[i] == ch) ++i;
        else unkept.push_back(ch);
      }
      const at::Tensor u = at::tensor(unkept, at::kLong);
      at::Tensor r = rc.index_select(1, u);
      y.index_copy_(1, u, relu ? capped_relu(r, relu_max) : r);
    }
    return y;
  };

  const int64_t threads = at::get_num_threads();
  // Depthwise convs take vectors over channels (dw_cl_units) on channels_last x, where kept channels that are
  // not one run are compacted first (one pass; each kept input feeds KH * KW / stride^2 outputs). On NCHW x
  // too (rows under kDwStagePixels), x restaged as channels_last (restage_units, the gather in the same pass),
  // each output row transposed back to NCHW as it is finished (DwArgs::nchw_out). A/B in one process, 2
  // threads, Xeon VM, 3x3 with ReLU6, against the NCHW row loops: with the output then computed channels_last
  // and copied back by ATen (38% of 384 @14 batch 8's profile), 960 channels @7 0.23x the time, 384 and 576
  // @14 0.27-0.40x, 144 @56 stride 2 (28-pixel rows) 0.76x, but 56-pixel rows 1.12-1.32x and 112 2.25x; with
  // the rows transposed in the kernel (each variant in its own process, 5 alternating runs), 144 @56 0.79x,
  // batch 8 0.93x (a 14.5 MB copy), 96 @112 stride 2 0.89x, 32 @112 0.74x, but 96 @112 stride 2 batch 8 3.0x:
  // its 38.5 MB copy came freshly mapped on every call (torch.empty + fill of 38.5 MB in a loop: 9,402 minor
  // page faults a call, every page), and with the copy kept between calls (Scratch), it still took 1.26x the
  // time of the row loops. Hence rows under 32 pixels, or up to kDwStagePixels with a copy of at most 16 MiB.
  const bool dw_restage = OW < 32 || (OW < kDwStagePixels && a.N * a.H * a.W * c_in * 4 <= (int64_t{16} << 20));
  if (a.Cig == 1 && has_res) a.relu = false, a.res = nullptr;  // (added after: see finish)
  if (a.Cig == 1 && a.Cog == 1 && (channels_last || dw_restage)) {
    Scratch xk;
    DwArgs d{a.x + in_ids[0], a.sN, a.sH, a.sW, nullptr, false};
    if (!channels_last) {
      xk = Scratch(kScratchCall, a.N * a.H * a.W * c_in);
      restage_kept(a, c_in, xk.get());
      d = {xk.get(), a.H * a.W * c_in, a.W * c_in, c_in, nullptr, true};
    } else if (in_ids.back() - in_ids.front() != c_in - 1) {
      xk = Scratch(kScratchCall, a.N * a.H * a.W * c_in);
      float* dst = xk.get();
      const int64_t W = a.W, HW = a.H * a.W;
      std::vector<uint16_t> keep((C + kLanes - 1) / kLanes, 0);
      for (const int64_t c : in_ids) keep[c / kLanes] |= static_cast<uint16_t>(1u << (c % kLanes));
      using CompactFn = void (*)(const ConvArgs&, const uint16_t*, int64_t, float*, int64_t, int64_t);
      const CompactFn cf = PYPRUNE_ISA_ENTRY(compact_cl);
      at::parallel_for(0, a.N * HW, 256, [&](int64_t p0, int64_t p1) { cf(a, keep.data(), c_in, dst, p0, p1); });
      d = {dst, HW * c_in, W * c_in, c_in, nullptr, false};
    }
    std::vector<float> wt(KH * KW * c_in);
    for (int64_t g = 0; g < c_in; ++g)
      for (int64_t t = 0; t < KH * KW; ++t) wt[t * c_in + g] = a.w[g * KH * KW + t];
    d.wt = wt.data();
    using DwFn = void (*)(const ConvArgs&, const DwArgs&, int64_t, int64_t);
    const DwFn fn = PYPRUNE_ISA_ENTRY(dw_cl);
    const int64_t units = a.N * OH * ((c_in + kDwBlock - 1) / kDwBlock);
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) { fn(a, d, u0, u1); });
    return finish(false);
  }
  if (a.Cig == 1) {
    const UnitFn fn = PYPRUNE_ISA_ENTRY(depthwise);
    at::parallel_for(0, a.N * c_out, 1, [&](int64_t u0, int64_t u1) { fn(a, u0, u1); });
    return finish(false);
  }
  // Stride-1 kxk convs on maps wide enough that the Wp - OW wasted columns cost less than building im2col
  // tiles (about a fifth of the FMAs' time at 28x28): stage the kept channels into zero-bordered planes.
  const int64_t Wp = a.W + 2 * a.PW, Hp = a.H + 2 * a.PH;
  const bool planar = xc.stride(3) == 1;
  // Pixels as GEMM rows: always for channels_last; for NCHW on small maps (7x7, stride-1 1x1 up to 16x16, kxk up
  // to 32x32), where 64-pixel vectors would waste lanes, need many short im2col runs or staged planes with
  // wasted border columns (measured, 1-2 threads: 0.65-0.91 -> 0.83-1.2 of the ideal at 7x7 and 14x14,
  // 0.71-0.86 -> 0.76-0.93 at 28x28; stride-1 1x1 at 14x14, Zen 5 VM, 2 threads, 1024->256 at keep 0.25 / 0.5 /
  // 0.75: batch 1 0.69 / 0.86 / 0.96 -> 0.75 / 0.97 / 1.10, batch 8 0.72 / 0.88 / 0.97 -> 0.83 / 0.95 / 1.02;
  // not at 28x28, 0.95 -> 0.91 and 0.77 -> 0.56 for 512->128, nor for stride 2, 0.98 -> 0.76 for 512->1024 @28
  // batch 8).
  const bool small_map =
      a.P <= 64 || (a.P <= 256 && KH == 1 && KW == 1 && a.SH == 1 && a.SW == 1) || (a.P <= 1024 && (KH > 1 || KW > 1));
  // Larger NCHW maps too for plain 3x3 convs whose output channels fill whole vectors: with x's kept channels
  // restaged as channels_last (below) or, under 16 Mi multiply-adds, read in place, they beat the staged planes
  // (A/B in one process, 2 threads, Xeon VM, NCHW, fused gather: 64->64 @56 keep 0.75 / 0.5 / 0.25 batch 8
  // 0.94 / 0.78-0.81 / 0.85x the time, batch 1 0.91 / 0.78 / 0.83x; 64->64 @224 keep 0.5 0.85x, 128->128 @112
  // 0.96x, 256->256 @56 0.93-0.96x; 64->64 @56 keep 1 batch 8 1.02x). Not with channels to spare in the last
  // vector (24->24 @40 1.05-1.09x, 8->8 5x5 2.4x) nor 7x7 kernels (64->64 @56 keep 0.5 1.03-1.06x), nor
  // under 32 input channels (3->64 @224 1.2-1.6x, 8->64 and 16->64 @56 batch 1 1.10x; 32->32 @56 0.86x) unless
  // 16 or more feed at most 32 outputs (16->16 @56 batch 1 0.86x, batch 8 0.98x, 16->32 0.92-0.95x). AVX-512
  // only: the AVX2 tiles (6 pixels x 1 vector) lost to the staged planes, 1.10-1.35x the time.
  const bool avx512 = kernel_isa() == Isa::kAvx512;
  const bool avx512_tiles = avx512 && a.Cog % kLanes == 0;
  const bool plain_3x3 = avx512_tiles && KH == 3 && KW == 3 && a.SH == 1 && a.SW == 1 && a.DH == 1 && a.DW == 1 &&
                         (a.Cig >= 32 || (a.Cig >= 16 && a.Cog <= 32));
  // And the ResNet stem's kind of conv, 7x7 or wider with stride 2 over at most 4 input channels, whose im2col
  // tiles (147 strided gathers per pixel for 147 multiply-adds per output channel) cost as much as their FMAs:
  // 3->64 7x7 s2 @224 0.78x the time at batch 1, 0.83x at batch 8 (same A/B; 3x3 s2 stems 1.02-1.13x, and on
  // AVX2 1.08-1.58x, so neither).
  const bool stem = avx512_tiles && KH * KW >= 49 && a.Cig <= 4 && a.SH == 2 && a.SW == 2;
  if ((!planar && xc.stride(1) == 1) || small_map || plain_3x3 || stem) {
    // read in place through the channel index (or restaged, below); the weight transposed once and kept
    const int64_t cog16 = round_up(a.Cog, kLanes);
    // NCHW x on kxk convs: its kept channels restaged as channels_last first (one parallel pass of 16x16 transposes
    // into a buffer kept between calls, see Scratch), after which the tiles broadcast along each pixel's contiguous
    // channels instead of one line per input channel (A/B in one process, 2 threads, Xeon VM, fused gather, keep 0.75
    // / 0.5 / 0.25: batch 8 128->128 3x3 @28 0.92 / 0.92 / 0.95x the time, 256->256 @14 0.89 / 0.87 / 0.92x, 512->512
    // @7 0.86 / 0.85 / 0.85x; batch 1 0.89-0.94x down to 16 Mi multiply-adds a call, below which the extra pass cost
    // up to 4%, with the buffer kept 0.99-1.07x; not 1x1 convs: 1024->256 @14 batch 8 1.19x, batch 1 1.01x, 2048->512
    // @7 batch 8 0.93x, 256->64 @56 0.97x). The copy used to come freshly mapped on every call (its pages faulted in,
    // ~1 us each): kept, the batch 8 3x3 convs above take 0.84-0.91x the time, 64->64 @56 0.70x (batch 1 0.67x),
    // 128->128 @28 batch 1 0.82x. Stride 2 from 128 kept input channels on (256->256 @28 batch 8 keep 0.75 0.84-0.87x,
    // 512->512 @14 batch 1 keep 0.5 0.93-0.96x, 256->256 @28 batch 1 keep 0.5 0.98-1.00x; with 64, 128->128 @56 batch
    // 8 keep 0.5, 0.98-1.07x; the 7x7 stem over 3 channels 1.02-1.07x)
    Scratch xt;
    std::vector<int64_t> kept;
    if (a.sC != 1 && (KH > 1 || KW > 1) && ((a.SH == 1 && a.SW == 1) || a.Cig >= 128) &&
        a.N * a.P * a.Kg * c_out >= (int64_t(16) << 20)) {
      xt = Scratch(kScratchCall, a.N * a.H * a.W * c_in);
      float* xtp = xt.get();
      restage_kept(a, c_in, xtp);
      kept.resize(c_in);
      std::iota(kept.begin(), kept.end(), int64_t(0));
      a.x = xtp, a.in_idx = kept.data();
      a.sC = 1, a.sW = c_in, a.sH = a.W * c_in, a.sN = a.H * a.sH;
    }
    // taps in the padding read a row of zeros at every x[pixel, c] offset (C floats for channels_last or
    // restaged x, the whole image for NCHW): allocated and cleared once, shared by the calls (never written after)
    const int64_t x_channels = xt.get() ? c_in : C;
    const at::Tensor zeros = a.PH || a.PW ? shared_zeros((x_channels - 1) * a.sC + 1) : at::Tensor();
    // register tile (AVX-512): 4 channel vectors x 6 pixels, or up to 3 x 8 when that splits the channels
    // evenly (96, 144, ...) and for 16-48 channels (8 pixels: 12 spilled the pixel pointers); AVX2 and the
    // baseline: 1 x 6 (12 ymm accumulators of 16; the AVX-512 tiles spill there)
    const int64_t vecs = cog16 / kLanes;
    int64_t mr = vecs >= 4 && (vecs % 4 == 0 || vecs % 3 != 0) ? 6 : 8;
    int64_t nv_max = mr == 6 ? 4 : 3;
    if (!avx512) mr = 6, nv_max = 1;
    // row windows (AVX-512, see cl_row_tile). A multiple of 3 channel vectors takes 7 x 3 windows where 7 divides OW
    // (21 accumulators and 9 weight vectors; A/B in one process, 2 threads, Xeon VM, fused gather, against the 8 x 3
    // tile: 64->64 @56 keep 0.75 batch 8 0.87x the time channels_last, 0.92x NCHW, batch 1 0.90x; 96->96 @28 keep 0.5
    // 0.87x; 128->128 @28 keep 0.375 0.88x; against the 2-vector windows below, keep 0.75: 128->128 @28 batch 8 0.92x
    // channels_last, 0.96x NCHW; 256->256 @14 0.91-0.92x; 512->512 @7 0.97-0.99x; 128->128 @56 batch 8 channels_last
    // 0.90x, batch 1 NCHW 0.99x), and so does an odd count of 2 past a multiple of 3 (5, 11, ...: blocks of 3 and a
    // last one of 2, where blocks of 2 left a last one of 1; same setup: 160->160 @14 keep 0.5 batch 8 channels_last
    // 0.86-0.90x the time, batch 1 NCHW 0.88x, @28 0.88x, @7 0.95x; 352->352 @14 keep 0.5 0.87-0.90x; even counts such
    // as 8 vectors within noise, 0.97-1.04x, so those keep the 2-vector windows). Otherwise 14, 8 or 7 pixels
    // (whichever first divides OW; 14 only for one channel vector) x up to 2 channel vectors, but not for an odd
    // multiple of 3 vectors (against 6 x 4 or 8 x 3 tiles: 512->512 3x3 @7 keep 1 / 0.75 / 0.5 batch 8 0.75 / 0.75 /
    // 0.67x the time, NCHW batch 1 keep 0.25 0.66x; 256->256 @14 keep 0.75 / 0.5 0.84-0.93x; 128->128 @28 keep 0.75 /
    // 0.5 0.92x; 64->64 @56 keep 1 0.89-0.91x; 160->160 @14 keep 0.5 (80 channels, 6 x 4 with a 1-vector tail) 0.68x;
    // but 48 channels (64->64 @56 keep 0.75, 96->96 @28 keep 0.5) in blocks of 2 vectors and 1 1.03-1.20x)
    const bool row_ok = avx512 && KW == 3 && a.SW == 1 && a.DW == 1 && a.PW <= 1;
    bool rows = false;
    if (row_ok && (vecs % 3 == 0 || (vecs % 3 == 2 && vecs % 2 == 1)) && OW % 7 == 0) {
      mr = 7, nv_max = 3, rows = true;
    } else if (row_ok && (vecs % 2 == 0 || vecs % 3 != 0)) {
      for (int64_t m : {14, 8, 7}) {
        if ((m == 14 && vecs > 1) || OW % m != 0) continue;
        mr = m, nv_max = 2, rows = true;
        break;
      }
    }
    // runs (AVX-512, see cl_micro's RUN): stride-1 unpadded 1x1 on channels_last x with <= 32 output channels,
    // 14-pixel tiles (A/B in one process, 2 threads: 256->64 1x1 @56 keep 0.5 batch 1 0.080-0.085 -> 0.071 ms,
    // 0.72 -> 0.82 of ideal; 128->32 and 64->32 1x1 8-10% faster; batch 8 within noise)
    // (pixels one run: every pixel of the batch sW floats after the previous one, i.e. channels_last x; an NCHW
    // 1x1 map also has sC == 1, but its images lie C floats apart)
    const bool one_run = KH == 1 && KW == 1 && a.SH == 1 && a.SW == 1 && a.PH == 0 && a.PW == 0 && a.sC == 1 &&
                         a.sH == a.W * a.sW && a.sN == a.H * a.sH;
    if (one_run && a.G == 1 && (a.Cog <= 2 || (a.Cog <= kFewOut && a.Cig >= 32)) && a.oN == a.P * a.oP &&
        in_ids.back() - in_ids.front() == c_in - 1) {
      // (A/B in one process, 2 threads, Xeon VM, against the pixels-as-rows tiles: 32->1 1x1 @112 0.40x the time,
      // 15->2 @56 0.67x, 64->4 @56 0.88x, 256->4 @14 0.85x, 32->3 @56 batch 8 0.89x; 15->4 @56 0.99-1.05x, so four
      // outputs only from 32 inputs; channel-pyprune MobileNetV2 channels_last at 0.75 / 0.9 0.97x)
      const UnitFn fn = PYPRUNE_ISA_ENTRY(few_out);
      const int64_t blocks = (a.N * a.P + kLanes - 1) / kLanes;
      at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.Cig * a.Cog)),
                       [&](int64_t b0, int64_t b1) { fn(a, b0, b1); });
      return finish(true);
    }
    const bool run = avx512 && vecs <= 2 && one_run;
    if (run) mr = 14, nv_max = 2;
    // A one_run tile reads one contiguous run of pixels (the kept channels of MR whole pixels: with 16 channels
    // to a line nearly every line of them). With x past L2 and at most 192 inputs (short tiles), the hardware
    // prefetchers alone left the loads waiting, so each tile prefetches the next one's run (256->64 1x1 @56
    // batch 8, A/B in one process over four runs: keep 0.75 1.15-1.74 -> 1.07-1.17 ms, keep 0.5 0.60-1.19 ->
    // 0.55-0.85 ms; 320->80 and 384->96 @28 batch 8 1.05-1.08x faster). Otherwise the prefetches only take issue
    // slots: A/B in one process, 2 threads, Xeon VM, against prefetching every one_run tile: x inside L2 (batch 1
    // on 7x7-28x28 maps: 1024->256 @14, 512->128 and 128->512 @28, 2048->512 @7) 0.87-0.90x the time; more than
    // 192 inputs (1024->256 @14 batch 8 keep 0.25-0.75, 2048->512 @7 keep 0.25, 1024->128 @28) 0.88-0.92x.
    const int64_t l2 = l2_cache_bytes();
    const bool ahead = one_run && a.Cig <= 192 && (l2 <= 0 || static_cast<int64_t>(x.nbytes()) > l2);
    // A channel block's weights over 512 KiB (with the input, more than a core's L2) stream from L3 once per
    // tile; then the taps go in chunks of at most 256 KiB of weights, each read once per batch of tiles (A/B in
    // one process, 2 threads, Zen 5 VM: 512->512 3x3 @7 NCHW batch 8 keep 0.75 3.49 -> 3.09 ms, keep 0.5 1.41
    // -> 1.35 ms, batch 1 0.205 -> 0.192 ms, channels_last batch 8 keep 0.5 1.30 -> 1.15 ms; chunking blocks of
    // 295-442 KiB (256->256 3x3 @14, keep 0.5-0.75; 512->512 keep 0.25) cost 1-8%, so they stay whole). A 1x1
    // conv's chunks re-read no input (each takes other channels): past 192 KiB its input channels go in chunks
    // of at most 64 KiB of weights (2048->512 1x1 @7 batch 8, NCHW keep 0.75 1.16 -> 1.05 ms, keep 0.5 0.56 ->
    // 0.50 ms, channels_last keep 0.5 0.48 -> 0.45 ms; 1024->256 @14 channels_last keep 0.75, a 192 KiB block,
    // was 4% slower chunked: it loses the prefetch of the next tile, which runs only unchunked).
    const int64_t taps = KH * KW, tap_bytes = a.Cig * std::min(nv_max * kLanes, cog16) * 4;
    int64_t k_chunk = taps * a.Cig;
    if (!rows && taps > 1 && taps * tap_bytes > (512 << 10)) {
      const int64_t n_chunks = std::min(taps, (taps * tap_bytes + (256 << 10) - 1) / (256 << 10));
      k_chunk = (taps + n_chunks - 1) / n_chunks * a.Cig;
    } else if (!rows && taps == 1 && tap_bytes > (192 << 10)) {
      const int64_t n_chunks = (tap_bytes + (64 << 10) - 1) / (64 << 10);
      k_chunk = (a.Cig + n_chunks - 1) / n_chunks;
    }
    // kxk tiles whose windows lie inside x run one loop over all taps through these offsets (cl_micro's WIN;
    // A/B in one process, 2 threads, keep 0.75 batch 8: 128->128 3x3 @28 4-5% faster in either format, 64->64
    // @56 channels_last 4%, the other ResNet-50 3x3 shapes within 1%)
    std::vector<int64_t> tap_off(taps), koff;
    for (int64_t t = 0; t < taps; ++t) tap_off[t] = (t / KW) * a.DH * a.sH + (t % KW) * a.DW * a.sW;
    if (taps > 1 && !rows) {
      koff.resize(groups * taps * a.Cig);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t ci = 0; ci < a.Cig; ++ci)
            koff[(g * taps + t) * a.Cig + ci] = tap_off[t] + a.in_idx[g * a.Cig + ci] * a.sC;
    }
    const int64_t wblock = nv_max * kLanes;
    const at::Tensor wt = transposed_weight(weight, wc, groups, a.Cog, a.Cig, taps, cog16, wblock);
    ClArgs c{wt.data_ptr<float>(), zeros.defined() ? zeros.data_ptr<float>() : nullptr, cog16, mr, nv_max, wblock, rows,
             one_run, run, ahead, k_chunk, tap_off.data(), koff.empty() ? nullptr : koff.data()};
    const ClFn fn = PYPRUNE_ISA_ENTRY(cl);
    const int64_t bw = nv_max * kLanes;
    const int64_t tiles = (a.N * a.P + c.MR - 1) / c.MR, blocks = groups * ((a.Cog + bw - 1) / bw);
    // one equal share of the (block, tile) items per thread (chunks of whole units left one thread up to 10%
    // more tiles than the other at 2 threads: 17 units of 8 tiles for 131 tiles)
    const int64_t items = blocks * tiles, parts = std::min(threads, items);
    // y streamed past half the LLC (as csr_conv2d's and bsr_linear's tiles; A/B in one process, 2 threads, Zen
    // 4 VM, channels_last batch 8, fused gather: 64->256 1x1 @56 keep 0.5 / 0.75 / 1 0.74x / 0.76x / 0.77x the
    // time, 256->64 @56 keep 0.25-0.75 0.97-0.99x, 64->64 3x3 @56 batch 16 keep 0.75 0.98x; below the rule
    // (128->512 @28, 256->1024 @14, 64->64 3x3 @56 batch 8, batch 1) unchanged)
    const int64_t footprint = static_cast<int64_t>(x.nbytes() + (has_res ? 2 : 1) * y.nbytes());
    a.stream_y = a.oC == 1 && stream_output(footprint, a.y);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) fn(a, c, items * p / parts, items * (p + 1) / parts);
      if (a.stream_y) stream_fence();
    });
    return finish(true);
  }
  if (a.SH == 1 && a.SW == 1 && (KH > 1 || KW > 1) && 7 * (Wp - OW) <= Wp) {
    a.staged = true;
    a.Hp = Hp;
    a.Wp = Wp;
    a.tiles_per_image = (OH * Wp + kNR - 1) / kNR;
    a.n_tiles = a.N * a.tiles_per_image;
  } else {
    a.n_tiles = (a.N * a.P + kNR - 1) / kNR;
  }
  // Too few (tile, group) units to balance the threads: split each group's rows too (the slices of one tile
  // then each build its im2col tile, a cost of 1 / rows_per_slice of the FMAs).
  const int64_t per_thread = 16;  // units
  const int64_t panels = (a.Cog + kMR - 1) / kMR;
  const int64_t tg = a.n_tiles * a.G;
  a.n_slices = tg >= per_thread * threads ? 1 : std::min(panels, (per_thread * threads + tg - 1) / tg);
  a.rows_per_slice = (panels + a.n_slices - 1) / a.n_slices * kMR;
  a.n_slices = (a.Cog + a.rows_per_slice - 1) / a.rows_per_slice;
  const UnitFn fn = PYPRUNE_ISA_ENTRY(gemm);
  // Contiguous unit ranges of equal cost (a tile's vectors x a slice's rows). Equal unit counts left one thread
  // a whole tile more work when a map ends in a short tile (1024->256 1x1 @14 batch 1: 196 pixels = 3 full
  // tiles + 4 pixels; A/B in one process, 2 threads: 14-17% faster, batch 8 2-6%, other shapes within 1%).
  const int64_t n_units = tg * a.n_slices;
  std::vector<int64_t> cost(n_units + 1, 0);
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t s = u % a.n_slices, t = u / a.n_slices / a.G;
    const int64_t pixels = a.staged ? std::min(kNR, OH * Wp - (t % a.tiles_per_image) * kNR)
                                    : std::min(kNR, a.N * a.P - t * kNR);
    const int64_t rows = std::min(a.Cog, (s + 1) * a.rows_per_slice) - s * a.rows_per_slice;
    cost[u + 1] = cost[u] + (pixels + kLanes - 1) / kLanes * rows;
  }
  const std::vector<int64_t> ub = balanced_split(n_units, threads, [&cost](int64_t u) { return cost[u]; }, 0);
  const int64_t ranges = static_cast<int64_t>(ub.size()) - 1;
  // NCHW y of 1x1 convs streamed past half the LLC with x, without a residual (A/B in one process, 2 threads,
  // Zen 4 VM, fused gather: 64->256 @56 batch 8 keep 0.75 / 0.5 0.77x / 0.75x the time, 128->512 @56 batch 4
  // 0.90x, 256->64 @56 batch 8 0.97-1.02x; the staged kxk tiles not measured, so not streamed)
  const int64_t footprint = static_cast<int64_t>(x.nbytes() + y.nbytes());
  a.stream_y = KH == 1 && KW == 1 && a.oP == 1 && !has_res && stream_output(footprint, a.y);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(a, ub[r], ub[r + 1]);
    if (a.stream_y) stream_fence();
  });
  return finish(true);
}

}  // namespace

at::Tensor pruned_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                             int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool relu, at::IntArrayRef max_pool,
                             std::optional<double> relu_max, const std::optional<at::Tensor>& residual) {
  PYPRUNE_CHECK(!relu_max.has_value() || (relu && *relu_max > 0), kOp, "relu_max",
                "must be None, or a number > 0 with relu=True, got ", relu_max.has_value() ? *relu_max : 0.0,
                " with relu=", relu ? "True" : "False");
  PYPRUNE_CHECK(max_pool.empty() || max_pool.size() == 6, kOp, "max_pool",
                "must be empty or (kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w), got ", max_pool);
  PYPRUNE_CHECK(!residual.has_value() || max_pool.empty(), kOp, "residual",
                "cannot be combined with max_pool (the pool would have to follow the residual add)");
  PoolWindow p{};
  if (!max_pool.empty()) {
    p = {max_pool[0], max_pool[1], max_pool[2], max_pool[3], max_pool[4], max_pool[5]};
    PYPRUNE_CHECK(p.KH >= 1 && p.KW >= 1 && p.SH >= 1 && p.SW >= 1 && p.PH >= 0 && p.PW >= 0 &&
                      2 * p.PH <= p.KH && 2 * p.PW <= p.KW,
                  kOp, "max_pool", "needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, got ", max_pool);
  }
  at::Tensor yc = conv_forward(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation,
                               groups, relu, relu_max.value_or(std::numeric_limits<double>::infinity()),
                               residual.has_value() ? *residual : at::Tensor());
  if (max_pool.empty()) return yc;
  PYPRUNE_CHECK(yc.size(2) + 2 * p.PH >= p.KH && yc.size(3) + 2 * p.PW >= p.KW, kOp, "max_pool",
                "gives an empty output for the conv's ", yc.size(2), " x ", yc.size(3), " output, got ", max_pool);
  return max_pool2d_checked(yc, p, x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous());
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("pruned_conv2d", &pruned_conv2d_cpu); }

}  // namespace pyprune
