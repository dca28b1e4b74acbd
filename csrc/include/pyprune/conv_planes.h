// What the sparse-weight conv kernels (csr_conv2d, bsr_conv2d) share: an implicit GEMM over staged input planes.
//
// Fast Sparse ConvNets (Elsen et al. 2020) for 1x1 convs, generalised to kxk: in NCHW a channel's pixels are
// contiguous, so a weight w[o, c, i, j] multiplies a contiguous run of input pixels into a contiguous run of
// output pixels, one broadcast FMA per 16 pixels. To make every tap a plain shift, each image's input is
// staged once as zero-padded planes, split by stride phase: plane (a, b, c)[u][v] = x_pad[c][u*sh + a][v*sw + b].
// Output pixel (oh, ow) is then q = oh*Wq + ow, and the tap (c, i, j) reads plane (i*dh % sh, j*dw % sw, c) at
// q + (i*dh / sh)*Wq + (j*dw / sw): one int32 offset per weight column (tap_offsets). taps_aligned instead
// stages one slot per (stride phase, column shift j*dw / sw), already shifted, and rounds Wq up to whole
// vectors, so that every tap reads whole 64-byte lines at q + (i*dh / sh)*Wq. Flat q covers Wq - OW
// columns per row that are computed and dropped; tiles either follow output rows (no waste, partial last
// vectors) or run flat across rows, whichever computes fewer vectors (make_tiles). channels_last x is staged
// through 16x16 transposes and gets a channels_last y, stored 16 rows at a time through the same transposes
// (store_group_cl).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "pyprune/check.h"
#include "pyprune/token_tiles.h"

namespace pyprune {

struct Tile {
  int64_t q0, len;
  int64_t dst;  // offset of q0 in an output channel when the tile's outputs are contiguous, else -1
};

// The geometry of a conv's staged planes: output size, the stride phases the taps use (slots), plane counts.
struct PlaneGeometry {
  int64_t N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t OH, OW, Hq, Wq;
  std::vector<int64_t> slot_phase;  // slot -> stride phase a * sw + b
  std::vector<int64_t> slot_shift;  // slot -> column shift its planes are staged with (0 unless aligned)
  std::vector<int64_t> tap_slot;  // tap i * kw + j -> the slot it reads
  int64_t planes;  // per image: slots x C
  int64_t reach;  // q distance from a tile's first output to the last input its taps read, past the tile
  bool cl;  // x is channels_last (as F.conv2d decides: laid out so, and not trivially both): staged from NHWC
  bool aligned;  // taps_aligned: every tap reads whole 64-byte lines
};

// Slots: one per distinct (stride phase, column shift) the taps read; a column shift of 0 everywhere unless
// `aligned`, where each tap's column shift j*dw / sw gets planes of its own, staged already shifted.
inline void assign_slots(PlaneGeometry& g) {
  std::vector<std::pair<int64_t, int64_t>> keys;
  g.slot_phase.clear(), g.slot_shift.clear(), g.tap_slot.assign(g.kh * g.kw, -1);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const std::pair<int64_t, int64_t> key{(i * g.dh % g.sh) * g.sw + j * g.dw % g.sw,
                                            g.aligned ? j * g.dw / g.sw : 0};
      const auto it = std::find(keys.begin(), keys.end(), key);
      g.tap_slot[i * g.kw + j] = it - keys.begin();
      if (it == keys.end()) {
        keys.push_back(key);
        g.slot_phase.push_back(key.first);
        g.slot_shift.push_back(key.second);
      }
    }
  g.planes = static_cast<int64_t>(keys.size()) * g.C;
  g.reach = ((g.kh - 1) * g.dh / g.sh) * g.Wq + (g.aligned ? 0 : (g.kw - 1) * g.dw / g.sw);
}

// OH / OW are 0 when the dilated kernel does not fit the padded input (the caller reports it).
inline PlaneGeometry plane_geometry(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  PlaneGeometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  g.OH = Hp >= g.dh * (g.kh - 1) + 1 ? (Hp - g.dh * (g.kh - 1) - 1) / g.sh + 1 : 0;
  g.OW = Wp >= g.dw * (g.kw - 1) + 1 ? (Wp - g.dw * (g.kw - 1) - 1) / g.sw + 1 : 0;
  g.Hq = (Hp + g.sh - 1) / g.sh, g.Wq = (Wp + g.sw - 1) / g.sw;
  g.aligned = false;
  assign_slots(g);
  g.cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return g;
}

