"""pyprune::max_pool2d against F.max_pool2d: bit for bit (a max pool makes no rounding), in both memory
formats, with NaN and infinities, gradients, opcheck, torch.compile and bad input."""

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.ops import max_pool2d
from pyprune.ops.max_pool2d import max_pool2d_checked_ref

OP = torch.ops.pyprune.max_pool2d.default

# (N, C, H, W, kernel, stride, padding): ResNet's stem pool (3x3 s2 p1) on even and odd maps, VGG's 2x2 s2, a
# non-square window with one-sided padding, stride 1, stride larger than the kernel, a 1x1 window, a window as
# large as the padded map, one channel, 17 channels (a partial vector in channels_last)
CASES = [
    (2, 8, 16, 16, (3, 3), (2, 2), (1, 1)),
    (1, 5, 15, 13, (3, 3), (2, 2), (1, 1)),
    (3, 6, 14, 14, (2, 2), (2, 2), (0, 0)),
    (2, 4, 11, 9, (3, 2), (1, 1), (1, 0)),
    (1, 3, 10, 12, (2, 3), (3, 2), (0, 1)),
    (2, 7, 9, 9, (1, 1), (1, 1), (0, 0)),
    (1, 2, 5, 6, (7, 8), (1, 1), (1, 1)),
    (1, 1, 8, 8, (3, 3), (1, 2), (1, 1)),
    (2, 17, 7, 7, (3, 3), (2, 2), (1, 1)),
    (1, 64, 112, 112, (3, 3), (2, 2), (1, 1)),
]


def _fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"_k{c[4]}_s{c[5]}_p{c[6]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_f_max_pool2d_bit_for_bit(case, channels_last):
    n, c, h, w, k, s, p = case
    x = torch.randn(n, c, h, w).contiguous(memory_format=_fmt(channels_last))
    y = max_pool2d(x, k, s, p)
    want = F.max_pool2d(x, k, s, p)
    assert y.shape == want.shape
    assert torch.equal(y, want)
    if c > 1 and y.shape[2] * y.shape[3] > 1:  # (otherwise both layouts are the same)
        assert y.is_contiguous(memory_format=_fmt(channels_last))


def nan_inf_input(channels_last: bool) -> torch.Tensor:
    """(2, 20, 11, 13) with two NaNs, a row of -inf in every channel, a +inf and a plane of -inf (channel 9 of
    image 1). Pooled 3x3 stride 2 padding 1: NaN wins in 2 + 1 windows ((4, 5) lies in those of output row 2,
    columns 2 and 3; (0, 0) in one), -inf never beats a number, +inf always does, the -inf plane stays
    -inf."""
    x = torch.randn(2, 20, 11, 13)
    x[0, 3, 4, 5] = float("nan")
    x[1, 17, 0, 0] = float("nan")
    x[0, :, 7, :] = float("-inf")
    x[1, 5, 10, 12] = float("inf")
    x[1, 9] = float("-inf")
    return x.contiguous(memory_format=_fmt(channels_last))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_nan_wins_and_infinities_order_like_f_max_pool2d(channels_last):
    x = nan_inf_input(channels_last)
    y = max_pool2d(x, 3, 2, 1)
    assert y.isnan().sum() == 2 + 1
    torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1), equal_nan=True, rtol=0, atol=0)
    assert (y[1, 9] == float("-inf")).all()


def test_stride_defaults_to_the_kernel():
    x = torch.randn(2, 3, 12, 10)
    assert torch.equal(max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert torch.equal(max_pool2d(x, (3, 2), padding=(1, 0)), F.max_pool2d(x, (3, 2), padding=(1, 0)))


def test_non_contiguous_input():
    base = torch.randn(2, 12, 20, 18)
    for x in (base[:, ::2], base[..., 1:17], base.transpose(2, 3)):
        assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))


