// pyprune._C: loading this module runs the TORCH_LIBRARY_IMPL registrations of csrc/cpu (and csrc/cuda).
// The schemas live in pyprune/ops/_library.py. pybind11 serves helpers that are not ops, and a typed call into
// the dispatcher for pruned_conv2d (the op itself, below the Autograd key): pyprune.ops.pruned_conv2d takes it
// for calls that need no autograd, instead of torch.ops' Python binding (see there).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "pyprune/cpu_features.h"

PYBIND11_MODULE(_C, m) {
  // the op's arguments in its schema's order; the dispatcher picks the kernel by the arguments' keys (CPU, CUDA's
  // router, a dispatch mode, the profiler's record), as for torch.ops; the GIL released while it runs, as
  // torch.ops' binding does
  m.def("pruned_conv2d", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                            int64_t out_channels, std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, int64_t groups, bool relu, std::vector<int64_t> max_pool,
                            std::optional<double> relu_max, const std::optional<at::Tensor>& residual) {
    using Opt = const std::optional<at::Tensor>&;
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("pyprune::pruned_conv2d", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, Opt, Opt, Opt, int64_t, at::IntArrayRef,
                              at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::IntArrayRef, std::optional<double>,
                              Opt)>();
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    return op.call(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu,
                   max_pool, relu_max, residual);
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
