"""pytest-benchmark: the op pyprune::csr_conv2d (NCHW, CSR weight in tap-major columns) vs dense F.conv2d on
ResNet-50's 1x1 and stride-1 3x3 conv shapes, batch 1.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu/sparse_conv2d.md come from sparse_conv2d_table.py (SparseConv2d, which calls this op for
NCHW input), which interleaves providers and repeats rounds. Provider cpp_inference_mode is the same call under
torch.inference_mode (the op keeps what it derives from the indices between calls there too).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from sparse_conv2d_table import SHAPES, dense_conv
from sparse_linear_providers import environment

from pyprune.nn.sparse_conv2d import tap_major
from pyprune.ops import csr_conv2d
from pyprune.sparse import CSR
from pyprune.sparse.select import magnitude_mask

PROVIDERS = ("torch_dense", "cpp", "cpp_inference_mode")
_dense_median: dict = {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_csr_conv2d(benchmark, c_in, c_out, hw, k, sparsity, provider):
    if provider == "torch_dense" and sparsity != 0.5:
        pytest.skip("dense does not depend on sparsity: timed once per shape")
    conv = dense_conv(c_in, c_out, k)
    w = conv.weight.detach()
    x = torch.randn(1, c_in, hw, hw, generator=torch.Generator().manual_seed(1))
    if provider == "torch_dense":
        fn = lambda: F.conv2d(x, w, None, 1, k // 2)
    else:
        w2 = tap_major(w)
        csr = CSR.from_dense(w2 * magnitude_mask(w2, sparsity))
        fn = lambda: csr_conv2d(x, csr.crow_indices, csr.col_indices, csr.values, c_out, k, padding=k // 2)
    with (
        torch.inference_mode() if provider == "cpp_inference_mode" else contextlib.nullcontext(),
        torch.no_grad(),
    ):
        y = benchmark(fn)
    assert y.shape == (1, c_out, hw, hw)
    flops = 2.0 * hw * hw * c_in * c_out * k * k
    key = (c_in, c_out, hw, k)
    info = {"shape": {"c_in": c_in, "c_out": c_out, "hw": hw, "kernel": k, "batch": 1}, "dtype": "float32",
            "sparsity": 0.0 if provider == "torch_dense" else sparsity, "device": "cpu", **environment()}  # fmt: skip
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        info["dense_equivalent_gflops"] = flops / med / 1e9
        if provider == "torch_dense":
            _dense_median[key] = med
        elif key in _dense_median:
            info["speedup_vs_torch_dense"] = _dense_median[key] / med
    benchmark.extra_info.update(info)