def test_empty_batch_and_channels():
    x = torch.randn(0, 4, 9, 9)
    assert max_pool2d(x, 3, 2, 1).shape == F.max_pool2d(x, 3, 2, 1).shape == (0, 4, 5, 5)
    # (ATen's pool rejects zero channels; an empty output is what the shapes say)
    assert max_pool2d(torch.randn(2, 0, 9, 9), 3, 2, 1).shape == (2, 0, 5, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_take_aten(dtype):
    x = torch.randn(2, 5, 9, 9).to(dtype)
    y = max_pool2d(x, 3, 2, 1)
    assert y.dtype == dtype
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))


def test_gradient_matches_f_max_pool2d():
    # ties (a constant region) send the gradient where ATen's indices point, as F.max_pool2d's does
    x0 = torch.randn(2, 6, 10, 9)
    x0[0, 2, 2:6, 2:6] = 1.5
    for cl in (False, True):
        x = x0.contiguous(memory_format=_fmt(cl)).requires_grad_()
        y = max_pool2d(x, 3, 2, 1)
        gy = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, x, gy)
        x2 = x.detach().clone().requires_grad_()
        (want,) = torch.autograd.grad(F.max_pool2d(x2, 3, 2, 1), x2, gy)
        assert torch.equal(got, want)


def test_gradcheck_float64_and_opcheck():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: max_pool2d(x, (3, 2), (2, 1), (1, 1)), (x,))
    for cl in (False, True):
        x = torch.randn(2, 5, 9, 8).contiguous(memory_format=_fmt(cl))
        torch.library.opcheck(OP, (x, [3, 3], [2, 2], [1, 1]))


def test_compiles_fullgraph():
    x = torch.randn(2, 4, 15, 15)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: max_pool2d(x, 3, 2, 1).relu(), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), F.max_pool2d(x, 3, 2, 1).relu())


@pytest.mark.parametrize(
    "x_shape, k, s, p, match",
    [
        ((4, 9, 9), [3, 3], [2, 2], [1, 1], "'x' must be 4-D"),
        ((1, 2, 9, 9), [0, 3], [2, 2], [0, 0], "'kernel_size' must be two ints >= 1"),
        ((1, 2, 9, 9), [3, 3], [2, 0], [0, 0], "'stride' must be two ints >= 1"),
        ((1, 2, 9, 9), [3, 3], [2, 2], [2, 1], "'padding' must be two ints in \\[0, kernel_size / 2\\]"),
        ((1, 2, 9, 9), [3, 3], [2, 2], [-1, 0], "'padding' must be two ints in \\[0, kernel_size / 2\\]"),
        ((1, 2, 4, 9), [7, 3], [1, 1], [1, 1], "'x' is too small for the window: 4 x 9"),
    ],
)
def test_bad_input_names_the_argument(x_shape, k, s, p, match):
    x = torch.randn(x_shape)
    with pytest.raises(ValueError, match=match):
        OP(x, k, s, p)
    with pytest.raises(ValueError, match=match):  # the checks of the fake and the CUDA route
        max_pool2d_checked_ref(x, k, s, p)


def test_bad_window_types_name_the_argument():
    x = torch.randn(1, 2, 9, 9)
    with pytest.raises(ValueError, match="max_pool2d: argument 'kernel_size' must be an int or a pair"):
        max_pool2d(x, (3, 3, 3))
    with pytest.raises(ValueError, match="max_pool2d: argument 'padding' must be an int or a pair"):
        max_pool2d(x, 3, 2, 1.5)


@pytest.mark.skipif(not pyprune._extension.HAS_CPP, reason="pyprune._C is not built")
def test_runs_the_cpp_kernel():
    x = torch.randn(1, 4, 9, 9)
    with torch.profiler.profile() as prof:
        max_pool2d(x, 3, 2, 1)
    names = {e.name for e in prof.events()}
    assert "pyprune::max_pool2d" in names
    assert not any(n.startswith("aten::max_pool2d") for n in names)
