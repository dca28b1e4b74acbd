// pyprune::_conv2d_weight_sampled on the CPU: the weight gradient of a conv at the stored entries of a sparse
// weight only (an SDDMM over the conv's patches): out[e] = sum over images and output pixels of
// grad[n, rows[e], oh, ow] * x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw], for the tap-major column
// cols[e] = (i*kw + j)*C_in + c. The backward of csr_conv2d / bsr_conv2d calls it for the values' gradient
// at low density, where ATen's dense weight gradient computes mostly entries that are then dropped.
//
// x is staged once into zero-padded planes per stride phase (conv_planes.h, as csr_conv2d's forward), and
// grad into planes on the same Wq-wide grid with zeros in the dropped columns, so that each entry is one dot
// product of two contiguous runs: the grad plane of its row and the x plane of its channel, shifted by its
// tap. Threads split the rows (balanced by entries); each walks the images outermost, so that one image's x
// planes stay in its L2 while all its rows read them, and takes a row's entries four at a time (each grad
// vector loaded once for four FMAs), or, where four rows hold the same columns (a BSR block's), a 4x4 tile of
// rows and columns (quad_rows).
//
// The dropped columns multiply x values by exact zeros, which is only exact for finite x: an x holding inf or
// NaN (and dtypes other than fp32) takes ATen's dense weight gradient, sampled.
#include "pyprune/conv_planes.h"

