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
from pyprune import reference
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


# (C_in, C_out, (kh, kw), stride, padding, dilation, (H, W), batch) on the kernel's input and store paths: x
# read in place (channels_last, unpadded: 1x1 and strided 3x3) or staged (NCHW rows of whole 16 x 16 blocks
# and their tails); NCHW outputs of whole 16 x 16 blocks, planes that end inside a 64-pixel token block (17 x
# 19 pixels, 3 images) and a partial 16-output vector (40 outputs).
EPILOGUE_CASES = [
    (32, 48, (3, 3), 1, 1, 1, (17, 19), 3),
    (40, 40, (1, 1), 1, 0, 1, (16, 20), 2),
    (16, 32, (3, 3), 2, 0, 1, (23, 21), 2),
    (48, 16, (1, 1), 2, 0, 1, (9, 9), 2),
]


@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_epilogue_matches_spec(case, channels_last):
    args, w = _case(case)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = (args[0].contiguous(memory_format=fmt), *args[1:])
    x, b, stride, padding, dilation = args[0], args[5], args[6], args[7], args[8]
    conv = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    res = torch.randn(conv.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    # a cap of 1 clips a good share of the outputs (ReLU6's path, with a cap the values reach)
    epilogues = [(False, None, None), (True, None, None), (False, res, None), (True, res, None),
                 (True, res, 1.0), (True, None, 1.0)]  # fmt: skip
    for relu, residual, cap in epilogues:
        y = OP(*args, relu, residual, cap)
        want = conv + residual.double() if residual is not None else conv
        want = want.relu() if relu else want
        want = want.clamp_max(cap) if cap is not None else want
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
        assert y.is_contiguous(memory_format=fmt)
        if relu:
            assert (y >= 0).all() and (y > 0).any()
        if cap is not None:
            assert y.max() == cap
    # a residual in the other layout, or strided, is read as it lies
    other = res.contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)
    for r in (other, torch.stack([res, res], -1)[..., 0]):
        got = OP(*args, True, r).double()
        torch.testing.assert_close(got, (conv + res.double()).relu(), rtol=1e-4, atol=1e-4)


def test_epilogue_keeps_nan_and_fallback_paths():
    args, _ = _case(CASES[0])
    x = args[0].clone()
    x[0, :, 4, 4] = float("nan")  # every output that reads pixel (4, 4) of image 0 is NaN
    y = OP(x, *args[1:], True, None, 6.0)
    assert y[0, :, 4, 4].isnan().all() and not y[1].isnan().any()
    # the dense fallbacks (C_in not a multiple of 8; float64) and an empty weight apply the epilogue too
    for a in (_case(CASES[5])[0], _case(CASES[0], dtype=torch.float64)[0]):
        res = torch.randn(OP(*a).shape, dtype=a[0].dtype)
        want = (sparse24_conv2d_ref(*_double(a)) + res.double()).relu()
        torch.testing.assert_close(OP(*a, True, res).double(), want, rtol=1e-4, atol=1e-4)
    empty = (x[:, :0], args[1][:0], args[2][:0], 24, [3, 3], args[5], *args[6:])
    res = torch.randn(2, 24, 9, 9)
    torch.testing.assert_close(OP(*empty, True, res), (args[5].view(1, -1, 1, 1) + res).relu())


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
    # with the epilogue: the residual's gradient, and the ReLU's and its cap's masks
    r = torch.randn(OP(*args).shape, dtype=torch.float64, requires_grad=True)
    for cap in (None, 1.0):
        fn = lambda x, v, b, r: OP(x, v, args[2], *args[3:5], b, *args[6:], True, r, cap)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, v, b, r))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    args, _ = _case(CASES[1])
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    torch.library.opcheck(OP, args)
    res = torch.randn(OP(*args).shape).contiguous(memory_format=reference._memory_format(args[0]))
    torch.library.opcheck(OP, (*args, True, res.requires_grad_(), 6.0))


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
        res = torch.randn(y.shape)
        got = _sparse24_conv2d_im2col(*args, True, res, 1.0)
        torch.testing.assert_close(got, (y + res).clamp(0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c_in, op", [(16, "sparse24_conv2d"), (12, "sparse24_linear")])
def test_module_uses_it_and_compiles(c_in, op):
    # convs whose group pairs lie in one tap (C_in % 8 == 0) take the op; others build the patch matrix
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
    # unpadded 1x1 convs too (channels_last x read in place), but for C_in not a multiple of 8
    for cin, op in ((16, "sparse24_conv2d"), (12, "sparse24_linear")):
        pw = pyprune.nn.SparseConv2d.from_dense(torch.nn.Conv2d(cin, 8, 1), sparsity=0.5, layout="2:4")
        assert pw.kernel_op(torch.randn(1, cin, 4, 4)) == op


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
    (lambda a: a.extend([True, torch.zeros(2, 24, 9, 8)]), ValueError, "'residual' must"),
    (lambda a: a.extend([False, None, 6.0]), ValueError, "'relu_max' must"),
    (lambda a: a.extend([True, None, -1.0]), ValueError, "'relu_max' must"),
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
