"""pytest-benchmark: SparseConv2d (pyprune's csr_conv2d and CSR / BSR / 2:4 linear kernels) vs dense F.conv2d
(oneDNN) on ResNet-50's 1x1 and stride-1 3x3 convolutions, NCHW and channels_last.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu/sparse_conv2d.md come from sparse_conv2d_table.py, which interleaves providers and
repeats rounds. Threads: every provider runs with torch's thread count.
"""

import pytest
import torch
from sparse_conv2d_table import BATCHES, FORMATS, SHAPES, SPARSITIES, dense_conv, make_input
from sparse_conv2d_table import PROVIDERS as _ALL
from sparse_linear_providers import environment

PROVIDERS = {p: _ALL[p] for p in ("torch_dense", "cpp_csr", "cpp_bsr32", "cpp_2:4")}
_dense_median: dict = {}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_sparse_conv2d(benchmark, c_in, c_out, hw, k, batch, fmt, sparsity, provider):
    if provider == "torch_dense" and sparsity != SPARSITIES[0]:
        pytest.skip("dense does not depend on sparsity: timed once per case")
    conv = dense_conv(c_in, c_out, k)
    x = make_input(batch, c_in, hw, fmt)
    fn = PROVIDERS[provider](conv, x, sparsity)
    if fn is None:
        pytest.skip(f"{provider} has a fixed sparsity")
    with torch.no_grad():
        y = benchmark(fn)
    assert y.shape == (batch, c_out, hw, hw)
    assert y.is_contiguous(
        memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    )
    case = (c_in, c_out, hw, k, batch, fmt)
    flops = 2.0 * batch * hw * hw * c_in * c_out * k * k
    info = {
        "shape": {"batch": batch, "c_in": c_in, "c_out": c_out, "hw": hw, "kernel": k, "format": fmt},
        "sparsity": sparsity if provider != "torch_dense" else 0.0,
        "dtype": "float32",
        "device": "cpu",
        **environment(),
    }
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        info["dense_equivalent_gflops"] = flops / med / 1e9
        if provider == "torch_dense":
            _dense_median[case] = med
        elif case in _dense_median:
            info["speedup_vs_torch_dense"] = _dense_median[case] / med
    benchmark.extra_info.update(info)
