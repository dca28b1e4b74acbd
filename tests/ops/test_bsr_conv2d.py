"""pyprune::bsr_conv2d on the CPU (the C++ kernel when built, else the reference) against the float64 spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn.sparse_conv2d import tap_major
from pyprune.ops import bsr_conv2d
from pyprune._extension import HAS_CPP
from pyprune.ops.bsr_conv2d import _bsr_conv2d_im2col, _sample_blocks, bsr_conv2d_checked_ref, dense_weight
from pyprune.ops.csr_conv2d import within_density
from pyprune.reference import bsr_conv2d_ref
from pyprune.sparse import BSR

from .test_csr_conv2d import (
    check_1x1_beyond_half_the_llc,
    gpu_backward_check,
    input_grad_check,
    values_grad_check,
)
from .triton_interp import set_arg

OP = torch.ops.pyprune.bsr_conv2d

# (C_in, C_out, (kh, kw), stride, padding, dilation, (H, W), batch, (bh, bw)). The kernel stages planes per
# stride phase in use (stride 2, stride 3 with dilation 2, asymmetric ones), in flat tiles across rows (small
# maps) or row tiles (wide maps: 1x7 at width 40). Blocks: bw dividing C_in (a block's columns one tap's
# channels), not dividing it (blocks across taps: 3x5 on 12 channels), past the weight's bottom and right
# edges
# (33 rows in 16-row blocks; K = 9 * 33 in 32-wide blocks), taller than 16 rows and not a divisor of 16 (the
# channels_last output leaves in groups of 16 rows), one block holding the whole weight, and a strided 3x3 in
# blocks that divide both channel counts (its input gradient goes phase by phase through the op). Unpadded 1x1
# convs (stride 1 and 2, and a 2x2 map: 4 pixels, bsr_linear's few-token path) run, on channels_last input,
# bsr_linear's kernel over the pixels' matrix inside the op; in 32x32 blocks with C_out a multiple of 16, its
# token-rows tiles (tiles of 12 pixels: 126 and 50 of them; K = 300, past a block's width and past the 256
# inputs a partial sum takes; 48 rows, the last block row half past the weight).
CASES = [
    (16, 32, (3, 3), 1, 1, 1, (9, 9), 2, (4, 8)),
    (33, 17, (3, 3), 2, 1, 1, (13, 13), 3, (16, 32)),
    (12, 10, (3, 3), 3, 2, 2, (17, 14), 1, (3, 5)),
    (20, 12, (3, 3), 1, 2, 2, (11, 11), 2, (32, 16)),
    (8, 8, (5, 5), 1, 2, 1, (40, 40), 1, (8, 8)),
    (6, 8, (1, 7), 1, (0, 3), 1, (3, 40), 2, (2, 6)),
    (9, 4, (3, 2), (2, 1), (1, 0), (1, 2), (10, 12), 2, (4, 9)),
    (24, 20, (1, 1), 1, 1, 1, (7, 9), 2, (4, 4)),
    (40, 48, (3, 3), 1, 1, 1, (7, 7), 4, (48, 64)),
    (5, 6, (7, 7), 1, 3, 1, (4, 5), 1, (6, 245)),
    (16, 24, (3, 3), 2, 1, 1, (11, 10), 2, (8, 4)),
    (40, 33, (1, 1), 1, 0, 1, (7, 9), 2, (8, 16)),
    (24, 20, (1, 1), 2, 0, 1, (9, 9), 2, (4, 8)),
    (16, 12, (1, 1), 1, 0, 1, (2, 2), 1, (4, 4)),
    (300, 48, (1, 1), 1, 0, 1, (7, 9), 2, (32, 32)),
    (64, 32, (1, 1), 2, 0, 1, (9, 9), 2, (32, 32)),
]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _case(case, sparsity, bias=True, dtype=torch.float32, seed=0):
    """A BSR weight with about ``sparsity`` of its blocks empty (dense inside the kept ones)."""
    cin, cout, k, s, p, d, hw, n, block = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *k, generator=gen, dtype=dtype)
    wt = tap_major(w)
    bh, bw = block
    keep = torch.rand(-(-cout // bh), -(-wt.shape[1] // bw), generator=gen) >= sparsity
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:cout, : wt.shape[1]]
    bsr = BSR.from_dense(wt * mask, block)
    x = torch.randn(n, cin, *hw, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype) if bias else None
    args = (x, bsr.crow_indices, bsr.col_indices, bsr.values, cout, list(k), b, _pair(s), _pair(p), _pair(d))
    dense = (wt * mask).reshape(cout, *k, cin).permute(0, 3, 1, 2)
    return args, dense


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
    want = bsr_conv2d_ref(*_double(args))
    cl = channels_last and not args[0].is_contiguous()
    assert y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    x, b, stride, padding, dilation = args[0], args[6], args[7], args[8], args[9]
    dense = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    torch.testing.assert_close(want, dense)


def test_reference_hand_computed():
    # 1 input channel, 2x2 image, a 2x2 kernel in one 1x4 block holding w[0, 0, 1, 0] = 5, and a bias
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    val = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]])
    y = bsr_conv2d_ref(x, crow, col, val, 1, [2, 2], torch.tensor([1.0]), [1, 1], [0, 0], [1, 1])
    assert y.tolist() == [[[[1.0 + 5 * 3]]]]
    got = OP(x, crow, col, val, 1, [2, 2], torch.tensor([1.0]), [1, 1], [0, 0], [1, 1])
    assert got.tolist() == y.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    args, _ = _case(CASES[1], 0.5, dtype=dtype)
    y = OP(*args)
    assert y.dtype == dtype
    want = bsr_conv2d_ref(*_double(args))
    naive = bsr_conv2d_ref(*args).double()
    assert (y.double() - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-12


def test_empty_and_noncontiguous_inputs():
    args, _ = _case(CASES[0], 0.5)
    x = args[0]
    assert OP(x[:0], *args[1:]).shape == (0, 32, 9, 9)
    for xs in (x.transpose(2, 3).contiguous().transpose(2, 3), torch.randn(2, 32, 9, 9)[:, ::2]):
        torch.testing.assert_close(OP(xs, *args[1:]), bsr_conv2d_ref(xs, *args[1:]), rtol=1e-4, atol=1e-4)
    no_rows = (x, torch.zeros(1, dtype=torch.int32), args[2][:0], args[3][:0], 0, *args[5:6], None, *args[7:])
    assert OP(*no_rows).shape == (2, 0, 9, 9)


def test_public_function_defaults():
    args, w = _case(CASES[0], 0.5, bias=False)
    x, crow, col, val = args[:4]
    y = bsr_conv2d(x, crow, col, val, 32, 3, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


def test_dense_weight_is_the_stored_weight():
    args, w = _case(CASES[1], 0.5)
    torch.testing.assert_close(dense_weight(args[1], args[2], args[3], 17, [3, 3], 33), w)


def test_gradients_match_reference_autograd():
    args, _ = _case(CASES[1], 0.5)

    def grads(fn, a):
        a = list(a)
        for i in (0, 3, 6):  # x, values, bias
            a[i] = a[i].detach().clone().requires_grad_()
        fn(*a).square().sum().backward()
        return [a[i].grad for i in (0, 3, 6)]

    got, want = grads(OP, args), grads(bsr_conv2d_ref, _double(args))
    for g, wg in zip(got, want):
        torch.testing.assert_close(g.double(), wg, rtol=1e-5, atol=1e-6 * float(wg.abs().max()))
    # the padding past the weight's edges (K = 9 * 33 in 32-wide blocks) gets no gradient from the reference
    # either; the block gradient's shape is the values'
    assert got[1].shape == args[3].shape


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_input_grad_through_the_op(case, channels_last, monkeypatch):
    # the op on the flipped, transposed blocks, phase by phase (csr_conv2d's input_grad_phases), where every
    # block stays in one tap and one range of output channels (bh | C_out, bw | C_in: 16->32 in 4x8, 16->24
    # strided in 8x4, 40->48 in 48x64 ...); otherwise (33 channels in 16x32 blocks, 3x5 blocks on 12 ...)
    # ATen's dense gradient
    args, w = _case(case, 0.5, bias=False)
    cin, cout, bh, bw = case[0], case[1], *case[8]
    input_grad_check(OP, args, w, channels_last, monkeypatch, cin % bw == 0 and cout % bh == 0)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["4x8", "across-taps"])
@pytest.mark.parametrize("sparsity", [0.95, 0.5])
def test_values_grad_sampled_at_low_density(case, sparsity, monkeypatch):
    # blocks holding at most a tenth of the weight: their entries alone (_conv2d_weight_sampled); else ATen's
    # dense gradient read at the blocks
    args, w = _case(case, sparsity, bias=False)
    crow, col, values = args[1:4]
    k = w[0].numel()
    sampled = within_density(values.numel(), w.shape[0] * k, 0.1, values[0].numel())
    assert sampled == (sparsity == 0.95)
    sample = lambda gw: _sample_blocks(gw, crow, col, values)  # noqa: E731
    values_grad_check(OP, args, w, monkeypatch, sampled and HAS_CPP, sample)


@pytest.mark.parametrize(
    "case, sampled, seed",
    [
        ((16, 16, (3, 3), 1, 1, 1, (14, 14), 1, (8, 8)), True, 0),
        ((16, 16, (3, 3), 2, 1, 1, (28, 28), 1, (8, 8)), False, 0),
        ((16, 16, (3, 3), 1, 1, 1, (13, 13), 1, (8, 8)), False, 0),
        ((16, 16, (3, 3), 1, 1, 1, (14, 14), 1, (2, 8)), False, 0),
        ((48, 16, (1, 1), 1, 0, 1, (14, 14), 1, (8, 8)), False, 1),
    ],
    ids=["3x3-14x14", "strided", "13x13", "2-row-blocks", "1x1"],
)
def test_values_grad_sampled_up_to_30_percent_on_tiled_kxk(case, sampled, seed, monkeypatch):
    # blocks holding 10-30% of the weight: the sampled gradient for stride-1 kxk convs with >= 14x14 outputs
    # in blocks of >= 4 rows (BSR_KXK_SAMPLED_MAX_DENSITY), ATen's dense one for the rest
    args, w = _case(case, 0.75, bias=False, seed=seed)
    crow, col, values = args[1:4]
    density = values.numel() / w.numel()
    assert 0.1 < density <= 0.3
    sample = lambda gw: _sample_blocks(gw, crow, col, values)  # noqa: E731
    values_grad_check(OP, args, w, monkeypatch, sampled and HAS_CPP, sample)


def test_sampled_values_grad_of_a_block_past_the_edges(monkeypatch):
    # one 16x32 block over rows 32-47 of 40 and columns 288-319 of 297: its entries inside the weight are
    # computed, the rest of the block's gradient is zero
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 33, 3, 3, generator=gen)
    wt = tap_major(w)
    mask = torch.zeros_like(wt)
    mask[32:, 288:] = 1
    bsr = BSR.from_dense(wt * mask, (16, 32))
    assert bsr.values.shape == (1, 16, 32)
    x = torch.randn(2, 33, 9, 9, generator=gen)
    args = (x, bsr.crow_indices, bsr.col_indices, bsr.values, 40, [3, 3], None, [1, 1], [1, 1], [1, 1])
    dense = (wt * mask).reshape(40, 3, 3, 33).permute(0, 3, 1, 2)
    sample = lambda gw: _sample_blocks(gw, *args[1:4])  # noqa: E731
    values_grad_check(OP, args, dense, monkeypatch, HAS_CPP, sample)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ kernel's path")
@pytest.mark.parametrize("c_out, block, epilogue", [(32, (16, 16), False), (32, (16, 16), True),
                                                    (40, (16, 16), True), (32, (8, 16), True),
                                                    (48, (32, 32), True)])
def test_channels_last_1x1_beyond_half_the_llc(c_out, block, epilogue):
    # x larger than half the last-level cache, on the route of channels_last unpadded 1x1 convs (bsr_linear's
    # kernel): y leaves by non-temporal stores with the epilogue applied where C_out and the block height are
    # multiples of 16 (40 output channels, or blocks 8 high: plain stores), from the token-rows tiles too
    # (32x32 blocks)
    check_1x1_beyond_half_the_llc(bsr_conv2d, lambda w: BSR.from_dense(w, block), c_out, 0.3, epilogue)


def test_gradcheck_float64():
    args, _ = _case((3, 4, (3, 2), 2, 1, (1, 2), (6, 7), 2, (2, 4)), 0.4, dtype=torch.float64)
    x, v, b = args[0].requires_grad_(), args[3].requires_grad_(), args[6].requires_grad_()
    assert v.numel() > 0
    assert torch.autograd.gradcheck(
        lambda x, v, b: OP(x, args[1], args[2], v, *args[4:6], b, *args[7:]), (x, v, b)
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    args, _ = _case(CASES[3], 0.5)
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    torch.library.opcheck(OP, args)


def test_module_uses_it_and_compiles():
    conv = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1)
    m = pyprune.nn.SparseConv2d.from_dense(conv, sparsity=0.5, layout="bsr", block=(4, 4))
    x = torch.randn(2, 12, 11, 11)
    assert m.kernel_op(x) == "bsr_conv2d"
    with torch.profiler.profile() as prof:
        y = m(x)
    assert any(e.name == "pyprune::bsr_conv2d" for e in prof.events())
    torch.testing.assert_close(y, m.to_dense()(x), rtol=1e-4, atol=1e-4)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), y)


def test_im2col_backend_matches():
    # the CUDA router's im2col backend (patches through F.unfold, then bsr_linear), run here on the CPU
    for channels_last in (False, True):
        args, _ = _case(CASES[6], 0.5)
        if channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        y = _bsr_conv2d_im2col(*args)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, bsr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
        res = torch.randn_like(y)  # the epilogue after bsr_linear
        y = _bsr_conv2d_im2col(*args, True, res)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, (bsr_conv2d_ref(*args) + res).relu(), rtol=1e-4, atol=1e-4)


def _bad(change):
    args, _ = _case(CASES[0], 0.5)
    args = list(args)
    change(args)
    return args


BAD = [
    (set_arg(0, lambda a: a[0][0]), ValueError, "'x' must be 4-D"),
    (set_arg(1, lambda a: a[1].long()), TypeError, "'crow_indices' must be"),
    (set_arg(2, lambda a: a[2].long()), TypeError, "'col_indices' must be"),
    (set_arg(3, lambda a: a[3].double()), TypeError, "'values' must be"),
    (set_arg(3, lambda a: a[3][:, 0]), ValueError, "'values' must"),
    (set_arg(1, lambda a: a[1][:-1]), ValueError,
     "'crow_indices' must have ceil\\(out_channels / bh\\) \\+ 1"),
    (set_arg(2, lambda a: a[2][:-1]), ValueError, "'col_indices' must have one entry per block"),
    (set_arg(2, lambda a: a[2] + 18), ValueError, "'col_indices' must lie in"),
    (set_arg(1, lambda a: a[1].flip(0)), ValueError, "'crow_indices' must"),
    (set_arg(5, [0, 3]), ValueError, "'kernel_size' must be"),
    (set_arg(7, [1, 0]), ValueError, "'stride' must be"),
    (set_arg(8, [-1, 1]), ValueError, "'padding' must be"),
    (set_arg(9, [1, 0]), ValueError, "'dilation' must be"),
    (set_arg(6, lambda a: torch.zeros(3)), ValueError, "'bias' must"),
    (set_arg(5, [12, 3]), ValueError, "'x' has spatial size"),
    (set_arg(4, -1), ValueError, "'out_channels' must be >= 0"),
]


@pytest.mark.parametrize("change, exc, match", BAD)
def test_bad_input_names_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        OP(*_bad(change))


@pytest.mark.parametrize("change, exc, match", BAD)
def test_checked_reference_names_the_argument(change, exc, match):
    # what the CPU runs without pyprune._C, and the CUDA router's last resort: the fake's checks (check_args),
    # then the index values' (whose messages name the argument unquoted)
    args = _bad(change)
    with pytest.raises(exc, match=match.replace("'", "'?")):
        bsr_conv2d_checked_ref(*args)


def test_cached_index_check_follows_writes():
    # the column check is kept between calls per index tensors and contents: an in-place write and a write
    # through .data must both be seen
    args, _ = _case(CASES[0], 0.5)
    col = args[2]
    torch.testing.assert_close(OP(*args), bsr_conv2d_ref(*args), rtol=1e-4, atol=1e-4)
    col[0] = 10**6
    with pytest.raises(ValueError, match="'col_indices' must lie in"):
        OP(*args)
    col[0] = 0
    OP(*args)
    col.data[0] = 10**6
    with pytest.raises(ValueError, match="'col_indices' must lie in"):
        OP(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_router_matches_float64(dtype, channels_last):
    # the routed op on CUDA: the Triton kernel where Triton runs, else im2col (F.unfold, then bsr_linear); in
    # fp32 both it and the naive F.conv2d follow cudnn.allow_tf32 (TF32 by default)
    args, _ = _case((32, 48, (3, 3), 2, 1, 1, (15, 15), 2, (16, 16)), 0.5, dtype=dtype)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    if channels_last:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    y = OP(*args)
    want = bsr_conv2d_ref(*_double([a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))
    naive = bsr_conv2d_ref(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args]).double()
    assert y.dtype == dtype and y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    err = (y.cpu().double() - want).abs().max().item()
    assert err <= max(2 * (naive - want).abs().max().item(), 1e-3 * want.abs().max().item()), err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=["3x3", "3x3-s2"])
def test_gpu_backward_matches_float64(case):
    # blocks within taps: the input gradient through the op on the transposed blocks (its CUDA router; stride
    # 2: one call per stride phase)
    args, w = _case(case, 0.8, bias=False)
    gv, gw = gpu_backward_check(OP, args, w)
    want = _sample_blocks(gw, *args[1:4])
    torch.testing.assert_close(gv, want, rtol=0, atol=1e-2 * float(want.abs().max()))
