"""pyprune::csr_conv2d on the CPU (the C++ kernel when built, else the reference) against the float64 spec."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune import reference
from pyprune._extension import HAS_CPP
from pyprune.nn.sparse_conv2d import tap_major
from pyprune.ops import csr_conv2d
from pyprune.ops.csr_conv2d import (
    csr_conv2d_checked_ref,
    dense_weight,
    input_grad_phases,
    transposed_structure,
    within_density,
)
from pyprune.reference import csr_conv2d_ref
from pyprune.sparse import CSR
from pyprune.sparse.base import compressed_rows

from .triton_interp import set_arg

OP = torch.ops.pyprune.csr_conv2d
# the modules (pyprune.ops.csr_conv2d is the function)
csr_conv2d_module = importlib.import_module("pyprune.ops.csr_conv2d")
bsr_conv2d_module = importlib.import_module("pyprune.ops.bsr_conv2d")

# (C_in, C_out, (kh, kw), stride, padding, dilation, (H, W), batch). Paths of the C++ kernel: a stride-1
# unpadded 1x1 reads x in place when the pixel count is a multiple of 16, else each unit range copies its own
# tiles (7x7: one tile shared by several row parts; 33x35: many tiles, a partial last one); everything else
# reads staged planes, one per stride phase in use (stride 2,
# stride 3 with dilation 2, asymmetric ones), in flat tiles across rows (small maps) or row tiles (wide maps
# where flat tiles would compute more dropped columns: 1x7 at width 40); kernel wider than the map. With
# channels_last input the planes are staged through 16x16 transposes, except for a stride-1 unpadded 1x1
# conv, where each unit range transposes its own tiles (channel and pixel tails included). Copied or
# transposed tiles run flat across images: 7x7 batch 5 and 3x3 batch 9 put two to eight images in one tile
# (NCHW: outputs stored a run per image), and 33x35 has tiles across the image boundary. (The planes staged per
# column shift of taps_aligned need more nonzeros per weight column than these have: see
# test_dense_columns_read_aligned_taps.) 200->20 1x1 on 195 pixels: channels_last at 90% takes 48-pixel
# tiles (4 and a 3-pixel tail), at 50% 64-pixel ones.
CASES = [
    (7, 5, (1, 1), 1, 0, 1, (7, 7), 1),
    (16, 24, (1, 1), 1, 0, 1, (8, 8), 3),
    (64, 33, (1, 1), 1, 0, 1, (56, 56), 1),
    (97, 9, (1, 1), 2, 0, 1, (9, 9), 2),
    (16, 32, (3, 3), 1, 1, 1, (9, 9), 2),
    (33, 17, (3, 3), 2, 1, 1, (13, 13), 3),
    (20, 12, (3, 3), 1, 2, 2, (11, 11), 2),
    (12, 10, (3, 3), 3, 2, 2, (17, 14), 1),
    (8, 8, (5, 5), 1, 2, 1, (40, 40), 1),
    (6, 8, (1, 7), 1, (0, 3), 1, (3, 40), 2),
    (9, 4, (3, 2), (2, 1), (1, 0), (1, 2), (10, 12), 2),
    (5, 6, (7, 7), 1, 3, 1, (4, 5), 1),
    (1, 1, (3, 3), 1, 1, 1, (5, 5), 1),
    (24, 20, (1, 1), 1, 0, 1, (33, 35), 2),
    (70, 20, (1, 1), 1, 0, 1, (7, 7), 5),
    (40, 18, (1, 1), 1, 0, 1, (3, 3), 9),
    (8, 12, (3, 3), 2, 1, 1, (32, 32), 2),
    (200, 20, (1, 1), 1, 0, 1, (15, 13), 1),
]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _case(case, sparsity, bias=True, dtype=torch.float32, seed=0):
    cin, cout, k, s, p, d, hw, n = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *k, generator=gen, dtype=dtype)
    w = w * (torch.rand(w.shape, generator=gen) >= sparsity)
    csr = CSR.from_dense(tap_major(w))
    x = torch.randn(n, cin, *hw, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype) if bias else None
    args = (x, csr.crow_indices, csr.col_indices, csr.values, cout, list(k), b, _pair(s), _pair(p), _pair(d))
    return args, w


def _double(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_reference_and_dense_conv(case, sparsity, channels_last):
    args, w = _case(case, sparsity, bias=sparsity != 0.5)
    if channels_last:  # staged from NHWC through 16x16 transposes; channels_last output
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    y = OP(*args)
    want = csr_conv2d_ref(*_double(args))
    cl = channels_last and not args[0].is_contiguous()  # C == 1 or a 1x1 map: both layouts at once
    assert y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    x, b, stride, padding, dilation = args[0], args[6], args[7], args[8], args[9]
    dense = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    torch.testing.assert_close(want, dense)


def test_reference_hand_computed():
    # 1 input channel, 2x2 image, a 2x2 kernel holding one nonzero at tap (1, 0) and a bias
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    crow, col, val = (
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([2], dtype=torch.int32),
        torch.tensor([5.0]),
    )
    y = csr_conv2d_ref(x, crow, col, val, 1, [2, 2], torch.tensor([1.0]), [1, 1], [0, 0], [1, 1])
    assert y.tolist() == [[[[1.0 + 5 * 3]]]]


def test_grouped_conv_as_block_diagonal():
    conv = torch.nn.Conv2d(8, 12, 3, padding=1, groups=4)
    m = pyprune.nn.SparseConv2d.from_dense(conv, sparsity=0.5)
    x = torch.randn(2, 8, 10, 9)
    w = m.weight
    y = csr_conv2d(x, w.crow_indices, w.col_indices, w.values, 12, 3, m.bias, padding=1)
    torch.testing.assert_close(y, m.to_dense()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    args, _ = _case(CASES[5], 0.5, dtype=dtype)
    y = OP(*args)
    assert y.dtype == dtype
    want = csr_conv2d_ref(*_double(args))
    naive = csr_conv2d_ref(*args).double()
    assert (y.double() - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-12


def test_empty_and_noncontiguous_inputs():
    args, _ = _case(CASES[4], 0.5)
    x = args[0]
    empty = OP(x[:0], *args[1:])
    assert empty.shape == (0, 32, 9, 9)
    for xs in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
               torch.randn(2, 32, 9, 9)[:, ::2]):  # fmt: skip
        got = OP(xs, *args[1:])
        torch.testing.assert_close(got, csr_conv2d_ref(xs, *args[1:]), rtol=1e-4, atol=1e-4)
    no_rows = (x, torch.zeros(1, dtype=torch.int32), args[2][:0], args[3][:0], 0, *args[5:6], None, *args[7:])
    assert OP(*no_rows).shape == (2, 0, 9, 9)


def test_public_function_defaults():
    args, w = _case(CASES[1], 0.5, bias=False)
    x, crow, col, val = args[:4]
    torch.testing.assert_close(csr_conv2d(x, crow, col, val, 24, 1), F.conv2d(x, w), rtol=1e-4, atol=1e-4)


def test_gradients_match_reference_autograd():
    # against float64 autograd of the reference: these gradients reach ~1e3, and two fp32 summation orders
    # differ by ~1e-4 (an atol of 1e-4 against the fp32 reference failed on the baseline ISA path)
    args, _ = _case(CASES[5], 0.5)

    def grads(fn, a):
        a = list(a)
        for i in (0, 3, 6):  # x, values, bias
            a[i] = a[i].detach().clone().requires_grad_()
        fn(*a).square().sum().backward()
        return [a[i].grad for i in (0, 3, 6)]

    for g, want in zip(grads(OP, args), grads(csr_conv2d_ref, _double(args))):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def input_grad_check(op, args, w, channels_last, monkeypatch, sparse_path):
    """x's gradient of op(*args) against F.conv2d's in float64, and whether it went through ATen's dense
    conv2d_input (it must not when ``sparse_path``: the op itself runs on the transposed weight)."""
    x, stride, padding, dilation = args[0], args[7], args[8], args[9]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    y = op(x, *args[1:])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    dense_calls = []
    conv2d_input = torch.nn.grad.conv2d_input
    monkeypatch.setattr(
        torch.nn.grad, "conv2d_input", lambda *a, **k: dense_calls.append(1) or conv2d_input(*a, **k)
    )
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(xd, w.double(), None, stride, padding, dilation), xd, g.double())
    assert gx.shape == x.shape
    torch.testing.assert_close(gx.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
    assert bool(dense_calls) != sparse_path


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("sparsity", [0.8, 0.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_input_grad_through_the_op(case, sparsity, channels_last, monkeypatch):
    # the op on the flipped, transposed weight, phase by phase (input_grad_phases), for 1x1 weights and kxk
    # ones up to 30% density; denser kxk ones take ATen's dense gradient
    args, w = _case(case, sparsity, bias=False)
    sparse = case[2] == (1, 1) or within_density(args[2].numel(), w.numel(), 0.3)
    input_grad_check(OP, args, w, channels_last, monkeypatch, sparse)


def test_input_grad_phases_of_a_strided_3x3():
    # 3x3, stride 2, padding 1: even pixels take the centre tap from output pixel m, odd ones the flipped
    # taps 0 and 2 (original 2 and 0) from output pixels m and m + 1: a 2-tap conv, padded by 1 and read
    # from its second output where the last odd pixel's m + 1 falls past the output (8 wide: 4 odd columns,
    # 4 output columns; 9 high: 4 odd rows, 5 output rows); 2x2 phases in all
    phases = input_grad_phases((3, 3), (2, 2), (1, 1), (1, 1), (9, 8), (5, 4))
    assert [p.start for p in phases] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [p.size for p in phases] == [(5, 4), (5, 4), (4, 4), (4, 4)]
    assert [p.taps for p in phases] == [(4,), (3, 5), (1, 7), (0, 2, 6, 8)]
    assert [p.kernel_size for p in phases] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [p.padding for p in phases] == [(0, 0), (0, 1), (0, 0), (0, 1)]
    assert [p.crop for p in phases] == [(0, 0), (0, 1), (0, 0), (0, 1)]
    # stride 1: one phase, every tap; a 1x1 conv of stride 2 (x 5 wide): its pixel phase and three empty ones
    (p,) = input_grad_phases((3, 5), (1, 1), (1, 2), (2, 1), (6, 6), (4, 6))
    assert p.taps == tuple(range(15)) and p.padding == (3, 2) and p.crop == (0, 0) and p.size == (6, 6)
    phases = input_grad_phases((1, 1), (2, 2), (0, 0), (1, 1), (5, 5), (3, 3))
    assert [p.taps for p in phases] == [(0,), None, None, None]
    # a 1-high map whose one row no tap reaches (padding 1, dilation 2, stride 2: every tap lands on odd rows)
    (p,) = input_grad_phases((2, 1), (2, 1), (1, 0), (2, 1), (1, 3), (1, 3))
    assert p.taps is None and p.size == (1, 3)


def test_input_grad_over_random_geometries(monkeypatch):
    # kernels 1-5, strides 1-4, paddings past the kernel's reach, dilations sharing factors with the stride
    # (phases with no tap), maps smaller than the stride; NCHW and channels_last
    gen = torch.Generator().manual_seed(3)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    done = 0
    while done < 40:
        k, s = (draw(1, 5), draw(1, 4)), (draw(1, 3), draw(1, 4))
        p, d, hw = (draw(0, 4), draw(0, 3)), (draw(1, 3), draw(1, 2)), (draw(1, 12), draw(1, 12))
        if done == 0:  # x's gradient all zeros: no tap reaches its one row
            k, s, p, d, hw = (2, 1), (2, 1), (1, 0), (2, 1), (1, 3)
        if any(n + 2 * pi - di * (ki - 1) < 1 for n, pi, di, ki in zip(hw, p, d, k)):
            continue
        args, w = _case((draw(1, 6), draw(1, 6), k, s, p, d, hw, 2), 0.85, bias=False, seed=done)
        sparse = k == (1, 1) or within_density(args[2].numel(), w.numel(), 0.3)
        input_grad_check(OP, args, w, done % 2 == 1, monkeypatch, sparse)
        monkeypatch.undo()
        done += 1


def values_grad_check(op, args, w, monkeypatch, sampled, sample):
    """The values' gradient of op(*args) against F.conv2d's weight gradient in float64, read by
    ``sample(dense tap-major gradient)``, and whether it went through the sampled kernel (``sampled``) or
    the dense weight gradient (reference.conv2d_weight)."""
    x, stride, padding, dilation = args[0], args[7], args[8], args[9]
    values = args[3].detach().requires_grad_()
    y = op(x, *args[1:3], values, *args[4:])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    dense_calls = []
    conv2d_weight = reference.conv2d_weight
    monkeypatch.setattr(
        reference, "conv2d_weight", lambda *a, **k: dense_calls.append(1) or conv2d_weight(*a, **k)
    )
    (gv,) = torch.autograd.grad(y, values, g)
    wd = w.double().requires_grad_()
    (gw,) = torch.autograd.grad(F.conv2d(x.double(), wd, None, stride, padding, dilation), wd, g.double())
    want = sample(tap_major(gw))
    torch.testing.assert_close(gv.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
    assert bool(dense_calls) != sampled


@pytest.mark.parametrize(
    "case", [CASES[4], CASES[3], CASES[6], CASES[14]], ids=["3x3", "1x1-s2", "dilated", "7x7-batch5"]
)
@pytest.mark.parametrize("sparsity", [0.95, 0.5])
def test_values_grad_sampled_at_low_density(case, sparsity, monkeypatch):
    # at most a tenth of the weight stored: the stored entries alone (_conv2d_weight_sampled); else ATen's
    # dense weight gradient, read at them
    args, w = _case(case, sparsity, bias=False)
    crow, col = args[1], args[2]
    assert within_density(col.numel(), w.numel(), 0.1) == (sparsity == 0.95)

    def sample(gw):
        return gw[compressed_rows(crow, col.numel()), col.long()]

    values_grad_check(OP, args, w, monkeypatch, sparsity == 0.95 and HAS_CPP, sample)


def test_double_backward_through_the_values_gradient():
    # create_graph: the values' gradient is differentiated again, which the sampled op cannot be: ATen's way
    args, w = _case(CASES[4], 0.95, bias=False)
    x = args[0].requires_grad_()
    v = args[3].requires_grad_()
    (gv,) = torch.autograd.grad(OP(x, *args[1:3], v, *args[4:]).square().sum(), v, create_graph=True)
    (gx,) = torch.autograd.grad(gv.square().sum(), x)
    xd, wd = x.detach().double().requires_grad_(), w.double().requires_grad_()
    (gw,) = torch.autograd.grad(F.conv2d(xd, wd, None, *args[7:]).square().sum(), wd, create_graph=True)
    rows = compressed_rows(args[1], args[2].numel())
    (want,) = torch.autograd.grad(tap_major(gw)[rows, args[2].long()].square().sum(), xd)
    torch.testing.assert_close(gx.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_transposed_structure_is_the_flipped_transposed_weight():
    args, w = _case((3, 5, (3, 2), 1, 1, 1, (4, 4), 1), 0.5)
    crow, col, values = args[1:4]
    crow_t, col_t, perm = transposed_structure(compressed_rows(crow, col.numel()), col.long(), 5, 6, 3)
    assert crow_t.dtype == col_t.dtype == torch.int32 and crow_t.shape == (4,)
    got = dense_weight(crow_t, col_t, values[perm], 3, (3, 2), 5)
    torch.testing.assert_close(got, w.flip(2, 3).transpose(0, 1), rtol=0, atol=0)
    for r in range(3):  # columns ascending within each row, as the kernels' structure checks expect
        row = col_t[crow_t[r] : crow_t[r + 1]]
        assert torch.all(row[1:] > row[:-1])


@pytest.mark.parametrize(
    "derived, sparsity, changed",
    [("transposed_structure", 0.8, 2), ("entry_order", 0.95, 1)],
    ids=["input-grad-structure", "sampled-entries"],
)
def test_backward_structures_are_kept_until_the_indices_change(derived, sparsity, changed, monkeypatch):
    # what the backward derives from the weight's structure is made once, and again after an in-place write
    # to an index tensor (col_indices, crow_indices) moves its version counter
    made = []
    make = getattr(csr_conv2d_module, derived)
    monkeypatch.setattr(csr_conv2d_module, derived, lambda *a: made.append(1) or make(*a))
    args, _ = _case(CASES[4], sparsity, bias=False)
    x, v = args[0].requires_grad_(), args[3].requires_grad_()
    for _ in range(2):
        OP(x, *args[1:3], v, *args[4:]).sum().backward()
    assert len(made) == 1
    with torch.no_grad():
        args[changed][0] = args[changed][0]
    OP(x, *args[1:3], v, *args[4:]).sum().backward()
    assert len(made) == 2


def test_gradcheck_float64():
    args, _ = _case((3, 4, (3, 2), 2, 1, (1, 2), (6, 7), 2), 0.5, dtype=torch.float64)
    x, v, b = args[0].requires_grad_(), args[3].requires_grad_(), args[6].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v, b: OP(x, args[1], args[2], v, *args[4:6], b, *args[7:]), (x, v, b)
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    args, _ = _case(CASES[6], 0.5)
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    torch.library.opcheck(OP, args)


def test_compile_matches_eager():
    conv = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1)
    m = pyprune.nn.SparseConv2d.from_dense(conv, sparsity=0.8)
    x = torch.randn(2, 12, 11, 11)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize(
    "c_in, c_out, k, stride, sparsity",
    [(16, 16, 3, 2, 0.8), (16, 16, 3, 1, 0.8), (16, 16, 1, 2, 0.8), (64, 64, 1, 1, 0.9), (64, 60, 1, 2, 0.9)],
    ids=["3x3-s2", "3x3", "1x1-s2", "sampled", "ragged"],
)
def test_compiled_backward_traces_whole(layout, c_in, c_out, k, stride, sparsity, monkeypatch):
    # AOTAutograd traces the backward: a strided kxk conv's phases keep a data-dependent share of the entries
    # (nonzero), which it cannot trace, so traced backwards take ATen's input gradient there, and bsr blocks
    # past the weight's edge (60 rows in 8-row blocks) the dense values' gradient; all compile whole, the
    # sampled values' gradient at 10% included, and the gradients match eager ones
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)
    m = pyprune.nn.SparseConv2d.from_dense(conv, sparsity=sparsity, layout=layout, block=(8, 8))
    sampled = []
    real = csr_conv2d_module.sampled_weight_grad
    for mod in (csr_conv2d_module, bsr_conv2d_module):
        monkeypatch.setattr(mod, "sampled_weight_grad", lambda *a: sampled.append(1) or real(*a))
    x = torch.randn(2, c_in, 11, 11, requires_grad=True)
    m(x).square().sum().backward()
    assert bool(sampled) == (sparsity == 0.9 and HAS_CPP)
    want = (x.grad.clone(), m.weight.values.grad.clone())
    x.grad = None
    m.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    torch.compile(m, backend="aot_eager")(x).square().sum().backward()
    assert counters["aot_autograd"]["ok"] >= 1 and counters["aot_autograd"]["not_ok"] == 0
    torch.testing.assert_close(x.grad, want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.weight.values.grad, want[1], rtol=1e-4, atol=1e-4)


def _bad(change):
    args, _ = _case(CASES[4], 0.5)
    args = list(args)
    change(args)
    return args


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (set_arg(0, lambda a: a[0][0]), ValueError, "'x' must be 4-D"),
        (set_arg(1, lambda a: a[1].long()), TypeError, "'crow_indices' must be"),
        (set_arg(2, lambda a: a[2].long()), TypeError, "'col_indices' must be"),
        (set_arg(3, lambda a: a[3].double()), TypeError, "'values' must be"),
        (set_arg(1, lambda a: a[1][:-1]), ValueError, "'crow_indices' must have out_channels \\+ 1"),
        (set_arg(2, lambda a: a[2][:-1]), ValueError, "'col_indices' must have as many entries"),
        (set_arg(2, lambda a: a[2] + 16 * 9), ValueError, "'col_indices' must lie in"),
        (set_arg(1, lambda a: a[1].flip(0)), ValueError, "'crow_indices' must"),
        # a row pointer past nnz: checked before any column is read through it
        (set_arg(1, lambda a: torch.cat([a[1][:1], a[1][-1:] + 100, a[1][2:]])), ValueError,
         "'crow_indices' must be non-decreasing and at most the number of nonzeros"),
        (set_arg(5, [0, 3]), ValueError, "'kernel_size' must be"),
        (set_arg(7, [1, 0]), ValueError, "'stride' must be"),
        (set_arg(8, [-1, 1]), ValueError, "'padding' must be"),
        (set_arg(9, [1, 0]), ValueError, "'dilation' must be"),
        (set_arg(6, lambda a: torch.zeros(3)), ValueError, "'bias' must"),
        (set_arg(5, [12, 3]), ValueError, "'x' has spatial size"),
        (set_arg(4, -1), ValueError, "'out_channels' must be >= 0"),
    ],
)
def test_bad_input_names_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        OP(*_bad(change))


def test_output_too_large_fails_at_once():
    # a 2^25 x 2^25 output (2^58 bytes, past any address space): the allocation fails before anything walks
    # the output's pixels (that walk took minutes)
    args, _ = _case(CASES[4], 0.5)
    args = list(args)
    args[8] = [1 << 24, 1 << 24]
    with pytest.raises(RuntimeError, match="allocate"):
        OP(*args)


def test_checked_reference_rejects_bad_indices():
    # what the CPU runs without pyprune._C, and the CUDA path
    args, _ = _case(CASES[4], 0.5)
    bad_col = list(args)
    bad_col[2] = args[2] + 16 * 9
    with pytest.raises(ValueError, match="csr_conv2d: col_indices must lie in"):
        csr_conv2d_checked_ref(*bad_col)
    torch.testing.assert_close(csr_conv2d_checked_ref(*args), OP(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "made_in, called_in",
    [("grad", "grad"), ("grad", "inference_mode"), ("inference_mode", "inference_mode")],
    ids=["grad", "normal-tensors-in-inference-mode", "inference-tensors"],
)
def test_cached_structure_follows_index_changes(made_in, called_in):
    # the C++ kernel keeps what it derives from the indices between calls (under inference_mode too, for
    # normal tensors); in-place writes must invalidate it, and inference tensors (no version counter) are never
    # kept
    def mode(name):
        return torch.inference_mode() if name == "inference_mode" else contextlib.nullcontext()

    with mode(made_in):
        args, _ = _case(CASES[5], 0.5)
    x, crow, col = args[0], args[1], args[2]
    assert col.is_inference() == (made_in == "inference_mode")
    with mode(called_in):
        torch.testing.assert_close(OP(*args), csr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
        first = int(crow[1])  # move row 0's last nonzero to the last column, keeping the row sorted
        assert first > 0 and int(col[first - 1]) < 9 * x.shape[1] - 1
        col[first - 1] = 9 * x.shape[1] - 1
        torch.testing.assert_close(OP(*args), csr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
        col[0], col[1] = col[1].clone(), col[0].clone()
        with pytest.raises(ValueError, match="'col_indices' must be strictly increasing within each row"):
            OP(*args)


def test_cached_structure_follows_writes_through_data():
    # a write through .data moves no version counter: the structure derived from the old indices (each
    # nonzero's input offset) was kept, a silently wrong result
    args, _ = _case(CASES[5], 0.5)
    x, crow, col = args[0], args[1], args[2]
    torch.testing.assert_close(OP(*args), csr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
    first = int(crow[1])
    assert first > 0 and int(col[first - 1]) < 9 * x.shape[1] - 1
    col.data[first - 1] = 9 * x.shape[1] - 1
    torch.testing.assert_close(OP(*args), csr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
    col.data[first - 1] = 10**9
    with pytest.raises(ValueError, match="'col_indices' must lie in"):
        OP(*args)


def test_channels_last_1x1_output_is_its_own_tensor():
    # a sparse channels_last 1x1 conv once ran csr_linear's kernel on the pixels and returned a permuted view of
    # its result: an in-place ReLU after it failed under autograd ("... is a view and is being modified inplace")
    w = torch.randn(32, 64) * (torch.rand(32, 64) < 0.1)
    c = CSR.from_dense(w)
    x = torch.randn(1, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    y = csr_conv2d(x, c.crow_indices, c.col_indices, c.values, 32, 1)
    assert not y._is_view() and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.relu_(y), F.conv2d(x, w.view(32, 64, 1, 1)).relu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,batch", [((14, 14), 1), ((7, 7), 3)], ids=["14x14", "7x7-b3"])
def test_channels_last_1x1_few_tiles_many_row_parts(hw, batch):
    # few pixel tiles (4 and 3 of 64 pixels) in 4 and 6 row parts that two threads share: a tile's transposed
    # copy is made by each unit range that reaches it, and ranges may split a tile's row parts between them
    torch.manual_seed(0)
    w = torch.randn(256, 192) * (torch.rand(256, 192) < 0.5)
    c = CSR.from_dense(w)
    x = torch.randn(batch, 192, *hw).contiguous(memory_format=torch.channels_last)
    b = torch.randn(256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = csr_conv2d(x, c.crow_indices, c.col_indices, c.values, 256, 1, b)
    finally:
        torch.set_num_threads(threads)
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.double(), w.double().view(256, 192, 1, 1), b.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "k,stride,padding,dilation,hw",
    [(3, 1, 1, 1, (14, 14)), (3, 2, 1, 1, (32, 30)), (3, 1, 2, 2, (11, 11)), ((1, 5), 1, (0, 2), 1, (6, 40))],
    ids=["3x3", "3x3-s2", "3x3-d2", "1x5"],
)
def test_dense_columns_read_aligned_taps(k, stride, padding, dilation, hw, fmt):
    # >= 48 nonzeros per weight column and rows dense enough for column chunks: the planes are staged once
    # per column shift with rows of whole vectors (taps_aligned), on maps where that costs few extra vectors
    torch.manual_seed(0)
    k = _pair(k)
    w = torch.randn(64, 12, *k) * (torch.rand(64, 12, *k) >= 0.2)
    c = CSR.from_dense(tap_major(w))
    x = torch.randn(2, 12, *hw)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    b = torch.randn(64)
    y = csr_conv2d(x, c.crow_indices, c.col_indices, c.values, 64, k, b, stride, padding, dilation)
    want = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


def check_1x1_beyond_half_the_llc(op, compress, c_out, density, epilogue):
    """op's channels_last 1x1 conv (bias, residual and ReLU with epilogue) on an x larger than half the
    last-level cache against F.conv2d; compress(w) stores the (c_out, 128) weight (crow_indices, col_indices,
    values)."""
    llc = pyprune._extension.cpu_features()["last_level_cache_bytes"]
    if not 0 < llc <= 64 << 20:
        pytest.skip(f"last-level cache of {llc} bytes: x would be too large for a unit test")
    torch.manual_seed(0)
    c_in, side = 128, 56
    batch = llc // (2 * 4 * c_in * side * side) + 1
    w = torch.randn(c_out, c_in) * (torch.rand(c_out, c_in) < density)
    sp = compress(w)
    x = torch.randn(batch, c_in, side, side).contiguous(memory_format=torch.channels_last)
    assert 2 * x.nbytes > llc
    b = torch.randn(c_out) if epilogue else None
    res = None
    if epilogue:
        res = torch.randn(batch, c_out, side, side).contiguous(memory_format=torch.channels_last)
    y = op(x, sp.crow_indices, sp.col_indices, sp.values, c_out, 1, b, relu=epilogue, residual=res)
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x, w.view(c_out, c_in, 1, 1), b)
    if epilogue:
        want = torch.relu(want + res)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ kernel's path")
@pytest.mark.parametrize("c_out, epilogue", [(32, False), (32, True), (40, True)])
def test_channels_last_1x1_beyond_half_the_llc(c_out, epilogue):
    # x larger than half the last-level cache: the tiles' transposes prefetch the pixels ahead (the one
    # path that does; past the end of x the prefetches must not fault), and y leaves by non-temporal stores
    # with the epilogue applied (C_out a multiple of 16, each pixel's channels whole lines; 40: plain stores)
    check_1x1_beyond_half_the_llc(csr_conv2d, CSR.from_dense, c_out, 0.1, epilogue)


def gpu_backward_check(op, args, w):
    """x's and the values' gradients of op(*args) on CUDA (fp32: TF32 where the kernels use it) against
    F.conv2d's in float64 on the CPU."""
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    x, v = args[0].requires_grad_(), args[3].requires_grad_()
    y = op(x, *args[1:3], v, *args[4:])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gx, gv = torch.autograd.grad(y, (x, v), g.cuda())
    xd, wd = x.detach().cpu().double().requires_grad_(), w.double().requires_grad_()
    gxd, gwd = torch.autograd.grad(F.conv2d(xd, wd, None, *args[7:]), (xd, wd), g.double())
    assert gx.shape == x.shape and gv.shape == v.shape
    torch.testing.assert_close(gx.cpu().double(), gxd, rtol=0, atol=1e-2 * float(gxd.abs().max()))
    return gv.cpu().double(), tap_major(gwd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [CASES[4], CASES[3], CASES[5]], ids=["3x3", "1x1-s2", "3x3-s2"])
def test_gpu_backward_matches_float64(case):
    # the input gradient through the op itself on the flipped, transposed weight (its CUDA router; stride 2:
    # one call per stride phase), the values' gradient from ATen's dense one
    args, w = _case(case, 0.9, bias=False)
    gv, gw = gpu_backward_check(OP, args, w)
    want = gw[compressed_rows(args[1], args[2].numel()), args[2].long()]
    torch.testing.assert_close(gv, want, rtol=0, atol=1e-2 * float(want.abs().max()))
