// pyprune::bsr_linear on the CPU: y = x W^T + b with W (N x K) in BSR, blocks (bh x bw) row-major, the blocks
// at the bottom and right edges zero-padded past N and K.
//
// Many tokens: the token-minor scheme of csr_linear, but a weight block lets RB rows share every activation
// load, so each loaded vector feeds RB FMAs (RB=4 on AVX-512: 4 loads + 4 broadcasts per 16 FMAs) and the
// kernel can approach the FMA roofline at 1/density of the dense time. Few tokens: dense dot products of each
// block row against x, bound by the weight bytes. With 32-row blocks, bsr_conv2d's channels_last 1x1 convs and
// very sparse weights take tokens as the tile's rows instead (token_rows_tile): x read in place, y written as
// it lies.
#include "pyprune/derived_cache.h"
#include "pyprune/linear.h"
#include "pyprune/token_tiles.h"

namespace pyprune {
namespace {

constexpr int64_t kGatherMaxTokens = 4;

struct BsrArgs {
  const int32_t* crow;
  const int32_t* col;
  const float* val;
  const float* bias;
  int64_t M, K, N, bh, bw;
  UnitOrder order;
  const float* res;  // bsr_conv2d's residual, laid out as y (null: none), added after the bias
  float cap;  // then the ReLU: kNoRelu, +inf (plain) or its cap (see store_transposed)
  bool stream_y;  // y beyond the LLC: whole groups of 16 rows leave by non-temporal stores
};

// out = (in, or zeros if in is null) + block rows [i0, i0 + RB) of block `blk` times xt's slice, plus addend
// if not null (RB rows x NV*16 tokens each, leading dimension ldb). Block-outer order: the block's slice of xt
// (bw rows x tile) is read from L2 once and then from L1 by every RB-row group; the accumulators make a round
// trip through the L1 buffer once per block (RB*NV loads and stores per bw*RB*NV FMAs).
template <class V, int RB, int NV>
PYPRUNE_INLINE void block_rows(const BsrArgs& a, int64_t blk, int64_t i0, const float* xt, int64_t ld,
                               const float* in, float* out, const float* addend, int64_t ldb) {
  V acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NV; ++t) acc[i][t] = in ? load16<V>(in + i * ldb + kLanes * t) : V{};
  const int64_t c0 = static_cast<int64_t>(a.col[blk]) * a.bw;
  const int64_t jn = std::min(a.bw, a.K - c0);
  const float* w = a.val + blk * a.bh * a.bw + i0 * a.bw;
  const float* xp = xt + c0 * ld;
  for (int64_t j = 0; j < jn; ++j) {
    V xv[NV];
    for (int t = 0; t < NV; ++t) xv[t] = load16<V>(xp + j * ld + kLanes * t);
    for (int i = 0; i < RB; ++i) {
      const float wi = w[i * a.bw + j];
      for (int t = 0; t < NV; ++t) acc[i][t] += wi * xv[t];
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < NV; ++t) {
      const int64_t q = i * ldb + kLanes * t;
      store16(out + q, addend ? acc[i][t] + load16<V>(addend + q) : acc[i][t]);
    }
}

// Blocks summed in the L1 buffer before the sum is added into the block row's total: the error of a sum of n
// fp32 terms in one chain grows with n (see csr_linear's kFlush), so a chunk holds about kFlushCols inputs.
constexpr int64_t kFlushCols = 256;

// Units u in [u0, u1) of the (block-row part x token tile) grid; the ISA copy comes from the wrapper's target.
// The tiles' slices come from xt, or (xt null) are packed by this range from the row-major x_rows.
template <class V, int RB, int NV>
PYPRUNE_INLINE void tile_units(const BsrArgs& a, const float* xt, const float* x_rows, const int64_t* bounds,
                               int64_t u0, int64_t u1, float* y) {
  constexpr int64_t tile = kLanes * NV, ld = tile;
  const int64_t per_chunk = std::max<int64_t>(1, kFlushCols / a.bw);  // blocks per partial sum
  std::vector<float> buf(a.bh * tile), total(a.bh * tile);
  TileSource<V> src(xt, x_rows, a.M, a.K, tile);
  for (int64_t u = u0; u < u1; ++u) {
    int64_t p, t;
    a.order.decode(u, p, t);
    const int64_t m0 = t * tile;
    const float* xtt = src.slice(t);
    for (int64_t br = bounds[p]; br < bounds[p + 1]; ++br) {
      const int64_t rows = std::min(a.bh, a.N - br * a.bh);
      const int64_t b0 = a.crow[br], b1 = a.crow[br + 1];
      float* out = total.data();
      if (b0 == b1) std::fill(out, out + rows * tile, 0.f);
      // each chunk starts from zeros in buf; its last block writes buf + the blocks so far into total
      for (int64_t blk = b0; blk < b1; ++blk) {
        const bool first = (blk - b0) % per_chunk == 0, last = blk + 1 == b1 || (blk + 1 - b0) % per_chunk == 0;
        const float* addend = last && blk - b0 >= per_chunk ? out : nullptr;
        int64_t i = 0;
        for (; i + RB <= rows; i += RB) {
          const int64_t q = i * tile;
          block_rows<V, RB, NV>(a, blk, i, xtt, ld, first ? nullptr : buf.data() + q, (last ? out : buf.data()) + q,
                                addend ? addend + q : nullptr, tile);
        }
        for (; i < rows; ++i) {
          const int64_t q = i * tile;
          block_rows<V, 1, NV>(a, blk, i, xtt, ld, first ? nullptr : buf.data() + q, (last ? out : buf.data()) + q,
                               addend ? addend + q : nullptr, tile);
        }
      }
      store_transposed<V>(out, tile, rows, std::min(tile, a.M - m0), a.bias, y, a.N, br * a.bh, m0, a.res,
                          a.cap, a.stream_y);
    }
  }
}

// Few tokens: bound by the weight bytes, so each block is streamed once, contiguously (row by row inside it),
// into per-row partial sums kept in an L1 buffer (acc: rows x MT vectors), reduced at the end of the block row.
template <class V, int MT>
PYPRUNE_INLINE void gather_rows(const BsrArgs& a, const float* x, int64_t b0, int64_t b1, float* y,
                                const float* res, V* acc, float* tail) {
  for (int64_t br = b0; br < b1; ++br) {
    const int64_t rows = std::min(a.bh, a.N - br * a.bh);
    for (int64_t q = 0; q < rows * MT; ++q) {
      acc[q] = V{};
      tail[q] = 0.f;
    }
    for (int64_t blk = a.crow[br]; blk < a.crow[br + 1]; ++blk) {
      const int64_t c0 = static_cast<int64_t>(a.col[blk]) * a.bw;
      const int64_t jn = std::min(a.bw, a.K - c0);
      const float* w = a.val + blk * a.bh * a.bw;
      for (int64_t i = 0; i < rows; ++i) {
        const float* wr = w + i * a.bw;
        V* ai = acc + i * MT;
        int64_t j = 0;
        for (; j + kLanes <= jn; j += kLanes) {
          const V wv = load16<V>(wr + j);
          for (int m = 0; m < MT; ++m) ai[m] += wv * load16<V>(x + m * a.K + c0 + j);
        }
        for (; j < jn; ++j)
          for (int m = 0; m < MT; ++m) tail[i * MT + m] += wr[j] * x[m * a.K + c0 + j];
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = br * a.bh + i;
      for (int m = 0; m < MT; ++m) {
        float sum = tail[i * MT + m];
        for (int l = 0; l < kLanes; ++l) sum += acc[i * MT + m][l];
        sum += a.bias ? a.bias[r] : 0.f;
        if (res) sum += res[m * a.N + r];
        y[m * a.N + r] = a.cap < 0.f ? sum : relu1(sum, a.cap);
      }
    }
  }
}

template <class V, int MT>
PYPRUNE_INLINE void gather_units(const BsrArgs& a, const float* x, const int64_t* bounds, int64_t p0, int64_t p1,
                                 float* y) {
  std::vector<float> acc_buf(a.bh * MT * kLanes);  // float storage, viewed as vectors (alignment 4)
  V* acc = reinterpret_cast<V*>(acc_buf.data());
  std::vector<float> tail(a.bh * MT);
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m0 = 0; m0 < a.M; m0 += MT) {
      if (a.M - m0 >= MT) {
        gather_rows<V, MT>(a, x + m0 * a.K, bounds[p], bounds[p + 1], y + m0 * a.N,
                           a.res ? a.res + m0 * a.N : nullptr, acc, tail.data());
      } else {
        for (int64_t m = m0; m < a.M; ++m)
          gather_rows<V, 1>(a, x + m * a.K, bounds[p], bounds[p + 1], y + m * a.N,
                            a.res ? a.res + m * a.N : nullptr, acc, tail.data());
      }
    }
}

// Tokens as a tile's rows (AVX-512; blocks of 16 * NV rows, N a multiple of 16): y[m, o] for the MT
// tokens from m0 (cnt of them real: past cnt, the last one again, never stored) and block row br. Each x[m, k]
// is broadcast where it lies in x's row, so x is never packed and only the columns of the row's blocks are
// read; it multiplies column k of its block, NV vectors of the block transposed (wt: bw x bh a block). Sums of
// about kFlushCols inputs at a time gather in `tot`, which leaves straight into y's rows with the bias,
// residual and ReLU.
template <class V, int MT, int NV>
PYPRUNE_INLINE void token_rows_tile(const BsrArgs& a, const float* wt, const float* x, int64_t m0, int64_t cnt,
                                    int64_t br, float* y) {
  const float* xr[MT];
  for (int r = 0; r < MT; ++r) xr[r] = x + (m0 + std::min<int64_t>(r, cnt - 1)) * a.K;
  alignas(64) float tot[MT][NV * kLanes];
  const int64_t b0 = a.crow[br], b1 = a.crow[br + 1], per_chunk = std::max<int64_t>(1, kFlushCols / a.bw);
  for (int64_t c = b0; c == b0 || c < b1; c += per_chunk) {
    V acc[MT][NV];
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    for (int64_t blk = c; blk < std::min(b1, c + per_chunk); ++blk) {
      const int64_t c0 = static_cast<int64_t>(a.col[blk]) * a.bw, jn = std::min(a.bw, a.K - c0);
      const float* w = wt + blk * a.bw * a.bh;
      for (int64_t j = 0; j < jn; ++j, w += a.bh) {
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load16<V>(w + v * kLanes);
        for (int r = 0; r < MT; ++r) {
          const float xs = xr[r][c0 + j];
          for (int v = 0; v < NV; ++v) acc[r][v] += xs * wv[v];
        }
      }
    }
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < NV; ++v)
        store16(tot[r] + v * kLanes, c == b0 ? acc[r][v] : acc[r][v] + load16<V>(tot[r] + v * kLanes));
  }
  const int64_t o0 = br * a.bh, nvo = std::min<int64_t>(NV, (a.N - o0) / kLanes);
  V bias[NV];
  for (int v = 0; v < nvo; ++v) bias[v] = a.bias ? load16<V>(a.bias + o0 + v * kLanes) : V{};
  for (int64_t r = 0; r < cnt; ++r) {
    const int64_t off = (m0 + r) * a.N + o0;
    for (int v = 0; v < nvo; ++v) {
      const V s = epilogue16(load16<V>(tot[r] + v * kLanes) + bias[v], a.res ? a.res + off + v * kLanes : nullptr,
                             a.cap);
      if (a.stream_y) stream16(y + off + v * kLanes, s);
      else store16(y + off + v * kLanes, s);
    }
  }
}

// Units u in [u0, u1) of the (token tile, block-row part) grid, tile-major: a thread's range walks its tiles'
// rows of x once each, the parts' transposed blocks (wt) staying in cache from tile to tile.
template <class V, int MT, int NV>
PYPRUNE_INLINE void token_rows_units(const BsrArgs& a, const float* wt, const float* x, const int64_t* bounds,
                                     int64_t n_parts, int64_t u0, int64_t u1, float* y) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t t = u / n_parts, p = u % n_parts, m0 = t * MT, cnt = std::min<int64_t>(MT, a.M - m0);
    for (int64_t br = bounds[p]; br < bounds[p + 1]; ++br) token_rows_tile<V, MT, NV>(a, wt, x, m0, cnt, br, y);
  }
}

