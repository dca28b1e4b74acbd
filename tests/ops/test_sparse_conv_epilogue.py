"""The fused epilogue of pyprune::csr_conv2d and pyprune::bsr_conv2d: relu?(conv + bias + residual) (capped at
relu_max when given), applied
in the C++ kernels' stores (every store path: NCHW row tiles, tiles whose pixels span images, channels_last
groups of 16 rows and their partial groups), in their dense fallback (other dtypes) and in their empty-weight
paths; against the float64 spec of F.conv2d, the add and F.relu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune.ops.bsr_conv2d import bsr_conv2d_checked_ref
from pyprune.ops.csr_conv2d import csr_conv2d_checked_ref

from . import test_bsr_conv2d as bsr_tests
from . import test_csr_conv2d as csr_tests

OPS = {"csr": torch.ops.pyprune.csr_conv2d, "bsr": torch.ops.pyprune.bsr_conv2d}
TESTS = {"csr": csr_tests, "bsr": bsr_tests}
REFS = {"csr": csr_conv2d_checked_ref, "bsr": bsr_conv2d_checked_ref}


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _spec(args, w, relu, residual, relu_max=None):
    """float64 F.conv2d of the case, plus the residual, then the ReLU (capped at relu_max)."""
    x, b, stride, padding, dilation = args[0], args[6], args[7], args[8], args[9]
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    if residual is not None:
        y = y + residual.double()
    y = y.relu() if relu else y
    return y.clamp_max(relu_max) if relu_max is not None else y


def _with_epilogue(args, relu, residual, relu_max=None):
    return (*args[:10], relu, residual, relu_max)


def _residual_for(op, args, channels_last, seed=1):
    shape = op(*args).shape
    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=args[0].dtype)
    return _cl(r) if channels_last else r


def _params():
    for layout in ("csr", "bsr"):
        for i, case in enumerate(TESTS[layout].CASES):
            yield pytest.param(layout, case, id=f"{layout}-{i}")


@pytest.mark.parametrize("layout, case", list(_params()))
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_epilogue_matches_spec(layout, case, sparsity, channels_last):
    op = OPS[layout]
    args, w = TESTS[layout]._case(case, sparsity)
    if channels_last:
        args = (_cl(args[0]), *args[1:])
    res = _residual_for(op, args, channels_last)
    # a cap of 1 clips a good share of most cases' outputs (ReLU6's path, with a cap the values reach)
    for relu, residual, cap in ((True, None, None), (False, res, None), (True, res, None), (True, res, 1.0),
                                (True, None, 1.0)):  # fmt: skip
        y = op(*_with_epilogue(args, relu, residual, cap))
        want = _spec(args, w, relu, residual, cap)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
        assert y.stride() == op(*args).stride()  # the output's layout does not change
        if relu:
            assert (y >= 0).all()
        if cap is not None:
            assert y.max() <= cap


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_residual_in_another_layout_or_strided(layout):
    op = OPS[layout]
    args, w = TESTS[layout]._case(TESTS[layout].CASES[0], 0.5)
    for channels_last in (False, True):
        a = (_cl(args[0]), *args[1:]) if channels_last else args
        shape = op(*a).shape
        for res in (_cl(torch.randn(shape)) if not channels_last else torch.randn(shape),
                    torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2]):  # fmt: skip
            y = op(*_with_epilogue(a, True, res))
            torch.testing.assert_close(y.double(), _spec(a, w, True, res), rtol=1e-4, atol=1e-4)


def test_csr_tiles_spanning_images_and_48_pixel_tiles():
    # 70->20 1x1 on 7x7 batch 5: NCHW tiles hold pixels of two images (a store per image); 200->20 1x1 on
    # 15x13 at 90% channels_last: 48-pixel tiles with a 3-pixel tail
    for case, channels_last in (((70, 20, (1, 1), 1, 0, 1, (7, 7), 5), False),
                                ((200, 20, (1, 1), 1, 0, 1, (15, 13), 2), True)):  # fmt: skip
        args, w = csr_tests._case(case, 0.9)
        if channels_last:
            args = (_cl(args[0]), *args[1:])
        res = _residual_for(OPS["csr"], args, channels_last)
        for cap in (None, 1.0):
            y = OPS["csr"](*_with_epilogue(args, True, res, cap))
            torch.testing.assert_close(y.double(), _spec(args, w, True, res, cap), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_take_the_epilogue_too(layout, dtype):
    op = OPS[layout]
    args, w = TESTS[layout]._case(TESTS[layout].CASES[1], 0.5, dtype=dtype)
    res = _residual_for(op, args, False)
    y = op(*_with_epilogue(args, True, res, 2.0))
    assert y.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 0.1 * float(_spec(args, w, False, res).abs().max())
    torch.testing.assert_close(y.double(), _spec(args, w, True, res, 2.0), rtol=0, atol=tol)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_empty_weight_gives_relu_of_bias_plus_residual(layout):
    op = OPS[layout]
    args, _ = TESTS[layout]._case(TESTS[layout].CASES[0], 1.0)  # every entry (block) pruned
    assert args[3].numel() == 0
    res = _residual_for(op, args, False)
    y = op(*_with_epilogue(args, True, res, 0.5))
    torch.testing.assert_close(y, (args[6].view(1, -1, 1, 1) + res).clamp(0, 0.5))


def test_nan_passes_the_relu():
    args, _ = csr_tests._case(csr_tests.CASES[1], 0.5)
    res = _residual_for(OPS["csr"], args, False)
    res[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = OPS["csr"](*_with_epilogue(args, True, res))
    assert y[0, 0, 0, 0].isnan() and y[0, 0, 0, 1] == float("inf") and y[0, 0, 0, 2] == 0


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_gradients_through_the_relu_and_the_residual(layout):
    case = TESTS[layout].CASES[0]
    args, _ = TESTS[layout]._case(case, 0.5, dtype=torch.float64)
    res = _residual_for(OPS[layout], args, False, seed=3)
    x, v, b = args[0].requires_grad_(), args[3].requires_grad_(), args[6].requires_grad_()
    r = res.requires_grad_()

    for cap in (None, 2.0):

        def fn(x, v, b, r):
            return OPS[layout](x, args[1], args[2], v, *args[4:6], b, *args[7:10], True, r, cap)

        assert torch.autograd.gradcheck(fn, (x, v, b, r))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_fp32_gradients_match_the_unfused_ops(layout):
    op = OPS[layout]
    args, _ = TESTS[layout]._case(TESTS[layout].CASES[4], 0.5)
    res = _residual_for(op, args, False, seed=2)

    def grads(fused):
        x, v, r = (t.detach().clone().requires_grad_() for t in (args[0], args[3], res))
        a = (x, *args[1:3], v, *args[4:10])
        y = op(*a, True, r, 1.5) if fused else F.relu6(4 * (op(*a) + r)) / 4  # capped at 1.5 both ways
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return x.grad, v.grad, r.grad

    for got, want in zip(grads(True), grads(False)):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(layout, channels_last):
    args, _ = TESTS[layout]._case(TESTS[layout].CASES[6], 0.5)
    if channels_last:
        args = (_cl(args[0]), *args[1:])
    res = _residual_for(OPS[layout], args, channels_last)
    torch.library.opcheck(OPS[layout], _with_epilogue(args, True, res, 6.0))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("checked_ref", [False, True], ids=["kernel", "checked-reference"])
def test_bad_residual_names_the_argument(layout, checked_ref):
    fn = REFS[layout] if checked_ref else OPS[layout]
    args, _ = TESTS[layout]._case(TESTS[layout].CASES[0], 0.5)
    shape = OPS[layout](*args).shape
    for res in (torch.randn(shape[0], shape[1] + 1, *shape[2:]), torch.randn(shape, dtype=torch.float64),
                torch.randn(shape[1:])):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match="residual"):
            fn(*_with_epilogue(args, False, res))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_relu_must_be_a_bool_and_its_cap_positive_with_it(layout):
    args, _ = TESTS[layout]._case(TESTS[layout].CASES[0], 0.5)
    with pytest.raises(TypeError, match="'relu' must be a bool"):
        REFS[layout](*_with_epilogue(args, 1, None))
    for fn in (REFS[layout], OPS[layout]):  # the checked reference and the kernel
        for relu, cap in ((False, 6.0), (True, 0.0), (True, -1.0)):
            with pytest.raises(ValueError, match="relu_max"):
                fn(*_with_epilogue(args, relu, None, cap))
