"""pytest-benchmark: pyprune's CSR / BSR / 2:4 linear vs dense and torch.sparse, per shape and sparsity.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu/ come from sparse_linear_table.py, which interleaves providers and repeats rounds.
Threads: every provider runs with torch's thread count (the OpenMP kernels and oneDNN/MKL share it).
"""

import pytest
import torch

from sparse_linear_providers import DENSE, PROVIDERS, SHAPES, SPARSITIES, dense_weight, environment

_dense_median: dict = {}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("k,n", SHAPES)
def test_sparse_linear(benchmark, k, n, m, sparsity, provider):
    if provider in DENSE and sparsity != SPARSITIES[0]:
        pytest.skip("dense providers do not depend on sparsity: timed once per shape")
    lin = dense_weight(k, n)
    x = torch.randn(m, k)
    fn = PROVIDERS[provider](lin, x, sparsity)
    if fn is None:
        pytest.skip(f"{provider} has a fixed sparsity")
    with torch.no_grad():
        benchmark(fn)
    flops = 2.0 * m * k * n
    info = {"shape": (m, k, n), "sparsity": sparsity, "dtype": "float32", "device": "cpu", **environment()}
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        info["dense_equivalent_gflops"] = flops / med / 1e9
        if provider == "torch_dense":
            _dense_median[(k, n, m)] = med
        elif (k, n, m) in _dense_median:
            info["speedup_vs_torch_dense"] = _dense_median[(k, n, m)] / med
    benchmark.extra_info.update(info)
