"""Triton csr_conv2d (kernels/csr_conv2d.py), its CUDA router entries, and the routed op on a GPU.

CPU (CI): the kernel runs under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (the interpreter gets bf16 wrong),
loaded under a private name with TRITON_INTERPRET=1 set only while its @triton.jit decorators run (as in
test_pruned_conv2d_triton.py), so the GPU tests of the same process still compile for the device.
GPU (`-m gpu`): the routed op on CUDA through the triton backend in every dtype, against float64; opcheck.
"""

from __future__ import annotations

import pytest
import torch

from pyprune.nn.sparse_conv2d import tap_major
from pyprune.ops import _router
from pyprune.ops.csr_conv2d import _CSR_CONV2D_CHECKED, CSR_CONV2D_BACKENDS
from pyprune.reference import csr_conv2d_ref
from pyprune.sparse import CSR

from .triton_interp import HAS_TRITON, case, check_layout, interp_fixture, to_double

HAS_CUDA = torch.cuda.is_available()


interp = interp_fixture("csr_conv2d")


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def make_case(
    n, c_in, hw, c_out, k, sparsity=0.5, stride=1, padding=0, dilation=1, bias=True, channels_last=False,
    empty_rows=(), dtype=torch.float32, device="cpu", seed=0,
):  # fmt: skip
    """The op's positional arguments: x (N, c_in, *hw); the pruned (c_out, c_in, *k) weight, tap-major CSR."""
    gen = torch.Generator().manual_seed(seed)
    hw, k = _pair(hw), _pair(k)
    x = torch.randn(n, c_in, *hw, generator=gen)
    w = torch.randn(c_out, c_in, *k, generator=gen) / (c_in * k[0] * k[1]) ** 0.5
    w = w * (torch.rand(w.shape, generator=gen) >= sparsity)
    w[list(empty_rows)] = 0
    csr = CSR.from_dense(tap_major(w))
    b = torch.randn(c_out, generator=gen).to(device, dtype) if bias else None
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    crow, col, val = (t.to(device) for t in (csr.crow_indices, csr.col_indices, csr.values.to(dtype)))
    return [x, crow, col, val, c_out, k, b, _pair(stride), _pair(padding), _pair(dilation)]


def ref64(args):
    return csr_conv2d_ref(*to_double(args))


def naive(args):
    """The same conv in the inputs' dtype by PyTorch (the densified weight through F.conv2d)."""
    return csr_conv2d_ref(*args)


def fp32_tol(args):
    x, k = args[0], args[5]
    return 4e-6 * max(1, x.shape[1] * k[0] * k[1]) ** 0.5


# (id, make_case kwargs): every kernel path and edge at least once, each small enough to interpret. With the
# interpreter's BLOCK_P 16 / BLOCK_K 4 they span several pixel blocks (partial last block) and nonzero chunks.
CPU_CASES = [
    case("1x1_dense", n=2, c_in=7, hw=5, c_out=6, k=1, sparsity=0.0),
    case("1x1_cl_nobias", n=2, c_in=9, hw=(4, 5), c_out=5, k=1, bias=False, channels_last=True),
    case("3x3_pad", n=2, c_in=5, hw=6, c_out=7, k=3, padding=1),
    case("3x3_stride2_cl", n=1, c_in=6, hw=7, c_out=5, k=3, stride=2, padding=1, channels_last=True),
    case("3x3_dilation2", n=1, c_in=4, hw=7, c_out=5, k=3, padding=2, dilation=2),
    case("asym_2x3", n=2, c_in=3, hw=(6, 7), c_out=4, k=(2, 3), stride=(2, 1), padding=(1, 0),
         dilation=(1, 2)),
    case("empty_rows_cl", n=2, c_in=5, hw=5, c_out=6, k=3, padding=1, empty_rows=(0, 3, 5),
         channels_last=True),
    case("all_zero", n=1, c_in=4, hw=5, c_out=3, k=3, sparsity=1.0, padding=1),
    case("all_zero_nobias_cl", n=1, c_in=4, hw=5, c_out=3, k=1, sparsity=1.0, bias=False, channels_last=True),
]  # fmt: skip


# ---- CPU: the kernel under the Triton interpreter ---------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("kw", [c[1] for c in CPU_CASES], ids=[c[0] for c in CPU_CASES])
def test_interpreted_fp32_matches_float64(interp, kw):
    args = make_case(**kw)
    y = interp.csr_conv2d_triton(*args)
    want = ref64(args)
    assert y.shape == want.shape and y.dtype == torch.float32
    check_layout(y, args)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=fp32_tol(args))
    for row in kw.get("empty_rows", ()):  # an empty row is its bias, exactly
        assert torch.equal(y[:, row], args[6][row].expand_as(y[:, row]))
    if kw.get("sparsity") == 1.0 and not kw.get("bias", True):
        assert torch.count_nonzero(y) == 0


