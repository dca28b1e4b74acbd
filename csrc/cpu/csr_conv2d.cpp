// pyprune::csr_conv2d on the CPU: conv2d of NCHW x with a CSR weight (C_out, kh*kw*C_in), tap-major columns
// (column (i*kw + j)*C_in + c holds w[o, c, i, j]), as an implicit GEMM that never builds a patch matrix.
//
// Fast Sparse ConvNets (Elsen et al. 2020) for 1x1 convs, generalised to kxk: in NCHW a channel's pixels are
// contiguous, so a nonzero w[o, c, i, j] multiplies a contiguous run of input pixels into a contiguous run of
// output pixels, one broadcast FMA per 16 pixels. To make every tap a plain shift, each image's input is
// staged once as zero-padded planes, split by stride phase: plane (a, b, c)[u][v] = x_pad[c][u*sh + a][v*sw + b].
// Output pixel (oh, ow) is then q = oh*Wq + ow, and the tap (c, i, j) reads plane (i*dh % sh, j*dw % sw, c) at
// q + (i*dh / sh)*Wq + (j*dw / sw): one int32 offset per nonzero, computed per call. Flat q covers Wq - OW
// columns per row that are computed and dropped; tiles either follow output rows (no waste, partial last
// vectors) or run flat across rows, whichever computes fewer vectors. A stride-1 unpadded 1x1 conv on a map
// of whole vectors (H*W % 16 == 0) reads x in place.
//
// Work units are (image, pixel tile, output-row part): a tile's input slice (planes x tile) stays in L2 while
// every row's nonzeros stream past it, and the next tile's slice is prefetched meanwhile; row parts (balanced
// by nnz) add parallelism when tiles are few.
#include <immintrin.h>

#include "pyprune/linear.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

struct Tile {
  int64_t q0, len;
  int64_t dst;  // offset of q0 in an output channel when the tile's outputs are contiguous, else -1
};

struct ConvArgs {
  const int32_t* crow;
  const int32_t* off;  // per nonzero: input plane and tap shift, relative to the tile's first q
  const float* val;
  const float* bias;
  const float* in;  // image 0's staged planes (or x itself)
  int64_t in_image;  // floats per image of `in`
  int64_t planes, plane;  // input planes per image and their stride in floats
  int64_t pf_lines;  // cache lines per plane one tile reads (tile + the taps' reach)
  const Tile* tiles;
  const int64_t* rb;  // output-row part bounds
  int64_t n_tiles, n_parts, n_images, O, Wq, OW, OHW;
  float* y;
};

// Two accumulator sets over alternate nonzeros: with 4 vectors, 8 independent FMA chains.
template <int NV>
PYPRUNE_INLINE void row_tile(const int32_t* off, const float* val, int64_t nnz, const float* base, vf16* out) {
  vf16 a[NV], b[NV];
  for (int t = 0; t < NV; ++t) a[t] = b[t] = vf16{};
  int64_t j = 0;
  for (; j + 2 <= nnz; j += 2) {
    const float* p0 = base + off[j];
    const float* p1 = base + off[j + 1];
    const float w0 = val[j], w1 = val[j + 1];
    for (int t = 0; t < NV; ++t) a[t] += w0 * load16(p0 + kLanes * t);
    for (int t = 0; t < NV; ++t) b[t] += w1 * load16(p1 + kLanes * t);
  }
  if (j < nnz) {
    const float* p0 = base + off[j];
    const float w0 = val[j];
    for (int t = 0; t < NV; ++t) a[t] += w0 * load16(p0 + kLanes * t);
  }
  for (int t = 0; t < NV; ++t) out[t] = a[t] + b[t];
}

