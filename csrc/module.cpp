// pyprune._C: loading this module runs the TORCH_LIBRARY_IMPL registrations of csrc/cpu (and csrc/cuda).
// The schemas live in pyprune/ops/_library.py. pybind11 serves helpers that are not ops, and a typed call into
// the dispatcher for each public op (the op itself, below the Autograd key): pyprune/ops/_common.py's call_op
// takes it for calls that need no autograd, instead of torch.ops' Python binding (see there).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "pyprune/cpu_features.h"

namespace {

using Opt = const std::optional<at::Tensor>&;
using Ints = std::vector<int64_t>;

// The op `name` called through the dispatcher, which picks the kernel by the arguments' keys (CPU, CUDA's
// router, a dispatch mode, the profiler's record) as for torch.ops; the GIL released while it runs, as torch.ops'
// binding does. Sig is the schema's C++ signature (int[] as at::IntArrayRef). Each entry is a function-local
// static, made on the op's first call, when pyprune/ops/_library.py has defined the schema.
template <class Sig>
struct Entry {
  c10::TypedOperatorHandle<Sig> op;
  explicit Entry(const char* name)
      : op(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>()) {}
  template <class... A>
  at::Tensor operator()(A&&... args) const {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    return op.call(std::forward<A>(args)...);
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  // the ops' arguments in their schemas' order (pybind11 converts Python lists to Ints, passed as IntArrayRef)
  using T = const at::Tensor&;
  using IA = at::IntArrayRef;
  using Linear = at::Tensor(T, T, T, T, int64_t, Opt);
  m.def("csr_linear", [](T x, T crow, T col, T values, int64_t out_features, Opt bias) {
    static const Entry<Linear> e("pyprune::csr_linear");
    return e(x, crow, col, values, out_features, bias);
  });
  m.def("bsr_linear", [](T x, T crow, T col, T values, int64_t out_features, Opt bias) {
    static const Entry<Linear> e("pyprune::bsr_linear");
    return e(x, crow, col, values, out_features, bias);
  });
  m.def("sparse24_linear", [](T x, T values, T meta, int64_t out_features, Opt bias) {
    static const Entry<at::Tensor(T, T, T, int64_t, Opt)> e("pyprune::sparse24_linear");
    return e(x, values, meta, out_features, bias);
  });
  using Conv = at::Tensor(T, T, T, T, int64_t, IA, Opt, IA, IA, IA, bool, Opt, std::optional<double>);
  m.def("csr_conv2d", [](T x, T crow, T col, T values, int64_t out_channels, Ints kernel_size, Opt bias,
                         Ints stride, Ints padding, Ints dilation, bool relu, Opt residual,
                         std::optional<double> relu_max) {
    static const Entry<Conv> e("pyprune::csr_conv2d");
    return e(x, crow, col, values, out_channels, IA(kernel_size), bias, IA(stride), IA(padding), IA(dilation),
             relu, residual, relu_max);
  });
  m.def("bsr_conv2d", [](T x, T crow, T col, T values, int64_t out_channels, Ints kernel_size, Opt bias,
                         Ints stride, Ints padding, Ints dilation, bool relu, Opt residual,
                         std::optional<double> relu_max) {
    static const Entry<Conv> e("pyprune::bsr_conv2d");
    return e(x, crow, col, values, out_channels, IA(kernel_size), bias, IA(stride), IA(padding), IA(dilation),
             relu, residual, relu_max);
  });
  m.def("sparse24_conv2d", [](T x, T values, T meta, int64_t out_channels, Ints kernel_size, Opt bias,
                              Ints stride, Ints padding, Ints dilation, bool relu, Opt residual,
                              std::optional<double> relu_max) {
    static const Entry<at::Tensor(T, T, T, int64_t, IA, Opt, IA, IA, IA, bool, Opt, std::optional<double>)> e(
        "pyprune::sparse24_conv2d");
    return e(x, values, meta, out_channels, IA(kernel_size), bias, IA(stride), IA(padding), IA(dilation), relu,
             residual, relu_max);
  });
  m.def("pruned_conv2d", [](T x, T weight, Opt bias, Opt in_index, Opt out_index, int64_t out_channels,
                            Ints stride, Ints padding, Ints dilation, int64_t groups, bool relu, Ints max_pool,
                            std::optional<double> relu_max, Opt residual) {
    static const Entry<at::Tensor(T, T, Opt, Opt, Opt, int64_t, IA, IA, IA, int64_t, bool, IA,
                                  std::optional<double>, Opt)>
        e("pyprune::pruned_conv2d");
    return e(x, weight, bias, in_index, out_index, out_channels, IA(stride), IA(padding), IA(dilation), groups, relu,
             IA(max_pool), relu_max, residual);
  });
  m.def("max_pool2d", [](T x, Ints kernel_size, Ints stride, Ints padding) {
    static const Entry<at::Tensor(T, IA, IA, IA)> e("pyprune::max_pool2d");
    return e(x, IA(kernel_size), IA(stride), IA(padding));
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
