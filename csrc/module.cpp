// pyprune._C: loading this module runs the TORCH_LIBRARY_IMPL registrations of csrc/cpu (and csrc/cuda).
// The schemas live in pyprune/ops/_library.py. pybind11 serves only helpers that are not ops.
#include <torch/extension.h>

#include "pyprune/cpu_features.h"

PYBIND11_MODULE(_C, m) {
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
