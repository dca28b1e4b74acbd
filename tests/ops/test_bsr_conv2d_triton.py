"""Triton bsr_conv2d (kernels/bsr_conv2d.py), its place in the CUDA router, and the routed op on a GPU.

CPU (CI): the kernel runs under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (the interpreter gets bf16 wrong),
loaded under a private name (see triton_interp.py), so the GPU tests of the same process still compile.
GPU (`-m gpu`): the routed op through the triton backend in every dtype against float64, TF32 following
cudnn.allow_tf32, the im2col backend, opcheck and the profiler label.
"""

from __future__ import annotations

import pytest
import torch

from pyprune.ops import _router
from pyprune.ops.bsr_conv2d import _BSR_CONV2D_CHECKED, _bsr_conv2d_im2col, BSR_CONV2D_BACKENDS
from pyprune.reference import bsr_conv2d_ref

from .test_bsr_conv2d import _case
from .triton_interp import HAS_TRITON, check_layout, interp_fixture, to_double

HAS_CUDA = torch.cuda.is_available()

interp = interp_fixture("bsr_conv2d")


def make_args(case, sparsity=0.5, bias=True, channels_last=False, dtype=torch.float32, device="cpu", seed=0):
    args, _ = _case(case, sparsity, bias=bias, dtype=dtype, seed=seed)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if channels_last:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    return args


def ref64(args):
    return bsr_conv2d_ref(*to_double([a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))


def naive(args):
    """The same conv in the inputs' dtype by PyTorch (the densified weight through F.conv2d)."""
    return bsr_conv2d_ref(*args)


def fp32_tol(args):
    x, k = args[0], args[5]
    return 4e-6 * max(1, x.shape[1] * k[0] * k[1]) ** 0.5 * max(1.0, ref64(args).abs().max().item())


# (C_in, C_out, (kh, kw), stride, padding, dilation, (H, W), batch, (bh, bw)), as in test_bsr_conv2d.py: each
# kernel path at least once, small enough to interpret (BLOCK_M 16 there, so several pixel tiles each).
# TAP_BLOCKS (bw divides C_in: a block's columns are one tap's channels) with a 16-wide chunk masked down to
# bw 8, with asymmetric strides / dilation, with padding on a 1x1 conv, and with a 96-wide block in two
# chunks; the general path (per-column taps) with blocks across taps and past the weight's right edge (3x5 on
# 12 channels), past its bottom edge (17 rows in 16-row blocks), and a 48x64 block over 40 channels
# (BLOCK_N 64 masked to 48); a 160-row block (two 128-row sub-tiles).
CPU_CASES = [
    ("tap_bw8_pad", (16, 32, (3, 3), 1, 1, 1, (9, 9), 2, (4, 8))),
    ("tap_asym", (9, 4, (3, 2), (2, 1), (1, 0), (1, 2), (10, 12), 2, (4, 9))),
    ("tap_1x1_pad", (24, 20, (1, 1), 1, 1, 1, (7, 9), 2, (4, 4))),
    ("tap_two_chunks", (96, 24, (3, 3), 1, 1, 1, (5, 5), 1, (8, 96))),
    ("cols_across_taps", (12, 10, (3, 3), 3, 2, 2, (17, 14), 1, (3, 5))),
    ("rows_past_edge", (33, 17, (3, 3), 2, 1, 1, (13, 13), 2, (16, 32))),
    ("block_48x64", (40, 48, (3, 3), 1, 1, 1, (7, 7), 2, (48, 64))),
    ("block_160_rows", (8, 160, (1, 1), 1, 0, 1, (5, 5), 2, (160, 8))),
]


# ---- CPU: the kernel under the Triton interpreter ---------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", [c[1] for c in CPU_CASES], ids=[c[0] for c in CPU_CASES])
def test_interpreted_fp32_matches_float64(interp, case, channels_last):
    for sparsity in (0.5, 0.0):
        args = make_args(case, sparsity, bias=sparsity == 0.5, channels_last=channels_last)
        y = interp.bsr_conv2d_triton(*args, allow_tf32=False)
        want = ref64(args)
        assert y.shape == want.shape and y.dtype == torch.float32
        check_layout(y, args)
        torch.testing.assert_close(y.double(), want, rtol=0, atol=fp32_tol(args))


@pytest.mark.triton
def test_interpreted_empty_weight_is_the_bias_or_zero(interp):
    case = dict(CPU_CASES)["tap_bw8_pad"]
    args = make_args(case, sparsity=1.0)
    assert args[2].numel() == 0
    y = interp.bsr_conv2d_triton(*args)
    assert torch.equal(y, args[6].view(1, -1, 1, 1).expand_as(y))
    args[6] = None
    assert torch.count_nonzero(interp.bsr_conv2d_triton(*args)) == 0
    # block rows 0 and 3 emptied among stored ones: those output channels are their bias, exactly
    args = make_args(case, sparsity=0.5)
    crow, col, values = args[1:4]
    block_row = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff().long())
    keep = (block_row != 0) & (block_row != 3)
    counts = crow.diff()
    counts[[0, 3]] = 0
    args[1] = torch.cat([crow[:1], counts.cumsum(0)]).int()
    args[2], args[3] = col[keep], values[keep]
    y = interp.bsr_conv2d_triton(*args, allow_tf32=False)
    bh = values.shape[1]
    for r in (0, 3):
        rows = slice(r * bh, (r + 1) * bh)
        assert torch.equal(y[:, rows], args[6][rows].view(1, -1, 1, 1).expand_as(y[:, rows]))
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))