@pytest.mark.triton
@pytest.mark.parametrize("name", ["3x3_pad", "3x3_stride2_cl", "empty_rows_cl"])
def test_interpreted_fp16_at_most_twice_naive_error(interp, name):
    args = make_case(**dict(CPU_CASES)[name], dtype=torch.float16)
    y = interp.csr_conv2d_triton(*args)
    assert y.dtype == torch.float16
    check_layout(y, args)
    want = ref64(args)
    err = (y.double() - want).abs().max().item()
    nerr = (naive(args).double() - want).abs().max().item()
    assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.triton
def test_interpreted_non_contiguous_x_and_empty_batch(interp):
    args = make_case(n=2, c_in=6, hw=5, c_out=4, k=3, padding=1)
    args[0] = torch.randn(2, 5, 5, 12)[..., ::2].permute(0, 3, 1, 2)  # (2, 6, 5, 5), no dense layout
    assert not args[0].is_contiguous() and not args[0].is_contiguous(memory_format=torch.channels_last)
    y = interp.csr_conv2d_triton(*args)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    args[0] = torch.randn(0, 6, 5, 5)
    assert interp.csr_conv2d_triton(*args).shape == (0, 4, 5, 5)


@pytest.mark.triton
def test_interpreted_launcher_rejects_bad_dtype(interp):
    args = make_case(n=1, c_in=4, hw=4, c_out=4, k=1)
    args[3] = args[3].double()
    with pytest.raises(TypeError, match="x's dtype"):
        interp.csr_conv2d_triton(*args)
    args[0], args[6] = args[0].double(), args[6].double()
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        interp.csr_conv2d_triton(*args)


# ---- CPU: the router's csr_conv2d entries ----------------------------------------------------------------


def test_router_lists_triton_then_reference_and_explains_dtype():
    assert [b.name for b in CSR_CONV2D_BACKENDS] == ["triton", "reference"]
    triton_be = CSR_CONV2D_BACKENDS[0]
    reason = triton_be.unavailable(*make_case(n=1, c_in=4, hw=4, c_out=4, k=1, dtype=torch.float64))
    if HAS_TRITON:
        assert "float16, bfloat16 or float32, not torch.float64" in reason
        assert triton_be.unavailable(*make_case(n=1, c_in=4, hw=4, c_out=4, k=1)) is None
    assert CSR_CONV2D_BACKENDS[1].unavailable() is None


def test_router_triton_unavailable_reuses_the_loader_reason(monkeypatch):
    args = make_case(n=1, c_in=4, hw=4, c_out=4, k=1)
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (None, "triton is not installed (test)"))
    assert CSR_CONV2D_BACKENDS[0].unavailable(*args) == "triton is not installed (test)"
    stale = type("Stale", (), {"__file__": "/old/pyprune_kernels/__init__.py"})()
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (stale, None))
    assert "predates csr_conv2d" in CSR_CONV2D_BACKENDS[0].unavailable(*args)


def test_router_falls_back_to_reference_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (None, "no triton here (test)"))
    impl = _router.route("csr_conv2d", CSR_CONV2D_BACKENDS)
    args = make_case(n=1, c_in=3, hw=5, c_out=4, k=3, padding=1)
    with pytest.warns(RuntimeWarning, match="no triton here"):
        y = impl(*args)
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    with _router.use_backend("triton"), pytest.raises(RuntimeError, match="no triton here"):
        impl(*args)


@pytest.mark.triton
def test_routed_triton_backend_runs_the_interpreted_kernel(interp, monkeypatch):
    # the CUDA router's impl, called with CPU tensors, its Triton backend pointed at the interpreted module
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (interp, None))
    impl = _router.route("csr_conv2d", CSR_CONV2D_BACKENDS)
    args = make_case(**dict(CPU_CASES)["3x3_stride2_cl"])
    with _router.use_backend("triton"):
        y = impl(*args)
    check_layout(y, args)
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))

    res = torch.randn_like(y)  # the epilogue after the kernel: relu(conv + residual)
    with _router.use_backend("triton"):
        y = impl(*args, True, res)
    check_layout(y, args)
    torch.testing.assert_close(y.double(), (ref64(args) + res.double()).relu(), rtol=0, atol=fp32_tol(args))


