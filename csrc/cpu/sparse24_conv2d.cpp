// pyprune::sparse24_conv2d on the CPU: conv2d whose (C_out, kh*kw*C_in) tap-major weight is 2:4 sparse along
// its columns (column (i*kw + j)*C_in + c holds w[o, c, i, j]; storage as sparse24_linear's), computed as an
// implicit GEMM with sparse24_linear's panels (pyprune/sparse24_panels.h), then the epilogue
// relu?(conv + bias + residual) (capped at relu_max) in the panels' stores.
//
// Output pixel m = (n, oh, ow) is a token whose inputs 8p .. 8p + 7 (one group pair) are the 8 channels of one
// tap at base[m] + koff[p] in an NHWC input, so no patch matrix (kh*kw times the input) is built. That input is
// x itself when x is channels_last and the conv unpadded, else a zero-bordered NHWC copy (NCHW rows turned
// through 16 x 16 register transposes). A pair lies in one tap when C_in is a multiple of 8; other channel
// counts (and dtypes other than fp32) run ATen's conv on the decoded weight instead. The panels write the
// channels_last output as (pixels, C_out) rows, and an NCHW output a plane per output channel.
#include <cstring>

#include "pyprune/conv_planes.h"
#include "pyprune/linear.h"
#include "pyprune/sparse24_panels.h"

namespace pyprune {
namespace {

// x (N, C, H, W) at any strides -> xp (N, Hp, Wp, C) contiguous, x's pixel (h, w) at (h + ph, w + pw), zero
// elsewhere. Unit: one row (n, hp) of xp.
struct StageArgs {
  const float* x;
  int64_t sN, sC, sH, sW, C, H, W, ph, pw, Hp, Wp;
  float* xp;
};

template <class V>
PYPRUNE_INLINE void stage_rows(const StageArgs& s, int64_t r0, int64_t r1) {
  const int64_t C = s.C, W = s.W;
  for (int64_t r = r0; r < r1; ++r) {
    float* d = s.xp + r * s.Wp * C;
    const int64_t n = r / s.Hp, h = r % s.Hp - s.ph;
    if (h < 0 || h >= s.H) {
      std::fill(d, d + s.Wp * C, 0.f);
      continue;
    }
    std::fill(d, d + s.pw * C, 0.f);
    std::fill(d + (s.pw + W) * C, d + s.Wp * C, 0.f);
    d += s.pw * C;
    const float* src = s.x + n * s.sN + h * s.sH;
    if (s.sC == 1 && s.sW == C) {  // a channels_last row: one run
      std::memcpy(d, src, sizeof(float) * W * C);
      continue;
    }
    // pixels along the row contiguous (NCHW): whole 16 x 16 blocks turned in registers
    const int64_t wf = s.sW == 1 ? W / kLanes * kLanes : 0, cf = C / kLanes * kLanes;
    for (int64_t w0 = 0; w0 < wf; w0 += kLanes)
      for (int64_t c0 = 0; c0 < cf; c0 += kLanes) {
        V v[kLanes];
        for (int i = 0; i < kLanes; ++i) v[i] = load16<V>(src + (c0 + i) * s.sC + w0);
        transpose16(v);
        for (int j = 0; j < kLanes; ++j) store16(d + (w0 + j) * C + c0, v[j]);
      }
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = w < wf ? cf : 0; c < C; ++c) d[w * C + c] = src[w * s.sW + c * s.sC];
  }
}

using StageFn = void (*)(const StageArgs&, int64_t, int64_t);
#define PYPRUNE_S24_STAGE(SUFFIX, TARGET, V) \
  TARGET void stage_##SUFFIX(const StageArgs& s, int64_t r0, int64_t r1) { stage_rows<V>(s, r0, r1); }
PYPRUNE_S24_STAGE(baseline, , VecBaseline)
#if PYPRUNE_X86
PYPRUNE_S24_STAGE(avx2, PYPRUNE_TARGET_AVX2, VecAvx2)
PYPRUNE_S24_STAGE(avx512, PYPRUNE_TARGET_AVX512, VecAvx512)
#endif

at::Tensor staged_nhwc(const at::Tensor& x, const PlaneGeometry& g) {
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  at::Tensor xp = at::empty({g.N, Hp, Wp, g.C}, x.options());
  const StageArgs s{x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3), g.C, g.H, g.W,
                    g.ph, g.pw, Hp, Wp, xp.data_ptr<float>()};
  const StageFn fn = PYPRUNE_ISA_ENTRY(stage);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Wp * g.C));
  at::parallel_for(0, g.N * Hp, grain, [&](int64_t r0, int64_t r1) { fn(s, r0, r1); });
  return xp;
}

}  // namespace