using TokenRowsFn = void (*)(const BsrArgs&, const float*, const float*, const int64_t*, int64_t, int64_t, int64_t,
                             float*);
#if PYPRUNE_X86
template <int MT, int NV>
PYPRUNE_TARGET_AVX512 void token_rows_avx512(const BsrArgs& a, const float* wt, const float* x, const int64_t* b,
                                             int64_t n_parts, int64_t u0, int64_t u1, float* y) {
  token_rows_units<VecAvx512, MT, NV>(a, wt, x, b, n_parts, u0, u1, y);
}
#endif

using UnitsFn = void (*)(const BsrArgs&, const float*, const float*, const int64_t*, int64_t, int64_t, float*);

#define PYPRUNE_BSR_ISA(SUFFIX, TARGET, V)                                                                 \
  template <int RB, int NV>                                                                               \
  TARGET void units_##SUFFIX(const BsrArgs& a, const float* xt, const float* x_rows, const int64_t* b,     \
                             int64_t u0, int64_t u1, float* y) {                                          \
    tile_units<V, RB, NV>(a, xt, x_rows, b, u0, u1, y);                                                   \
  }                                                                                                       \
  TARGET void gather_##SUFFIX(const BsrArgs& a, const float* x, const int64_t* b, int64_t p0, int64_t p1,  \
                              float* y) {                                                                 \
    gather_units<V, kGatherMaxTokens>(a, x, b, p0, p1, y);                                                \
  }