@pytest.mark.triton
@pytest.mark.parametrize("name", ["tap_bw8_pad", "cols_across_taps", "block_48x64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_interpreted_fp16_at_most_twice_naive_error(interp, name, channels_last):
    args = make_args(dict(CPU_CASES)[name], dtype=torch.float16, channels_last=channels_last)
    y = interp.bsr_conv2d_triton(*args)
    assert y.dtype == torch.float16
    check_layout(y, args)
    want = ref64(args)
    err = (y.double() - want).abs().max().item()
    nerr = (naive(args).double() - want).abs().max().item()
    assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.triton
def test_interpreted_non_contiguous_x_and_empty_batch(interp):
    args = make_args((6, 8, (3, 3), 1, 1, 1, (5, 5), 2, (4, 6)))
    args[0] = torch.randn(2, 5, 5, 12)[..., ::2].permute(0, 3, 1, 2)  # (2, 6, 5, 5), no dense layout
    assert not args[0].is_contiguous() and not args[0].is_contiguous(memory_format=torch.channels_last)
    y = interp.bsr_conv2d_triton(*args, allow_tf32=False)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    args[0] = torch.randn(0, 6, 5, 5)
    assert interp.bsr_conv2d_triton(*args).shape == (0, 8, 5, 5)


@pytest.mark.triton
def test_interpreted_launcher_rejects_bad_arguments(interp):
    args = make_args(dict(CPU_CASES)["tap_bw8_pad"])
    bad = list(args)
    bad[3] = bad[3].double()
    with pytest.raises(TypeError, match="x's dtype"):
        interp.bsr_conv2d_triton(*bad)
    bad[0], bad[6] = bad[0].double(), bad[6].double()
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        interp.bsr_conv2d_triton(*bad)
    bad = list(args)
    bad[1] = bad[1][:-1]
    with pytest.raises(ValueError, match="row pointers"):
        interp.bsr_conv2d_triton(*bad)
    bad = list(args)
    bad[2] = bad[2].long()
    with pytest.raises(TypeError, match="int32"):
        interp.bsr_conv2d_triton(*bad)


# ---- CPU: the router's bsr_conv2d entries ----------------------------------------------------------------


def test_router_lists_triton_then_im2col_then_reference():
    assert [b.name for b in BSR_CONV2D_BACKENDS] == ["triton", "im2col", "reference"]
    args = make_args(dict(CPU_CASES)["tap_bw8_pad"], dtype=torch.float64)
    reason = BSR_CONV2D_BACKENDS[0].unavailable(*args)
    if HAS_TRITON:
        assert "float16, bfloat16 or float32, not torch.float64" in reason
        assert BSR_CONV2D_BACKENDS[0].unavailable(*make_args(dict(CPU_CASES)["tap_bw8_pad"])) is None
    assert BSR_CONV2D_BACKENDS[1].unavailable(*args) is None


def test_router_without_triton_takes_im2col(monkeypatch):
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (None, "no triton here (test)"))
    assert "no triton here" in BSR_CONV2D_BACKENDS[0].unavailable(*make_args(dict(CPU_CASES)["tap_asym"]))
    impl = _router.route("bsr_conv2d", BSR_CONV2D_BACKENDS)
    args = make_args(dict(CPU_CASES)["tap_asym"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = impl(*args)
    assert "pyprune::bsr_conv2d/im2col" in {e.name for e in prof.events()}
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    with _router.use_backend("triton"), pytest.raises(RuntimeError, match="no triton here"):
        impl(*args)


@pytest.mark.triton
def test_routed_triton_backend_runs_the_interpreted_kernel(interp, monkeypatch):
    # the CUDA router's impl, called with CPU tensors, its Triton backend pointed at the interpreted module
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (interp, None))
    impl = _router.route("bsr_conv2d", BSR_CONV2D_BACKENDS)
    args = make_args(dict(CPU_CASES)["rows_past_edge"], channels_last=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = impl(*args)
    assert "pyprune::bsr_conv2d/triton" in {e.name for e in prof.events()}
    check_layout(y, args)
    # the router passes no allow_tf32: on the CPU the interpreter computes fp32 either way
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    # the epilogue after the kernel: relu(conv + residual)
    res = torch.randn_like(y)
    with _router.use_backend("triton"):
        y = impl(*args, True, res)
    check_layout(y, args)
    torch.testing.assert_close(y.double(), (ref64(args) + res.double()).relu(), rtol=0, atol=fp32_tol(args))


def _launch_recorder(monkeypatch):
    launched = []
    fake = type("Kernels", (), {"bsr_conv2d_triton": staticmethod(lambda *a: launched.append(a))})()
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (fake, None))
    return launched


# tap_bw8_pad: C_in 16, 3x3, blocks (4, 8): ceil(144 / 8) = 18 block columns, 8 block rows
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: a.__setitem__(2, a[2] + 18), r"must lie in \[0, ceil\(kh\*kw\*C_in / bw\) = 18\)"),
        (lambda a: a.__setitem__(2, a[2] - 100), "col_indices' must lie in"),
        (lambda a: a.__setitem__(1, a[1].flip(0)), "crow_indices' must"),
        (lambda a: a.__setitem__(5, [1, 1]), r"ceil\(kh\*kw\*C_in / bw\) = 2\)"),
        (lambda a: a.__setitem__(3, a[3].double()), "'values' must be"),
        (lambda a: a.__setitem__(1, a[1][:-1]), "'crow_indices' must have ceil"),
        (lambda a: a.__setitem__(8, [-1, 1]), "'padding' must be"),
    ],
    ids=["col_past_bound", "col_negative", "crow_order", "smaller_kernel", "values_dtype", "crow_len",
         "padding"],
)
def test_router_checks_run_before_any_launch(monkeypatch, bad, match):
    launched = _launch_recorder(monkeypatch)
    triton_fn = BSR_CONV2D_BACKENDS[0].fn
    args = make_args(dict(CPU_CASES)["tap_bw8_pad"], sparsity=0.3)
    triton_fn(*args)
    assert len(launched) == 1  # the good call reaches the kernel
    bad(args)
    with pytest.raises((ValueError, TypeError), match=match):
        triton_fn(*args)
    assert len(launched) == 1


