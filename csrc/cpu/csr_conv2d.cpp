// pyprune::csr_conv2d on the CPU: conv2d of x with a CSR weight (C_out, kh*kw*C_in), tap-major columns
// (column (i*kw + j)*C_in + c holds w[o, c, i, j]), as an implicit GEMM that never builds a patch matrix: the
// staged planes of pyprune/conv_planes.h, where a nonzero w[o, c, i, j] multiplies a contiguous run of input
// pixels into a contiguous run of output pixels, one broadcast FMA per 16 pixels, at one int32 offset per
// nonzero, cached with the indices. A stride-1 unpadded 1x1 conv on an NCHW map of whole vectors
// (H*W % 16 == 0) reads x in place; on other NCHW maps (7x7, 14x14) each unit range copies its own tiles into
// an L2 buffer instead of staging the image (no pass through memory), the tiles running flat across images so
// that small maps fill whole vectors. For a channels_last stride-1 unpadded 1x1 conv each unit range
// transposes its own tiles instead (the input is read once, nothing staged goes through memory).
//
// Work units are (image, pixel tile, output-row part): a tile's input slice (planes x tile) stays in L2 while
// every row's nonzeros stream past it, and the next tile's slice is prefetched meanwhile; row parts (balanced
// by nnz) add parallelism when tiles are few.
#include "pyprune/conv_planes.h"
#include "pyprune/derived_cache.h"
#include "pyprune/linear.h"
#include "pyprune/scratch.h"