PYPRUNE_BSR_ISA(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_BSR_ISA(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_BSR_ISA(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

// Register tiles (RB rows x NV vectors of 16 tokens): AVX-512 4x4 = 16 zmm accumulators of 32; AVX2 4x1 = 8
// ymm of 16; baseline 2x1 = 8 xmm of 16. Returns the tile width in vectors through nv.
UnitsFn pick_units(Isa isa, int& nv) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) {
    static constexpr UnitsFn t[] = {units_avx512<4, 1>, units_avx512<4, 2>, units_avx512<4, 3>,
                                    units_avx512<4, 4>};
    return t[nv - 1];
  }
  if (isa == Isa::kAvx2) { nv = 1; return units_avx2<4, 1>; }
#endif
  (void)isa;
  nv = 1;
  return units_baseline<2, 1>;
}

using GatherFn = void (*)(const BsrArgs&, const float*, const int64_t*, int64_t, int64_t, float*);
GatherFn pick_gather(Isa isa) {
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) return gather_avx512;
  if (isa == Isa::kAvx2) return gather_avx2;
#endif
  (void)isa;
  return gather_baseline;
}

// The blocks transposed, (nnzb, bw, bh), for token_rows_tile: built once per values tensor and kept.
at::Tensor transposed_blocks(const at::Tensor& val) {
  static DerivedCache<at::Tensor> cache(int64_t(256) << 20);
  return cache.get({val}, {val}, {val.size(0), val.size(1), val.size(2)},
                   [](const std::vector<at::Tensor>& from) { return from[0].transpose(1, 2).contiguous(); },
                   [](const at::Tensor& wt) { return static_cast<int64_t>(wt.nbytes()); });
}

}  // namespace

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  check_compressed_args(x, crow_indices, col_indices, values, 3, op);
  const int64_t N = out_features, K = x.size(-1), M = token_rows(x);
  const int64_t bh = values.size(1), bw = values.size(2), nnzb = values.size(0);
  PYPRUNE_CHECK(bh > 0 && bw > 0, op, "values", "must hold blocks of positive size, got ", values.sizes());
  PYPRUNE_CHECK(N >= 0, op, "out_features", "must be >= 0, got ", N);
  const int64_t n_brows = (N + bh - 1) / bh;
  PYPRUNE_CHECK(crow_indices.numel() == n_brows + 1, op, "crow_indices", "must have ceil(out_features / bh) + 1 = ",
                n_brows + 1, " entries, got ", crow_indices.numel());
  PYPRUNE_CHECK(col_indices.numel() == nnzb, op, "col_indices", "must have one entry per block (", nnzb, "), got ",
                col_indices.numel());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous(), val = values.contiguous();
  PYPRUNE_CHECK(crow.data_ptr<int32_t>()[0] == 0 && crow.data_ptr<int32_t>()[n_brows] == nnzb, op, "crow_indices",
                "must start at 0 and end at the number of blocks ", nnzb);
  check_compressed_indices(crow_indices, col_indices, (K + bw - 1) / bw, op, "ceil(in_features / bw)");
  const at::Tensor b = checked_bias(bias, N, op, x.scalar_type());
  if (x.scalar_type() != at::kFloat) {
    // The kernel is fp32; float64 (gradcheck), bf16 and fp16 run a dense fallback.
    return dense_linear(x, bsr_dense_matrix(crow, col, val, N, K), b);
  }
  at::Tensor y = linear_output(x, N);
  if (M == 0 || N == 0) return y;
  if (K == 0 || nnzb == 0) return bias_only(y, b);
  // token-rows tiles at most 15% of the blocks stored: A/B in one process, 2 threads, Zen 4 VM, 32x32 blocks,
  // against the packed tiles: BERT-base's shapes at 90% block sparsity, 128 tokens, 768->768 0.44x the time,
  // 768->3072 0.80x, 3072->768 0.96x; the whole model (seq 128) 0.72x at batch 1 and 0.86x at batch 8. Denser,
  // they lost where the rows are long (3072->768 at 50-75%: 1.01-1.12x; the model at 50% 1.06x).
  const int64_t n_bcols = (K + bw - 1) / bw;
  const bool token_rows = nnzb * 20 <= 3 * n_brows * n_bcols;
  bsr_linear_rows(x, M, crow, col, val, N, b, y.data_ptr<float>(), nullptr, kNoRelu, token_rows);
  return y;
}

