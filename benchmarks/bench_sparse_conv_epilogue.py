"""pytest-benchmark: a sparse conv with its skip connection's add and ReLU, as ResNet-50's bottlenecks run it
(conv3 -> + identity -> ReLU on the 1x1 expansions; conv2 -> ReLU on the 3x3s), batch 1, csr and bsr at 90%
sparsity, NCHW and channels_last:

- torch_dense: F.conv2d, then ``add_`` and ``relu_`` in place (torchvision's Bottleneck);
- unfused: SparseConv2d, then the same in-place add and ReLU (compare's sparse variants before the fusion);
- fused: SparseConv2d(relu=True)(x, residual), the add and ReLU in the kernel's stores.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/<device>/NOTES.md come from same-process A/Bs of whole models (compare's variants with and
without the fusion), which interleave rounds.
"""

import pytest
import torch
import torch.nn.functional as F
from conv_op_bench import against_dense
from sparse_linear_providers import environment

from pyprune.nn import SparseConv2d

PROVIDERS = ("torch_dense", "unfused", "fused")
# (C_in, C_out, side, kernel, residual): the 1x1 expansions add the identity, the 3x3s only have the ReLU
SHAPES = [(64, 256, 56, 1, True), (256, 1024, 14, 1, True), (128, 128, 28, 3, False)]
_dense_median: dict = {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("c_in,c_out,side,k,has_res", SHAPES)
def test_sparse_conv_epilogue(benchmark, c_in, c_out, side, k, has_res, channels_last, layout, provider):
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)
    x = torch.randn(1, c_in, side, side, generator=gen).contiguous(memory_format=fmt)
    res = torch.randn(1, c_out, side, side, generator=gen).contiguous(memory_format=fmt) if has_res else None
    fused = SparseConv2d.from_dense(conv, sparsity=0.9, layout=layout, relu=True)
    plain = SparseConv2d.from_dense(conv, sparsity=0.9, layout=layout)

    def separate(y):
        if res is not None:
            y.add_(res)
        return y.relu_()

    if provider == "torch_dense":
        fn = lambda: separate(F.conv2d(x, conv.weight, conv.bias, padding=k // 2))  # noqa: E731
    elif provider == "unfused":
        fn = lambda: separate(plain(x))  # noqa: E731
    else:
        fn = lambda: fused(x, res)  # noqa: E731
    with torch.no_grad():
        y = benchmark(fn)
        if provider != "torch_dense":  # the sparse conv, then the add and ReLU: the same values
            torch.testing.assert_close(y, separate(plain(x)), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=fmt)
    info = {
        "shape": {"batch": 1, "c_in": c_in, "c_out": c_out, "side": side, "kernel": k, "residual": has_res},
        "layout": layout,
        "sparsity": 0.9,
        "format": "channels_last" if channels_last else "nchw",
        "dtype": "float32",
        "device": "cpu",
        **environment(),
    }
    key = (c_in, c_out, side, k, channels_last, layout)
    info.update(against_dense(benchmark, key, provider == "torch_dense", _dense_median))
    benchmark.extra_info.update(info)