namespace pyprune {
namespace {

constexpr const char* kOp = "_conv2d_weight_sampled";

struct SampledArgs {
  const float* xs;  // staged x: NB blocks of in_block floats
  const float* gs;  // staged grad: NB * O runs of len floats
  int64_t NB, O, in_block, len;  // len: floats per (block, row): nb planes, rounded up to whole vectors
  int64_t chunk;                 // floats per dot: len in pieces whose x runs fit in L2
  const int64_t* row_ptr;  // (O + 1): entries of row o are order[row_ptr[o] .. row_ptr[o + 1])
  const int64_t* order;    // entry indices by row, within a row by (channel, tap); null: the identity
  const int64_t* cols;     // each entry's tap-major column
  const int64_t* col_off;  // per column: its x run's offset in a block's staged planes
  const uint8_t* quad;     // per row: rows o .. o + 3 hold the same columns (a BSR block's rows), or null
};

template <class V>
PYPRUNE_INLINE float hsum(const V& v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Four rows o .. o + 3 with the same columns (in the same order), over q in [q0, q1): four columns at a time,
// each x vector loaded once for the four rows and each grad vector once for the four columns (16 FMAs per 8
// loads, against 4 per 5 a row at a time). sum: row o's first entry; the others follow row by row. On BSR
// blocks (32x32, batch 8, 2 threads, Xeon VM) 3x3 convs ran 1.5-1.9x faster than row by row at 10-30%
// block density, 1x1 convs 0.92-1.24x (x, streamed from L2, stays their bound).
template <class V>
PYPRUNE_INLINE void quad_rows(const SampledArgs& a, const float* xb, const float* g, int64_t o, int64_t q0,
                              int64_t q1, float* sum) {
  const int64_t n = a.row_ptr[o + 1] - a.row_ptr[o];
  auto x_of = [&](int64_t i) {
    const int64_t e = a.row_ptr[o] + i;
    return xb + a.col_off[a.cols[a.order ? a.order[e] : e]];
  };
  const float* g1 = g + a.len;
  const float* g2 = g1 + a.len;
  const float* g3 = g2 + a.len;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* x[4] = {x_of(i), x_of(i + 1), x_of(i + 2), x_of(i + 3)};
    V s[4][4] = {};
    for (int64_t q = q0; q < q1; q += kLanes) {
      const V gv[4] = {load16<V>(g + q), load16<V>(g1 + q), load16<V>(g2 + q), load16<V>(g3 + q)};
      for (int c = 0; c < 4; ++c) {
        const V xv = load16<V>(x[c] + q);
        for (int r = 0; r < 4; ++r) s[r][c] += gv[r] * xv;
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) sum[r * n + i + c] += hsum(s[r][c]);
  }
  for (; i < n; ++i) {
    const float* x0 = x_of(i);
    V s[4] = {};
    for (int64_t q = q0; q < q1; q += kLanes) {
      const V xv = load16<V>(x0 + q);
      s[0] += load16<V>(g + q) * xv;
      s[1] += load16<V>(g1 + q) * xv;
      s[2] += load16<V>(g2 + q) * xv;
      s[3] += load16<V>(g3 + q) * xv;
    }
    for (int r = 0; r < 4; ++r) sum[r * n + i] += hsum(s[r]);
  }
}

// out[order[e]] for the entries e of rows [o0, o1) (sums over image blocks in `sum`, in row order).
template <class V>
PYPRUNE_INLINE void sampled_rows(const SampledArgs& a, int64_t o0, int64_t o1, float* sum, float* out) {
  const int64_t e_begin = a.row_ptr[o0];
  auto xoff = [&](int64_t e) { return a.col_off[a.cols[a.order ? a.order[e] : e]]; };
  std::fill(sum, sum + a.row_ptr[o1] - e_begin, 0.f);
  const int64_t chunks = (a.len + a.chunk - 1) / a.chunk;
  for (int64_t piece = 0; piece < a.NB * chunks; ++piece) {
    const int64_t b = piece / chunks, q0 = piece % chunks * a.chunk, q1 = std::min(a.len, q0 + a.chunk);
    const float* xb = a.xs + b * a.in_block;
    for (int64_t o = o0; o < o1; ++o) {
      const float* g = a.gs + (b * a.O + o) * a.len;
      if constexpr (V::kParts == 1) {  // 16 accumulators + 8 operands: AVX-512's 32 registers only
        if (a.quad && a.quad[o] && o + 4 <= o1) {
          quad_rows<V>(a, xb, g, o, q0, q1, sum + (a.row_ptr[o] - e_begin));
          o += 3;
          continue;
        }
      }
      int64_t e = a.row_ptr[o];
      const int64_t e1 = a.row_ptr[o + 1];
      for (; e + 4 <= e1; e += 4) {
        const float* x0 = xb + xoff(e);
        const float* x1 = xb + xoff(e + 1);
        const float* x2 = xb + xoff(e + 2);
        const float* x3 = xb + xoff(e + 3);
        V s0{}, s1{}, s2{}, s3{};
        for (int64_t q = q0; q < q1; q += kLanes) {
          const V gv = load16<V>(g + q);
          s0 += gv * load16<V>(x0 + q);
          s1 += gv * load16<V>(x1 + q);
          s2 += gv * load16<V>(x2 + q);
          s3 += gv * load16<V>(x3 + q);
        }
        float* d = sum + (e - e_begin);
        d[0] += hsum(s0), d[1] += hsum(s1), d[2] += hsum(s2), d[3] += hsum(s3);
      }
      for (; e < e1; ++e) {
        const float* x0 = xb + xoff(e);
        V s0{};
        for (int64_t q = q0; q < q1; q += kLanes) s0 += load16<V>(g + q) * load16<V>(x0 + q);
        sum[e - e_begin] += hsum(s0);
      }
    }
  }
  for (int64_t e = e_begin; e < a.row_ptr[o1]; ++e) out[a.order ? a.order[e] : e] = sum[e - e_begin];
}

using SampledFn = void (*)(const SampledArgs&, int64_t, int64_t, float*, float*);

#define PYPRUNE_SAMPLED_ISA(SUFFIX, TARGET, V)                                                               \
  TARGET void sampled_##SUFFIX(const SampledArgs& a, int64_t o0, int64_t o1, float* sum, float* out) { \
    sampled_rows<V>(a, o0, o1, sum, out);                                                                    \
  }
PYPRUNE_SAMPLED_ISA(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_SAMPLED_ISA(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_SAMPLED_ISA(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

// grad (N, O, OH, OW), NCHW or channels_last, into runs of `run` floats per (image block, row): image i of
// the block at i * plane, pixel (oh, ow) at oh * Wq + ow, zero in the columns ow >= OW and past the last
// pixel (only those floats are zeroed: a zero fill of the whole buffer first made the op 1.00-1.06x slower on
// ResNet-50's convs at batch 8).
at::Tensor stage_grad(const at::Tensor& grad, int64_t nb, int64_t Wq, int64_t plane, int64_t run) {
  const int64_t N = grad.size(0), O = grad.size(1), OH = grad.size(2), OW = grad.size(3);
  at::Tensor gs = at::empty({N / nb * O * run}, grad.options());
  float* d = gs.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int64_t sN = grad.stride(0), sC = grad.stride(1), sH = grad.stride(2), sW = grad.stride(3);
  at::parallel_for(0, N * O, std::max<int64_t>(1, 16384 / plane), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {  // p = (image n, row o)
      const int64_t n = p / O, o = p % O;
      const float* src = g + n * sN + o * sC;
      float* dst = d + ((n / nb) * O + o) * run + (n % nb) * plane;
      if (sW == 1) {  // NCHW: a copy per row
        for (int64_t oh = 0; oh < OH; ++oh) std::copy(src + oh * sH, src + oh * sH + OW, dst + oh * Wq);
      } else {
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow) dst[oh * Wq + ow] = src[oh * sH + ow * sW];
      }
      for (int64_t oh = 0; oh < OH && OW < Wq; ++oh) std::fill(dst + oh * Wq + OW, dst + (oh + 1) * Wq, 0.f);
      // past the last pixel: to the next image's plane, or for the block's last image to the run's end
      const int64_t end = n % nb == nb - 1 ? run - (n % nb) * plane : plane;
      std::fill(dst + OH * Wq, dst + end, 0.f);
    }
  });
  return gs;
}

// Whether every float of x (contiguous in some order: NCHW or channels_last) is finite: exponent bits not all
// ones (at::isfinite(x).all() made three passes and two temporaries, a quarter of a call).
bool all_finite(const at::Tensor& x) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  return at::parallel_reduce(0, x.numel(), int64_t(1) << 16, true, [&](int64_t i0, int64_t i1, bool ok) {
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) bad |= static_cast<uint32_t>((p[i] & 0x7f800000u) == 0x7f800000u);
    return ok && !bad;
  }, [](bool a, bool b) { return a && b; });
}

// ATen's dense weight gradient at the entries (other dtypes, non-finite x).
at::Tensor dense_sampled(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols,
                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  const int64_t O = grad.size(1), C = x.size(1);
  const at::Tensor w = at::empty({O, C, kernel_size[0], kernel_size[1]}, x.options());
  const auto grads = at::convolution_backward(grad, x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                              {false, true, false});
  const at::Tensor gw = std::get<1>(grads).permute({0, 2, 3, 1}).reshape({O, -1});
  return gw.index({rows, cols});
}

}  // namespace

