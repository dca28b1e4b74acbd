"""pytest-benchmark: the op pyprune::sparse24_conv2d (NCHW, the tap-major weight pruned 2:4 by magnitude) vs
dense F.conv2d on ResNet-50's 1x1 and stride-1 3x3 conv shapes, batch 1.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu-xeon-emr/sparse24_conv2d_3x3.md come from sparse_conv2d_table.py (SparseConv2d, which
calls this op for 2:4 convs with C_in a multiple of 8), which interleaves providers and repeats
rounds.
"""

import conv_op_bench
import pytest
from sparse_conv2d_table import SHAPES

from pyprune.ops import sparse24_conv2d
from pyprune.sparse import Sparse24
from pyprune.sparse.select import nm_mask

PROVIDERS = ("torch_dense", "cpp")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_sparse24_conv2d(benchmark, c_in, c_out, hw, k, provider):
    def build(w2, x):
        s24 = Sparse24.from_dense(w2 * nm_mask(w2, 2, 4))
        return lambda: sparse24_conv2d(x, s24.values, s24.meta, c_out, k, padding=k // 2)

    conv_op_bench.run(benchmark, c_in, c_out, hw, k, 0.5, provider, build)
