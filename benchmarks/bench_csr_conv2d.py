"""pytest-benchmark: the op pyprune::csr_conv2d (NCHW, CSR weight in tap-major columns) vs dense F.conv2d on
ResNet-50's 1x1 and stride-1 3x3 conv shapes, batch 1.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu/sparse_conv2d.md come from sparse_conv2d_table.py (SparseConv2d, which calls this op for
NCHW input), which interleaves providers and repeats rounds. Provider cpp_inference_mode is the same call under
torch.inference_mode (the op keeps what it derives from the indices between calls there too).
"""

import conv_op_bench
import pytest
from sparse_conv2d_table import SHAPES

from pyprune.ops import csr_conv2d
from pyprune.sparse import CSR
from pyprune.sparse.select import magnitude_mask

PROVIDERS = ("torch_dense", "cpp", "cpp_inference_mode")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("c_in,c_out,hw,k", SHAPES)
def test_csr_conv2d(benchmark, c_in, c_out, hw, k, sparsity, provider):
    if provider == "torch_dense" and sparsity != 0.5:
        pytest.skip("dense does not depend on sparsity: timed once per shape")

    def build(w2, x):
        csr = CSR.from_dense(w2 * magnitude_mask(w2, sparsity))
        return lambda: csr_conv2d(x, csr.crow_indices, csr.col_indices, csr.values, c_out, k, padding=k // 2)

    conv_op_bench.run(benchmark, c_in, c_out, hw, k, sparsity, provider, build)