void bsr_linear_rows(const at::Tensor& x, int64_t M, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& val, int64_t N, const at::Tensor& b, float* yp, const float* res, float cap,
                     bool token_rows) {
  const int64_t K = x.size(-1), bh = val.size(1), bw = val.size(2), nnzb = val.size(0);
  const int64_t n_brows = (N + bh - 1) / bh;
  BsrArgs a{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(),
            b.defined() ? b.data_ptr<float>() : nullptr, M, K, N, bh, bw, UnitOrder{}, res, cap, false};
  const int32_t* cr = a.crow;
  const int64_t block_cost = bh * bw;
  auto prefix = [cr, block_cost](int64_t r) { return static_cast<int64_t>(cr[r]) * block_cost; };
  const int64_t threads = at::get_num_threads();
  const Isa isa = kernel_isa();

  if (M <= kGatherMaxTokens) {
    const auto bounds = balanced_split(n_brows, threads * 8, prefix, bh * 4);
    const GatherFn fn = pick_gather(isa);
    const at::Tensor xc = x.contiguous();
    const float* xp = xc.data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1,
                     [&](int64_t p0, int64_t p1) { fn(a, xp, bounds.data(), p0, p1, yp); });
    return;
  }
  const int64_t footprint = static_cast<int64_t>(x.nbytes()) + (res ? 2 : 1) * M * N * 4;
