"""Every SIMD path of the C++ kernels (AVX-512, AVX2, portable baseline) on the same cases. The ISA is picked
once per process, so each capped path runs in a subprocess with PYPRUNE_ISA set."""

import glob
import os
import subprocess
import sys

import pytest

import pyprune

SCRIPT = r"""
import torch, torch.nn.functional as F, pyprune
from pyprune.nn import SparseLinear
torch.manual_seed(0)
print(pyprune._extension.cpu_features()["kernel_isa"])
for layout, s in (("csr", 0.8), ("bsr", 0.6), ("2:4", 0.5)):
    for m in (1, 3, 17, 70):
        for k, n in ((97, 33), (64, 50), (520, 40), (3001, 20)):  # the last: several partial sums a row
            lin = torch.nn.Linear(k, n)
            sp = SparseLinear.from_dense(lin, sparsity=s, layout=layout, block=(8, 16))
            x = torch.randn(m, k)
            want = F.linear(x.double(), sp.to_dense().weight.double(), lin.bias.double())
            err = (sp(x).double() - want).abs().max().item()
            assert err < 1e-4, (layout, m, k, n, err)
from pyprune.reference import pruned_conv2d_ref
for cin, cout, k, s, p, g, side, cl in ((12, 10, 3, 1, 1, 1, 20, False), (12, 10, 3, 2, 1, 1, 9, True),
                                        (16, 8, 1, 1, 0, 1, 7, False), (6, 6, 3, 1, 1, 3, 8, False),
                                        (5, 5, 3, 1, 1, 5, 9, True), (16, 12, 3, 1, 1, 1, 14, True),
                                        (16, 24, 3, 1, 1, 1, 16, False)):  # the last two: row windows
    x = torch.randn(2, cin, side, side)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ii = torch.arange(0, cin, 2) if g == 1 else None
    w = torch.randn(cout, (cin if ii is None else ii.numel()) // g, k, k)
    args = (x, w, torch.randn(cout), ii, None, cout, [s, s], [p, p], [1, 1], g, True)
    got = torch.ops.pyprune.pruned_conv2d(*args)
    want = pruned_conv2d_ref(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                               for a in args])
    err = (got.double() - want).abs().max().item()
    assert err < 1e-4, ("conv", cin, cout, k, s, g, side, cl, err)
from pyprune.nn import SparseConv2d
for cin, cout, k, s, p, side, cl in ((12, 10, 1, 1, 0, 7, False), (12, 10, 3, 1, 1, 20, False),
                                     (9, 7, 3, 2, 1, 9, False), (20, 18, 3, 1, 1, 13, True),
                                     (24, 20, 1, 1, 0, 33, True)):
    m = SparseConv2d.from_dense(torch.nn.Conv2d(cin, cout, k, s, p), sparsity=0.6)
    x = torch.randn(2, cin, side, side)
    if cl:  # staged through 16x16 transposes; the 1x1 one transposes per tile
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.double(), m.to_dense().weight.double(), m.bias.double(), s, p)
    err = (m(x).double() - want).abs().max().item()
    assert err < 1e-4, ("csr_conv2d", cin, cout, k, s, side, cl, err)
    fmt = torch.channels_last if cl else torch.contiguous_format
    m.relu, res = True, torch.randn(want.shape).contiguous(memory_format=fmt)
    err = (m(x, res).double() - (want + res.double()).relu()).abs().max().item()  # the fused epilogue
    assert err < 1e-4, ("csr_conv2d epilogue", cin, cout, k, s, side, cl, err)
for cin, cout, k, s, p, side, cl, block in ((12, 10, 3, 1, 1, 20, False, (4, 8)),
                                            (16, 40, 3, 2, 1, 9, True, (16, 16)),
                                            (20, 18, 3, 1, 1, 13, True, (3, 5)),
                                            (32, 33, 5, 1, 2, 7, False, (32, 32)),
                                            (24, 20, 1, 1, 0, 9, True, (4, 8))):  # bsr_linear's kernel
    m = SparseConv2d.from_dense(torch.nn.Conv2d(cin, cout, k, s, p), sparsity=0.6, layout="bsr", block=block)
    x = torch.randn(2, cin, side, side)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.double(), m.to_dense().weight.double(), m.bias.double(), s, p)
    err = (m(x).double() - want).abs().max().item()
    assert err < 1e-4, ("bsr_conv2d", cin, cout, k, s, side, cl, block, err)
    fmt = torch.channels_last if cl else torch.contiguous_format
    m.relu, res = True, torch.randn(want.shape).contiguous(memory_format=fmt)
    err = (m(x, res).double() - (want + res.double()).relu()).abs().max().item()  # the fused epilogue
    assert err < 1e-4, ("bsr_conv2d epilogue", cin, cout, k, s, side, cl, block, err)
# 2:4: the implicit GEMM (C_in a multiple of 8) over a zero-bordered NHWC copy (NCHW rows of whole 16 x 16
# blocks: 32 channels, 19 pixels) or x in place (channels_last 1x1); 20 / 33 outputs: a partial vector; NCHW
# output in 16 x 16 blocks and one by one; the epilogue (ReLU6, residual)
for cin, cout, k, s, p, side, cl in ((16, 20, 3, 1, 1, 11, False), (24, 33, 3, 2, 1, 9, True),
                                     (32, 48, 3, 1, 1, 19, False), (40, 33, 1, 1, 0, 9, True)):
    m = SparseConv2d.from_dense(torch.nn.Conv2d(cin, cout, k, s, p), sparsity=0.5, layout="2:4")
    x = torch.randn(2, cin, side, side)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    assert m.kernel_op(x) == "sparse24_conv2d"
    want = F.conv2d(x.double(), m.to_dense().weight.double(), m.bias.double(), s, p)
    err = (m(x).double() - want).abs().max().item()
    assert err < 1e-4, ("sparse24_conv2d", cin, cout, k, s, side, cl, err)
    fmt = torch.channels_last if cl else torch.contiguous_format
    m.relu, m.relu_max, res = True, 0.5, torch.randn(want.shape).contiguous(memory_format=fmt)
    err = (m(x, res).double() - (want + res.double()).clamp(0, 0.5)).abs().max().item()
    assert err < 1e-4, ("sparse24_conv2d epilogue", cin, cout, k, s, side, cl, err)
# the sampled weight gradient (a 7x7 map in image blocks, a 3x3 conv, a strided 1x1)
from pyprune.reference import _conv2d_weight_sampled_ref
for cin, cout, k, s, p, side in ((20, 12, 1, 1, 0, 7), (12, 10, 3, 1, 1, 13), (16, 8, 1, 2, 0, 9)):
    x = torch.randn(3, cin, side, side)
    g = torch.randn(3, cout, (side + 2 * p - k) // s + 1, (side + 2 * p - k) // s + 1)
    rows, cols = (torch.rand(cout, k * k * cin) < 0.3).nonzero(as_tuple=True)
    conv = ([k, k], [s, s], [p, p], [1, 1])
    got = torch.ops.pyprune._conv2d_weight_sampled(x, g, rows, cols, *conv)
    want = _conv2d_weight_sampled_ref(x.double(), g.double(), rows, cols, *conv)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-3, ("_conv2d_weight_sampled", cin, cout, k, s, side, err)
# the max pool (vectorized per target): NCHW rows of whole and partial vectors, channels_last runs of 17
for shape, k, s, p in (((2, 3, 40, 37), 3, 2, 1), ((1, 17, 9, 11), (2, 3), 1, (1, 0))):
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        got = pyprune.ops.max_pool2d(x, k, s, p)
        assert torch.equal(got, F.max_pool2d(x, k, s, p)), ("max_pool2d", shape)
print("ok")
"""