namespace pyprune {
namespace {

struct ConvArgs {
  const int32_t* bnd;  // (n_chunks + 1, O): bnd[k * O + o] = row o's first nonzero with column >= k * chunk
  int64_t n_chunks;
  int64_t scratch_stride;  // floats per row in a unit range's scratch (partial sums between chunks)
  const int32_t* off;  // per nonzero: input plane and tap shift, relative to the tile's first q
  const float* val;
  const float* bias;
  const float* in;  // image 0's staged planes (or x itself)
  int64_t in_image;  // floats per image of `in`
  int64_t plane;  // the input planes' stride in floats
  int64_t pf_lines;  // cache lines per plane one tile reads (tile + the taps' reach)
  const int32_t* used;  // the planes some nonzero reads, ascending: those prefetched for the next tile
  int64_t n_used;
  const Tile* tiles;
  const int64_t* rb;  // output-row part bounds
  int64_t n_tiles, n_parts, O, Wq, OW, OHW;
  bool cl_out;  // y is channels_last: rows leave in groups of 16 through 16x16 transposes (parts are multiples)
  bool pack_tiles;  // 1x1 without staging: each unit range copies (NCHW) or transposes (channels_last) its
                    // tiles of x_raw into its own buffer; the tiles then run flat across images (one image
                    // of N * OHW pixels in q; an NCHW tile that spans images has dst -1)
  const float* x_raw;
  int64_t C, tile;
  float* y;
  bool pack_prefetch;  // channels_last tiles prefetch the pixels kPrefetchBlocks blocks ahead (x beyond the LLC)
  const float* res;  // the residual laid out as y (null: none), added after the bias
  float cap;  // then the ReLU: kNoRelu, +inf (plain) or its cap (pyprune/conv_planes.h's relu_cap)
  bool stream_y;  // channels_last y beyond the LLC: whole groups of 16 rows leave by non-temporal stores
};

// Two accumulator sets over alternate nonzeros: with 4 vectors, 8 independent FMA chains.
template <class V, int NV>
PYPRUNE_INLINE void row_tile(const int32_t* off, const float* val, int64_t nnz, const float* base,
                             const float* init, V* out) {
  V a[NV], b[NV];
  for (int t = 0; t < NV; ++t) {
    a[t] = init ? load16<V>(init + kLanes * t) : V{};
    b[t] = V{};
  }
  int64_t j = 0;
  for (; j + 2 <= nnz; j += 2) {
    const float* p0 = base + off[j];
    const float* p1 = base + off[j + 1];
    const float w0 = val[j], w1 = val[j + 1];
    for (int t = 0; t < NV; ++t) a[t] += w0 * load16<V>(p0 + kLanes * t);
    for (int t = 0; t < NV; ++t) b[t] += w1 * load16<V>(p1 + kLanes * t);
  }
  if (j < nnz) {
    const float* p0 = base + off[j];
    const float w0 = val[j];
    for (int t = 0; t < NV; ++t) a[t] += w0 * load16<V>(p0 + kLanes * t);
  }
  for (int t = 0; t < NV; ++t) out[t] = a[t] + b[t];
}

// NCHW output of a packed tile that spans images (q = n * OHW + p): one run per image. yo: output channel o of
// image 0; images are O * OHW apart; ro: the residual's, laid out as y (null: none).
template <class V, int NV>
PYPRUNE_INLINE void store_tile_images(const V* acc, const Tile& tl, float bias, int64_t OHW, int64_t O, float* yo,
                                      const float* ro, float cap) {
  alignas(64) float buf[NV * kLanes];
  for (int t = 0; t < NV; ++t) store16(buf + kLanes * t, acc[t]);
  for (int64_t q = tl.q0, q1 = tl.q0 + tl.len; q < q1;) {
    const int64_t n = q / OHW, p = q - n * OHW, len = std::min(q1 - q, OHW - p);
    const int64_t at = n * O * OHW + p;
    epilogue_run(yo + at, buf + (q - tl.q0), bias, ro ? ro + at : nullptr, len, cap);
    q += len;
  }
}

// Prefetches used planes [i0, i1) (a.used[i]) of the tile at `next` (null: none). Only the planes some nonzero
// reads: at high sparsity whole input channels go unread, and prefetching them anyway cost more than the FMAs
// (A/B in one process, 2 threads, Xeon VM, against every plane: 256->64 1x1 @56 at 99% sparsity 0.70-0.72x
// the time at batch 1 and 8, at 98% 0.85x; 64->64 3x3 @56 at 99% 0.91x; at 95% and below, where nearly every
// plane is read, unchanged).
PYPRUNE_INLINE void prefetch_planes(const ConvArgs& a, const float* next, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const char* s = reinterpret_cast<const char*>(next + a.used[i] * a.plane);
    for (int64_t l = 0; l < a.pf_lines; ++l) __builtin_prefetch(s + 64 * l, 0, 3);
  }
}

// Rows [r0, r1) of one tile, one column chunk at a time for all rows, so that the chunk's slice of the input
// stays in L1 while the rows' nonzeros in it stream past (partial sums wait in `scratch` between chunks).
// During the last chunk the next tile's input (if `next`) is prefetched a slice of planes per row, so that its
// memory traffic overlaps this tile's arithmetic.
template <class V, int NV>
PYPRUNE_INLINE void rows_tile(const ConvArgs& a, const Tile& tl, const float* base, const float* next,
                              int64_t r0, int64_t r1, float* y_img, float* scratch) {
  V acc[NV];
  alignas(64) float group[kLanes * NV * kLanes];  // channels_last: the current 16 rows, bias added
  const int64_t rows = r1 - r0;
  const float* r_img = a.res ? a.res + (y_img - a.y) : nullptr;  // the residual's image, laid out as y_img
  for (int64_t k = 0; k < a.n_chunks; ++k) {
    const int32_t* lo = a.bnd + k * a.O;
    const int32_t* hi = lo + a.O;
    const bool last = k + 1 == a.n_chunks;
    for (int64_t o = r0; o < r1; ++o) {
      float* sc = scratch + (o - r0) * a.scratch_stride;
      const int64_t s = lo[o];
      row_tile<V, NV>(a.off + s, a.val + s, hi[o] - s, base, k ? sc : nullptr, acc);
      if (!last) {
        for (int t = 0; t < NV; ++t) store16(sc + kLanes * t, acc[t]);
        continue;
      }
      if (next) prefetch_planes(a, next, (o - r0) * a.n_used / rows, (o - r0 + 1) * a.n_used / rows);
      const float bias = a.bias ? a.bias[o] : 0.f;
      if (!a.cl_out) {
        const float* rc = r_img ? r_img + o * a.OHW : nullptr;
        if (a.pack_tiles && tl.dst < 0)
          store_tile_images<V, NV>(acc, tl, bias, a.OHW, a.O, y_img + o * a.OHW, rc, a.cap);
        else
          store_tile<V, NV>(acc, tl, bias, a.Wq, a.OW, y_img + o * a.OHW, rc, a.cap);
        continue;
      }
      const int64_t i = (o - r0) % kLanes;
      for (int t = 0; t < NV; ++t) store16(group + i * NV * kLanes + kLanes * t, acc[t] + bias);
      if (i == kLanes - 1 || o + 1 == r1)
        store_group_cl<V>(group, NV * kLanes, i + 1, tl, a.Wq, a.OW, a.O, o - i, y_img, r_img, a.cap,
                          a.stream_y);
    }
  }
}

// Units u in [u0, u1), ordered (image, tile, row part). NVMAX is the ISA's accumulator budget (2*NV vectors
// live: 8 zmm on AVX-512 at 4, 8 ymm pairs on AVX2 at 2, 8 xmm quads on the baseline at 1).
template <class V, int NVMAX>
PYPRUNE_INLINE void conv_units(const ConvArgs& a, int64_t u0, int64_t u1, float* scratch, float* tile_buf) {
  int64_t packed = -1;  // (image, tile) in tile_buf
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t p = u % a.n_parts, t = (u / a.n_parts) % a.n_tiles, n = u / (a.n_parts * a.n_tiles);
    const Tile& tl = a.tiles[t];
    const float* base = a.in + n * a.in_image + tl.q0;
    const float* next = nullptr;  // the next unit's tile, when this unit is the last on its own
    if (a.pack_tiles) {  // pixels q0 .. q0 + len of image n, as C planes of `tile` floats; lanes past len zero
      const int64_t key = n * a.n_tiles + t;
      if (key != packed) {  // the row parts of one tile that fall in this range share its packing
        const int64_t end = round_up(tl.len, kLanes);
        if (a.cl_out) {  // the images' pixels are one run of x
          const float* xr = a.x_raw + tl.q0 * a.C;
          if (a.pack_prefetch) stage_row_cl<V, true>(xr, a.C, 0, tl.len, 0, 1, tile_buf, a.tile);
          else stage_row_cl<V, false>(xr, a.C, 0, tl.len, 0, 1, tile_buf, a.tile);
        } else {  // one run per image the tile reaches
          for (int64_t q = tl.q0, q1 = tl.q0 + tl.len; q < q1;) {
            const int64_t img = q / a.OHW, p = q - img * a.OHW, len = std::min(q1 - q, a.OHW - p);
            const int64_t full = len / kLanes * kLanes;
            const float* src = a.x_raw + img * a.C * a.OHW + p;
            float* dst = tile_buf + (q - tl.q0);
            for (int64_t c = 0; c < a.C; ++c) {
              const float* s = src + c * a.OHW;
              float* d = dst + c * a.tile;
              for (int64_t i = 0; i < full; i += kLanes) store16(d + i, load16<V>(s + i));
              for (int64_t i = full; i < len; ++i) d[i] = s[i];
            }
            q += len;
          }
        }
        for (int64_t c = 0; end > tl.len && c < a.C; ++c)
          std::fill(tile_buf + c * a.tile + tl.len, tile_buf + c * a.tile + end, 0.f);
        packed = key;
      }
      base = tile_buf;
    } else if (u + 1 < u1 && p == a.n_parts - 1) {
      const int64_t t1 = (t + 1) % a.n_tiles, n1 = t1 ? n : n + 1;
      next = a.in + n1 * a.in_image + a.tiles[t1].q0;
    }
    float* y_img = a.y + n * a.O * a.OHW;
    const int64_t r0 = a.rb[p], r1 = a.rb[p + 1];
    switch (std::min<int64_t>(NVMAX, (tl.len + kLanes - 1) / kLanes)) {
      case 4: if constexpr (NVMAX >= 4) { rows_tile<V, 4>(a, tl, base, next, r0, r1, y_img, scratch); break; }
      [[fallthrough]];
      case 3: if constexpr (NVMAX >= 3) { rows_tile<V, 3>(a, tl, base, next, r0, r1, y_img, scratch); break; }
      [[fallthrough]];
      case 2: if constexpr (NVMAX >= 2) { rows_tile<V, 2>(a, tl, base, next, r0, r1, y_img, scratch); break; }
      [[fallthrough]];
      default: rows_tile<V, 1>(a, tl, base, next, r0, r1, y_img, scratch);
    }
  }
  if (a.stream_y) stream_fence();
}