// The geometry with every tap reading whole 64-byte lines: rows Wq = OW rounded up to whole vectors (so that
// the row shifts are too), and one slot per column shift, its planes staged already shifted (kw slots instead
// of one for a stride-1 conv). Unaligned, a tap's 16-float vectors straddle two lines for all but one shift in
// 16: on a Zen 4 VM, 2 threads, csr_conv2d's 3x3 convs took 1.1-1.4x as long as with aligned offsets.
inline PlaneGeometry taps_aligned(PlaneGeometry g) {
  g.Wq = round_up(g.OW, kLanes);
  g.aligned = true;
  assign_slots(g);
  return g;
}

// plane_geometry after the checks of x's rank and the conv arguments (which `op` names when they fail).
inline PlaneGeometry checked_plane_geometry(const at::Tensor& x, at::IntArrayRef kernel_size,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, const char* op) {
  PYPRUNE_CHECK(x.dim() == 4, op, "x", "must be 4-D (N, C_in, H, W), got shape ", x.sizes());
  PYPRUNE_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op, "kernel_size",
                "must be two ints >= 1, got ", kernel_size);
  PYPRUNE_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, "stride",
                "must be two ints >= 1, got ", stride);
  PYPRUNE_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op, "padding",
                "must be two ints >= 0, got ", padding);
  PYPRUNE_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op, "dilation",
                "must be two ints >= 1, got ", dilation);
  PlaneGeometry g = plane_geometry(x, kernel_size, stride, padding, dilation);
  PYPRUNE_CHECK(g.OH >= 1 && g.OW >= 1, op, "x", "has spatial size (", g.H, ", ", g.W,
                "), smaller than the dilated kernel after padding ", padding);
  return g;
}

// Widest tile (in vectors, at most nv_max) whose input slice (planes x (tile + the taps' reach)) stays within
// ~512 KiB of L2.
inline int64_t tile_vecs(const PlaneGeometry& g, int64_t nv_max) {
  int64_t nv = nv_max;
  while (nv > 1 && g.planes * (kLanes * nv + g.reach) * 4 > 512 * 1024) --nv;
  return nv;
}

// A plane stride of `lines` 64-byte lines spreads consecutive planes' tiles over the L1 sets (a 4 KiB plane
// stride puts every plane's tile in the same 4 sets: about 1.5x slower at 32x32).
inline bool spreads_sets(int64_t lines, int64_t nv) { return std::gcd<int64_t>(lines, 64) <= nv; }

// Staged planes: one per (stride phase in use, channel), Hq x Wq each, padded to whole vectors so that every
// plane starts 64-byte aligned (split-line loads cost 1.2-1.25x on 7x7 and 14x14 maps), and to a line count
// that spreads_sets.
inline int64_t plane_stride(const PlaneGeometry& g, int64_t nv) {
  int64_t plane = round_up(g.Hq * g.Wq, kLanes);
  if (!spreads_sets(plane / kLanes, nv)) plane += kLanes;
  return plane;
}

// Per tap (i, j): its plane slot's first plane and its shift in q. Column (i*kw + j)*C + c of a tap-major
// weight reads tap_off[i*kw + j] + c * plane.
inline std::vector<int64_t> tap_offsets(const PlaneGeometry& g, int64_t plane) {
  std::vector<int64_t> tap_off(g.kh * g.kw);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      tap_off[i * g.kw + j] = g.tap_slot[i * g.kw + j] * g.C * plane + (i * g.dh / g.sh) * g.Wq +
                              (g.aligned ? 0 : j * g.dw / g.sw);
  return tap_off;
}

// Vectors computed by tiles at most `tile` (a multiple of kLanes) wide over a run of `len` q positions.
inline int64_t run_vectors(int64_t len, int64_t tile) {
  return len / tile * (tile / kLanes) + (len % tile + kLanes - 1) / kLanes;
}