template <int NV>
PYPRUNE_INLINE void store_tile(const vf16* acc, const Tile& tl, float bias, int64_t Wq, int64_t OW, float* yc) {
  if (tl.dst >= 0) {
    float* d = yc + tl.dst;
    int t = 0;
    for (; t < NV && (t + 1) * kLanes <= tl.len; ++t) store16(d + kLanes * t, acc[t] + bias);
    for (int64_t k = t * kLanes; k < tl.len; ++k) d[k] = acc[t][k - t * kLanes] + bias;
    return;
  }
  alignas(64) float buf[NV * kLanes];
  for (int t = 0; t < NV; ++t) store16(buf + kLanes * t, acc[t]);
  const int64_t q1 = tl.q0 + tl.len;
  for (int64_t q = tl.q0; q < q1;) {
    const int64_t oh = q / Wq, row = oh * Wq;
    const int64_t valid_end = std::min(q1, row + OW);
    float* d = yc + oh * OW - row;
    for (int64_t k = q; k < valid_end; ++k) d[k] = buf[k - tl.q0] + bias;
    q = std::min(q1, row + Wq);
  }
}

// Prefetches planes [p0, p1) of the tile at `next` (null: none).
PYPRUNE_INLINE void prefetch_planes(const ConvArgs& a, const float* next, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const char* s = reinterpret_cast<const char*>(next + p * a.plane);
    for (int64_t l = 0; l < a.pf_lines; ++l) __builtin_prefetch(s + 64 * l, 0, 3);
  }
}

// Rows [r0, r1) of one tile; the next tile's input (if `next`) is prefetched a slice of planes per row, so
// that its memory traffic overlaps this tile's arithmetic.
template <int NV>
PYPRUNE_INLINE void rows_tile(const ConvArgs& a, const Tile& tl, const float* base, const float* next,
                              int64_t r0, int64_t r1, float* y_img) {
  vf16 acc[NV];
  const int64_t rows = r1 - r0;
  for (int64_t o = r0; o < r1; ++o) {
    if (next) prefetch_planes(a, next, (o - r0) * a.planes / rows, (o - r0 + 1) * a.planes / rows);
    const int64_t s = a.crow[o];
    row_tile<NV>(a.off + s, a.val + s, a.crow[o + 1] - s, base, acc);
    store_tile<NV>(acc, tl, a.bias ? a.bias[o] : 0.f, a.Wq, a.OW, y_img + o * a.OHW);
  }
}

// Units u in [u0, u1), ordered (image, tile, row part). NVMAX is the ISA's accumulator budget (2*NV vectors
// live: 8 zmm on AVX-512 at 4, 8 ymm pairs on AVX2 at 2, 8 xmm quads on the baseline at 1).
template <int NVMAX>
PYPRUNE_INLINE void conv_units(const ConvArgs& a, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t p = u % a.n_parts, t = (u / a.n_parts) % a.n_tiles, n = u / (a.n_parts * a.n_tiles);
    const Tile& tl = a.tiles[t];
    const float* base = a.in + n * a.in_image + tl.q0;
    const float* next = nullptr;  // the next unit's tile, when this unit is the last on its own
    if (u + 1 < u1 && p == a.n_parts - 1) {
      const int64_t t1 = (t + 1) % a.n_tiles, n1 = t1 ? n : n + 1;
      next = a.in + n1 * a.in_image + a.tiles[t1].q0;
    }
    float* y_img = a.y + n * a.O * a.OHW;
    const int64_t r0 = a.rb[p], r1 = a.rb[p + 1];
    switch (std::min<int64_t>(NVMAX, (tl.len + kLanes - 1) / kLanes)) {
      case 4: if constexpr (NVMAX >= 4) { rows_tile<4>(a, tl, base, next, r0, r1, y_img); break; }
      [[fallthrough]];
      case 3: if constexpr (NVMAX >= 3) { rows_tile<3>(a, tl, base, next, r0, r1, y_img); break; }
      [[fallthrough]];
      case 2: if constexpr (NVMAX >= 2) { rows_tile<2>(a, tl, base, next, r0, r1, y_img); break; }
      [[fallthrough]];
      default: rows_tile<1>(a, tl, base, next, r0, r1, y_img);
    }
  }
}

