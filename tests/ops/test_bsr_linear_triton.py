"""Triton BSR linear (kernels/bsr_linear.py) and the CUDA router (pyprune/ops/_router.py).

CPU (CI): the kernel runs under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (the interpreter gets bf16 wrong).
The interpreted copy of the kernel module is loaded under a private name with TRITON_INTERPRET=1 set only while
its @triton.jit decorators run: Triton decides interpret-or-compile when it decorates, so the GPU tests below,
run in the same process, still compile for the device.
GPU (`-m gpu`): the routed op on CUDA in every dtype and block size, opcheck, torch.compile, gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn import SparseLinear
from pyprune.ops import _router, bsr_linear
from pyprune.sparse import BSR
from pyprune.sparse.select import block_mask

from .triton_interp import interp_fixture

HAS_CUDA = torch.cuda.is_available()


interp = interp_fixture("bsr_linear")


def bsr_case(n, k, block, sparsity=0.5, dtype=torch.float32, device="cpu", empty_rows=()):
    """Dense pruned weight (rounded to dtype) and its BSR; block rows in ``empty_rows`` hold no block."""
    w = torch.randn(n, k)
    w = w * block_mask(w, sparsity, block)
    for r in empty_rows:
        w[r * block[0] : (r + 1) * block[0]] = 0
    w = w.to(dtype)
    f = BSR.from_dense(w, block)
    return w.to(device), f.crow_indices.to(device), f.col_indices.to(device), f.values.detach().to(device)


def ref64(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# fp32 error vs float64, relative to sqrt(K); fp16/bf16 are held to the 2x-naive rule instead
TOL32 = 1e-5


# ---- CPU: the kernel under the Triton interpreter ----------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 32)])
@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (7, 50, 40), (20, 97, 33)])
def test_interpreted_fp32_matches_float64(interp, block, m, k, n):
    # 50, 97, 40 and 33 are multiples of no block side: ragged last block row and column
    w, crow, col, vals = bsr_case(n, k, block)
    x, b = torch.randn(m, k), torch.randn(n)
    y = interp.bsr_linear_triton(x, crow, col, vals, n, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref64(x, w, b), rtol=0, atol=TOL32 * k**0.5 * 4)


@pytest.mark.triton
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 32), (32, 16)])
def test_interpreted_fp16_at_most_twice_naive_error(interp, block):
    m, k, n = 9, 70, 45
    w, crow, col, vals = bsr_case(n, k, block, dtype=torch.float16)
    x, b = torch.randn(m, k).half(), torch.randn(n).half()
    y = interp.bsr_linear_triton(x, crow, col, vals, n, b)
    assert y.dtype == torch.float16
    want = ref64(x, w, b)
    err = (y.double() - want).abs().max().item()
    naive = (F.linear(x, w, b).double() - want).abs().max().item()
    assert err <= 2 * naive + 1e-6, (err, naive)


@pytest.mark.triton
def test_interpreted_empty_block_rows_and_no_bias(interp):
    n, k = 64, 48
    w, crow, col, vals = bsr_case(n, k, (16, 16), sparsity=0.3, empty_rows=(0, 2))
    assert int(crow[1] - crow[0]) == 0 and int(crow[3] - crow[2]) == 0
    x, b = torch.randn(5, k), torch.randn(n)
    y = interp.bsr_linear_triton(x, crow, col, vals, n, b)
    torch.testing.assert_close(y[:, :16], b[:16].expand(5, 16))  # an empty block row outputs the bias alone
    torch.testing.assert_close(y.double(), ref64(x, w, b), rtol=0, atol=1e-4)
    y0 = interp.bsr_linear_triton(x, crow, col, vals, n, None)
    torch.testing.assert_close(y0.double(), ref64(x, w, None), rtol=0, atol=1e-4)


@pytest.mark.triton
def test_interpreted_small_and_odd_blocks_are_padded(interp):
    # tl.dot needs sides >= 16: the launcher pads 5x3 and 8x64 blocks to tensor-core tiles (masked)
    for block in [(5, 3), (8, 64)]:
        w, crow, col, vals = bsr_case(21, 70, block)
        x = torch.randn(4, 70)
        y = interp.bsr_linear_triton(x, crow, col, vals, 21, None)
        torch.testing.assert_close(y.double(), ref64(x, w, None), rtol=0, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("schedule", ["rows", "balanced"])
def test_interpreted_blocks_wider_than_a_chunk(interp, schedule):
    # blocks wider than BLOCK_K (64) run as several chunks of one flat loop (an unrolled chunk loop multiplied
    # the kernel's shared memory by BW / 64: 384 KiB for fp32 256x256 blocks, over an H100's 227 KiB), with a
    # ragged last chunk (100, 144) and last block column
    for block in [(32, 128), (16, 100), (32, 144)]:
        w, crow, col, vals = bsr_case(70, 300, block, sparsity=0.3)
        x, b = torch.randn(5, 300), torch.randn(70)
        y = interp.bsr_linear_triton(x, crow, col, vals, 70, b, schedule=schedule, split_blocks=1)
        torch.testing.assert_close(y.double(), ref64(x, w, b), rtol=0, atol=TOL32 * 300**0.5 * 4)


@pytest.mark.triton
def test_interpreted_non_contiguous_x_and_all_empty(interp):
    w, crow, col, vals = bsr_case(32, 40, (16, 16))
    x = torch.randn(40, 6).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(
        interp.bsr_linear_triton(x, crow, col, vals, 32, None).double(), ref64(x, w, None), rtol=0, atol=1e-4
    )
    _, crow0, col0, vals0 = bsr_case(32, 40, (16, 16), sparsity=1.0)
    b = torch.randn(32)
    torch.testing.assert_close(interp.bsr_linear_triton(x, crow0, col0, vals0, 32, b), b.expand(6, 32))
    assert interp.bsr_linear_triton(x[:0], crow, col, vals, 32, b).shape == (0, 32)


@pytest.mark.triton
def test_interpreted_launcher_rejects_bad_input(interp):
    _, crow, col, vals = bsr_case(32, 40, (16, 16))
    with pytest.raises(TypeError, match="dtype"):
        interp.bsr_linear_triton(torch.randn(2, 40), crow, col, vals.half(), 32, None)
    with pytest.raises(ValueError, match="crow"):
        interp.bsr_linear_triton(torch.randn(2, 40), crow, col, vals, 64, None)


# ---- CPU: the router's choice ---------------------------------------------------------------------------


def test_use_backend_sets_and_restores(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    assert _router.get_backend() is None
    with _router.use_backend("reference"):
        assert _router.get_backend() == "reference"
        with _router.use_backend("auto"):
            assert _router.get_backend() is None
        assert _router.get_backend() == "reference"
    assert _router.get_backend() is None
    monkeypatch.setenv(_router.ENV_VAR, "triton")
    assert _router.get_backend() == "triton"
    with _router.use_backend("reference"):  # the setter wins over the environment
        assert _router.get_backend() == "reference"
    with _router.use_backend("auto"):  # "auto" too (it fell through to the environment)
        assert _router.get_backend() is None
    with _router.use_backend(None):  # no choice: the environment's
        assert _router.get_backend() == "triton"
    monkeypatch.setenv(_router.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="PYPRUNE_BACKEND"):
        _router.get_backend()
    with pytest.raises(ValueError, match="unknown pyprune backend"):
        _router.use_backend("cublas")


def test_route_picks_labels_and_explains(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    calls = []
    backends = [
        _router.Backend("triton", lambda t: calls.append("triton") or t, lambda t: "not built here"),
        _router.Backend("reference", lambda t: calls.append("reference") or t),
    ]
    impl = _router.route("fake_op", backends)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            impl(torch.ones(1))
    assert calls == ["reference"]
    assert any("not built here" in str(w.message) for w in caught)  # auto fell back, and said why
    assert "pyprune::fake_op/reference" in {e.name for e in prof.events()}
    with _router.use_backend("triton"), pytest.raises(RuntimeError, match="not built here"):
        impl(torch.ones(1))
    calls.clear()
    with _router.use_backend("cuda"), pytest.warns(RuntimeWarning, match="no 'cuda' backend"):
        impl(torch.ones(1))  # the op has no cuda backend at all: its automatic order runs
    assert calls == ["reference"]


def test_router_reference_path_checks_and_computes():
    # the routed CUDA implementation, called directly with CPU tensors on its reference backend
    impl = _router.route("bsr_linear", _router.BSR_LINEAR_BACKENDS)
    w, crow, col, vals = bsr_case(40, 50, (16, 16))
    x, b = torch.randn(2, 3, 50), torch.randn(40)
    with _router.use_backend("reference"):
        y = impl(x, crow, col, vals, 40, b)
        assert y.shape == (2, 3, 40)
        torch.testing.assert_close(y.double(), ref64(x, w, b), rtol=0, atol=1e-4)
        with pytest.raises(TypeError, match="values"):
            impl(x, crow, col, vals.double(), 40, b)
        with pytest.raises(ValueError, match="crow_indices"):
            impl(x, crow, col, vals, 80, None)


# ---- GPU -------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
GPU_BLOCKS = [(16, 16), (32, 32), (64, 64), (16, 32), (32, 16), (64, 32), (8, 8), (128, 128)]


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", GPU_BLOCKS)
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (37, 200, 130), (300, 1025, 97)])
def test_gpu_matches_float64(dtype, block, m, k, n):
    w, crow, col, vals = bsr_case(n, k, block, dtype=dtype, device="cuda", empty_rows=(1,))
    x, b = torch.randn(m, k, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype)
    with pyprune.ops._router.use_backend("triton"):
        y = bsr_linear(x, crow, col, vals, n, b)
    assert y.dtype == dtype and y.shape == (m, n)
    want = ref64(x, w, b)
    err = (y.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= TOL32 * k**0.5 * 4, err
    else:
        naive = (F.linear(x, w, b).double() - want).abs().max().item()
        assert err <= 2 * naive + 1e-6, (err, naive)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_triton_equals_reference_backend_and_profiles():
    _, crow, col, vals = bsr_case(96, 130, (32, 32), device="cuda")
    x = torch.randn(4, 7, 130, device="cuda")
    with _router.use_backend("reference"):
        want = bsr_linear(x, crow, col, vals, 96, None)
    with (
        _router.use_backend("triton"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        got = bsr_linear(x, crow, col, vals, 96, None)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert "pyprune::bsr_linear/triton" in {e.name for e in prof.events()}


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_opcheck():
    _, crow, col, vals = bsr_case(40, 33, (16, 16), device="cuda")
    x = torch.randn(5, 33, device="cuda", requires_grad=True)
    v = vals.clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.pyprune.bsr_linear.default, (x, crow, col, v, 40, torch.randn(40, device="cuda"))
    )


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_torch_compile_equals_eager():
    _, crow, col, vals = bsr_case(64, 96, (32, 32), dtype=torch.float16, device="cuda")
    b = torch.randn(64, device="cuda").half()

    def f(x):
        return torch.relu(bsr_linear(x, crow, col, vals, 64, b)) * 2

    x = torch.randn(17, 96, device="cuda").half()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
def test_gpu_sparse_linear_gradients(block):
    lin = torch.nn.Linear(70, 50)
    cpu = SparseLinear.from_dense(lin, sparsity=0.6, layout="bsr", block=block).double()
    dev = SparseLinear.from_dense(lin, sparsity=0.6, layout="bsr", block=block).cuda()
    x = torch.randn(3, 8, 70, requires_grad=True)
    xd = x.detach().cuda().requires_grad_(True)
    g = torch.randn(3, 8, 50)
    cpu(x.double()).backward(g.double())
    with _router.use_backend("triton"):
        dev(xd).backward(g.cuda())
    torch.testing.assert_close(xd.grad.cpu().double(), x.grad.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        dev.weight.values.grad.cpu().double(), cpu.weight.values.grad, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(dev.bias.grad.cpu().double(), cpu.bias.grad, atol=1e-4, rtol=1e-4)