at::Tensor sparse24_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               int64_t out_channels, at::IntArrayRef kernel_size,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                               const std::optional<at::Tensor>& residual, std::optional<double> relu_max) {
  constexpr const char* op = "sparse24_conv2d";
  PYPRUNE_CHECK_DTYPE(values, op, "values", x.scalar_type());
  PYPRUNE_CHECK_DTYPE(meta, op, "meta", at::kByte);
  PYPRUNE_CHECK_DIM(values, 2, op, "values");
  PYPRUNE_CHECK_DIM(meta, 2, op, "meta");
  for (const auto* t : {&x, &values, &meta}) PYPRUNE_CHECK_CPU(*t, op, "x/values/meta");
  const PlaneGeometry g = checked_plane_geometry(x, kernel_size, stride, padding, dilation, op);
  PYPRUNE_CHECK(out_channels >= 0, op, "out_channels", "must be >= 0, got ", out_channels);
  const int64_t N = g.N, C = g.C, O = out_channels, K = g.kh * g.kw * C, K4 = round_up(K, 8);
  PYPRUNE_CHECK(values.size(0) == K4 / 2 && values.size(1) == O, op, "values", "must have shape (", K4 / 2, ", ",
                O, ") for kh*kw*C_in = ", K, " and out_channels ", O, ", got ", values.sizes());
  PYPRUNE_CHECK(meta.size(0) == K4 / 8 && meta.size(1) == O, op, "meta", "must have shape (", K4 / 8, ", ", O,
                "), got ", meta.sizes());
  const at::Tensor b = checked_bias(bias, O, op, x.scalar_type());
  const float cap = relu_cap(relu, relu_max, op);
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (x.scalar_type() != at::kFloat || C % 8 != 0) {
    const at::Tensor w = s24::sparse24_dense_matrix(values, meta, O, K).view({O, g.kh, g.kw, C}).permute({0, 3, 1, 2});
    const std::optional<at::Tensor> bo = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
    at::Tensor y = at::conv2d(x, w, bo, stride, padding, dilation).contiguous(fmt);
    apply_epilogue(y, checked_residual(residual, y, g.cl, op), cap);
    return y;
  }
  const int64_t OH = g.OH, OW = g.OW, M = N * OH * OW;
  at::Tensor y = at::empty({N, O, OH, OW}, x.options().memory_format(fmt));
  const at::Tensor res = checked_residual(residual, y, g.cl, op);
  if (M == 0 || O == 0) return y;
  if (C == 0) {
    if (b.defined()) y.copy_(b.view({1, O, 1, 1}).expand_as(y));
    else y.zero_();
    apply_epilogue(y, res, cap);
    return y;
  }
  // the NHWC input the tokens read: x in place (channels_last, no padding) or its zero-bordered copy
  const bool in_place = x.is_contiguous(at::MemoryFormat::ChannelsLast) && g.ph == 0 && g.pw == 0;
  const at::Tensor xp = in_place ? x : staged_nhwc(x, g);
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  std::vector<int64_t> base(M), koff(K4 / 8);
  for (int64_t n = 0, m = 0; n < N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow, ++m) base[m] = ((n * Hp + oh * g.sh) * Wp + ow * g.sw) * C;
  for (int64_t p = 0; p < K4 / 8; ++p) {
    const int64_t t = 8 * p / C, c = 8 * p % C;
    koff[p] = ((t / g.kw) * g.dh * Wp + (t % g.kw) * g.dw) * C + c;
  }
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  s24::S24Args a{v.data_ptr<float>(), mt.data_ptr<uint8_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
                 M, K4, O, base.data(), koff.data()};
  a.res = res.defined() ? res.data_ptr<float>() : nullptr;
  a.cap = cap;
  a.plane = g.cl ? 0 : OH * OW;
  s24::run_panels(a, xp.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("sparse24_conv2d", &sparse24_conv2d_cpu); }

}  // namespace pyprune