def test_router_checks_index_values_once_per_structure_version(monkeypatch):
    launched = _launch_recorder(monkeypatch)
    calls = []
    real = _router.check_csr_index_values
    monkeypatch.setattr(_router, "check_csr_index_values", lambda *a: calls.append(a[2]) or real(*a))
    _BSR_CONV2D_CHECKED.clear()
    triton_fn = BSR_CONV2D_BACKENDS[0].fn
    args = make_args(dict(CPU_CASES)["tap_bw8_pad"])
    triton_fn(*args)
    triton_fn(*args)
    assert calls == [18]  # cached: no second device sync
    args[2].add_(0)  # an in-place change bumps the version: checked again
    triton_fn(*args)
    assert calls == [18, 18] and len(launched) == 3


# ---- GPU -------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# device-sized cases: the tiles the tuned configs use (64/128 pixel rows, 32-wide blocks over 64 channels),
# a 7x7 map at batch 1 (49 pixels), the general path, and odd sizes
GPU_CASES = [
    ("3x3_32x32", (64, 64, (3, 3), 1, 1, 1, (28, 28), 2, (32, 32))),
    ("3x3_stride2_16x16", (64, 128, (3, 3), 2, 1, 1, (29, 29), 2, (16, 16))),
    ("1x1_64x64", (256, 128, (1, 1), 1, 0, 1, (14, 14), 4, (64, 64))),
    ("7x7_map_batch1", (128, 96, (3, 3), 1, 1, 1, (7, 7), 1, (32, 32))),
    ("across_taps_odd", (97, 33, (3, 3), 1, 1, 1, (11, 11), 3, (16, 48))),
    ("dilation2_asym", (32, 40, (3, 5), (1, 2), (2, 4), 2, (13, 21), 2, (8, 32))),
]