// The vectors make_tiles' tiles compute per image, flat across rows or along them, whichever is fewer (*flat:
// which one make_tiles takes).
inline int64_t tiled_vectors(int64_t OH, int64_t OW, int64_t Wq, int64_t tile, bool* flat = nullptr) {
  const int64_t flat_vecs = run_vectors((OH - 1) * Wq + OW, tile), row_vecs = OH * run_vectors(OW, tile);
  const bool f = Wq == OW || flat_vecs <= row_vecs;
  if (flat) *flat = f;
  return f ? flat_vecs : row_vecs;
}

// Vectors one image's tiles compute, at the widest tile the geometry's planes allow.
inline int64_t image_vectors(const PlaneGeometry& g, int64_t nv_max) {
  return tiled_vectors(g.OH, g.OW, g.Wq, kLanes * tile_vecs(g, nv_max));
}

// taps_aligned(g) when some tap shifts by columns and rounding the rows up to whole vectors adds at most 1/8
// to the vectors computed (3x3 convs on 56x56, 28x28 and 14x14 maps, not on 7x7: 4 -> 7 vectors), else g.
inline PlaneGeometry aligned_if_cheap(const PlaneGeometry& g, int64_t nv_max) {
  if ((g.kw - 1) * g.dw / g.sw == 0) return g;
  const PlaneGeometry a = taps_aligned(g);
  return 8 * image_vectors(a, nv_max) <= 9 * image_vectors(g, nv_max) ? a : g;
}

// The pixel tiles of one image in q space, at most `tile` wide: along output rows, or flat across them.
inline std::vector<Tile> make_tiles(int64_t OH, int64_t OW, int64_t Wq, int64_t tile) {
  const int64_t q_end = (OH - 1) * Wq + OW;
  bool flat = true;
  tiled_vectors(OH, OW, Wq, tile, &flat);
  std::vector<Tile> tiles;
  auto add = [&](int64_t q0, int64_t len) {
    const int64_t oh = q0 / Wq, ow = q0 - oh * Wq;
    const bool contiguous = Wq == OW || ow + len <= OW;
    tiles.push_back({q0, len, contiguous ? oh * OW + ow : -1});
  };
  if (flat) {
    for (int64_t q = 0; q < q_end; q += tile) add(q, std::min(tile, q_end - q));
  } else {
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t w = 0; w < OW; w += tile) add(oh * Wq + w, std::min(tile, OW - w));
  }
  return tiles;
}