#if PYPRUNE_X86
  // Tokens as rows (token_rows_tile), for bsr_conv2d's channels_last 1x1 convs with 32-row blocks: A/B in one
  // process, 2 threads, Zen 4 VM, against the packed tiles below, through SparseConv2d(layout="bsr", block=(32,
  // 32)): at 90% block sparsity 1024->256 @14 0.59x the time at batch 1 and 0.61x at batch 8, 256->64 @56
  // 0.29x / 0.44x, 512->128 @28 0.53x, 2048->512 @7 0.78x, 64->256 @56 0.67x; at 75% 256->1024 @14 batch 8
  // 0.71x, 512->2048 @7 0.89x; at 50% 1024->256 @14 0.83x / 0.88x, 256->64 @56 batch 8 0.88x, 2048->512 @7 batch
  // 8 0.84x; at 25% 1024->256 @14 0.86x, 512->128 @28 batch 8 0.87x. Not 16-row blocks (one FMA per broadcast:
  // 0.40-0.88x at 90% but 1.15-1.18x for 1024->256 @14 at 50-75%). bsr_linear asks for them at most 15% of
  // the blocks stored (see bsr_linear_cpu).
  if (token_rows && isa == Isa::kAvx512 && bh == 32 && N % kLanes == 0) {
    const at::Tensor wt = transposed_blocks(val);
    const at::Tensor xc = x.reshape({M, K}).contiguous();
    // tiles of 12 tokens x 2 vectors (24 accumulators); block rows in parts of equal blocks, enough (token
    // tile, part) units for 8 a thread
    constexpr int64_t MT = 12;
    const int64_t n_tiles = (M + MT - 1) / MT;
    const auto bounds = balanced_split(n_brows, (threads * 8 + n_tiles - 1) / n_tiles, prefix, bh * 4);
    const int64_t n_parts = static_cast<int64_t>(bounds.size()) - 1;
    const TokenRowsFn fn = token_rows_avx512<MT, 2>;
    a.stream_y = stream_output(footprint, yp);
    const float* wtp = wt.data_ptr<float>();
    const float* xp = xc.data_ptr<float>();
    at::parallel_for(0, n_tiles * n_parts, 1, [&](int64_t u0, int64_t u1) {
      fn(a, wtp, xp, bounds.data(), n_parts, u0, u1, yp);
      if (a.stream_y) stream_fence();
    });
    return;
  }