@pytest.mark.skipif(not pyprune._extension.HAS_CPP, reason="pyprune._C is not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_path_matches_reference(isa):
    have = pyprune._extension.cpu_features()
    if isa == "avx512" and not have["avx512"] or isa == "avx2" and not have["avx2"]:
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, PYPRUNE_ISA=isa)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [isa, "ok"]


def test_unknown_isa_cap_raises_at_import():
    env = dict(os.environ, PYPRUNE_ISA="avx1024")
    cmd = [sys.executable, "-c", "import pyprune"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ValueError: environment variable PYPRUNE_ISA must be one of baseline, avx2, avx512" in out.stderr


def sysfs_last_level_cache() -> int:
    """The size of cpu0's highest cache level from sysfs, in bytes (0 without sysfs)."""
    top, size = 0, 0
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level = int(open(f"{d}/level").read())
            text = open(f"{d}/size").read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if level > top:
            top, size = level, int(text.rstrip("KMG")) * scale
    return size


@pytest.mark.skipif(not pyprune._extension.HAS_CPP, reason="pyprune._C is not built")
def test_last_level_cache_size_is_read_from_sysfs():
    got = pyprune._extension.cpu_features()["last_level_cache_bytes"]
    assert got == sysfs_last_level_cache()
    assert got == 0 or got >= 1 << 16
