"""pytest-benchmark: the op pyprune::max_pool2d vs F.max_pool2d (ATen) on ResNet-50's stem pool (64 x 112
x 112, 3x3 stride 2 padding 1) and VGG-16's last pool (512 x 14 x 14, 2x2), batch 1 and 8, NCHW and
channels_last.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/<device>/max_pool.md come from max_pool_table.py, which interleaves providers and repeats
rounds.
"""

import pytest
import torch
import torch.nn.functional as F
from conv_op_bench import against_dense
from sparse_linear_providers import environment

from pyprune.ops import max_pool2d

PROVIDERS = ("torch_dense", "cpp")
# (channels, side, (kernel, stride, padding))
SHAPES = [(64, 112, (3, 2, 1)), (512, 14, (2, 2, 0))]
_dense_median: dict = {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("c,side,pool", SHAPES)
def test_max_pool2d(benchmark, c, side, pool, batch, channels_last, provider):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, side, side, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=fmt)
    fn = (lambda: F.max_pool2d(x, *pool)) if provider == "torch_dense" else (lambda: max_pool2d(x, *pool))
    with torch.no_grad():
        y = benchmark(fn)
    assert torch.equal(y, F.max_pool2d(x, *pool))
    info = {
        "shape": {"batch": batch, "channels": c, "side": side, "pool": list(pool)},
        "format": "channels_last" if channels_last else "nchw",
        "dtype": "float32",
        "device": "cpu",
        **environment(),
    }
    if benchmark.stats is not None:
        info["gbytes_per_s"] = x.nbytes / benchmark.stats.stats.median / 1e9  # the input read once
    key = (c, side, batch, channels_last)
    info.update(against_dense(benchmark, key, provider == "torch_dense", _dense_median))
    benchmark.extra_info.update(info)