#endif
  // A block row walks its block columns in order, so xt streams through the prefetchers: the widest tile wins,
  // up to the number of tokens (padding lanes are computed for nothing).
  int nv = static_cast<int>(std::min<int64_t>(kMaxTileVecs, (M + kLanes - 1) / kLanes));
  const UnitsFn fn = pick_units(isa, nv);
  const int64_t tile = kLanes * nv;
  const auto bounds = balanced_split(n_brows, threads * 8, prefix, bh * 4);
  const TokenOperand xo =
      token_operand(x, M, K, tile, static_cast<int64_t>(bounds.size()) - 1, nnzb * bh * bw * 4);
  a.order = xo.order;
  // y leaves by non-temporal stores when x, y and the residual together pass half the LLC (as csr_conv2d's
  // packed tiles): A/B in one process, Zen 4 VM, 7 rounds, channels_last 1x1 convs at batch 8 through
  // SparseConv2d's bsr route, 256->64 @56 at 90% / 50% 0.79x / 0.89x the time, 64->256 @56 with a residual and
  // ReLU 0.78x; at batch 1 (within the LLC) 1.00-1.01x with the stores forced on, so plain stores there.
  a.stream_y = N % kLanes == 0 && bh % kLanes == 0 && stream_output(footprint, yp);
  const int64_t n_units = a.order.size();
  const float* xtp = xo.xt_data();
  const float* xrp = xo.rows_data();
  at::parallel_for(0, n_units, 1, [&](int64_t u0, int64_t u1) {
    fn(a, xtp, xrp, bounds.data(), u0, u1, yp);
    if (a.stream_y) stream_fence();
  });
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("bsr_linear", &bsr_linear_cpu); }

}  // namespace pyprune
