"""pytest-benchmark: the private op pyprune::_conv2d_weight_sampled (a conv's weight gradient at the stored
entries of a sparse weight only, the values' gradient of csr_conv2d / bsr_conv2d at low density) vs ATen's
dense weight gradient (torch.nn.grad.conv2d_weight) on ResNet-50's 1x1 and stride-1 3x3 conv shapes, batch 8,
NCHW, entries in the order the backward passes them.

CI runs this with --benchmark-disable (each case once, as a smoke test). Whole training steps are timed by
sparse_conv2d_train_table.py, which interleaves providers and repeats rounds.
"""

import pytest
import torch
from conv_op_bench import against_dense
from sparse_conv2d_table import SHAPES
from sparse_linear_providers import environment

from pyprune.ops.csr_conv2d import entry_order

_dense_median: dict = {}


@pytest.mark.parametrize("provider", ("torch_dense", "cpp"))
@pytest.mark.parametrize("density", [0.05, 0.1])
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_conv2d_weight_sampled(benchmark, c_in, c_out, hw, k, density, provider):
    if provider == "torch_dense" and density != 0.05:
        pytest.skip("dense does not depend on density: timed once per shape")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, c_in, hw, hw, generator=gen)
    grad = torch.randn(8, c_out, hw, hw, generator=gen)
    conv = ([k, k], [1, 1], [k // 2, k // 2], [1, 1])
    if provider == "torch_dense":
        out = benchmark(lambda: torch.nn.grad.conv2d_weight(x, (c_out, c_in, k, k), grad, *conv[1:]))
        assert out.shape == (c_out, c_in, k, k)
    else:
        rows, cols = (torch.rand(c_out, k * k * c_in, generator=gen) < density).nonzero(as_tuple=True)
        perm = entry_order(rows, cols, k * k, c_in)
        rows, cols = rows[perm], cols[perm]
        out = benchmark(lambda: torch.ops.pyprune._conv2d_weight_sampled(x, grad, rows, cols, *conv))
        assert out.shape == rows.shape
    benchmark.extra_info.update(
        {
            "shape": {"c_in": c_in, "c_out": c_out, "hw": hw, "kernel": k, "batch": 8},
            "dtype": "float32",
            "density": 1.0 if provider == "torch_dense" else density,
            "device": "cpu",
            **environment(),
            **against_dense(benchmark, (c_in, c_out, hw, k), provider == "torch_dense", _dense_median),
        }
    )
