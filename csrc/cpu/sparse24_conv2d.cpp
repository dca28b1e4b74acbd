// pyprune::sparse24_conv2d on the CPU: conv2d whose (C_out, kh*kw*C_in) tap-major weight is 2:4 sparse along
// its columns (column (i*kw + j)*C_in + c holds w[o, c, i, j]; storage as sparse24_linear's), computed as an
// implicit GEMM with sparse24_linear's panels (pyprune/sparse24_panels.h).
//
// The input is copied once into a zero-padded NHWC buffer; output pixel m = (n, oh, ow) is a token whose
// inputs 8p .. 8p + 7 (one group pair) are the 8 channels of one tap at base[m] + koff[p] in that buffer, so no
// patch matrix (kh*kw times the input) is built. A pair lies in one tap when C_in is a multiple of 8; other
// channel counts (and dtypes other than fp32) run ATen's conv on the decoded weight instead. The panels write
// the (pixels, C_out) matrix, which is the channels_last output; NCHW input gets it transposed to NCHW.
#include "pyprune/conv_planes.h"
#include "pyprune/linear.h"
#include "pyprune/sparse24_panels.h"

namespace pyprune {

at::Tensor sparse24_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               int64_t out_channels, at::IntArrayRef kernel_size,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
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
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (x.scalar_type() != at::kFloat || C % 8 != 0) {
    const at::Tensor w = s24::sparse24_dense_matrix(values, meta, O, K).view({O, g.kh, g.kw, C}).permute({0, 3, 1, 2});
    const std::optional<at::Tensor> bo = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
    return at::conv2d(x, w, bo, stride, padding, dilation).contiguous(fmt);
  }
  const int64_t OH = g.OH, OW = g.OW, M = N * OH * OW;
  at::Tensor y = at::empty({N, OH, OW, O}, x.options());  // (pixels, C_out): channels_last
  auto result = [&]() { return g.cl ? unaliased(y.permute({0, 3, 1, 2})) : y.permute({0, 3, 1, 2}).contiguous(); };
  if (M == 0 || O == 0) return result();
  if (C == 0) {
    if (b.defined()) y.copy_(b.expand_as(y));
    else y.zero_();
    return result();
  }
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  at::Tensor xp = at::zeros({N, Hp, Wp, C}, x.options());
  xp.narrow(1, g.ph, g.H).narrow(2, g.pw, g.W).copy_(x.permute({0, 2, 3, 1}));
  std::vector<int64_t> base(M), koff(K4 / 8);
  for (int64_t n = 0, m = 0; n < N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow, ++m) base[m] = ((n * Hp + oh * g.sh) * Wp + ow * g.sw) * C;
  for (int64_t p = 0; p < K4 / 8; ++p) {
    const int64_t t = 8 * p / C, c = 8 * p % C;
    koff[p] = ((t / g.kw) * g.dh * Wp + (t % g.kw) * g.dw) * C + c;
  }
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  const s24::S24Args a{v.data_ptr<float>(), mt.data_ptr<uint8_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
                       M, K4, O, base.data(), koff.data()};
  s24::run_panels(a, xp.data_ptr<float>(), y.data_ptr<float>());
  return result();
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("sparse24_conv2d", &sparse24_conv2d_cpu); }

}  // namespace pyprune