using UnitsFn = void (*)(const ConvArgs&, int64_t, int64_t, float*, float*);

#define PYPRUNE_CSR_CONV_UNITS(SUFFIX, TARGET, V, NVMAX)                                                     \
  TARGET void units_##SUFFIX(const ConvArgs& a, int64_t u0, int64_t u1, float* scratch, float* tile_buf) { \
    conv_units<V, NVMAX>(a, u0, u1, scratch, tile_buf);                                                    \
  }

PYPRUNE_CSR_CONV_UNITS(baseline, , VecBaseline, 1)
#if PYPRUNE_X86
PYPRUNE_CSR_CONV_UNITS(avx2, PYPRUNE_TARGET_AVX2, VecAvx2, 2)
PYPRUNE_CSR_CONV_UNITS(avx512, PYPRUNE_TARGET_AVX512, VecAvx512, 4)
#endif

int isa_vecs(Isa isa) { return isa == Isa::kAvx512 ? 4 : (isa == Isa::kAvx2 ? 2 : 1); }

// Column chunks: when a row holds >= 24 nonzeros per ~96 columns on average, the reduction runs in chunks of
// that many columns (the input slice of chunk x tile fits in L1, 24 KiB). Sparser rows run whole: the
// partial sums' round trip through scratch would cost more than L1 saves (measured: 50% sparse 1x1 convs
// 1.1-1.3x faster chunked, 90% ones up to 1.25x slower).
int64_t l1_cols(int64_t tile) { return std::max<int64_t>(16, (24 * 1024) / (4 * tile)); }
bool chunked_rows(int64_t nnz, int64_t K, int64_t O, int64_t tile) { return l1_cols(tile) * nnz >= 24 * K * O; }

