"""pyprune::sparse24_conv2d on the CPU (the C++ kernel when built, else the reference) against the float64
spec, and SparseConv2d's 2:4 layout on top of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn.sparse_conv2d import tap_major
from pyprune.ops import sparse24_conv2d
from pyprune.ops.sparse24_conv2d import _sparse24_conv2d_im2col, dense_weight, sparse24_conv2d_checked_ref
from pyprune.reference import sparse24_conv2d_ref
from pyprune.sparse import Sparse24
from pyprune.sparse.select import nm_mask

from .triton_interp import set_arg

OP = torch.ops.pyprune.sparse24_conv2d

# (C_in, C_out, (kh, kw), stride, padding, dilation, (H, W), batch). C_in a multiple of 8 takes the
# implicit GEMM (a group pair of 8 inputs in one tap): 3x3 padded, strided, dilated and asymmetric, 1x1 with
# padding, 24 outputs (a partial 16-output vector), batches past a register tile of 8 pixels; other C_in (12:
# pairs across taps, K = 108 padded to 112) take the dense fallback.
CASES = [
    (16, 24, (3, 3), 1, 1, 1, (9, 9), 2),
    (8, 5, (3, 3), 2, 1, 1, (10, 11), 3),
    (32, 17, (3, 5), (2, 1), (1, 2), (1, 2), (11, 13), 2),
    (24, 40, (1, 1), 1, 1, 1, (6, 7), 2),
    (64, 33, (3, 3), 1, 2, 2, (7, 7), 1),
    (12, 8, (3, 3), 1, 1, 1, (7, 6), 2),
]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _case(case, bias=True, dtype=torch.float32, seed=0):
    """A 2:4 weight (the two largest of every 4 consecutive tap-major inputs kept) and its dense form."""
    cin, cout, k, s, p, d, hw, n = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *k, generator=gen, dtype=dtype)
    wt = tap_major(w)
    wt = wt * nm_mask(wt, 2, 4)
    s24 = Sparse24.from_dense(wt)
    x = torch.randn(n, cin, *hw, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype) if bias else None
    args = (x, s24.values, s24.meta, cout, list(k), b, _pair(s), _pair(p), _pair(d))
    return args, wt.reshape(cout, *k, cin).permute(0, 3, 1, 2)


def _double(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_and_dense_conv(case, channels_last, bias):
    args, w = _case(case, bias=bias)
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    y = OP(*args)
    want = sparse24_conv2d_ref(*_double(args))
    assert y.shape == want.shape
    cl = channels_last and not args[0].is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    x, b, stride, padding, dilation = args[0], args[5], args[6], args[7], args[8]
    dense = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    torch.testing.assert_close(want, dense)


def test_reference_hand_computed():
    # 8 input channels, a 1x1 kernel, 1 output keeping inputs 1 (weight 2) and 6 (weight -1) of its two groups
    x = torch.arange(8.0).view(1, 8, 1, 1)
    values = torch.tensor([[0.0], [2.0], [0.0], [-1.0]])  # group 0 keeps positions (0, 1), group 1 (0, 2)
    meta = torch.tensor([[0 | 1 << 2 | 0 << 4 | 2 << 6]], dtype=torch.uint8)
    y = sparse24_conv2d_ref(x, values, meta, 1, [1, 1], torch.tensor([0.5]), [1, 1], [0, 0], [1, 1])
    assert y.flatten().tolist() == [2 * 1 - 1 * 6 + 0.5]
    got = OP(x, values, meta, 1, [1, 1], torch.tensor([0.5]), [1, 1], [0, 0], [1, 1])
    assert got.tolist() == y.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    args, _ = _case(CASES[0], dtype=dtype)
    y = OP(*args)
    assert y.dtype == dtype
    want = sparse24_conv2d_ref(*_double(args))
    naive = sparse24_conv2d_ref(*args).double()
    assert (y.double() - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-12


def test_empty_and_noncontiguous_inputs():
    args, _ = _case(CASES[0])
    x = args[0]
    assert OP(x[:0], *args[1:]).shape == (0, 24, 9, 9)
    for xs in (x.transpose(2, 3).contiguous().transpose(2, 3), torch.randn(2, 32, 9, 9)[:, ::2]):
        want = sparse24_conv2d_ref(xs, *args[1:])
        torch.testing.assert_close(OP(xs, *args[1:]), want, rtol=1e-4, atol=1e-4)
    no_out = (x, args[1][:, :0], args[2][:, :0], 0, args[4], None, *args[6:])
    assert OP(*no_out).shape == (2, 0, 9, 9)


def test_public_function_defaults():
    args, w = _case(CASES[0], bias=False)
    y = sparse24_conv2d(args[0], args[1], args[2], 24, 3, padding=1)
    torch.testing.assert_close(y, F.conv2d(args[0], w, padding=1), rtol=1e-4, atol=1e-4)


def test_dense_weight_is_the_stored_weight():
    args, w = _case(CASES[2])
    torch.testing.assert_close(dense_weight(args[1], args[2], 17, [3, 5], 32), w)


def test_gradients_match_reference_autograd():
    args, _ = _case(CASES[1])

    def grads(fn, a):
        a = list(a)
        for i in (0, 1, 5):  # x, values, bias
            a[i] = a[i].detach().clone().requires_grad_()
        fn(*a).square().sum().backward()
        return [a[i].grad for i in (0, 1, 5)]

    got, want = grads(OP, args), grads(sparse24_conv2d_ref, _double(args))
    for g, wg in zip(got, want):
        torch.testing.assert_close(g.double(), wg, rtol=1e-5, atol=1e-6 * float(wg.abs().max()))
    assert got[1].shape == args[1].shape


def test_gradcheck_float64():
    args, _ = _case((8, 4, (3, 2), 2, 1, (1, 2), (6, 7), 2), dtype=torch.float64)
    x, v, b = args[0].requires_grad_(), args[1].requires_grad_(), args[5].requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: OP(x, v, args[2], *args[3:5], b, *args[6:]), (x, v, b))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    args, _ = _case(CASES[1])
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    torch.library.opcheck(OP, args)


def test_im2col_backend_matches():
    # the CUDA router's first backend (patches through F.unfold, then sparse24_linear), run here on the CPU
    for channels_last in (False, True):
        args, _ = _case(CASES[2])
        if channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        y = _sparse24_conv2d_im2col(*args)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, sparse24_conv2d_ref(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c_in, op", [(16, "sparse24_conv2d"), (12, "sparse24_linear")])
def test_module_uses_it_and_compiles(c_in, op):
    # kxk convs whose group pairs lie in one tap (C_in % 8 == 0) take the op; others build the patch matrix
    conv = torch.nn.Conv2d(c_in, 24, 3, stride=2, padding=1)
    m = pyprune.nn.SparseConv2d.from_dense(conv, sparsity=0.5, layout="2:4")
    x = torch.randn(2, c_in, 11, 11)
    assert m.kernel_op(x) == op
    with torch.profiler.profile() as prof:
        y = m(x)
    assert any(e.name == f"pyprune::{op}" for e in prof.events())
    torch.testing.assert_close(y, m.to_dense()(x), rtol=1e-4, atol=1e-4)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), y)
    # 1x1 unpadded convs stay on sparse24_linear
    pw = pyprune.nn.SparseConv2d.from_dense(torch.nn.Conv2d(16, 8, 1), sparsity=0.5, layout="2:4")
    assert pw.kernel_op(torch.randn(1, 16, 4, 4)) == "sparse24_linear"


def _bad(change):
    args, _ = _case(CASES[0])
    args = list(args)
    change(args)
    return args


BAD = [
    (set_arg(0, lambda a: a[0][0]), ValueError, "'x' must be 4-D"),
    (set_arg(1, lambda a: a[1].double()), TypeError, "'values' must be"),
    (set_arg(2, lambda a: a[2].int()), TypeError, "'meta' must be"),
    (set_arg(1, lambda a: a[1][:-1]), ValueError, "'values' must have shape"),
    (set_arg(2, lambda a: a[2][:, :-1]), ValueError, "'meta' must have shape"),
    (set_arg(4, [0, 3]), ValueError, "'kernel_size' must be"),
    (set_arg(4, [1, 1]), ValueError, "'values' must have shape"),
    (set_arg(6, [1, 0]), ValueError, "'stride' must be"),
    (set_arg(7, [-1, 1]), ValueError, "'padding' must be"),
    (set_arg(8, [1, 0]), ValueError, "'dilation' must be"),
    (set_arg(5, lambda a: torch.zeros(3)), ValueError, "'bias' must"),
    (set_arg(4, [12, 3]), ValueError, "'x' has spatial size"),
    (set_arg(3, -1), ValueError, "'out_channels' must be >= 0"),
]


@pytest.mark.parametrize("change, exc, match", BAD)
def test_bad_input_names_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        OP(*_bad(change))


@pytest.mark.parametrize("change, exc, match", BAD)
def test_checked_reference_names_the_argument(change, exc, match):
    # what the CPU runs without pyprune._C, and the CUDA router's last resort
    with pytest.raises(exc, match=match):
        sparse24_conv2d_checked_ref(*_bad(change))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_router_matches_float64(dtype, channels_last):
    # on CUDA the router's im2col backend: F.unfold, then sparse24_linear on its own GPU route
    args, _ = _case((32, 48, (3, 3), 2, 1, 1, (15, 15), 2), dtype=dtype)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    if channels_last:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    y = OP(*args)
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    want = sparse24_conv2d_ref(*_double(cpu))
    naive = sparse24_conv2d_ref(*cpu).double()
    assert y.dtype == dtype and y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    err = (y.cpu().double() - want).abs().max().item()
    assert err <= max(2 * (naive - want).abs().max().item(), 1e-3 * want.abs().max().item()), err
