"""pytest-benchmark: the op pyprune::bsr_conv2d (NCHW, 32x32 blocks of the tap-major weight, the smallest-norm
blocks pruned) vs dense F.conv2d on ResNet-50's 1x1 and stride-1 3x3 conv shapes, batch 1.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/*/bsr_conv2d.md and sparse_conv2d*.md come from interleaved tables (sparse_conv2d_table.py:
SparseConv2d, which calls this op for every bsr conv but an unpadded 1x1 on channels_last input).
"""

import conv_op_bench
import pytest
from sparse_conv2d_table import SHAPES

from pyprune.ops import bsr_conv2d
from pyprune.sparse import BSR
from pyprune.sparse.select import block_mask

PROVIDERS = ("torch_dense", "cpp")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_bsr_conv2d(benchmark, c_in, c_out, hw, k, sparsity, provider):
    if provider == "torch_dense" and sparsity != 0.5:
        pytest.skip("dense does not depend on sparsity: timed once per shape")

    def build(w2, x):
        bsr = BSR.from_dense(w2 * block_mask(w2, sparsity, (32, 32)), (32, 32))
        return lambda: bsr_conv2d(x, bsr.crow_indices, bsr.col_indices, bsr.values, c_out, k, padding=k // 2)

    conv_op_bench.run(benchmark, c_in, c_out, hw, k, sparsity, provider, build)
