"""pyprune::_conv2d_weight_sampled (the weight gradient of a conv at given entries only) on the CPU: the C++
kernel when built, else the reference, against ATen's dense weight gradient in float64."""

from __future__ import annotations

import pytest
import torch

from pyprune.ops.csr_conv2d import entry_order
from pyprune.reference import _conv2d_weight_sampled_ref

from .test_csr_conv2d import CASES

OP = torch.ops.pyprune._conv2d_weight_sampled


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _case(case, density, seed=0, dtype=torch.float32):
    """x, grad, the entries (rows, cols) of about ``density`` of the tap-major weight, and the conv args."""
    cin, cout, k, s, p, d, hw, n = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=gen, dtype=dtype)
    oh = (hw[0] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (hw[1] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    grad = torch.randn(n, cout, oh, ow, generator=gen, dtype=dtype)
    rows, cols = (torch.rand(cout, k[0] * k[1] * cin, generator=gen) < density).nonzero(as_tuple=True)
    return x, grad, rows, cols, list(k), s, p, d


def _want(x, grad, rows, cols, *conv):
    return _conv2d_weight_sampled_ref(x.double(), grad.double(), rows, cols, *conv)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_dense_weight_gradient(case, density, channels_last):
    # image blocks (several images per dot: 70 channels @7x7 in one block of 5 images), stride phases'
    # planes, channels_last x and grad staged through their strides
    x, grad, rows, cols, *conv = _case(case, density)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    got = OP(x, grad, rows, cols, *conv)
    want = _want(x, grad, rows, cols, *conv)
    assert got.shape == rows.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_runs_in_chunks(channels_last):
    # one image's planes past 1 MiB (64 channels of 66x66 padded planes): its runs go in two chunks
    x, grad, rows, cols, *conv = _case((64, 8, (3, 3), 1, 1, 1, (64, 64), 2), 0.05)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    want = _want(x, grad, rows, cols, *conv)
    torch.testing.assert_close(OP(x, grad, rows, cols, *conv).double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_rows_with_the_same_columns(channels_last):
    # 4x3 blocks over 10 rows: rows 0-7 go four at a time with their columns (3 of each block, 4 at a time and
    # a tail), rows 8-9 one by one
    x, grad, _, _, *conv = _case((16, 10, (3, 3), 1, 1, 1, (9, 9), 2), 0.0)
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(3, 48, generator=gen) < 0.4
    mask = keep.repeat_interleave(4, 0).repeat_interleave(3, 1)[:10]
    rows, cols = mask.nonzero(as_tuple=True)
    perm = entry_order(rows, cols, 9, 16)
    rows, cols = rows[perm], cols[perm]
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    want = _want(x, grad, rows, cols, *conv)
    got = OP(x, grad, rows, cols, *conv)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    shuffled = torch.randperm(rows.numel(), generator=gen)  # the same entries in another order
    torch.testing.assert_close(OP(x, grad, rows[shuffled], cols[shuffled], *conv), got[shuffled], rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_entry_order_gives_the_same_values():
    # entries in (row, channel, tap) order take the kernel's no-sort path; any other order is sorted inside
    x, grad, rows, cols, *conv = _case(CASES[4], 0.3)
    perm = entry_order(rows, cols, conv[0][0] * conv[0][1], x.shape[1])
    assert not torch.equal(perm, torch.arange(perm.numel()))
    shuffled = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(3))
    base = OP(x, grad, rows, cols, *conv)
    torch.testing.assert_close(OP(x, grad, rows[perm], cols[perm], *conv), base[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(OP(x, grad, rows[shuffled], cols[shuffled], *conv), base[shuffled], rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_non_finite_input_matches_aten():
    # the kernel's dropped columns multiply x by exact zeros, which an inf would turn into NaN where ATen's
    # gradient is finite: such an x takes the dense gradient
    x, grad, rows, cols, *conv = _case(CASES[4], 1.0)
    x[0, 3, 2, 8] = float("inf")
    got = OP(x, grad, rows, cols, *conv)
    want = _conv2d_weight_sampled_ref(x, grad, rows, cols, *conv)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert finite.any() and not finite.all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    x, grad, rows, cols, *conv = _case(CASES[4], 0.3, dtype=dtype)
    got = OP(x, grad, rows, cols, *conv)
    assert got.dtype == dtype
    want = _want(x, grad, rows, cols, *conv)
    naive = _conv2d_weight_sampled_ref(x, grad, rows, cols, *conv).double()
    assert (got.double() - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-9


def test_empty():
    x, grad, rows, cols, *conv = _case(CASES[4], 0.3)
    assert OP(x, grad, rows[:0], cols[:0], *conv).shape == (0,)
    got = OP(x[:0], grad[:0], rows, cols, *conv)
    assert got.shape == rows.shape and not got.any()


def test_opcheck():
    torch.library.opcheck(OP, _case(CASES[5], 0.3))


BAD = [
    (lambda a: a.__setitem__(2, a[2].int()), TypeError, "'rows' must be Long"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "'cols' must be 1-D with one entry per row index"),
    (lambda a: a.__setitem__(2, a[2] + 100), ValueError, r"'rows' must hold output channels in \[0, 32\)"),
    (lambda a: a.__setitem__(3, -a[3] - 1), ValueError, r"'cols' must hold tap-major columns in \[0, 144\)"),
    (lambda a: a.__setitem__(1, a[1][:, :, :-1]), ValueError, "'grad' must have shape"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "'grad' must be Float"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "'x' must be 4-D"),
]


@pytest.mark.parametrize("change, exc, match", BAD)
def test_bad_input_names_the_argument(change, exc, match):
    args = list(_case(CASES[4], 0.3))
    change(args)
    with pytest.raises(exc, match=match):
        OP(*args)
