"""pyprune::pruned_conv2d on the CPU (the C++ kernel when built, else the reference) against the float64 spec."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn import PrunedConv2d
from pyprune.ops import pruned_conv2d
from pyprune.ops.pruned_conv2d import pruned_conv2d_checked_ref
from pyprune.reference import _memory_format, pruned_conv2d_ref

from .test_max_pool2d import nan_inf_input

OP = torch.ops.pyprune.pruned_conv2d

# (C_in, C_out, kernel, stride, padding, dilation, groups, side, batch): 1x1 and kxk, stride 2, dilation,
# groups and depthwise, odd sizes; maps that take each path of the C++ kernel: channels_last and NCHW maps up
# to 32x32 (pixels as rows), stride-1 kxk on wider maps (staged planes: 40, 36; see also the thread-count
# test) except plain 3x3 convs with >= 32 input channels (>= 16 for <= 32 outputs) and whole vectors of output
# channels (AVX-512: pixels as rows, 36 with x read in place, 40 restaged as channels_last), a 7x7 stride-2
# conv over 4 channels (AVX-512: pixels as rows, 30), NCHW 1x1 (rows read in place), the rest (im2col tiles:
# stride 2 at 70, a 7x7 kernel whose border columns would waste > 1/7); pixels as rows with row windows
# (3-wide stride-1 kernels, OW a multiple of 14, 8 or 7; a multiple of 3 channel vectors, or an odd count of
# 2 past one, at 7): both borders in one 14-pixel tile (14), unpadded with groups (8), 8-pixel tiles of one
# and two channel vectors (16), 14 and 7 (28), blocks of two vectors and a last one of one (112 channels at
# 14, 7-pixel tiles), of two vectors (64 at 40, 8-pixel tiles), 7 pixels x 3 vectors (48 and 96 channels at
# 14; 96 at 56, where 8 divides OW too) and a last block of 2 (80 at 14); the taps in chunks: see the
# thread-count test;
# stride-1 1x1 on NCHW maps past 16x16 (17: tiles of 64 pixels that span images) and up to it (10: pixels as
# rows); on channels_last with <= 32 output channels, 14-pixel runs with a partial last tile (7, 10, 56;
# grouped: 9), but not a 1x1 map of 30 NCHW images (its pixels are one input channel apart yet not one run: C
# floats apart)
CASES = [
    (16, 32, 3, 1, 1, 1, 1, 9, 2),
    (7, 5, 1, 1, 0, 1, 1, 7, 1),
    (64, 64, 1, 1, 0, 1, 1, 56, 1),
    (33, 17, 3, 2, 1, 1, 1, 13, 3),
    (20, 12, 3, 1, 2, 2, 1, 11, 2),
    (12, 12, 3, 1, 1, 1, 3, 10, 2),
    (8, 8, 3, 1, 1, 1, 8, 12, 2),
    (8, 16, 5, 2, 2, 1, 8, 17, 1),
    (97, 9, 1, 2, 0, 1, 1, 9, 2),
    (32, 40, 3, 1, 0, 1, 1, 7, 8),
    (16, 24, 1, 1, 0, 1, 1, 7, 8),
    (16, 24, 3, 1, 1, 1, 1, 20, 2),
    (12, 12, 3, 1, 2, 2, 3, 24, 1),
    (8, 8, 5, 1, 2, 1, 1, 40, 1),
    (9, 4, 3, 1, 0, 1, 1, 25, 2),
    (1, 1, 3, 1, 1, 1, 1, 5, 1),
    (24, 20, 3, 2, 1, 1, 1, 70, 1),
    (6, 8, 7, 1, 3, 1, 1, 33, 1),
    (12, 12, 3, 1, 2, 2, 3, 36, 1),
    (16, 24, 1, 1, 0, 1, 1, 10, 3),
    (16, 24, 1, 1, 0, 1, 1, 17, 3),
    (24, 16, 1, 1, 0, 1, 2, 9, 3),
    (16, 24, 3, 1, 1, 1, 1, 14, 2),
    (12, 30, 3, 1, 0, 1, 2, 10, 3),
    (16, 32, 3, 1, 1, 1, 1, 16, 2),
    (24, 32, 3, 1, 1, 1, 1, 28, 1),
    (40, 24, 1, 1, 0, 1, 1, 1, 30),
    (64, 16, 3, 1, 1, 1, 1, 36, 1),
    (64, 64, 3, 1, 1, 1, 1, 40, 3),
    (4, 16, 7, 2, 3, 1, 1, 30, 2),
    (48, 80, 3, 1, 1, 1, 1, 14, 2),
    (40, 96, 3, 1, 1, 1, 1, 14, 3),
    (32, 96, 3, 1, 1, 1, 1, 56, 1),
    (48, 112, 3, 1, 1, 1, 1, 14, 2),
]


def _case(case, keep, scatter, cl, bias, dtype=torch.float32, seed=0):
    cin, cout, k, s, p, d, g, side, n = case
    gen = torch.Generator().manual_seed(seed)
    ci = max(g, int(cin * keep) // g * g)
    in_index = None if ci == cin else torch.sort(torch.randperm(cin, generator=gen)[:ci]).values
    if g == cin:  # depthwise: every kept input channel is its own group
        g = co = ci
    else:
        co = max(g, int(cout * keep) // g * g)
    out_index = torch.sort(torch.randperm(cout, generator=gen)[:co]).values if scatter else None
    if g == ci and scatter:
        out_index = in_index.clone() if in_index is not None else torch.arange(cin)
    x = torch.randn(n, cin, side, side, generator=gen, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci // g, k, k, generator=gen, dtype=dtype)
    b = torch.randn(co, generator=gen, dtype=dtype) if bias else None
    out_channels = (cout if g != ci else cin) if scatter else co
    return x, w, b, in_index, out_index, out_channels, [s, s], [p, p], [d, d], g


def _double(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_reference(case, keep, channels_last):
    # (relu_max 0.5: a ReLU capped low enough that most convs' outputs reach the cap, ReLU6 in kind)
    combos = ((False, False, True, None), (True, True, False, None), (True, False, True, None),
              (False, True, True, 0.5))  # fmt: skip
    for scatter, relu, bias, cap in combos:
        args = (*_case(case, keep, scatter, channels_last, bias), relu)
        y = OP(*args, [], cap)
        want = pruned_conv2d_ref(*_double(args), [], cap)
        assert y.shape == want.shape
        assert y.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
        if scatter:
            dropped = torch.ones(want.shape[1], dtype=torch.bool)
            dropped[args[4]] = False
            assert (y[:, dropped] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_residual_matches_reference(case, channels_last):
    # the residual is added before the ReLU, in every path's epilogue (or after the kernel where the path has
    # none for it), to the unkept channels of a scattered output too; a residual in the other memory format
    combos = ((True, True, True, None, False), (False, True, False, 0.5, True), (True, False, True, None, True),
              (False, False, True, None, False))  # fmt: skip
    for scatter, relu, bias, cap, other_format in combos:
        x, w, b, ii, oi, oc, s, p, d, g = _case(case, 0.5, scatter, channels_last, bias, seed=1)
        args = (x, w, b, ii, oi, oc, s, p, d, g, relu)
        oh = (x.shape[2] + 2 * p[0] - d[0] * (w.shape[2] - 1) - 1) // s[0] + 1
        ow = (x.shape[3] + 2 * p[1] - d[1] * (w.shape[3] - 1) - 1) // s[1] + 1
        res = torch.randn(x.shape[0], oc, oh, ow, generator=torch.Generator().manual_seed(2)) * 2
        if channels_last != other_format:
            res = res.contiguous(memory_format=torch.channels_last)
        y = OP(*args, [], cap, res)
        want = pruned_conv2d_ref(*_double(args), [], cap, res.double())
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
        assert (want < 0).any() == (not relu)  # the ReLU after the sum, so the test can tell the order
        if scatter:
            dropped = torch.ones(oc, dtype=torch.bool)
            dropped[oi] = False
            r = res[:, dropped]
            torch.testing.assert_close(y[:, dropped], (r.clamp(0, cap) if cap else r.relu()) if relu else r)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_on_depthwise_rows_and_other_dtypes(channels_last, dtype):
    # depthwise on 130-pixel NCHW rows (the row loops) and channels_last (channel vectors), and float64 (ATen's
    # conv): the residual added after the kernel
    x, w, b, ii, oi, oc, s, p, d, g = _case((18, 18, 3, 1, 1, 1, 18, 130, 1), 0.5, True, channels_last, True,
                                            dtype)  # fmt: skip
    res = torch.randn(1, oc, 130, 130, dtype=dtype)
    args = (x, w, b, ii, oi, oc, s, p, d, g, True)
    torch.testing.assert_close(OP(*args, [], 6.0, res), pruned_conv2d_ref(*args, [], 6.0, res))


def test_residual_gradcheck_float64_and_opcheck():
    x, w, b, ii, oi, oc, s, p, d, g = _case((6, 5, 3, 1, 1, 1, 1, 5, 1), 0.5, True, False, True, torch.float64)
    r = torch.randn(1, oc, 5, 5, dtype=torch.float64)
    x, w, b, r = (t.requires_grad_() for t in (x, w, b, r))
    fn = lambda x, w, b, r: OP(x, w, b, ii, oi, oc, s, p, d, g, True, [], None, r)
    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    x, w, b, ii, oi, oc, s, p, d, g = _case((8, 6, 3, 1, 1, 1, 1, 6, 2), 0.5, True, True, True)
    r = torch.randn(2, oc, 6, 6)
    torch.library.opcheck(OP, (x, w, b, ii, oi, oc, s, p, d, g, True, [], 0.5, r))


@pytest.mark.parametrize("what", ["shape", "dtype", "pool"])
def test_bad_residuals_are_named(what):
    x, w, b, ii, oi, oc, s, p, d, g = _case((8, 6, 3, 1, 1, 1, 1, 6, 1), 1.0, False, False, True)
    res = {"shape": torch.randn(1, oc, 6, 5), "dtype": torch.randn(1, oc, 6, 6, dtype=torch.float64),
           "pool": torch.randn(1, oc, 6, 6)}[what]  # fmt: skip
    pool = [2, 2, 2, 2, 0, 0] if what == "pool" else []
    args = (x, w, b, ii, oi, oc, s, p, d, g, True)
    for call in (lambda: OP(*args, pool, None, res), lambda: pruned_conv2d_checked_ref(*args, pool, None, res),
                 lambda: pruned_conv2d(*args, max_pool=(pool[:2], pool[2:4], pool[4:]) if pool else None,
                                       residual=res)):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match="'residual'"):
            call()


@pytest.mark.parametrize("c_in, c_out", [(1, 1), (15, 2), (17, 1), (32, 3), (40, 4), (15, 4)])
@pytest.mark.parametrize("keep", ["all", "run", "scattered"])
def test_one_to_four_output_channels_on_channels_last(c_in, c_out, keep):
    # stride-1 1x1 convs on channels_last x with 1-2 outputs (3-4 from 32 inputs) and a run of kept inputs
    # take pixels as lanes: whole and masked 16-channel chunks, a partial last block of pixels (7x7 maps), a
    # bias, residual and capped ReLU per pixel, scattered outputs; 15->4 and scattered inputs keep the tiles
    gen = torch.Generator().manual_seed(c_in + c_out)
    x = torch.randn(2, c_in + 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    ii = {"all": None, "run": torch.arange(2, 2 + c_in),
          "scattered": torch.sort(torch.randperm(c_in + 3, generator=gen)[:c_in]).values}[keep]  # fmt: skip
    if keep == "all":
        x = x[:, :c_in].contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 1, 1, generator=gen)
    b = torch.randn(c_out, generator=gen)
    oi = torch.arange(1, 1 + c_out)
    res = torch.randn(2, c_out + 2, 7, 7, generator=gen)
    plain = (x, w, b, ii, None, c_out, [1, 1], [0, 0], [1, 1], 1, False)
    scattered = (x, w, None, ii, oi, c_out + 2, [1, 1], [0, 0], [1, 1], 1, True)
    for args, extra in ((plain, ([], None, None)), (scattered, ([], 0.5, res))):
        y = OP(*args, *extra)
        assert y.is_contiguous(memory_format=_memory_format(x))  # (x of one channel counts as NCHW)
        torch.testing.assert_close(y, pruned_conv2d_ref(*args, *extra), rtol=1e-4, atol=1e-4)


# depthwise (C, kernel, stride, padding, dilation, side, batch): 3x3 (weights in registers, interior pixels in
# blocks of 8, then 4 (AVX2, baseline: 2), the rest one at a time) with a tail past the last 16-channel vector,
# on rows under 32 pixels and over (NCHW restaged either way), and of 130 (NCHW row loops); 3x3 stride 2; 5x5
# stride 2 (weights from memory); dilation 2; fewer than 16 channels (the tail alone); 7x7 maps of 2 blocks of 64
DEPTHWISE = [
    (40, 3, 1, 1, 1, 9, 2), (20, 3, 1, 1, 1, 34, 1), (18, 3, 1, 1, 1, 130, 1), (48, 3, 2, 1, 1, 20, 1),
    (36, 5, 2, 2, 1, 15, 2), (32, 3, 1, 2, 2, 11, 1), (7, 3, 2, 1, 1, 10, 3), (144, 3, 1, 1, 1, 7, 2),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("keep", ["all", "run", "scattered"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_depthwise_matches_reference(case, keep, channels_last):
    # the channel-vector path (channels_last x; NCHW restaged) reads x in place when the kept channels are one
    # run and compacts them first otherwise; scattered outputs store lane by lane
    c, k, s, p, d, side, n = case
    gen = torch.Generator().manual_seed(c + k)
    kept = {"all": None, "run": torch.arange(1, c - 2),
            "scattered": torch.sort(torch.randperm(c, generator=gen)[: c // 2 + 1]).values}[keep]  # fmt: skip
    ck = c if kept is None else kept.numel()
    x = torch.randn(n, c, side, side, generator=gen) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(ck, 1, k, k, generator=gen), torch.randn(ck, generator=gen)
    for scatter, relu, cap in ((False, False, None), (True, True, None), (kept is not None, True, 1.0)):
        oi = kept if scatter else None
        args = (x, w, b, kept, oi, c if scatter else ck, [s, s], [p, p], [d, d], ck, relu)
        y = OP(*args, [], cap)
        want = pruned_conv2d_ref(*_double(args), [], cap)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize(
    "case, cl",
    [((10, 14, 3, 1, 1, 1, 1, 34, 1), False), ((12, 12, 3, 1, 2, 2, 3, 36, 3), False),
     ((40, 72, 3, 1, 1, 1, 2, 13, 3), False), ((24, 40, 1, 1, 0, 1, 1, 9, 5), True),
     ((20, 48, 3, 1, 1, 1, 1, 14, 3), True), ((800, 72, 3, 1, 1, 1, 1, 10, 3), False),
     ((800, 72, 3, 1, 1, 1, 1, 10, 3), True), ((1600, 128, 1, 1, 0, 1, 1, 7, 2), False),
     ((1600, 128, 1, 1, 0, 1, 1, 7, 2), True), ((100, 40, 3, 1, 1, 1, 1, 11, 20), False),
     ((128, 128, 3, 1, 2, 2, 2, 12, 8), False), ((300, 40, 3, 2, 1, 1, 1, 21, 6), False)],
    ids=["staged", "staged-groups", "pixel-rows", "pixel-rows-cl", "row-windows", "tap-chunks", "tap-chunks-cl",
         "channel-chunks", "channel-chunks-cl", "restaged", "restaged-groups", "restaged-stride2"],
)  # fmt: skip
def test_work_split_at_any_thread_count(case, cl, threads):
    # the staged path (stride-1 kxk on maps wider than 32): each thread stages the band of rows its tiles read,
    # so bands start and end mid-image, span images, and (8 threads, few tiles) share tiles split by rows; the
    # pixels-as-rows path (small NCHW maps, channels_last): each thread takes an equal share of (output-channel
    # block, pixel tile) items, which may start and end mid-block; with the taps in chunks (400 kept input
    # channels x 9 taps x 36 output channels, 48 in the transposed weight: a block's weights over 512 KiB) a
    # thread's tiles of a block pass over each chunk in batches (38 tiles: two batches at one thread); a 1x1
    # conv's input channels in chunks (800 kept channels x 64 outputs: a block's weights over 192 KiB); NCHW x
    # restaged as channels_last (kxk, >= 16 Mi multiply-adds: 50 kept channels, 121-pixel maps, not whole 16 x
    # 16 blocks; with groups and dilation; stride 2 from 150 kept channels), in parallel over 16-pixel blocks of
    # each image
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = (*_case(case, 0.5, True, cl, True), True)
        want = pruned_conv2d_ref(*_double(args))
        torch.testing.assert_close(OP(*args).double(), want, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_padding_taps_read_zeros_whatever_the_call_order():
    # the pixels-as-rows path points taps in the padding at a zero buffer shared by all calls (grown on demand):
    # a small NCHW map with many channels needs it as large as the image, the next call may need more or less
    for cin, side in ((8, 5), (96, 9), (16, 7), (128, 11), (8, 5)):
        x = torch.randn(2, cin, side, side)
        w = torch.randn(6, cin // 2, 3, 3)
        ii = torch.arange(1, cin, 2)
        args = (x, w, None, ii, None, 6, [1, 1], [1, 1], [1, 1], 1, False)
        torch.testing.assert_close(
            OP(*args).double(), pruned_conv2d_ref(*_double(args)), rtol=1e-4, atol=1e-4
        )


def test_kept_scratch_buffers_across_sizes_and_threads():
    # the restaged input (kxk on NCHW, >= 16 Mi multiply-adds), the staged planes' bands and the im2col tiles
    # live in buffers each thread keeps for its next call, grown on demand: calls of other sizes in turn, from
    # two Python threads at once, each against the reference
    import threading

    cases = [((100, 40, 3, 1, 1, 1, 1, 11, 20), False), ((10, 14, 3, 1, 1, 1, 1, 34, 1), False),
             ((300, 40, 3, 2, 1, 1, 1, 21, 6), False), ((100, 40, 3, 1, 1, 1, 1, 11, 8), False),
             ((24, 20, 3, 2, 1, 1, 1, 70, 1), False), ((64, 64, 3, 1, 1, 1, 64, 40, 8), False)]  # fmt: skip
    calls = []
    for case, cl in cases:
        args = (*_case(case, 0.5, False, cl, True), True)
        calls.append((args, pruned_conv2d_ref(*_double(args))))
    errors = []

    def run(order):
        try:
            for _ in range(2):
                for i in order:
                    args, want = calls[i]
                    torch.testing.assert_close(OP(*args).double(), want, rtol=1e-4, atol=1e-4)
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(order,)) for order in ([0, 1, 2, 3, 4, 5], [5, 3, 4, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_reference_hand_computed():
    # one input channel kept of two, a 1x1 weight of 2, out_index scatters to channel 1 of 3, ReLU
    x = torch.tensor([[[[1.0, -2.0]], [[10.0, 20.0]]]])
    w = torch.tensor([[[[2.0]]]])
    y = pruned_conv2d_ref(x, w, torch.tensor([0.5]), torch.tensor([0]), torch.tensor([1]), 3,
                          [1, 1], [0, 0], [1, 1], 1, True)  # fmt: skip
    assert torch.equal(y, torch.tensor([[[[0.0, 0.0]], [[2.5, 0.0]], [[0.0, 0.0]]]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    args = (*_case((16, 24, 3, 1, 1, 1, 1, 9, 2), 0.5, True, False, True, dtype), True)
    y = OP(*args)
    assert y.dtype == dtype
    want = pruned_conv2d_ref(*_double(args))
    naive = pruned_conv2d_ref(*args).double()
    assert (y.double() - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-12


def test_empty_batch_and_noncontiguous_input():
    x, w, b, ii, oi, oc, s, p, d, g = _case((16, 24, 3, 1, 1, 1, 1, 20, 1), 0.5, False, False, True)
    empty = OP(x[:0], w, b, ii, oi, oc, s, p, d, g, False)
    assert empty.shape == (0, oc, 20, 20)
    big = torch.randn(2, 32, 24, 22)
    view = big[:, ::2, 2:, :20]  # every other channel, cropped: strided in C, H and W
    assert not view.is_contiguous()
    y = OP(view, w, b, ii, oi, oc, s, p, d, g, False)
    want = pruned_conv2d_ref(*_double((view.contiguous(), w, b, ii, oi, oc, s, p, d, g, False)))
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_public_function_defaults():
    x = torch.randn(1, 6, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    ii = torch.tensor([0, 2, 5])
    oi = torch.tensor([0, 1, 3, 6])
    y = pruned_conv2d(x, w, None, ii, oi, padding=1)  # out_channels defaults to out_index.max() + 1
    assert y.shape == (1, 7, 5, 5)
    torch.testing.assert_close(y[:, oi], F.conv2d(x[:, ii], w, padding=1))


def test_gradients_match_reference_autograd():
    args = list(_case((12, 10, 3, 2, 1, 1, 1, 9, 2), 0.5, True, False, True))
    x, w, b = (t.clone().requires_grad_() for t in args[:3])
    y = OP(x, w, b, *args[3:], True)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y2 = pruned_conv2d_ref(x2, w2, b2, *args[3:], True)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, w2, b2), gy.double())
    for got, want in ((gx, gx2), (gw, gw2), (gb, gb2)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert (gx[:, [c for c in range(12) if c not in args[3].tolist()]] == 0).all()


@pytest.mark.parametrize("pool", [[], [2, 2, 2, 2, 0, 0]], ids=["no-pool", "pool"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_relu6_and_its_gradients_match_f_relu6(pool, channels_last):
    # relu_max=6 is F.relu6: forward, and the gradient zero where the cap or the ReLU cut (backward either
    # reads the saved output or, with a pool, recomputes the conv)
    x, w, b, ii, oi, oc, s, p, d, g = _case((10, 12, 3, 1, 1, 1, 1, 8, 2), 0.5, True, channels_last, True)
    x, w, b = (t * 4 for t in (x, w, b))  # outputs well past 6 and below 0
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = pruned_conv2d(x, w, b, ii, oi, oc, s, p, d, g, relu=True, relu_max=6.0,
                      max_pool=(pool[:2], pool[2:4], pool[4:]) if pool else None)  # fmt: skip
    xs = x.index_select(1, ii)
    full = torch.zeros(x.shape[0], oc, 8, 8).index_copy(1, oi, F.relu6(F.conv2d(xs, w, b, 1, 1)))
    want = F.max_pool2d(full, pool[:2], pool[2:4], pool[4:]) if pool else full
    assert (want == 6).any() and (want == 0).any()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    wanted = torch.autograd.grad(want, (x, w, b), gy)
    for g1, g2 in zip(got, wanted):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_relu_max_gradcheck_float64_and_opcheck():
    case = (6, 5, 3, 1, 1, 1, 1, 5, 1)
    x, w, b, ii, oi, oc, s, p, d, g = _case(case, 0.5, True, False, True, torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: OP(x, w, b, ii, oi, oc, s, p, d, g, True, [], 0.7)  # (no output at exactly 0.7)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    torch.library.opcheck(OP, (*_case((8, 6, 3, 1, 1, 1, 1, 6, 2), 0.5, True, True, True), True, [], 0.5))


@pytest.mark.parametrize("relu, cap", [(False, 6.0), (True, 0.0), (True, -1.0), (True, float("nan"))])
def test_relu_max_needs_relu_and_a_positive_cap(relu, cap):
    args = _case((8, 6, 3, 1, 1, 1, 1, 6, 1), 1.0, False, False, True)
    for call in (lambda: OP(*args, relu, [], cap), lambda: pruned_conv2d(*args, relu=relu, relu_max=cap),
                 lambda: pruned_conv2d_checked_ref(*args, relu, [], cap)):  # fmt: skip
        with pytest.raises(ValueError, match="'relu_max' must be None, or a number > 0 with relu=True"):
            call()


def test_gradcheck_float64():
    x, w, b, ii, oi, oc, s, p, d, g = _case(
        (6, 5, 3, 1, 1, 1, 1, 5, 1), 0.5, True, False, True, torch.float64
    )
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: OP(x, w, b, ii, oi, oc, s, p, d, g, False)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_opcheck():
    args = (*_case((8, 6, 3, 1, 1, 1, 1, 6, 2), 0.5, True, False, True), True)
    torch.library.opcheck(OP, args)


def test_compile_matches_eager():
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    m = pyprune.nn.PrunedConv2d.from_dense(conv, keep_in=[0, 3, 5, 7], keep_out=[1, 2, 4, 8, 11], relu=True)
    x = torch.randn(2, 8, 10, 10)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))


def _bad(**change):
    args = dict(zip(
        ["x", "weight", "bias", "in_index", "out_index", "out_channels", "stride", "padding", "dilation", "groups"],
        _case((8, 6, 3, 1, 1, 1, 1, 6, 1), 0.5, True, False, True),
    ))  # fmt: skip
    args.update(change)
    return OP(*args.values(), False)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"in_index": torch.tensor([0, 1, 2, 8])}, ValueError, "in_index.*must hold channels in \\[0, 8\\)"),
        ({"in_index": torch.tensor([0, 2, 2, 3])}, ValueError, "in_index.*sorted and free of duplicates"),
        ({"in_index": torch.tensor([3, 2, 1, 0])}, ValueError, "in_index.*sorted"),
        ({"in_index": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, TypeError, "in_index.*Long"),
        ({"out_index": torch.tensor([0, 1, 6])}, ValueError, "out_index.*\\[0, 6\\)"),
        ({"out_index": torch.tensor([0, 1])}, ValueError, "out_index.*one entry per weight row"),
        ({"out_channels": -1}, ValueError, "out_channels.*>= 0"),
        ({"in_index": torch.tensor([0, 1, 2])}, ValueError, "weight.*C_in_kept"),
        ({"groups": 3}, ValueError, "groups.*must divide"),
        ({"weight": torch.randn(3, 4, 3)}, ValueError, "weight.*4-D"),
        ({"weight": torch.randn(3, 4, 3, 3, dtype=torch.float64)}, TypeError, "weight"),
        ({"bias": torch.randn(5)}, ValueError, "bias"),
        ({"out_index": None, "out_channels": 7}, ValueError, "out_channels"),
        ({"stride": [0, 1]}, ValueError, "stride"),
        ({"padding": [0, 0], "x": torch.randn(1, 8, 2, 2)}, ValueError, "empty output"),
    ],
)
def test_bad_input_names_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**change)


@pytest.mark.parametrize("made_in", ["grad", "inference_mode"], ids=["normal-weight", "inference-weight"])
@pytest.mark.parametrize("called_in", ["grad", "inference_mode"])
def test_channels_last_weight_cache_follows_weight_changes(made_in, called_in):
    # the channels_last path keeps a transposed copy of the weight between calls (under inference_mode too,
    # for a normal weight): in-place updates, a new .data and a different weight tensor must all be seen
    def mode(name):
        return torch.inference_mode() if name == "inference_mode" else contextlib.nullcontext()

    x = torch.randn(2, 12, 9, 9).contiguous(memory_format=torch.channels_last)
    with mode(made_in):
        w = torch.randn(10, 6, 3, 3)
    ii = torch.arange(0, 12, 2)

    def run(weight):
        with mode(called_in):
            return OP(x, weight, None, ii, None, 10, [1, 1], [1, 1], [1, 1], 1, False)

    y1 = run(w)
    torch.testing.assert_close(run(w), y1)
    with mode(called_in if made_in == "grad" else "inference_mode"):  # inference tensors change only in there
        w.mul_(2.0)
    torch.testing.assert_close(run(w), 2 * y1)
    if made_in == "inference_mode":
        return
    p = torch.nn.Parameter(w.clone())
    torch.testing.assert_close(run(p), 2 * y1)
    p.data = -p.data
    torch.testing.assert_close(run(p), -2 * y1)
    with torch.no_grad():
        p.add_(p)
    torch.testing.assert_close(run(p), -4 * y1)
    torch.testing.assert_close(run(torch.zeros_like(w)), torch.zeros_like(y1))


def test_weight_changes_behind_the_version_counter_are_seen():
    # writes through .data leave the parameter's version counter alone, and `p.data = t` can hand back an
    # address seen before (a reused flat buffer, as torch.nn.utils.vector_to_parameters does): the transposed
    # weight kept between calls, matched by identity and version alone, gave the old values here (max error
    # 0.7 to 30); it is now matched against the weight's contents too
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    m = PrunedConv2d.from_dense(conv, keep_in=[0, 2, 3, 5], keep_out=[1, 4, 9])
    x = torch.randn(2, 8, 7, 7)  # a small map: the path that packs the weight

    def check():
        torch.testing.assert_close(m(x), m.to_dense()(x), rtol=1e-4, atol=1e-4)

    check()
    m.weight.data.mul_(0.5)
    check()
    m.weight.data.copy_(torch.randn_like(m.weight))
    check()
    m.weight.data[0, 1, 2, 0] = 0.0  # one weight, as pruning by hand does
    check()
    flat = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    for _ in range(3):
        torch.nn.utils.vector_to_parameters(flat, m.parameters())
        check()
        flat.mul_(-0.5)  # the next values, in the same buffer
    # changes that add one constant to every 32-bit word (a sign flip; a scale by a power of two moves every
    # exponent) passed a Fletcher sum of the words on these shapes (numel a multiple of 64, 64 KiB)
    m = PrunedConv2d.from_dense(torch.nn.Conv2d(128, 128, 1), keep_in=range(128), keep_out=range(128))
    x = torch.randn(1, 128, 7, 7)
    check()
    m.weight.data.neg_()
    check()
    m.weight.data.mul_(2.0)
    check()


def test_a_weight_reshaped_through_data_is_seen():
    # same tensor, version and bytes, another shape: the transposed copy of the old shape was reused
    w = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    with torch.no_grad():
        pruned_conv2d(torch.randn(1, 16, 7, 7), w, padding=1)
        w.data = w.data.view(16, 32, 3, 3)
        x = torch.randn(1, 32, 7, 7)
        y = pruned_conv2d(x, w, padding=1)
        torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cap", [None, 6.0], ids=["relu", "relu6"])
@pytest.mark.parametrize("side", [7, 40], ids=["pixels-as-rows", "pixel-vectors"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_keeps_nan_like_f_relu(side, channels_last, cap):
    # a NaN weight (a diverged run, a bad checkpoint) must show in the output, as with F.relu(F.conv2d(...)):
    # the vector ReLU's `v > 0 ? v : 0` turned it into a plausible 0 (and F.relu6 keeps NaN too)
    x = torch.randn(1, 8, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3)
    w[1, 0, 1, 1] = float("nan")
    y = OP(x, w, None, None, None, 4, [1, 1], [1, 1], [1, 1], 1, True, [], cap)
    expected = (F.relu if cap is None else F.relu6)(F.conv2d(x, w, None, 1, 1))
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(y[:, 1]).all()
    torch.testing.assert_close(y[:, [0, 2, 3]], expected[:, [0, 2, 3]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu, cap", [(False, None), (True, None), (True, 1.5)])
def test_no_input_channel_kept_gives_the_bias(relu, cap):
    # an empty in_index sums nothing: every output pixel is its channel's bias (the output was left unset)
    x = torch.randn(2, 6, 5, 5)
    b = torch.tensor([0.5, -1.0, 2.0])
    empty = torch.zeros(0, dtype=torch.int64)
    oi = torch.tensor([0, 2, 4])
    y = OP(x, torch.randn(3, 0, 3, 3), b, empty, oi, 5, [1, 1], [0, 0], [1, 1], 1, relu, [], cap)
    expected = torch.zeros(2, 5, 3, 3)
    expected[:, [0, 2, 4]] = (b.relu().clamp_max(cap or float("inf")) if relu else b).view(1, 3, 1, 1)
    assert torch.equal(y, expected)


def test_empty_out_index_needs_out_channels():
    with pytest.raises(ValueError, match="'out_channels' must be given when out_index is empty"):
        empty = torch.zeros(0, dtype=torch.long)
        pruned_conv2d(torch.randn(1, 4, 5, 5), torch.randn(0, 4, 1, 1), None, None, empty)


def test_grad_mode_off_skips_autograd_and_gives_the_same_result():
    # pyprune.ops.* call below the Autograd key under no_grad (ops._common.call_op): same values, no graph
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    ii = torch.tensor([0, 2, 5])
    y = pruned_conv2d(x, w, None, ii, padding=1)
    assert y.requires_grad and y.grad_fn is not None
    with torch.no_grad():
        y0 = pruned_conv2d(x, w, None, ii, padding=1)
    assert not y0.requires_grad and y0.grad_fn is None
    torch.testing.assert_close(y0, y.detach())
    with torch.no_grad(), torch.enable_grad():  # grad mode back on inside: the graph is built again
        assert pruned_conv2d(x, w, None, ii, padding=1).grad_fn is not None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_index", [[1, 2, 5], [0, 6], [3]])
def test_scatter_zeroes_every_channel_nobody_writes(channels_last, out_index):
    # The output is allocated uninitialised and the kernel zeroes what out_index leaves out (runs of channels
    # before, between and after the kept ones; all of a channels_last y): memory freed full of NaN just before
    # must not show through
    out_index = torch.tensor(out_index)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 9, 9).contiguous(memory_format=fmt)
    w, b = torch.randn(len(out_index), 4, 3, 3), torch.randn(len(out_index))
    ii = torch.tensor([0, 1, 3, 4])
    expected = torch.zeros(3, 8, 9, 9)
    expected[:, out_index] = F.conv2d(x[:, ii], w, b, padding=1)
    for _ in range(3):
        garbage = torch.full((3, 8, 9, 9), float("nan")).contiguous(memory_format=fmt)
        del garbage
        y = pruned_conv2d(x, w, b, ii, out_index, 8, padding=1)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


# (case index into CASES, max_pool): ResNet's 3x3 s2 p1 on a pixels-as-rows and a staged-planes conv, 2x2 s2
# (VGG's), a non-square kernel with stride 1 and one-sided padding, a window past a map of odd size, 1x1
POOLS = [(0, [3, 3, 2, 2, 1, 1]), (13, [3, 3, 2, 2, 1, 1]), (29, [2, 2, 2, 2, 0, 0]), (4, [3, 2, 1, 1, 1, 0]),
         (3, [2, 3, 3, 2, 0, 1]), (2, [1, 1, 1, 1, 0, 0]), (26, [1, 1, 1, 1, 0, 0])]  # fmt: skip


def _pool_id(v):
    return "_".join(map(str, v)) if isinstance(v, list) else str(v)


@pytest.mark.parametrize("case, pool", POOLS, ids=_pool_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_max_pool_matches_reference(case, pool, channels_last):
    for scatter, relu in ((False, True), (True, False)):
        args = (*_case(CASES[case], 0.5, scatter, channels_last, True), relu, pool)
        y = OP(*args)
        want = pruned_conv2d_ref(*_double(args))
        assert y.shape == want.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
        plain = F.max_pool2d(OP(*args[:-1]), pool[:2], pool[2:4], pool[4:])
        assert torch.equal(y, plain)  # bit for bit what ATen's pool makes of the same conv output


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_max_pool_keeps_nan_and_inf_like_f_max_pool2d(channels_last):
    # a depthwise 1x1 identity conv, so the fused pool sees x itself
    x = nan_inf_input(channels_last)
    ones = torch.ones(20, 1, 1, 1)
    y = OP(x, ones, None, None, None, 20, [1, 1], [0, 0], [1, 1], 20, False, [3, 3, 2, 2, 1, 1])
    assert y.isnan().sum() == 2 + 1
    torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1), equal_nan=True, rtol=0, atol=0)


def test_max_pool_gradients_match_reference_autograd():
    for relu, scatter in ((True, True), (False, False)):
        args = list(_case((12, 10, 3, 1, 1, 1, 1, 9, 2), 0.5, scatter, False, True))
        x, w, b = (t.clone().requires_grad_() for t in args[:3])
        pool = [3, 3, 2, 2, 1, 1]
        y = OP(x, w, b, *args[3:], relu, pool)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), gy)
        x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y2 = pruned_conv2d_ref(x2, w2, b2, *args[3:], relu, pool)
        want = torch.autograd.grad(y2, (x2, w2, b2), gy.double())
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-4)


def test_max_pool_gradcheck_float64_and_opcheck():
    case = (6, 5, 3, 1, 1, 1, 1, 7, 1)
    x, w, b, ii, oi, oc, s, p, d, g = _case(case, 0.5, True, False, True, torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: OP(x, w, b, ii, oi, oc, s, p, d, g, True, [2, 3, 2, 1, 1, 1])
    assert torch.autograd.gradcheck(fn, (x, w, b))
    args = (*_case((8, 6, 3, 1, 1, 1, 1, 9, 2), 0.5, True, True, True), True, [3, 3, 2, 2, 1, 1])
    torch.library.opcheck(OP, args)


def test_max_pool_compiles_and_counts_the_conv_flops():
    conv = torch.nn.Conv2d(3, 8, 7, 2, 3)
    pool = torch.nn.MaxPool2d(3, 2, 1)
    m = pyprune.nn.PrunedConv2d.from_dense(conv, keep_out=[0, 2, 3, 5], relu=True, max_pool=pool)
    x = torch.randn(2, 3, 30, 30)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    y = compiled(x)
    assert y.shape == (2, 4, 8, 8)
    torch.testing.assert_close(y, m(x))
    # the conv's 15 x 15 outputs, not the pool's 8 x 8
    assert pyprune.flops.count_flops(m, x) == 2 * m.weight.numel() * 2 * 15 * 15


@pytest.mark.parametrize(
    "pool, match",
    [
        ([3, 3, 2, 2, 1], "max_pool.*empty or \\(kernel_h"),
        ([0, 3, 2, 2, 0, 0], "max_pool.*kernel >= 1"),
        ([3, 3, 0, 2, 0, 0], "max_pool.*stride >= 1"),
        ([3, 3, 2, 2, 2, 1], "max_pool.*padding <= kernel / 2"),
        ([3, 3, 2, 2, -1, 0], "max_pool.*0 <= padding"),
        ([9, 9, 1, 1, 0, 0], "max_pool.*empty output for the conv's 6 x 6 output"),
    ],
)
def test_max_pool_bad_input_names_the_argument(pool, match):
    args = _case((8, 6, 3, 1, 1, 1, 1, 6, 1), 0.5, True, False, True)
    with pytest.raises(ValueError, match=match):
        OP(*args, False, pool)
    with pytest.raises(ValueError, match=match):  # the checks of the fake and the GPU routes
        pruned_conv2d_checked_ref(*args, False, pool)


def test_gpu_routes_pool_after_their_kernel():
    # the router's checked wrapper (the Triton and CUDA backends) pools what an 11-argument kernel returns
    from pyprune.ops._router import _pruned_conv2d_checked

    routed = _pruned_conv2d_checked(pruned_conv2d_ref)
    for cl in (False, True):
        args = (*_case(CASES[0], 0.5, True, cl, True), True)
        pool = [3, 3, 2, 2, 1, 1]
        y = routed(*args, pool)
        torch.testing.assert_close(y, pruned_conv2d_ref(*args, pool))
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        with pytest.raises(ValueError, match="max_pool"):
            routed(*args, [3, 3, 2, 2, 2, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_pool": (3, None, 1)}, "'max_pool stride' must be an int or a pair of ints, got None"),
        ({"max_pool": 3}, "'max_pool' must be \\(kernel_size, stride, padding\\) or None"),
        ({"stride": None}, "'stride' must be an int or a pair of ints, got None"),
        ({"padding": (1, 1, 1)}, "'padding' must be an int or a pair of ints"),
    ],
)
def test_public_function_names_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pruned_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), **kwargs)


def test_numpy_and_tensor_integers_are_sizes():
    # as F.conv2d takes them: numpy integers (a tuple of an array's items) and 0-d integer tensors
    import numpy as np

    x, w = torch.randn(1, 3, 9, 9), torch.randn(4, 3, 3, 3)
    want = F.conv2d(x, w, None, 2, 1)
    got = pruned_conv2d(x, w, stride=tuple(np.array([2, 2])), padding=np.int64(1), dilation=torch.tensor(1))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="'stride' must be an int or a pair of ints"):
        pruned_conv2d(x, w, stride=(2.0, 2))


@pytest.mark.parametrize("epilogue", ["none", "bias_relu", "residual"])
@pytest.mark.parametrize(
    "fmt, side, out_start", [("cl", 56, 0), ("cl", 56, 5), ("nchw", 56, 0), ("nchw", 55, 0)]
)
def test_1x1_beyond_half_the_llc(epilogue, fmt, side, out_start):
    # x past half the last-level cache: y leaves by non-temporal stores, whole vectors at 64-byte aligned
    # addresses, from the channels_last pixels-as-rows tiles (out_start 5 puts every vector off that
    # alignment: plain stores) and the NCHW GEMM tiles without a residual (55 x 55 planes start off
    # alignment: plain stores around the streamed vectors), with the bias, residual and ReLU applied
    llc = pyprune._extension.cpu_features()["last_level_cache_bytes"]
    if not 0 < llc <= 64 << 20:
        pytest.skip(f"last-level cache of {llc} bytes: x would be too large for a unit test")
    gen = torch.Generator().manual_seed(out_start + side)
    c_in, out_channels = 64, 80
    fmt = torch.channels_last if fmt == "cl" else torch.contiguous_format
    batch = llc // (2 * 4 * c_in * side * side) + 1
    x = torch.randn(batch, c_in, side, side, generator=gen).contiguous(memory_format=fmt)
    assert 2 * x.nbytes > llc
    ii = torch.arange(0, c_in, 4).repeat_interleave(3) + torch.arange(3).repeat(c_in // 4)  # 48 of 64
    oi = torch.arange(out_start, out_start + 64)
    w = torch.randn(64, 48, 1, 1, generator=gen) / 7
    b = torch.randn(64, generator=gen) if epilogue != "none" else None
    res = None
    if epilogue == "residual":
        res = torch.randn(batch, out_channels, side, side, generator=gen).contiguous(memory_format=fmt)
    y = pruned_conv2d(x, w, b, ii, oi, out_channels, relu=epilogue != "none", residual=res)
    assert y.is_contiguous(memory_format=fmt)
    want = torch.zeros(batch, out_channels, side, side)
    want[:, oi] = F.conv2d(x[:, ii], w, b)
    if res is not None:
        want = want + res
    if epilogue != "none":
        want = torch.relu(want)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