UnitsFn pick_units(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return units_avx512;
  if (isa == Isa::kAvx2) return units_avx2;
#endif
  (void)isa;
  return units_baseline;
}

// The dense equivalent, for dtypes the kernel lacks (float64 for gradcheck, fp16, bf16) and for images too
// large for int32 offsets.
at::Tensor dense_conv(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                      int64_t O, int64_t kh, int64_t kw, const at::Tensor& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t C = x.size(1), nnz = val.numel();
  const at::Tensor rows =
      at::repeat_interleave(at::arange(O, crow.options().dtype(at::kLong)), crow.diff().to(at::kLong), 0, nnz);
  const at::Tensor w = at::zeros({O, kh * kw * C}, val.options()).index_put_({rows, col.to(at::kLong)}, val, true);
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  return at::conv2d(x, w.view({O, kh, kw, C}).permute({0, 3, 1, 2}), b, stride, padding, dilation)
      .contiguous(x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
                      ? at::MemoryFormat::ChannelsLast
                      : at::MemoryFormat::Contiguous);
}

// Index values: rows non-decreasing, columns strictly increasing within a row and inside [0, K).
void check_structure(const int32_t* cr, const int32_t* ci, int64_t O, int64_t K) {
  constexpr const char* op = "csr_conv2d";
  for (int64_t o = 0; o < O; ++o)  // all row pointers first: the column walk below trusts them (cr[O] is nnz)
    PYPRUNE_CHECK(cr[o] <= cr[o + 1] && cr[o + 1] <= cr[O], op, "crow_indices",
                  "must be non-decreasing and at most the number of nonzeros (", cr[O], "), got ", cr[o], " then ",
                  cr[o + 1], " at row ", o);
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t j = cr[o]; j < cr[o + 1]; ++j) {
      PYPRUNE_CHECK(ci[j] >= 0 && ci[j] < K, op, "col_indices", "must lie in [0, kh*kw*C_in = ", K, "), got ",
                    ci[j], " in row ", o);
      PYPRUNE_CHECK(j == cr[o] || ci[j] > ci[j - 1], op, "col_indices",
                    "must be strictly increasing within each row, got ", ci[j - 1], " then ", ci[j], " in row ",
                    o);
    }
  }
}