def _launch_recorder(monkeypatch):
    launched = []
    fake = type("Kernels", (), {"csr_conv2d_triton": staticmethod(lambda *a: launched.append(a))})()
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (fake, None))
    return launched


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: a.__setitem__(2, a[2] + 4 * 9), "col_indices' must lie in"),  # past kh*kw*C_in
        (lambda a: a.__setitem__(2, a[2] - 100), "col_indices' must lie in"),
        (lambda a: a.__setitem__(1, a[1].flip(0)), "crow_indices' must"),
        (lambda a: a.__setitem__(5, [1, 1]), "col_indices' must lie in \\[0, kh\\*kw\\*C_in = 4\\)"),
        (lambda a: a.__setitem__(3, a[3].double()), "'values' must be"),
        (lambda a: a.__setitem__(8, [-1, 1]), "'padding' must be"),
    ],
    ids=["col_past_bound", "col_negative", "crow_order", "smaller_kernel", "values_dtype", "padding"],
)
def test_router_checks_run_before_any_launch(monkeypatch, bad, match):
    launched = _launch_recorder(monkeypatch)
    triton_fn = CSR_CONV2D_BACKENDS[0].fn
    args = make_case(n=1, c_in=4, hw=5, c_out=6, k=3, padding=1, sparsity=0.3)
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
    _CSR_CONV2D_CHECKED.clear()
    triton_fn = CSR_CONV2D_BACKENDS[0].fn
    args = make_case(n=1, c_in=4, hw=5, c_out=6, k=3, padding=1)
    triton_fn(*args)
    triton_fn(*args)
    assert calls == [36]  # cached: no second device sync
    args[2].add_(0)  # an in-place change bumps the version: checked again
    triton_fn(*args)
    assert calls == [36, 36] and len(launched) == 3


# ---- GPU -------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GPU_CASES = [
    case("1x1", n=2, c_in=64, hw=14, c_out=48, k=1),
    case("1x1_cl_dense", n=2, c_in=64, hw=14, c_out=48, k=1, sparsity=0.0, channels_last=True),
    case("3x3", n=2, c_in=32, hw=14, c_out=40, k=3, padding=1, sparsity=0.9),
    case("3x3_stride2_cl", n=2, c_in=32, hw=15, c_out=40, k=3, stride=2, padding=1, channels_last=True),
    case("dilation2_cl", n=1, c_in=16, hw=13, c_out=24, k=3, padding=2, dilation=2, channels_last=True),
    case("asym_1x7", n=2, c_in=12, hw=(9, 40), c_out=10, k=(1, 7), padding=(0, 3)),
    case("empty_rows_nobias", n=2, c_in=16, hw=9, c_out=9, k=3, padding=1, empty_rows=(0, 4, 8), bias=False),
    case("all_zero_cl", n=1, c_in=8, hw=7, c_out=5, k=3, padding=1, sparsity=1.0, channels_last=True),
    case("odd_97", n=3, c_in=97, hw=11, c_out=33, k=3, padding=1, sparsity=0.7),
]  # fmt: skip


def _triton_or_skip(args):
    why = CSR_CONV2D_BACKENDS[0].unavailable(*args)
    if why:
        pytest.skip(f"triton: {why}")


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [c[1] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_gpu_matches_float64(dtype, kw):
    args = make_case(**kw, dtype=dtype, device="cuda")
    _triton_or_skip(args)
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        y = torch.ops.pyprune.csr_conv2d(*args)
        naive_y = naive(args)
    want = ref64(args)
    assert y.dtype == dtype and y.shape == want.shape
    check_layout(y, args)
    err = (y.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= fp32_tol(args), err
    else:
        nerr = (naive_y.double() - want).abs().max().item()
        assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_labels_profile_and_rejects_bad_column():
    args = make_case(**dict(GPU_CASES)["3x3"], device="cuda")
    _triton_or_skip(args)
    with (
        _router.use_backend("triton"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        torch.ops.pyprune.csr_conv2d(*args)
    assert "pyprune::csr_conv2d/triton" in {e.name for e in prof.events()}
    args[2] = args[2].clone()
    args[2][-1] = 32 * 9  # out of range: caught before the launch
    with _router.use_backend("triton"), pytest.raises(ValueError, match="col_indices"):
        torch.ops.pyprune.csr_conv2d(*args)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_opcheck(channels_last):
    args = make_case(n=2, c_in=6, hw=7, c_out=5, k=3, stride=2, padding=1, channels_last=channels_last,
                     device="cuda")  # fmt: skip
    _triton_or_skip(args)
    args[0].requires_grad_(True)
    args[3].requires_grad_(True)
    args[6].requires_grad_(True)
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        torch.library.opcheck(torch.ops.pyprune.csr_conv2d.default, tuple(args))
