// pyprune::bsr_conv2d on the CPU: conv2d of x with a BSR weight (C_out, kh*kw*C_in), tap-major columns (column
// (i*kw + j)*C_in + c holds w[o, c, i, j]), blocks (bh x bw) row-major and zero-padded past the weight's edges,
// as an implicit GEMM over the staged planes of pyprune/conv_planes.h: no patch matrix is built.
//
// Column k of the weight reads the staged input at coff[k] (its tap's plane and shift) plus the tile's first
// q, so a block multiplies bw runs of pixels, and RB rows of the block share each loaded run: every vector
// loaded feeds RB FMAs (RB x NV vectors of accumulators, 4 x 4 zmm on AVX-512).
// A block row's blocks go in chunks whose input slice (bw x tile floats each) fits in L1; every RB-row group
// of the block row runs over the chunk while it is there, its partial sums waiting in an L1 buffer between
// chunks (one load and store per accumulator per chunk).
//
// Work units are (image, pixel tile, block-row part), as in csr_conv2d: a tile's input slice stays in L2
// while the block rows stream past it; parts (balanced by blocks) add parallelism when tiles are few.
#include "pyprune/conv_planes.h"
#include "pyprune/linear.h"

namespace pyprune {
namespace {

struct BsrConvArgs {
  const int32_t* crow;
  const int32_t* col;
  const float* val;
  const float* bias;
  const int32_t* coff;  // per weight column: its input plane and tap shift, relative to the tile's first q
  int64_t bh, bw, K;
  int64_t chunk_blocks;  // blocks per L1 chunk of a block row
  const float* in;  // image 0's staged planes
  int64_t in_image;  // floats per image of `in`
  const Tile* tiles;
  const int64_t* rb;  // block-row part bounds
  int64_t n_tiles, n_parts, O, Wq, OW, OHW;
  bool cl_out;  // y is channels_last: rows leave in groups of 16 through 16x16 transposes
  float* y;
  const float* res;  // the residual laid out as y (null: none), added after the bias
  float cap;  // then the ReLU: kNoRelu, +inf (plain) or its cap (pyprune/conv_planes.h's relu_cap)
};

// acc (RB rows x NV vectors) = `init` (or zeros) + rows [i0, i0 + RB) of blocks [b0, b1) times the tile's
// input at `base`.
template <class V, int RB, int NV>
PYPRUNE_INLINE void block_rows(const BsrConvArgs& a, int64_t b0, int64_t b1, int64_t i0, const float* base,
                               const float* init, int64_t ldi, V (&acc)[RB][NV]) {
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NV; ++t) acc[i][t] = init ? load16<V>(init + i * ldi + kLanes * t) : V{};
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = static_cast<int64_t>(a.col[blk]) * a.bw;
    const int64_t jn = std::min(a.bw, a.K - c0);
    const float* w = a.val + (blk * a.bh + i0) * a.bw;
    const int32_t* off = a.coff + c0;
    for (int64_t j = 0; j < jn; ++j) {
      const float* p = base + off[j];
      V xv[NV];
      for (int t = 0; t < NV; ++t) xv[t] = load16<V>(p + kLanes * t);
      for (int i = 0; i < RB; ++i) {
        const float wi = w[i * a.bw + j];
        for (int t = 0; t < NV; ++t) acc[i][t] += wi * xv[t];
      }
    }
  }
}

// Where a tile's finished rows go: out at once (NCHW), or through `group`, 16 consecutive rows at a time
// (channels_last). Member functions, not a lambda: a lambda would not inherit the ISA target of the wrapper.
template <class V, int NV>
struct RowSink {
  static constexpr int64_t ld = NV * kLanes;
  const BsrConvArgs& a;
  const Tile& tl;
  float* y_img;
  const float* r_img;  // the residual's image, laid out as y_img (null: none)
  alignas(64) float group[kLanes * ld];
  int64_t g0 = -1, gn = 0;  // first row in `group`, rows in it

  PYPRUNE_INLINE void emit(int64_t o, const V* acc) {
    const float bias = a.bias ? a.bias[o] : 0.f;
    if (!a.cl_out) {
      store_tile<V, NV>(acc, tl, bias, a.Wq, a.OW, y_img + o * a.OHW, r_img ? r_img + o * a.OHW : nullptr, a.cap);
      return;
    }
    if (gn == 0) g0 = o;
    for (int t = 0; t < NV; ++t) store16(group + gn * ld + kLanes * t, acc[t] + bias);
    if (++gn == kLanes) flush();
  }
  PYPRUNE_INLINE void flush() {
    if (gn) store_group_cl<V>(group, ld, gn, tl, a.Wq, a.OW, a.O, g0, y_img, r_img, a.cap, false);
    gn = 0;
  }
};