def _triton_or_skip(args):
    why = BSR_CONV2D_BACKENDS[0].unavailable(*args)
    if why:
        pytest.skip(f"triton: {why}")


# every case in fp16, the first also in bf16 and fp32 (each dtype and layout compiles its own kernel, and the
# device suite's test step has minutes, not more)
GPU_RUNS = [(name, case, torch.float16) for name, case in GPU_CASES] + [
    (GPU_CASES[0][0], GPU_CASES[0][1], dt) for dt in (torch.bfloat16, torch.float32)
]


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "case,dtype", [r[1:] for r in GPU_RUNS], ids=[f"{r[0]}-{str(r[2])[6:]}" for r in GPU_RUNS]
)
def test_gpu_matches_float64(case, dtype, channels_last):
    args = make_args(case, 0.5, channels_last=channels_last, dtype=dtype, device="cuda")
    _triton_or_skip(args)
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        y = torch.ops.pyprune.bsr_conv2d(*args)
        naive_y = naive(args)
    want = ref64(args)
    assert y.dtype == dtype and y.shape == want.shape
    check_layout(y, args)
    err = (y.cpu().double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= fp32_tol(args), err
    else:
        nerr = (naive_y.cpu().double() - want).abs().max().item()
        assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_fp32_follows_cudnn_allow_tf32():
    args = make_args(GPU_CASES[0][1], 0.5, device="cuda")
    _triton_or_skip(args)
    want = ref64(args)
    errs = {}
    for tf32 in (False, True):
        with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=tf32):
            errs[tf32] = (torch.ops.pyprune.bsr_conv2d(*args).cpu().double() - want).abs().max().item()
    assert errs[False] <= fp32_tol(args), errs
    # TF32 keeps 10 mantissa bits: its error is far above fp32's and still a small fraction of the output
    assert errs[False] < errs[True] <= 1e-2 * want.abs().max().item(), errs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_im2col_backend_matches_float64(dtype, channels_last):
    # the router's second backend: F.unfold, then bsr_linear on its own GPU backends
    args = make_args(GPU_CASES[1][1], 0.5, channels_last=channels_last, dtype=dtype, device="cuda")
    y = _bsr_conv2d_im2col(*args)
    want = ref64(args)
    check_layout(y, args)
    err = (y.cpu().double() - want).abs().max().item()
    nerr = (naive(args).cpu().double() - want).abs().max().item()
    assert err <= max(2 * nerr, 1e-3 * want.abs().max().item()), err


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_labels_profile_and_rejects_bad_column():
    args = make_args(GPU_CASES[0][1], 0.5, device="cuda")
    _triton_or_skip(args)
    with (
        _router.use_backend("triton"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        torch.ops.pyprune.bsr_conv2d(*args)
    assert "pyprune::bsr_conv2d/triton" in {e.name for e in prof.events()}
    args[2] = args[2].clone()
    args[2][-1] = 18  # ceil(9 * 64 / 32) = 18 block columns: out of range, caught before the launch
    with _router.use_backend("triton"), pytest.raises(ValueError, match="col_indices"):
        torch.ops.pyprune.bsr_conv2d(*args)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_opcheck(channels_last):
    case = (8, 12, (3, 3), 2, 1, 1, (7, 7), 2, (4, 8))
    args = make_args(case, 0.5, channels_last=channels_last, device="cuda")
    _triton_or_skip(args)
    args[0].requires_grad_(True)
    args[3].requires_grad_(True)
    args[6].requires_grad_(True)
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        torch.library.opcheck(torch.ops.pyprune.bsr_conv2d.default, tuple(args))