using UnitsFn = void (*)(const ConvArgs&, int64_t, int64_t);

#define PYPRUNE_CSR_CONV_UNITS(SUFFIX, TARGET, NVMAX) \
  TARGET void units_##SUFFIX(const ConvArgs& a, int64_t u0, int64_t u1) { conv_units<NVMAX>(a, u0, u1); }

PYPRUNE_CSR_CONV_UNITS(baseline, , 1)
#if PYPRUNE_X86
PYPRUNE_CSR_CONV_UNITS(avx2, PYPRUNE_TARGET_AVX2, 2)
PYPRUNE_CSR_CONV_UNITS(avx512, PYPRUNE_TARGET_AVX512, 4)
#endif

int isa_vecs(Isa isa) { return isa == Isa::kAvx512 ? 4 : (isa == Isa::kAvx2 ? 2 : 1); }

UnitsFn pick_units(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return units_avx512;
  if (isa == Isa::kAvx2) return units_avx2;
#endif
  (void)isa;
  return units_baseline;
}

// The pixel tiles of one image in q space, at most `tile` wide: along output rows, or flat across them.
std::vector<Tile> make_tiles(int64_t OH, int64_t OW, int64_t Wq, int64_t tile) {
  auto vecs = [](int64_t len) { return (len + kLanes - 1) / kLanes; };
  const int64_t q_end = (OH - 1) * Wq + OW;
  int64_t flat_vecs = 0, row_vecs = 0;
  for (int64_t q = 0; q < q_end; q += tile) flat_vecs += vecs(std::min(tile, q_end - q));
  for (int64_t w = 0; w < OW; w += tile) row_vecs += OH * vecs(std::min(tile, OW - w));
  std::vector<Tile> tiles;
  auto add = [&](int64_t q0, int64_t len) {
    const int64_t oh = q0 / Wq, ow = q0 - oh * Wq;
    const bool contiguous = Wq == OW || ow + len <= OW;
    tiles.push_back({q0, len, contiguous ? oh * OW + ow : -1});
  };
  if (Wq == OW || flat_vecs <= row_vecs) {
    for (int64_t q = 0; q < q_end; q += tile) add(q, std::min(tile, q_end - q));
  } else {
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t w = 0; w < OW; w += tile) add(oh * Wq + w, std::min(tile, OW - w));
  }
  return tiles;
}

// The dense equivalent, for dtypes the kernel lacks (float64 for gradcheck, fp16, bf16) and for images too
// large for int32 offsets.
at::Tensor dense_conv(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                      int64_t O, int64_t kh, int64_t kw, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t C = x.size(1), nnz = val.numel();
  const at::Tensor rows =
      at::repeat_interleave(at::arange(O, crow.options().dtype(at::kLong)), crow.diff().to(at::kLong), 0, nnz);
  const at::Tensor w = at::zeros({O, kh * kw * C}, val.options()).index_put_({rows, col.to(at::kLong)}, val, true);
  return at::conv2d(x, w.view({O, kh, kw, C}).permute({0, 3, 1, 2}), bias, stride, padding, dilation)
      .contiguous();
}

}  // namespace