// Rows of one tile for block rows [br0, br1).
template <class V, int RB, int NV>
PYPRUNE_INLINE void rows_tile(const BsrConvArgs& a, const Tile& tl, const float* base, int64_t br0, int64_t br1,
                              float* y_img, float* partial) {
  constexpr int64_t ld = NV * kLanes;
  RowSink<V, NV> sink{a, tl, y_img, a.res ? a.res + (y_img - a.y) : nullptr};
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t rows = std::min(a.bh, a.O - br * a.bh);
    const int64_t b0 = a.crow[br], b1 = a.crow[br + 1];
    for (int64_t c = b0; c < b1 || c == b0; c += a.chunk_blocks) {  // an empty block row: one pass of zeros
      const int64_t c1 = std::min(b1, c + a.chunk_blocks);
      const bool first = c == b0, last = c1 == b1;
      int64_t i = 0;
      for (; i + RB <= rows; i += RB) {
        V acc[RB][NV];
        block_rows<V, RB, NV>(a, c, c1, i, base, first ? nullptr : partial + i * ld, ld, acc);
        for (int r = 0; r < RB; ++r) {
          if (last) sink.emit(br * a.bh + i + r, acc[r]);
          else for (int t = 0; t < NV; ++t) store16(partial + (i + r) * ld + kLanes * t, acc[r][t]);
        }
      }
      for (; i < rows; ++i) {
        V acc[1][NV];
        block_rows<V, 1, NV>(a, c, c1, i, base, first ? nullptr : partial + i * ld, ld, acc);
        if (last) sink.emit(br * a.bh + i, acc[0]);
        else for (int t = 0; t < NV; ++t) store16(partial + i * ld + kLanes * t, acc[0][t]);
      }
      if (b0 == b1) break;
    }
  }
  sink.flush();
}

// Units u in [u0, u1), ordered (image, tile, part). NVMAX x RB is the ISA's accumulator budget.
template <class V, int RB, int NVMAX>
PYPRUNE_INLINE void conv_units(const BsrConvArgs& a, int64_t u0, int64_t u1, float* partial) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t p = u % a.n_parts, t = (u / a.n_parts) % a.n_tiles, n = u / (a.n_parts * a.n_tiles);
    const Tile& tl = a.tiles[t];
    const float* base = a.in + n * a.in_image + tl.q0;
    float* y_img = a.y + n * a.O * a.OHW;
    const int64_t r0 = a.rb[p], r1 = a.rb[p + 1];
    switch (std::min<int64_t>(NVMAX, (tl.len + kLanes - 1) / kLanes)) {
      case 4: if constexpr (NVMAX >= 4) { rows_tile<V, RB, 4>(a, tl, base, r0, r1, y_img, partial); break; }
      [[fallthrough]];
      case 3: if constexpr (NVMAX >= 3) { rows_tile<V, RB, 3>(a, tl, base, r0, r1, y_img, partial); break; }
      [[fallthrough]];
      case 2: if constexpr (NVMAX >= 2) { rows_tile<V, RB, 2>(a, tl, base, r0, r1, y_img, partial); break; }
      [[fallthrough]];
      default: rows_tile<V, RB, 1>(a, tl, base, r0, r1, y_img, partial);
    }
  }
}

using UnitsFn = void (*)(const BsrConvArgs&, int64_t, int64_t, float*);

#define PYPRUNE_BSR_CONV_UNITS(SUFFIX, TARGET, V, RB, NVMAX)                         \
  TARGET void units_##SUFFIX(const BsrConvArgs& a, int64_t u0, int64_t u1, float* partial) { \
    conv_units<V, RB, NVMAX>(a, u0, u1, partial);                                    \
  }

// Register tiles (RB rows x NV vectors of 16 pixels), as bsr_linear's: AVX-512 4x4 = 16 zmm accumulators of
// 32; AVX2 4x1 = 8 ymm of 16; baseline 2x1 = 8 xmm of 16.
PYPRUNE_BSR_CONV_UNITS(baseline, , VecBaseline, 2, 1)
#if PYPRUNE_X86
PYPRUNE_BSR_CONV_UNITS(avx2, PYPRUNE_TARGET_AVX2, VecAvx2, 4, 1)
PYPRUNE_BSR_CONV_UNITS(avx512, PYPRUNE_TARGET_AVX512, VecAvx512, 4, 4)
#endif

