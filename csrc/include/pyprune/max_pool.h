// pyprune::max_pool2d's CPU kernel (csrc/cpu/max_pool2d.cpp), which pruned_conv2d's fused max pool runs too.
#pragma once
#include <torch/extension.h>

namespace pyprune {

// A max pool's window: kernel, stride and padding (dilation 1, floor mode).
struct PoolWindow {
  int64_t KH, KW, SH, SW, PH, PW;
};

// F.max_pool2d(x, w) for a 4-D x, in channels_last when `channels_last` (else contiguous); float32 through the
// kernel, other dtypes through at::max_pool2d. The caller has checked the window (kernel >= 1, stride >= 1,
// 0 <= padding <= kernel / 2) and that it fits x (H + 2 PH >= KH, W + 2 PW >= KW).
at::Tensor max_pool2d_checked(const at::Tensor& x, const PoolWindow& w, bool channels_last);

}  // namespace pyprune