at::Tensor csr_conv2d_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, int64_t out_channels, at::IntArrayRef kernel_size,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  constexpr const char* op = "csr_conv2d";
  check_compressed_args(x, crow_indices, col_indices, values, 1, op);
  PYPRUNE_CHECK(x.dim() == 4, op, "x", "must be 4-D (N, C_in, H, W), got shape ", x.sizes());
  PYPRUNE_CHECK(out_channels >= 0, op, "out_channels", "must be >= 0, got ", out_channels);
  PYPRUNE_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op, "kernel_size",
                "must be two ints >= 1, got ", kernel_size);
  PYPRUNE_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, "stride",
                "must be two ints >= 1, got ", stride);
  PYPRUNE_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op, "padding",
                "must be two ints >= 0, got ", padding);
  PYPRUNE_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op, "dilation",
                "must be two ints >= 1, got ", dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = out_channels;
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t OH = Hp >= dh * (kh - 1) + 1 ? (Hp - dh * (kh - 1) - 1) / sh + 1 : 0;
  const int64_t OW = Wp >= dw * (kw - 1) + 1 ? (Wp - dw * (kw - 1) - 1) / sw + 1 : 0;
  PYPRUNE_CHECK(OH >= 1 && OW >= 1, op, "x", "has spatial size (", H, ", ", W,
                "), smaller than the dilated kernel after padding ", padding);
  PYPRUNE_CHECK(crow_indices.numel() == O + 1, op, "crow_indices", "must have out_channels + 1 = ", O + 1,
                " entries, got ", crow_indices.numel());
  PYPRUNE_CHECK(col_indices.numel() == values.numel(), op, "col_indices",
                "must have as many entries as values (", values.numel(), "), got ", col_indices.numel());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous(), val = values.contiguous();
  const int64_t nnz = val.numel(), K = kh * kw * C;
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  PYPRUNE_CHECK(cr[0] == 0 && cr[O] == nnz, op, "crow_indices", "must start at 0 and end at nnz = ", nnz,
                ", got ", cr[0], " and ", cr[O]);
  for (int64_t o = 0; o < O; ++o)
    PYPRUNE_CHECK(cr[o] <= cr[o + 1], op, "crow_indices", "must be non-decreasing, got ", cr[o], " then ",
                  cr[o + 1], " at row ", o);
  int32_t lo = 0, hi = 0;
  for (int64_t j = 0; j < nnz; ++j) {
    lo = std::min(lo, ci[j]);
    hi = std::max(hi, ci[j]);
  }
  PYPRUNE_CHECK(lo >= 0 && (nnz == 0 || hi < K), op, "col_indices", "must lie in [0, kh*kw*C_in = ", K,
                "), got values in [", lo, ", ", hi, "]");

  // Staged planes: one per (stride phase in use, channel), Hq x Wq each, padded to whole vectors so that every
  // plane starts 64-byte aligned (split-line loads cost 1.5x on 7x7 and 14x14 maps). A 1x1 stride-1 unpadded
  // conv whose planes are whole vectors already reads x in place.
  const bool in_place = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && (H * W) % kLanes == 0;
  const int64_t Hq = (Hp + sh - 1) / sh, Wq = (Wp + sw - 1) / sw;
  std::vector<int64_t> phase_slot(sh * sw, -1);
  std::vector<int64_t> slot_phase;
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t ph_ab = (i * dh % sh) * sw + j * dw % sw;
      if (phase_slot[ph_ab] < 0) {
        phase_slot[ph_ab] = static_cast<int64_t>(slot_phase.size());
        slot_phase.push_back(ph_ab);
      }
    }
  const int64_t planes = in_place ? C : static_cast<int64_t>(slot_phase.size()) * C;
  const int64_t plane = round_up(Hq * Wq, kLanes);

  if (x.scalar_type() != at::kFloat || planes * plane >= (int64_t{1} << 31))
    return dense_conv(x, crow, col, val, O, kh, kw, bias, stride, padding, dilation);
  const at::Tensor b = checked_bias(bias, O, op);
  at::Tensor y = at::empty({N, O, OH, OW}, x.options());
  if (N == 0 || O == 0) return y;
  if (C == 0 || nnz == 0) return b.defined() ? y.copy_(b.view({1, O, 1, 1}).expand_as(y)) : y.zero_();

  const at::Tensor xc = x.contiguous();
  const Isa isa = kernel_isa();
  // Widest tile whose input slice (planes x (tile + the taps' reach)) stays within ~512 KiB of L2.
  const int64_t reach = ((kh - 1) * dh / sh) * Wq + (kw - 1) * dw / sw;
  int64_t nv = isa_vecs(isa);
  while (nv > 1 && planes * (kLanes * nv + reach) * 4 > 512 * 1024) --nv;
  const int64_t tile = kLanes * nv;
  const std::vector<Tile> tiles = make_tiles(OH, OW, Wq, tile);

  // Offsets: per tap (i, j) its plane slot and shift; a row's columns ascend, so its tap is found by stepping.
  std::vector<int64_t> tap_off(kh * kw);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      tap_off[i * kw + j] =
          phase_slot[(i * dh % sh) * sw + j * dw % sw] * C * plane + (i * dh / sh) * Wq + j * dw / sw;
  at::Tensor offs = at::empty({nnz}, crow.options());
  int32_t* off = offs.data_ptr<int32_t>();
  at::parallel_for(0, O, 64, [&](int64_t r0, int64_t r1) {
    int64_t tap = 0;
    for (int64_t j = cr[r0]; j < cr[r1]; ++j) {
      while (ci[j] >= (tap + 1) * C) ++tap;
      while (ci[j] < tap * C) --tap;
      off[j] = static_cast<int32_t>(tap_off[tap] + (ci[j] - tap * C) * plane);
    }
  });

  // Staging: every image's planes, zero borders, plus one tile of slack at the end for full-vector reads.
  at::Tensor staged;
  const float* in = xc.data_ptr<float>();
  const int64_t in_image = planes * plane;
  if (!in_place) {
    staged = at::empty({N * in_image + kLanes * nv}, x.options());
    float* st = staged.data_ptr<float>();
    std::fill(st + N * in_image, st + N * in_image + kLanes * nv, 0.f);
    const int64_t n_slots = static_cast<int64_t>(slot_phase.size());
    at::parallel_for(0, N * planes, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / planes, s = (p / C) % n_slots, c = p % C;
        const int64_t pa = slot_phase[s] / sw, pb = slot_phase[s] % sw;
        const float* src = in + (n * C + c) * H * W;
        float* dst = st + n * in_image + (s * C + c) * plane;
        // columns v whose input column v*sw + pb - pw lies in [0, W)
        const int64_t v0 = std::min(Wq, (std::max<int64_t>(0, pw - pb) + sw - 1) / sw);
        const int64_t v1 = std::max(v0, std::min(Wq, (W + pw - pb + sw - 1) / sw));
        for (int64_t u = 0; u < Hq; ++u) {
          const int64_t r = u * sh + pa - ph;
          float* d = dst + u * Wq;
          if (r < 0 || r >= H) {
            std::fill(d, d + Wq, 0.f);
            continue;
          }
          const float* sr = src + r * W + pb - pw;
          std::fill(d, d + v0, 0.f);
          if (sw == 1) std::copy(sr + v0, sr + v1, d + v0);
          else for (int64_t v = v0; v < v1; ++v) d[v] = sr[v * sw];
          std::fill(d + v1, d + Wq, 0.f);
        }
        std::fill(dst + Hq * Wq, dst + plane, 0.f);
      }
    });
    in = st;
  }

  const int64_t threads = at::get_num_threads();
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t want_parts = std::clamp<int64_t>((8 * threads + N * n_tiles - 1) / (N * n_tiles), 1, O);
  auto prefix = [cr](int64_t r) { return static_cast<int64_t>(cr[r]); };
  const auto rb = balanced_split(O, want_parts, prefix, 16);
  ConvArgs a{cr,
             off,
             val.data_ptr<float>(),
             b.defined() ? b.data_ptr<float>() : nullptr,
             in,
             in_image,
             planes,
             plane,
             ((tile + reach) * 4 + 63) / 64 + 1,
             tiles.data(),
             rb.data(),
             n_tiles,
             static_cast<int64_t>(rb.size()) - 1,
             N,
             O,
             Wq,
             OW,
             OH * OW,
             y.data_ptr<float>()};
  const UnitsFn fn = pick_units(isa);
  at::parallel_for(0, N * n_tiles * a.n_parts, 1, [&](int64_t u0, int64_t u1) { fn(a, u0, u1); });
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("csr_conv2d", &csr_conv2d_cpu); }

}  // namespace pyprune