UnitsFn pick_units(Isa isa, int64_t& nv_max) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return nv_max = 4, units_avx512;
  if (isa == Isa::kAvx2) return nv_max = 1, units_avx2;
#endif
  (void)isa;
  return nv_max = 1, units_baseline;
}

// The dense equivalent, for dtypes the kernel lacks (float64 for gradcheck, fp16, bf16) and for images too
// large for int32 offsets.
at::Tensor dense_conv(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                      int64_t O, int64_t K, const PlaneGeometry& g, const at::Tensor& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor w = bsr_dense_matrix(crow, col, val, O, K);
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  return at::conv2d(x, w.reshape({O, g.kh, g.kw, g.C}).permute({0, 3, 1, 2}), b, stride, padding, dilation)
      .contiguous(g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace

at::Tensor bsr_conv2d_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, int64_t out_channels, at::IntArrayRef kernel_size,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool relu, const std::optional<at::Tensor>& residual,
                          std::optional<double> relu_max) {
  constexpr const char* op = "bsr_conv2d";
  const float cap = relu_cap(relu, relu_max, op);
  check_compressed_args(x, crow_indices, col_indices, values, 3, op);
  const PlaneGeometry g = checked_plane_geometry(x, kernel_size, stride, padding, dilation, op);
  PYPRUNE_CHECK(out_channels >= 0, op, "out_channels", "must be >= 0, got ", out_channels);
  const int64_t N = g.N, C = g.C, O = out_channels, K = g.kh * g.kw * C;
  const int64_t bh = values.size(1), bw = values.size(2), nnzb = values.size(0);
  PYPRUNE_CHECK(bh > 0 && bw > 0, op, "values", "must hold blocks of positive size, got ", values.sizes());
  const int64_t n_brows = (O + bh - 1) / bh, n_bcols = (K + bw - 1) / bw;
  PYPRUNE_CHECK(crow_indices.numel() == n_brows + 1, op, "crow_indices", "must have ceil(out_channels / bh) + 1 = ",
                n_brows + 1, " entries, got ", crow_indices.numel());
  PYPRUNE_CHECK(col_indices.numel() == nnzb, op, "col_indices", "must have one entry per block (", nnzb, "), got ",
                col_indices.numel());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous(), val = values.contiguous();
  const int32_t* cr = crow.data_ptr<int32_t>();
  PYPRUNE_CHECK(cr[0] == 0 && cr[n_brows] == nnzb, op, "crow_indices",
                "must start at 0 and end at the number of blocks ", nnzb, ", got ", cr[0], " and ", cr[n_brows]);
  check_compressed_indices(crow_indices, col_indices, n_bcols, op, "ceil(kh*kw*C_in / bw)");
  const at::Tensor b = checked_bias(bias, O, op, x.scalar_type());

  const Isa isa = kernel_isa();
  int64_t nv_max = 1;
  const UnitsFn fn = pick_units(isa, nv_max);
  const int64_t nv = tile_vecs(g, nv_max), tile = kLanes * nv;
  const int64_t plane = plane_stride(g, nv);
  if (x.scalar_type() != at::kFloat || N * g.planes * plane >= (int64_t{1} << 31)) {
    at::Tensor yd = dense_conv(x, crow, col, val, O, K, g, b, stride, padding, dilation);
    apply_epilogue(yd, checked_residual(residual, yd, g.cl, op), cap);
    return yd;
  }
  at::Tensor y = at::empty({N, O, g.OH, g.OW}, x.options().memory_format(g.cl ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous));
  const at::Tensor res = checked_residual(residual, y, g.cl, op);
  if (N == 0 || O == 0) return y;
  if (C == 0 || nnzb == 0) {
    if (b.defined()) y.copy_(b.view({1, O, 1, 1}).expand_as(y));
    else y.zero_();
    apply_epilogue(y, res, cap);
    return y;
  }
  if (g.cl && g.kh == 1 && g.kw == 1 && g.ph == 0 && g.pw == 0) {
    // channels_last unpadded 1x1: the pixels' (pixels x C) matrix as it lies (strided: its read pixels
    // copied) times W^T, through bsr_linear's kernel, whose (pixels x O) rows are y's channels_last storage
    // (with 32-row blocks, its token-rows tiles: the pixels' rows read in place, see bsr_linear_rows).
    // The planes' implicit GEMM staged the whole input through transposes for these: 1.0-7x slower on
    // ResNet-50's 1x1 convs (2 threads, Xeon VM).
    const at::Tensor xs = g.sh == 1 && g.sw == 1 ? x : x.slice(2, 0, g.H, g.sh).slice(3, 0, g.W, g.sw);
    const at::Tensor rows = xs.permute({0, 2, 3, 1}).reshape({N * g.OH * g.OW, C});
    bsr_linear_rows(rows, N * g.OH * g.OW, crow, col, val, O, b, y.data_ptr<float>(),
                    res.defined() ? res.data_ptr<float>() : nullptr, cap, true);
    return y;
  }

  // each column's offset; the columns of the last block column past K are never read (block_rows stops at K)
  const std::vector<int64_t> tap_off = tap_offsets(g, plane);
  std::vector<int32_t> coff(n_bcols * bw, 0);
  for (int64_t k = 0; k < K; ++k) coff[k] = static_cast<int32_t>(tap_off[k / C] + (k % C) * plane);

  const at::Tensor staged = stage_planes(g.cl ? x : x.contiguous(), g, plane, tile, isa);
  const std::vector<Tile> tiles = make_tiles(g.OH, g.OW, g.Wq, tile);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t threads = at::get_num_threads();
  // block-row parts balanced by blocks; for channels_last output with blocks under 16 rows, in groups of block
  // rows that fill whole groups of 16 output rows (one transposed store each)
  const int64_t step = g.cl && bh < kLanes && kLanes % bh == 0 ? kLanes / bh : 1;
  const int64_t groups = (n_brows + step - 1) / step;
  const int64_t want_parts =
      std::clamp<int64_t>((8 * threads + N * n_tiles - 1) / (N * n_tiles), 1, std::max<int64_t>(1, groups));
  auto prefix = [cr, step, n_brows](int64_t q) { return static_cast<int64_t>(cr[std::min(q * step, n_brows)]); };
  std::vector<int64_t> rb = balanced_split(groups, want_parts, prefix, 1);
  for (int64_t& r : rb) r = std::min(r * step, n_brows);
  // an L1 chunk: the input slices of its blocks (bw x tile floats each) in ~24 KiB
  const int64_t chunk_blocks = std::max<int64_t>(1, (24 * 1024) / (bw * tile * 4));
  BsrConvArgs a{cr,
                col.data_ptr<int32_t>(),
                val.data_ptr<float>(),
                b.defined() ? b.data_ptr<float>() : nullptr,
                coff.data(),
                bh,
                bw,
                K,
                chunk_blocks,
                staged.data_ptr<float>(),
                g.planes * plane,
                tiles.data(),
                rb.data(),
                n_tiles,
                static_cast<int64_t>(rb.size()) - 1,
                O,
                g.Wq,
                g.OW,
                g.OH * g.OW,
                g.cl,
                y.data_ptr<float>(),
                res.defined() ? res.data_ptr<float>() : nullptr,
                cap};
  // Each thread takes a contiguous range of units of equal cost (vectors x block entries, plus a little per
  // block row); one thread for tiny convs (under ~64K vector FMAs), where waking the second costs more.
  const int64_t n_units = N * n_tiles * a.n_parts;
  std::vector<int64_t> cost(n_units + 1, 0);
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t p = u % a.n_parts, t = (u / a.n_parts) % n_tiles;
    const int64_t part = (cr[rb[p + 1]] - cr[rb[p]]) * bh * bw + 2 * bh * (rb[p + 1] - rb[p]);
    cost[u + 1] = cost[u] + (tiles[t].len + kLanes - 1) / kLanes * part;
  }
  const auto ub = balanced_split(n_units, cost[n_units] < 65536 ? 1 : threads,
                                 [&cost](int64_t u) { return cost[u]; }, 0);
  // partial sums per unit range, not per thread id: safe whatever thread runs a range
  const int64_t ranges = static_cast<int64_t>(ub.size()) - 1;
  std::vector<float> partial(ranges * bh * tile);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(a, ub[r], ub[r + 1], partial.data() + r * bh * tile);
  });
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("bsr_conv2d", &bsr_conv2d_cpu); }

}  // namespace pyprune