// The residual of csr_conv2d's / bsr_conv2d's fused epilogue, y = relu?(conv + bias + residual): checked
// against the output y (channels_last or not), returned laid out as y so that one offset serves both
// (undefined: no residual).
inline at::Tensor checked_residual(const std::optional<at::Tensor>& residual, const at::Tensor& y, bool cl,
                                   const char* op) {
  if (!residual.has_value()) return at::Tensor();
  PYPRUNE_CHECK_DTYPE(*residual, op, "residual", y.scalar_type());
  PYPRUNE_CHECK_CPU(*residual, op, "residual");
  PYPRUNE_CHECK(residual->sizes() == y.sizes(), op, "residual", "must have the output's shape ", y.sizes(),
                ", got ", residual->sizes());
  return residual->contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// The epilogue's ReLU as one float (kNoRelu, +inf or a cap: see epilogue16 in token_tiles.h).
inline float relu_cap(bool relu, const std::optional<double>& relu_max, const char* op) {
  PYPRUNE_CHECK(!relu_max.has_value() || (relu && *relu_max > 0), op, "relu_max",
                "must be None, or a number > 0 with relu=True, got ", relu_max.value_or(0.0), " with relu=",
                relu);
  if (!relu) return kNoRelu;
  return relu_max.has_value() ? static_cast<float>(*relu_max) : std::numeric_limits<float>::infinity();
}

// y = relu?(y + res) in place (res undefined: none), for the paths that compute y without the epilogue.
inline void apply_epilogue(at::Tensor& y, const at::Tensor& res, float cap) {
  if (res.defined()) y.add_(res);
  if (cap != kNoRelu) y.clamp_min_(0);
  if (cap != kNoRelu && cap < std::numeric_limits<float>::infinity()) y.clamp_max_(cap);
}

// d[k] = epilogue1(s[k] + bias, r + k, cap) for k < n, one loop per case so that the compiler vectorizes each:
// the NCHW row tiles that drop columns (3x3 convs on small maps) store every output here, and with the choices
// inside one loop (and the ReLU's cap compared too) bsr_conv2d with relu took 1.17x its time without, 128->128
// 3x3 @28 at 90% (a separate in-place ReLU: 1.0-1.15x).
PYPRUNE_INLINE void epilogue_run(float* __restrict d, const float* __restrict s, float bias,
                                 const float* __restrict r, int64_t n, float cap) {
  const bool relu = cap != kNoRelu;
  if (relu && cap < std::numeric_limits<float>::infinity()) {  // capped (ReLU6)
    if (r) {
      for (int64_t k = 0; k < n; ++k) d[k] = relu1(s[k] + bias + r[k], cap);
    } else {
      for (int64_t k = 0; k < n; ++k) d[k] = relu1(s[k] + bias, cap);
    }
  } else if (r && relu) {
    for (int64_t k = 0; k < n; ++k) d[k] = relu1(s[k] + bias + r[k]);
  } else if (r) {
    for (int64_t k = 0; k < n; ++k) d[k] = s[k] + bias + r[k];
  } else if (relu) {
    for (int64_t k = 0; k < n; ++k) d[k] = relu1(s[k] + bias);
  } else {
    for (int64_t k = 0; k < n; ++k) d[k] = s[k] + bias;
  }
}

// NCHW output of one row of a tile (yc: the row's output channel), bias added, then the epilogue (rc: the
// residual's same channel, laid out as y, or null); dropped columns skipped.
template <class V, int NV>
PYPRUNE_INLINE void store_tile(const V* acc, const Tile& tl, float bias, int64_t Wq, int64_t OW, float* yc,
                               const float* rc, float cap) {
  if (tl.dst >= 0) {
    float* d = yc + tl.dst;
    const float* r = rc ? rc + tl.dst : nullptr;
    int t = 0;
    for (; t < NV && (t + 1) * kLanes <= tl.len; ++t)
      store16(d + kLanes * t, epilogue16(acc[t] + bias, r ? r + kLanes * t : nullptr, cap));
    for (int64_t k = t * kLanes; k < tl.len; ++k)
      d[k] = epilogue1(acc[t][k - t * kLanes] + bias, r ? r + k : nullptr, cap);
    return;
  }
  alignas(64) float buf[NV * kLanes];
  for (int t = 0; t < NV; ++t) store16(buf + kLanes * t, acc[t]);
  const int64_t q1 = tl.q0 + tl.len;
  for (int64_t q = tl.q0; q < q1;) {
    const int64_t oh = q / Wq, row = oh * Wq;
    const int64_t valid_end = std::min(q1, row + OW);
    const int64_t at = oh * OW - row + q;  // y's offset of q
    epilogue_run(yc + at, buf + (q - tl.q0), bias, rc ? rc + at : nullptr, valid_end - q, cap);
    q = std::min(q1, row + Wq);
  }
}

// channels_last output: rows [o0, o0 + g) of one tile, buffered as buf[row][q - q0] (bias added), go out as
// y[pixel][o0 .. o0 + g), a whole group through in-register 16x16 transposes, a partial one element-wise; the
// epilogue with r_img (the residual laid out as y_img, or null). stream: whole groups leave through stream16
// (y 64-byte aligned and O a multiple of 16).
template <class V>
PYPRUNE_INLINE void store_group_cl(const float* buf, int64_t ldb, int64_t g, const Tile& tl, int64_t Wq,
                                   int64_t OW, int64_t O, int64_t o0, float* y_img, const float* r_img,
                                   float cap, bool stream) {
  auto pixel = [&](int64_t q) {  // output pixel of q, or -1 for a dropped column
    if (tl.dst >= 0) return tl.dst + q - tl.q0;  // the tile's outputs are contiguous: no division
    const int64_t oh = q / Wq, ow = q - oh * Wq;
    return ow < OW ? oh * OW + ow : -1;
  };
  for (int64_t qb = 0; qb < tl.len; qb += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, tl.len - qb);
    if (g == kLanes) {
      V r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(buf + i * ldb + qb);
      transpose16(r);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = pixel(tl.q0 + qb + j);
        if (p < 0) continue;
        const V v = epilogue16(r[j], r_img ? r_img + p * O + o0 : nullptr, cap);
        if (stream) stream16(y_img + p * O + o0, v);
        else store16(y_img + p * O + o0, v);
      }
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = pixel(tl.q0 + qb + j);
      if (p < 0) continue;
      for (int64_t i = 0; i < g; ++i) {
        const int64_t at = p * O + o0 + i;
        y_img[at] = epilogue1(buf[i * ldb + qb + j], r_img ? r_img + at : nullptr, cap);
      }
    }
  }
}

