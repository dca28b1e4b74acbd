"""Long dot products keep fp32 error near a blocked GEMM's: the CPU kernels sum a row's products in chunks
(csr_linear's kFlush, bsr_linear's kFlushCols, sparse24_linear's kFlushPairs) instead of one chain over K,
whose error was 3-9x torch's dense F.linear at K = 4096-65536."""

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn import SparseLinear


@pytest.mark.skipif(not pyprune._extension.HAS_CPP, reason="pyprune._C is not built")
@pytest.mark.parametrize("layout, tokens", [("csr", 8), ("bsr", 8), ("2:4", 8), ("2:4", 4)])
def test_long_rows_are_about_as_accurate_as_dense(layout, tokens):
    torch.manual_seed(0)
    lin = torch.nn.Linear(65536, 32, bias=False)
    sp = SparseLinear.from_dense(lin, sparsity=0.5, layout=layout, block=(16, 16))
    x = torch.randn(tokens, 65536)
    w = sp.to_dense().weight.detach()
    want = F.linear(x.double(), w.double())
    with torch.no_grad():
        ours = (sp(x).double() - want).abs().max().item()
        dense = (F.linear(x, w).double() - want).abs().max().item()
    assert ours <= 3 * dense, (ours, dense)
