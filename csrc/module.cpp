// pyprune._C: loading this module runs the TORCH_LIBRARY_IMPL registrations of csrc/cpu (and csrc/cuda).
// The schemas live in pyprune/ops/_library.py. pybind11 serves helpers that are not ops, and one direct entry
// to an op's CPU kernel: pruned_conv2d_cpu, which pyprune.ops.pruned_conv2d calls in plain eager inference
// instead of going through the dispatcher (see there).
#include <torch/extension.h>

#include "pyprune/cpu_features.h"

namespace pyprune {
at::Tensor pruned_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                             int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool relu, at::IntArrayRef max_pool,
                             std::optional<double> relu_max, const std::optional<at::Tensor>& residual);
}

PYBIND11_MODULE(_C, m) {
  // the same arguments as the op's schema, in its order; the GIL released while the kernel runs, as the
  // dispatcher's Python binding does
  m.def("pruned_conv2d_cpu", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                                int64_t out_channels, std::vector<int64_t> stride, std::vector<int64_t> padding,
                                std::vector<int64_t> dilation, int64_t groups, bool relu, std::vector<int64_t> max_pool,
                                std::optional<double> relu_max, const std::optional<at::Tensor>& residual) {
    pybind11::gil_scoped_release no_gil;
    return pyprune::pruned_conv2d_cpu(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation,
                                      groups, relu, max_pool, relu_max, residual);
  });
  m.def("cpu_features", []() {
    const auto f = pyprune::detect_cpu_features();
    pybind11::dict d;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["kernel_isa"] = pyprune::kernel_isa_name();
    d["last_level_cache_bytes"] = pyprune::last_level_cache_bytes();
    d["with_cuda"] = bool(PYPRUNE_WITH_CUDA);
    return d;
  });
}