// What the kernel derives from the sparsity pattern and the input geometry: each nonzero's input offset, the
// rows' chunk bounds (bnd[k * O + o]: row o's first nonzero with column >= k * chunk) and the input planes that
// some nonzero reads (ascending; tap t's channel c is plane tap_slot[t] * C + c).
struct Structure {
  at::Tensor off, bnd, used;
  int64_t n_chunks;
};

Structure build_structure(const int32_t* cr, const int32_t* ci, int64_t O, int64_t C, int64_t chunk,
                          const std::vector<int64_t>& tap_off, int64_t plane, const std::vector<int64_t>& tap_slot,
                          int64_t planes) {
  const int64_t nnz = cr[O], K = static_cast<int64_t>(tap_off.size()) * C;
  const int64_t n_chunks = (K + chunk - 1) / chunk;
  Structure st{at::empty({nnz}, at::kInt), at::empty({(n_chunks + 1) * O}, at::kInt), at::Tensor(), n_chunks};
  int32_t* off = st.off.data_ptr<int32_t>();
  int32_t* bnd = st.bnd.data_ptr<int32_t>();
  at::parallel_for(0, O, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      int64_t tap = 0, k = 0;
      for (int64_t j = cr[o]; j < cr[o + 1]; ++j) {  // columns ascend: step the tap and the chunk along
        while (ci[j] >= (tap + 1) * C) ++tap;
        off[j] = static_cast<int32_t>(tap_off[tap] + (ci[j] - tap * C) * plane);
        for (; k * chunk <= ci[j]; ++k) bnd[k * O + o] = static_cast<int32_t>(j);
      }
      for (; k <= n_chunks; ++k) bnd[k * O + o] = cr[o + 1];
    }
  });
  std::vector<uint8_t> read(planes, 0);
  for (int64_t j = 0; j < nnz; ++j) read[tap_slot[ci[j] / C] * C + ci[j] % C] = 1;
  std::vector<int32_t> used;
  for (int64_t p = 0; p < planes; ++p)
    if (read[p]) used.push_back(static_cast<int32_t>(p));
  st.used = at::tensor(used, at::kInt);
  return st;
}

// Structures are kept between calls (at 90% sparsity building one costs as much as the multiply on a 7x7 map),
// per index tensors, their contents and geometry; validation happens only when an entry is built.
template <typename Build>
Structure structure(const at::Tensor& crow, const at::Tensor& col, std::vector<int64_t> geometry, Build build) {
  static DerivedCache<Structure> cache(int64_t(64) << 20);
  return cache.get({crow, col}, {crow, col}, std::move(geometry), [&](const std::vector<at::Tensor>& from) {
    return build(from[0].data_ptr<int32_t>(), from[1].data_ptr<int32_t>());
  }, [](const Structure& st) { return static_cast<int64_t>(st.off.nbytes() + st.bnd.nbytes() + st.used.nbytes()); });
}

}  // namespace