at::Tensor conv2d_weight_sampled_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& rows,
                                     const at::Tensor& cols, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const PlaneGeometry g = checked_plane_geometry(x, kernel_size, stride, padding, dilation, kOp);
  PYPRUNE_CHECK_CPU(x, kOp, "x");
  PYPRUNE_CHECK_CPU(grad, kOp, "grad");
  PYPRUNE_CHECK_CPU(rows, kOp, "rows");
  PYPRUNE_CHECK_CPU(cols, kOp, "cols");
  PYPRUNE_CHECK_DTYPE(grad, kOp, "grad", x.scalar_type());
  PYPRUNE_CHECK_DTYPE(rows, kOp, "rows", at::kLong);
  PYPRUNE_CHECK_DTYPE(cols, kOp, "cols", at::kLong);
  PYPRUNE_CHECK_DIM(rows, 1, kOp, "rows");
  PYPRUNE_CHECK(cols.dim() == 1 && cols.numel() == rows.numel(), kOp, "cols",
                "must be 1-D with one entry per row index (", rows.numel(), "), got shape ", cols.sizes());
  PYPRUNE_CHECK(grad.dim() == 4 && grad.size(0) == g.N && grad.size(2) == g.OH && grad.size(3) == g.OW, kOp,
                "grad", "must have shape (", g.N, ", out_channels, ", g.OH, ", ", g.OW, ") for x of shape ",
                x.sizes(), ", got ", grad.sizes());
  const int64_t O = grad.size(1), K = g.kh * g.kw * g.C, nnz = rows.numel();
  const at::Tensor rc = rows.contiguous(), cc = cols.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  for (int64_t e = 0; e < nnz; ++e) {
    PYPRUNE_CHECK(rp[e] >= 0 && rp[e] < O, kOp, "rows", "must hold output channels in [0, ", O, "), got ", rp[e],
                  " at position ", e);
    PYPRUNE_CHECK(cp[e] >= 0 && cp[e] < K, kOp, "cols", "must hold tap-major columns in [0, ", K,
                  ") (kh*kw*C_in), got ", cp[e], " at position ", e);
  }
  at::Tensor out = at::empty({nnz}, x.options());
  if (nnz == 0) return out;
  if (g.N == 0) return out.zero_();
  const at::Tensor xc = g.cl ? x : x.contiguous();
  if (x.scalar_type() != at::kFloat || !all_finite(xc)) {
    return dense_sampled(x, grad, rc, cc, kernel_size, stride, padding, dilation);
  }
  const at::Tensor gc = grad.is_contiguous() || grad.is_contiguous(at::MemoryFormat::ChannelsLast)
                            ? grad : grad.contiguous();
  // Images in blocks of nb (the largest divisor of N whose block of x planes fits in ~1 MiB): each block's x
  // planes lie channel-major, (slot, channel, image) = (slot, c * nb + i), and its grad run per row is nb
  // planes long, so one entry's dot runs over all nb images at once (on a 7x7 map a dot per image was 4
  // vectors, and its overhead cost more than its FMAs). Planes past an image's last pixel multiply grad's zeros.
  // When one image's planes exceed that, its runs go in chunks whose x fits instead (256->64 1x1 @56: x read
  // from L3 for every row otherwise).
  // Blocked images' planes are packed (Hq * Wq floats apart, not rounded up to whole vectors: a padded 7x7
  // map's 49 pixels in 81 floats, not 96; an unpadded one's in 49, not 64); only each run is rounded up to
  // whole vectors (A/B in one process at 10% density, batch 8: 7x7 maps 0.63-0.91x the time).
  constexpr int64_t kL2Floats = (int64_t(1) << 20) / 4;
  const int64_t slots = static_cast<int64_t>(g.slot_phase.size());
  int64_t nb = 1;
  for (int64_t d = 1; d <= g.N; ++d)
    if (g.N % d == 0 && d * slots * g.C * g.Hq * g.Wq <= kL2Floats) nb = d;
  const int64_t plane = nb > 1 ? g.Hq * g.Wq : plane_stride(g, 1);
  const int64_t NB = g.N / nb, len = round_up(nb * plane, kLanes);
  const int64_t chunk = std::min(len, std::max<int64_t>(kLanes, kL2Floats / (slots * g.C) / kLanes * kLanes));
  const at::Tensor xb =
      nb == 1 ? xc : xc.reshape({NB, nb, g.C, g.H, g.W}).transpose(1, 2).reshape({NB, g.C * nb, g.H, g.W});
  const PlaneGeometry gb = plane_geometry(xb, kernel_size, stride, padding, dilation);
  const std::vector<int64_t> tap_off = tap_offsets(gb, plane);
  // a run reaches past its first plane by its tap's shift plus len: slack after the last block
  const int64_t shift = *std::max_element(tap_off.begin(), tap_off.end()) % plane;
  const Isa isa = kernel_isa();
  const at::Tensor xs = stage_planes(gb.cl ? xb : xb.contiguous(), gb, plane, shift + len, isa);
  const at::Tensor gs = stage_grad(gc, nb, g.Wq, plane, len);

  // Entries run by row, and within a row by (channel, tap): a channel's taps read overlapping runs of one
  // plane, which the next dots then find in L1 (7-39% faster than tap-major order on ResNet-50's 3x3 convs
  // at 10-30% density). The backward passes its entries in that order already (sorted once per structure);
  // other orders are sorted here: two counting sorts, by (channel, tap), then stably by row. Per tap-major
  // column t * C + c, its sort key and its x run's offset (no division per entry: 64-bit divisions took 4 ms
  // of a 12 ms call with 236K entries).
  const int64_t taps = g.kh * g.kw;
  std::vector<int64_t> col_key(K), col_off(K);
  for (int64_t t = 0, k = 0; t < taps; ++t)
    for (int64_t c = 0; c < g.C; ++c, ++k) col_key[k] = c * taps + t, col_off[k] = tap_off[t] + c * nb * plane;
  std::vector<int64_t> row_ptr(O + 1, 0), order;
  bool ordered = true;
  for (int64_t e = 0; e < nnz; ++e) {
    ++row_ptr[rp[e] + 1];
    ordered = ordered && (e == 0 || rp[e] > rp[e - 1] ||
                          (rp[e] == rp[e - 1] && col_key[cp[e]] >= col_key[cp[e - 1]]));
  }
  for (int64_t o = 0; o < O; ++o) row_ptr[o + 1] += row_ptr[o];
  if (!ordered) {
    std::vector<int64_t> start(K + 1, 0), by_key(nnz);
    for (int64_t e = 0; e < nnz; ++e) ++start[col_key[cp[e]] + 1];
    for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
    for (int64_t e = 0; e < nnz; ++e) by_key[start[col_key[cp[e]]]++] = e;
    order.resize(nnz);
    std::vector<int64_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t e : by_key) order[fill[rp[e]]++] = e;
  }
  // rows o .. o + 3 with the same columns in the same order (a BSR block's rows, 4 at a time)
  auto col_at = [&](int64_t e) { return cp[ordered ? e : order[e]]; };
  std::vector<uint8_t> quad(O, 0);
  bool any_quad = false;
  for (int64_t o = 0; o + 4 <= O; ++o) {
    const int64_t n = row_ptr[o + 1] - row_ptr[o];
    bool same = n > 0;
    for (int64_t r = 1; r < 4 && same; ++r) {
      same = row_ptr[o + r + 1] - row_ptr[o + r] == n;
      for (int64_t i = 0; i < n && same; ++i) same = col_at(row_ptr[o + r] + i) == col_at(row_ptr[o] + i);
    }
    quad[o] = same;
    any_quad = any_quad || same;
  }
  const SampledArgs a{xs.data_ptr<float>(), gs.data_ptr<float>(), NB, O, gb.planes * plane, len, chunk,
                      row_ptr.data(), ordered ? nullptr : order.data(), cp, col_off.data(),
                      any_quad ? quad.data() : nullptr};
  SampledFn fn = sampled_baseline;
#if PYPRUNE_X86
  if (isa == Isa::kAvx512) fn = sampled_avx512;
  else if (isa == Isa::kAvx2) fn = sampled_avx2;
#endif
  // rows in ranges of about equal entries (a row costs a little even when empty)
  const std::vector<int64_t> bounds =
      balanced_split(O, at::get_num_threads(), [&](int64_t o) { return row_ptr[o]; }, 1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::vector<float> sum(row_ptr[bounds[r + 1]] - row_ptr[bounds[r]]);
      fn(a, bounds[r], bounds[r + 1], sum.data(), op);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("_conv2d_weight_sampled", &conv2d_weight_sampled_cpu); }

}  // namespace pyprune
