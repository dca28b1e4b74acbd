import torch

import pyprune
from pyprune.nn import PrunedConv2d, SparseConv2d, SparseLinear


def test_count_flops_counts_pyprune_ops():
    # FlopCounterMode knows no pyprune:: op: every one of these counted 0 (a converted model too)
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(64, 128), torch.randn(4, 64)
    for layout in ("csr", "bsr", "2:4"):
        sp = SparseLinear.from_dense(lin, sparsity=0.5, layout=layout, block=(8, 8))
        assert pyprune.count_flops(sp, x) == 2 * sp.weight.nnz * 4  # what the kernel multiplies
    conv, img = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.randn(2, 8, 9, 9)
    sc = SparseConv2d.from_dense(conv, sparsity=0.5)
    assert pyprune.count_flops(sc, img) == 2 * sc.weight.nnz * 2 * 5 * 5
    pc = PrunedConv2d.from_dense(conv, keep_in=[0, 2, 4, 6], keep_out=list(range(8)))
    assert pyprune.count_flops(pc, img) == 2 * (8 * 4 * 9) * 2 * 5 * 5
    assert pyprune.count_flops(conv, img) == 2 * (16 * 8 * 9) * 2 * 5 * 5  # dense, for scale