// channels_last input: plane row u (all channels) from one NHWC input row xr, columns v in [v0, v1) reading
// input column v*sw + col0; stride 1 through in-register 16x16 transposes (16 pixels x 16 channels at a time).
// With Prefetch, each block's 16 pixel rows are prefetched into L2 kPrefetchBlocks blocks (48 pixels) ahead:
// the 16 rows, a whole pixel (C floats) apart, are more streams than the hardware prefetcher kept up with when
// the planes were staged row by row (2 threads, 90% sparse channels_last 256->64 1x1 @56 batch 8, A/B in one
// process: 2 blocks ahead into L2 1.35x faster than none, 3 blocks 1.06x faster than 2, 4 or 5 no better).
// csr_conv2d's packed 1x1 tiles, one contiguous run of pixels each, go without unless x is larger than half
// the last-level cache: with x in the LLC the prefetches cost 1.01-1.16x on ResNet-50's 1x1 convs (Xeon VM, 9
// alternating rounds in one process), from memory they gained 1.13-1.25x (Zen 4 VM, see csr_conv2d.cpp).
constexpr int64_t kPrefetchBlocks = 3;

template <class V, bool Prefetch = true>
PYPRUNE_INLINE void stage_row_cl(const float* xr, int64_t C, int64_t v0, int64_t v1, int64_t col0, int64_t sw,
                                 float* dst, int64_t plane) {
  int64_t v = v0;
  if (sw == 1) {
    for (; v + kLanes <= v1; v += kLanes) {
      const float* src = xr + (v + col0) * C;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) {
        if constexpr (Prefetch)
          for (int i = 0; i < kLanes; ++i) __builtin_prefetch(src + (kPrefetchBlocks * kLanes + i) * C + c, 0, 2);
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = load16<V>(src + i * C + c);
        transpose16(r);
        for (int j = 0; j < kLanes; ++j) store16(dst + (c + j) * plane + v, r[j]);
      }
      for (; c < C; ++c)
        for (int i = 0; i < kLanes; ++i) dst[c * plane + v + i] = src[i * C + c];
    }
  }
  for (; v < v1; ++v) {
    const float* src = xr + (v * sw + col0) * C;
    for (int64_t c = 0; c < C; ++c) dst[c * plane + v] = src[c];
  }
}

using StageClFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

#define PYPRUNE_STAGE_CL(SUFFIX, TARGET, V)                                                                    \
  TARGET inline void stage_cl_##SUFFIX(const float* xr, int64_t C, int64_t v0, int64_t v1, int64_t col0,      \
                                       int64_t sw, float* dst, int64_t plane) {                               \
    stage_row_cl<V>(xr, C, v0, v1, col0, sw, dst, plane);                                                     \
  }