at::Tensor csr_conv2d_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, int64_t out_channels, at::IntArrayRef kernel_size,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool relu, const std::optional<at::Tensor>& residual,
                          std::optional<double> relu_max) {
  constexpr const char* op = "csr_conv2d";
  const float cap = relu_cap(relu, relu_max, op);
  check_compressed_args(x, crow_indices, col_indices, values, 1, op);
  const PlaneGeometry g0 = checked_plane_geometry(x, kernel_size, stride, padding, dilation, op);
  PYPRUNE_CHECK(out_channels >= 0, op, "out_channels", "must be >= 0, got ", out_channels);
  const int64_t N = g0.N, C = g0.C, H = g0.H, W = g0.W, O = out_channels;
  const int64_t kh = g0.kh, kw = g0.kw, sh = g0.sh, sw = g0.sw, ph = g0.ph, pw = g0.pw;
  const int64_t OH = g0.OH, OW = g0.OW;
  const bool cl = g0.cl;  // channels_last x gets a channels_last y; anything else is read as NCHW
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

  const Isa isa = kernel_isa();
  // Taps that read whole lines where the rows run in column chunks (below), so that the loads, not L2, bound
  // the FMAs, and where a weight column holds >= 48 nonzeros on average, so that its FMAs outweigh staging
  // the kw shifted copies. Sparser rows stream a tile's whole input slice from L2, which the copies triple.
  // A/B in one process, Zen 4 VM, 2 threads, ResNet-50's 3x3 convs: 128->128 @28 and 256->256 @14 at 50%
  // (64 and 128 a column) 1.14-1.29x faster, 256->256 @14 at 70% 1.05x, the stride-2 ones at 50% 1.07-1.10x;
  // 64->64 @56 at 50% (32 a column) 0.85-1.04x, at 70% (19) 0.77x; every conv at 90% 0.67-0.89x.
  const bool dense_columns = nnz >= 48 * K && chunked_rows(nnz, K, O, kLanes * tile_vecs(g0, isa_vecs(isa)));
  const PlaneGeometry g = dense_columns ? aligned_if_cheap(g0, isa_vecs(isa)) : g0;
  const int64_t Wq = g.Wq, planes = g.planes, reach = g.reach;
  int64_t nv = tile_vecs(g, isa_vecs(isa));
  // A channels_last stride-1 unpadded 1x1 conv at density <= 1/4 whose 64-pixel tile of transposed input
  // (C x 64 floats) is past 48 KiB takes 48-pixel tiles (at density 0.19-0.25 its rows then also run in
  // column chunks, see chunked_rows). A/B in one process, 13 rounds, Xeon VM, against 64 pixels, speedup over
  // dense: 90% sparse 256->64 @56 batch 1 / 8 1.97 -> 2.02x / 1.71 -> 1.73x, 1024->256 @14 2.57 -> 2.82x / 2.56
  // -> 2.74x, 512->128 @28 batch 1 2.54 -> 2.66x, 2048->512 @7 batch 8 3.43 -> 3.64x; 80% sparse 256->64 @56
  // batch 8 1.03 -> 1.30x, 1024->256 @14 1.44 -> 1.65x. Not at density above 1/4 (50% sparse: 0.88-0.93x the
  // speedup), nor from 192 input channels down (64->256 @56 at 90%: 0.96x), nor on maps of a few tiles (2048->512
  // @7 batch 1: 49 pixels as 48 + 1, 0.96x).
  if (cl && kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && nv == 4 && 4 * nnz <= K * O &&
      C > 192 && N * OH * OW >= 4 * 3 * kLanes)
    nv = 3;
  const int64_t tile = kLanes * nv;
  // A stride-1 unpadded 1x1 conv on NCHW x whose planes already qualify reads x in place.
  const bool in_place = !cl && kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 &&
                        (H * W) % kLanes == 0 && spreads_sets(H * W / kLanes, nv);
  // allocated before the tiles are laid out, whose count follows the output's size: an output too large to
  // allocate (a huge padding) fails here at once, as in F.conv2d
  at::Tensor y = at::empty({N, O, OH, OW},
                           x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const at::Tensor res = checked_residual(residual, y, cl, op);
  std::vector<Tile> tiles = make_tiles(OH, OW, Wq, tile);
  const int64_t threads = at::get_num_threads();
  // row parts balanced by nnz; for channels_last output, in whole groups of 16 rows (one transposed store each)
  const int64_t step = cl ? kLanes : 1, groups = (O + step - 1) / step;
  auto parts_for = [&](int64_t units) {  // units = (image, tile) pairs; N = 0 returns below, before any use
    units = std::max<int64_t>(1, units);
    return std::clamp<int64_t>((8 * threads + units - 1) / units, 1, std::max<int64_t>(1, groups));
  };
  int64_t want_parts = parts_for(N * static_cast<int64_t>(tiles.size()));
  // A stride-1 unpadded 1x1 conv on channels_last x (or NCHW x not read in place): each unit range transposes
  // (copies) its own tiles into an L2-sized buffer, so the input is read once and no staged copy goes through
  // memory. Units run (image, tile, row part), so consecutive row parts of a tile share its packing.
  const bool unpadded_1x1 = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  const bool pack_tiles = unpadded_1x1 && (cl || !in_place);
  // A channels_last tile is one contiguous run of pixels, which the hardware prefetchers follow while x sits in
  // the last-level cache; from memory they fall behind. Software prefetch only when x is larger than half the
  // LLC (A/B in one process, 2 threads, 90% / 70% / 50% sparse 256->64 1x1 @56 channels_last: Zen 4 VM, 32 MiB
  // L3, batch 8 (x 25.7 MB) 1.25x / 1.19x / 1.13x faster with it, batch 1, 2 and 4 1.02-1.07x slower; the
  // Xeon VM's 300 MiB L3 holds these x, and there it cost 1.01-1.16x on ResNet-50's 1x1 convs).
  const int64_t llc = last_level_cache_bytes();
  const bool pack_prefetch = cl && pack_tiles && llc > 0 && 2 * static_cast<int64_t>(x.nbytes()) > llc;
  // Packed channels_last tiles store y by non-temporal stores when x, y and the residual together pass half
  // the LLC: y's lines are then not read in before being overwritten (write-allocate), nor kept in a cache that
  // x streams through. A/B in one process, Zen 4 VM, 7 rounds, batch 8, 256->64 @56 at 90% / 50% 0.85x / 0.93x
  // the time, 64->256 @56 with a residual and ReLU at 90% / 70% 0.86x / 0.90x; at batch 1 (all of it within
  // the LLC) plain stores, as streaming there cost 64->256 @56 1.04x. Not for staged kxk convs, whose staged
  // copy also goes through the cache: 0.95-1.02x.
  const int64_t footprint = static_cast<int64_t>(x.nbytes() + y.nbytes() + (res.defined() ? res.nbytes() : 0));
  const bool stream_y = cl && pack_tiles && O % kLanes == 0 && stream_output(footprint, y.data_ptr());
  // Packed tiles run flat across images (q = n * OH * OW + p, as one image), so that small maps fill whole
  // vectors: a 7x7 image alone is 49 pixels in 4 vectors, 8 of them 25 vectors instead of 32.
  int64_t n_img = N;
  if (pack_tiles) {
    tiles = make_tiles(1, N * OH * OW, N * OH * OW, tile);
    if (!cl)  // an NCHW tile's outputs are one run only inside one image: dst in y's channel 0, else -1
      for (Tile& t : tiles) {
        const int64_t n = t.q0 / (OH * OW), p = t.q0 - n * OH * OW;
        t.dst = p + t.len <= OH * OW ? n * O * OH * OW + p : -1;
      }
    n_img = 1;
    want_parts = parts_for(static_cast<int64_t>(tiles.size()));
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t plane = pack_tiles ? tile : in_place ? round_up(H * W, kLanes) : plane_stride(g, nv);

  const at::Tensor b = checked_bias(bias, O, op, x.scalar_type());
  if (x.scalar_type() != at::kFloat || N * planes * plane >= (int64_t{1} << 31)) {
    check_structure(cr, ci, O, K);
    at::Tensor yd = dense_conv(x, crow, col, val, O, kh, kw, b, stride, padding, dilation);
    apply_epilogue(yd, res, cap);
    return yd;
  }
  if (N == 0 || O == 0) return y;
  if (C == 0 || nnz == 0) {
    if (b.defined()) y.copy_(b.view({1, O, 1, 1}).expand_as(y));
    else y.zero_();
    apply_epilogue(y, res, cap);
    return y;
  }

  const at::Tensor xc = cl ? x : x.contiguous();

  const int64_t chunk = chunked_rows(nnz, K, O, tile) ? std::min(K, l1_cols(tile)) : K;
  const std::vector<int64_t> tap_off = tap_offsets(g, plane);
  const Structure st = structure(crow, col, {C, kh, kw, sh, sw, g.dh, g.dw, Wq, plane, chunk, g.aligned},
                                 [&](const int32_t* crow_p, const int32_t* col_p) {
    check_structure(crow_p, col_p, O, K);
    return build_structure(crow_p, col_p, O, C, chunk, tap_off, plane, g.tap_slot, planes);
  });
  const int32_t* off = st.off.data_ptr<int32_t>();
  const int64_t n_chunks = st.n_chunks;
  // Staging: every image's planes, zero borders, plus one tile of slack at the end for full-vector reads.
  at::Tensor staged;
  const float* in = xc.data_ptr<float>();
  const int64_t in_image = planes * plane;
  if (!in_place && !pack_tiles) {
    staged = stage_planes(xc, g, plane, tile, isa);
    in = staged.data_ptr<float>();
  }

  auto prefix = [cr, step, O](int64_t g) { return static_cast<int64_t>(cr[std::min(g * step, O)]); };
  std::vector<int64_t> rb = balanced_split(groups, want_parts, prefix, 16 * step);
  for (int64_t& r : rb) r = std::min(r * step, O);
  ConvArgs a{st.bnd.data_ptr<int32_t>(),
             n_chunks,
             tile,
             off,
             val.data_ptr<float>(),
             b.defined() ? b.data_ptr<float>() : nullptr,
             in,
             in_image,
             plane,
             ((tile + reach) * 4 + 63) / 64 + 1,
             st.used.data_ptr<int32_t>(),
             st.used.numel(),
             tiles.data(),
             rb.data(),
             n_tiles,
             static_cast<int64_t>(rb.size()) - 1,
             O,
             Wq,
             OW,
             OH * OW,
             cl,
             pack_tiles,
             xc.data_ptr<float>(),
             C,
             tile,
             y.data_ptr<float>(),
             pack_prefetch,
             res.defined() ? res.data_ptr<float>() : nullptr,
             cap,
             stream_y};
  const UnitsFn fn = pick_units(isa);
  // Each thread takes a contiguous range of units of equal cost (vectors x nonzeros, plus a little per row and,
  // on a tile's first row part, its packing): a short last tile or a light row part would otherwise leave one
  // thread idle. One thread for tiny convs (under ~64K vector FMAs, some 20 us), where waking the second costs
  // more. A packed tile's 16x16 transposes (channels_last) cost about as much as 4 nonzeros a channel, its copy
  // (NCHW) 1. Without them, 99% sparse channels_last 256->64 1x1 @56 at batch 1 ran on one thread (A/B in one
  // process, 11 rounds, Xeon VM: 0.58-0.61x the time at 99% and 99.9%; at 95%, which had two threads, and on the
  // 14x14 and 7x7 NCHW packed convs at 99-99.9%, unchanged).
  const int64_t n_units = n_img * n_tiles * a.n_parts;
  const int64_t pack_cost = pack_tiles ? (cl ? 4 : 1) * C : 0;
  std::vector<int64_t> cost(n_units + 1, 0);
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t p = u % a.n_parts, t = (u / a.n_parts) % n_tiles;
    const int64_t rows_nnz = cr[rb[p + 1]] - cr[rb[p]] + 2 * (rb[p + 1] - rb[p]) + (p == 0 ? pack_cost : 0);
    cost[u + 1] = cost[u] + (tiles[t].len + kLanes - 1) / kLanes * rows_nnz;
  }
  const auto ub = balanced_split(n_units, cost[n_units] < 65536 ? 1 : threads,
                                 [&cost](int64_t u) { return cost[u]; }, 0);
  // The partial sums and the packed tile are the running thread's own buffers, kept between calls (Scratch).
  // With slices of one at::empty per call, one a unit range, the second range ran 1.3x slower than the first
  // in the same call, whichever thread took it (channels_last 90% sparse 256->64 @56 batch 1, Zen 4 VM: 181-203
  // against 140-148 us); the cause was not pinned down (no hardware counters on the VM). Per-thread buffers,
  // A/B in one process, 3 processes, 11 rounds: 256->64 @56 at batch 1 / 8 1.25-1.73x / 1.10-1.75x faster,
  // 1024->256 @14 1.02-1.11x; NCHW, 3x3 and 50-70% sparse convs 1.00-1.05x.
  const int64_t ranges = static_cast<int64_t>(ub.size()) - 1;
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    const Scratch sc = n_chunks > 1 ? Scratch(kScratchCall, O * tile) : Scratch();
    const Scratch tb = pack_tiles ? Scratch(kScratchTile, C * tile) : Scratch();
    for (int64_t r = r0; r < r1; ++r) fn(a, ub[r], ub[r + 1], sc.get(), tb.get());
  });
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("csr_conv2d", &csr_conv2d_cpu); }

}  // namespace pyprune