PYPRUNE_STAGE_CL(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_STAGE_CL(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_STAGE_CL(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

inline StageClFn pick_stage_cl(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return stage_cl_avx512;
  if (isa == Isa::kAvx2) return stage_cl_avx2;
#endif
  (void)isa;
  return stage_cl_baseline;
}

// Every image's planes (planes x `plane` floats each, zero borders) from x (NCHW-contiguous, or channels_last
// when g.cl), plus `slack` zero floats at the end for full-vector reads past the last tile.
inline at::Tensor stage_planes(const at::Tensor& x, const PlaneGeometry& g, int64_t plane, int64_t slack,
                               Isa isa) {
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, Hq = g.Hq, Wq = g.Wq, sh = g.sh, sw = g.sw;
  const int64_t ph = g.ph, pw = g.pw, in_image = g.planes * plane;
  const int64_t n_slots = static_cast<int64_t>(g.slot_phase.size());
  const float* in = x.data_ptr<float>();
  if (g.cl) {
    // NHWC rows into planes: unit (image, slot, plane row), a thread's share at least ~64 KiB. Each unit
    // zeroes only its row's borders (and the last row's unit the plane's tail), so every float is written
    // once: zeroing the whole buffer first took 3% of a channels_last bsr_conv2d call.
    at::Tensor staged = at::empty({N * in_image + slack}, x.options());
    float* st = staged.data_ptr<float>();
    std::fill(st + N * in_image, st + N * in_image + slack, 0.f);
    const StageClFn stage = pick_stage_cl(isa);
    at::parallel_for(0, N * n_slots * Hq, std::max<int64_t>(1, 16384 / (C * Wq)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / (n_slots * Hq), s = (p / Hq) % n_slots, u = p % Hq;
        const int64_t pa = g.slot_phase[s] / sw, r = u * sh + pa - ph;
        const int64_t pb = g.slot_phase[s] % sw + g.slot_shift[s] * sw;  // column v reads v * sw + pb - pw
        const bool inside = r >= 0 && r < H;
        const int64_t v0 = inside ? std::min(Wq, (std::max<int64_t>(0, pw - pb) + sw - 1) / sw) : Wq;
        const int64_t v1 = inside ? std::max(v0, std::min(Wq, (W + pw - pb + sw - 1) / sw)) : Wq;
        float* row = st + n * in_image + s * C * plane + u * Wq;
        for (int64_t c = 0; c < C; ++c) {
          float* d = row + c * plane;
          std::fill(d, d + v0, 0.f);
          std::fill(d + v1, d + Wq, 0.f);
          if (u == Hq - 1) std::fill(d + Wq, d + plane - u * Wq, 0.f);
        }
        if (inside) stage(in + (n * H + r) * W * C, C, v0, v1, pb - pw, sw, row, plane);
      }
    });
    return staged;
  }
  at::Tensor staged = at::empty({N * in_image + slack}, x.options());
  float* st = staged.data_ptr<float>();
  std::fill(st + N * in_image, st + N * in_image + slack, 0.f);
  // per slot: its phase (pa, pb) and the columns v whose input column v*sw + pb - pw lies in [0, W)
  std::vector<int64_t> pa(n_slots), pb(n_slots), v0(n_slots), v1(n_slots);
  for (int64_t s = 0; s < n_slots; ++s) {
    pa[s] = g.slot_phase[s] / sw;
    pb[s] = g.slot_phase[s] % sw + g.slot_shift[s] * sw;
    v0[s] = std::min(Wq, (std::max<int64_t>(0, pw - pb[s]) + sw - 1) / sw);
    v1[s] = std::max(v0[s], std::min(Wq, (W + pw - pb[s] + sw - 1) / sw));
  }
  const bool whole_planes = Hq == H && Wq == W && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  // a thread's share at least ~64 KiB: waking the second thread costs more than copying less. Plane p is
  // (image n, slot s, channel c) = p / planes, (p % planes) / C, p % C, stepped without divisions.
  at::parallel_for(0, N * g.planes, std::max<int64_t>(1, 16384 / plane), [&](int64_t p0, int64_t p1) {
    int64_t n = p0 / g.planes, s = (p0 % g.planes) / C, c = p0 % C;
    for (int64_t p = p0; p < p1; ++p) {
      const float* src = in + (n * C + c) * H * W;
      float* dst = st + p * plane;
      if (whole_planes) {  // one run
        std::copy(src, src + H * W, dst);
        std::fill(dst + H * W, dst + plane, 0.f);
      } else {  // one fill of the plane, then a copy per row
        std::fill(dst, dst + plane, 0.f);
        for (int64_t u = 0; u < Hq; ++u) {
          const int64_t r = u * sh + pa[s] - ph;
          if (r < 0 || r >= H) continue;
          const float* sr = src + r * W + pb[s] - pw;
          float* d = dst + u * Wq;
          if (sw == 1) std::copy(sr + v0[s], sr + v1[s], d + v0[s]);
          else for (int64_t v = v0[s]; v < v1[s]; ++v) d[v] = sr[v * sw];
        }
      }
      if (++c == C) {
        c = 0;
        if (++s == n_slots) s = 0, ++n;
      }
    }
  });
  return staged;
}

}  // namespace pyprune
