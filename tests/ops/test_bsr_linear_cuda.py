"""bsr_linear's CUDA backend: the tensor-core kernel of csrc/cuda/bsr_linear.cu (private op
pyprune::_bsr_linear_cuda) and its place in the router (pyprune/ops/_router.py).

CPU (CI): the router's reasons for not running it (missing build, dtype, block size, compute capability), the
backend order, the index checks done before the kernel (once per structure), and the arguments handed to the
private op. GPU (`-m gpu`): every supported block size, square and rectangular, against float64 with the
2x-naive-error rule, on ragged N and K, token counts that are not multiples of the tile (both tiles forced),
empty block rows, with and without bias; opcheck, torch.compile, gradients, and the errors of a bad call.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from pyprune import _extension
from pyprune.nn import SparseLinear
from pyprune.ops import _router, bsr_linear

from .test_bsr_linear_triton import bsr_case, ref64

HAS_CUDA = torch.cuda.is_available()
SIDES = (16, 32, 64)
BLOCKS = [(bh, bw) for bh in SIDES for bw in SIDES]


def fake_cuda_x(dtype):
    """Stands in for a CUDA tensor where only dtype and device are read."""
    return types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0))


@pytest.fixture
def built(monkeypatch):
    """Pretends pyprune._C was built with the CUDA kernel, so the checks after the build check run."""
    monkeypatch.setattr(_extension, "HAS_CUDA", True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)


# ---- CPU: router decisions and messages -----------------------------------------------------------------


def test_cuda_backend_sits_between_triton_and_reference():
    assert [b.name for b in _router.BSR_LINEAR_BACKENDS] == ["triton", "cuda", "reference"]
    # the private op takes the public op's arguments
    pub = torch.ops.pyprune.bsr_linear.default._schema
    priv = torch.ops.pyprune._bsr_linear_cuda.default._schema
    assert [(a.name, str(a.type)) for a in priv.arguments] == [(a.name, str(a.type)) for a in pub.arguments]


def test_reason_when_not_built(monkeypatch):
    _, crow, col, vals = bsr_case(32, 48, (16, 16), dtype=torch.float16)
    x = torch.randn(2, 48).half()
    if not _extension.HAS_CUDA:
        assert "pyprune._C has no CUDA kernels" in _router._bsr_cuda_unavailable(x, crow, col, vals, 32, None)
    monkeypatch.setattr(_extension, "HAS_CUDA", True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    reason = _router._bsr_cuda_unavailable(x, crow, col, vals, 32, None)
    assert "without csrc/cuda/bsr_linear.cu" in reason and "pip install --no-build-isolation -e ." in reason


def test_reason_dtype(built):
    _, crow, col, vals = bsr_case(32, 48, (16, 16))
    reason = _router._bsr_cuda_unavailable(torch.randn(2, 48), crow, col, vals, 32, None)
    assert "float16 or bfloat16, not torch.float32" in reason and "triton or reference backend" in reason
    reason = _router._bsr_cuda_unavailable(torch.randn(2, 48).double(), crow, col, vals.double(), 32, None)
    assert "float16 or bfloat16, not torch.float64" in reason and "triton" not in reason
    for dtype in (torch.float16, torch.bfloat16):
        assert (
            _router._bsr_cuda_unavailable(torch.randn(2, 48).to(dtype), crow, col, vals.to(dtype), 32, None)
            is None
        )


@pytest.mark.parametrize("block", [(8, 8), (16, 8), (128, 16), (32, 128), (5, 3), (48, 16)])
def test_reason_block_size(built, block):
    _, crow, col, vals = bsr_case(40, 50, block, dtype=torch.float16)
    reason = _router._bsr_cuda_unavailable(torch.randn(2, 50).half(), crow, col, vals, 40, None)
    assert f"sides 16, 32 or 64, not {block[0]} x {block[1]}" in reason and "triton backend" in reason


@pytest.mark.parametrize("block", BLOCKS)
def test_every_supported_block_is_available(built, block):
    _, crow, col, vals = bsr_case(70, 90, block, dtype=torch.bfloat16)
    assert _router._bsr_cuda_unavailable(torch.randn(2, 90).bfloat16(), crow, col, vals, 70, None) is None


def test_reason_compute_capability(built, monkeypatch):
    vals = torch.zeros(0, 32, 32, dtype=torch.float16)
    x = fake_cuda_x(torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = _router._bsr_cuda_unavailable(x, None, None, vals, 32, None)
    assert "compute capability >= 8.0" in reason and "Tesla T4 is 7.5" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _router._bsr_cuda_unavailable(x, None, None, vals, 32, None) is None


def test_named_cuda_backend_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    impl = _router.route("bsr_linear", _router.BSR_LINEAR_BACKENDS)
    _, crow, col, vals = bsr_case(32, 48, (16, 16))
    with _router.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run") as e:
        impl(torch.randn(3, 48), crow, col, vals, 32, None)  # float32 never runs on it, built or not
    assert "float16 or bfloat16" in str(e.value) or "no CUDA kernels" in str(e.value)


def test_index_values_checked_once_per_structure_then_passed_through(monkeypatch):
    _, crow, col, vals = bsr_case(40, 50, (16, 16), sparsity=0.0, dtype=torch.float16)  # 4 block columns
    x, b = torch.randn(2, 3, 50).half(), torch.randn(40).half()
    checks, calls = [], []
    real_check = _router.check_bsr_index_values
    monkeypatch.setattr(
        _router, "check_bsr_index_values", lambda c, k, nb: checks.append(nb) or real_check(c, k, nb)
    )
    monkeypatch.setattr(torch.ops.pyprune, "_bsr_linear_cuda", lambda *args: calls.append(args) or "y")
    _router._BSR_CHECKED.clear()
    assert _router._bsr_cuda(x, crow, col, vals, 40, b) == "y"
    assert _router._bsr_cuda(x, crow, col, vals, 40, None) == "y"
    assert checks == [4]  # the second call found the structure checked
    assert calls[0][0] is x and calls[0][3] is vals and calls[0][4] == 40 and calls[0][5] is b
    # the same structure against a narrower x: block columns now reach past it and are refused
    with pytest.raises(
        ValueError, match=r"pyprune::bsr_linear: .*col_indices.* ceil\(in_features / bw\) = 3\)"
    ):
        _router._bsr_cuda(torch.randn(2, 40).half(), crow, col, vals, 40, None)
    assert checks == [4, 3] and len(calls) == 2
    bad = crow.clone()
    bad[1] = int(crow[2]) + 1  # a block row ending after the next one
    with pytest.raises(ValueError, match="non-decreasing"):
        _router._bsr_cuda(x, bad, col, vals, 40, None)
    with pytest.raises(TypeError, match="values"):  # argument checks come first
        _router._bsr_cuda(x, crow, col, vals.float(), 40, None)
    _router._BSR_CHECKED.clear()


def test_check_bsr_index_values_messages():
    _, crow, col, _ = bsr_case(40, 50, (16, 16), sparsity=0.0)
    _router.check_bsr_index_values(crow, col, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, ceil\(in_features / bw\) = 3\)"):
        _router.check_bsr_index_values(crow, col, 3)
    with pytest.raises(ValueError, match="end at nnz"):
        _router.check_bsr_index_values(crow, col[:-1], 4)


# ---- GPU -------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _cuda_or_skip(dtype=torch.float16, block=(16, 16)):
    vals = torch.empty(0, *block, dtype=dtype, device="cuda")
    reason = _router._bsr_cuda_unavailable(
        torch.empty(1, 16, dtype=dtype, device="cuda"), None, None, vals, 16, None
    )
    if reason:
        pytest.skip(reason)


def _at_most_twice_naive_error(y, x, w, b):
    want = ref64(x, w, b)
    err = (y.double() - want).abs().max().item()
    naive = (F.linear(x, w, b).double() - want).abs().max().item()
    assert err <= 2 * naive + 1e-6, (err, naive)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("tile", ["64", "128"])
# 97, 130 and 1025 are multiples of no block side (ragged last block row and column); K = 97 and 1025 stage x
# element by element (rows not 16-byte aligned), K = 64 and 200 through cp.async; M = 1, 7, 97, 300 leave a
# token tail in both tiles
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (7, 97, 130), (97, 200, 130), (300, 1025, 97)])
def test_gpu_matches_float64(monkeypatch, dtype, block, tile, m, k, n):
    _cuda_or_skip(dtype, block)
    monkeypatch.setenv("PYPRUNE_BSR_CUDA_TILE", tile)
    empty = n > block[0]  # block row 0 left empty when another one remains
    w, crow, col, vals = bsr_case(n, k, block, dtype=dtype, device="cuda", empty_rows=(0,) if empty else ())
    x, b = torch.randn(m, k, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype)
    with _router.use_backend("cuda"):
        y = bsr_linear(x, crow, col, vals, n, b)
        y0 = bsr_linear(x, crow, col, vals, n, None)
    assert y.dtype == dtype and y.shape == (m, n)
    _at_most_twice_naive_error(y, x, w, b)
    _at_most_twice_naive_error(y0, x, w, None)
    if empty:  # an empty block row writes the bias alone, exactly
        bh = block[0]
        torch.testing.assert_close(y[:, :bh], b[:bh].expand(m, bh), atol=0, rtol=0)
        assert bool((y0[:, :bh] == 0).all())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block", [(16, 16), (64, 32)])
def test_gpu_long_block_rows_dense_and_empty(monkeypatch, block):
    _cuda_or_skip()
    monkeypatch.delenv("PYPRUNE_BSR_CUDA_TILE", raising=False)
    with _router.use_backend("cuda"):
        # many blocks per row (the pipeline wraps around its stages many times); an odd block count per row
        for m, k, n, sparsity in [(130, 4096, 256, 0.3), (33, 16 * 7, 64, 0.0), (1, 8192, 128, 0.9)]:
            w, crow, col, vals = bsr_case(n, k, block, sparsity=sparsity, dtype=torch.float16, device="cuda")
            x = torch.randn(m, k, device="cuda").half()
            _at_most_twice_naive_error(bsr_linear(x, crow, col, vals, n, None), x, w, None)
        # no stored block at all: the bias alone
        _, crow, col, vals = bsr_case(70, 50, block, sparsity=1.0, dtype=torch.float16, device="cuda")
        assert col.numel() == 0
        b = torch.randn(70, device="cuda").half()
        x = torch.randn(5, 50, device="cuda").half()
        torch.testing.assert_close(bsr_linear(x, crow, col, vals, 70, b), b.expand(5, 70), atol=0, rtol=0)


@pytest.mark.gpu
@gpu
def test_gpu_shapes_layouts_and_profile():
    _cuda_or_skip()
    w, crow, col, vals = bsr_case(96, 130, (32, 32), dtype=torch.float16, device="cuda")
    with _router.use_backend("cuda"):
        x3 = torch.randn(4, 7, 130, device="cuda").half()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y3 = bsr_linear(x3, crow, col, vals, 96, None)
        assert "pyprune::bsr_linear/cuda" in {e.name for e in prof.events()}
        assert y3.shape == (4, 7, 96)
        _at_most_twice_naive_error(y3, x3, w, None)
        xt = torch.randn(130, 6, device="cuda").half().t()  # non-contiguous
        _at_most_twice_naive_error(bsr_linear(xt, crow, col, vals, 96, None), xt, w, None)
        assert bsr_linear(x3[:0], crow, col, vals, 96, None).shape == (0, 7, 96)
        # values at an odd offset in their storage (not 16-byte aligned): the glue realigns them
        shifted = torch.empty(vals.numel() + 1, device="cuda", dtype=vals.dtype)[1:].view_as(vals).copy_(vals)
        _at_most_twice_naive_error(bsr_linear(x3, crow, col, shifted, 96, None), x3, w, None)


@pytest.mark.gpu
@gpu
def test_gpu_bad_calls_raise():
    _cuda_or_skip()
    _, crow, col, vals = bsr_case(40, 50, (16, 16), dtype=torch.float16, device="cuda")
    x = torch.randn(3, 50, device="cuda").half()
    with _router.use_backend("cuda"):
        bad = col.clone()
        bad[0] = 4  # ceil(50 / 16) = 4 block columns: 4 is one past the last
        with pytest.raises(ValueError, match=r"ceil\(in_features / bw\) = 4"):
            bsr_linear(x, crow, bad, vals, 40, None)
        with pytest.raises(RuntimeError, match="float16 or bfloat16"):
            bsr_linear(x.float(), crow, col, vals.float(), 40, None)
        _, crow8, col8, vals8 = bsr_case(40, 50, (8, 8), dtype=torch.float16, device="cuda")
        with pytest.raises(RuntimeError, match="sides 16, 32 or 64"):
            bsr_linear(x, crow8, col8, vals8, 40, None)
    with pytest.raises(TypeError, match="float16 or bfloat16"):  # the private op's own check
        torch.ops.pyprune._bsr_linear_cuda(x.float(), crow, col, vals.float(), 40, None)


@pytest.mark.gpu
@gpu
def test_gpu_opcheck_and_compile():
    _cuda_or_skip()
    _, crow, col, vals = bsr_case(40, 33, (16, 16), dtype=torch.float16, device="cuda")
    x = torch.randn(5, 33, device="cuda").half().requires_grad_(True)
    b = torch.randn(40, device="cuda").half()
    with _router.use_backend("cuda"):
        # the values' gradient (_bsr_linear_grad_values, no "cuda" backend) takes its automatic order
        torch.library.opcheck(
            torch.ops.pyprune.bsr_linear.default, (x, crow, col, vals.requires_grad_(), 40, b)
        )

        def f(x):
            return torch.relu(bsr_linear(x, crow, col, vals, 40, b)) * 2

        xe = torch.randn(17, 33, device="cuda").half()
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(xe), f(xe))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block", [(16, 32), (64, 16)])
def test_gpu_input_gradient(block):
    # the input gradient is bsr_linear on the transposed structure with (bw x bh) blocks: the kernel again. The
    # values' gradient is left out (the Triton SDDMM's, tested in test_bsr_linear_triton_backward.py).
    _cuda_or_skip()
    lin = torch.nn.Linear(70, 50).half().float()  # weights exact in fp16: both sides use the same ones
    cpu = SparseLinear.from_dense(lin, sparsity=0.6, layout="bsr", block=block).double()
    dev = SparseLinear.from_dense(lin, sparsity=0.6, layout="bsr", block=block).half().cuda()
    dev.weight.values.requires_grad_(False)
    x = torch.randn(3, 8, 70).half()
    g = torch.randn(3, 8, 50).half()
    xc = x.double().requires_grad_(True)
    cpu(xc).backward(g.double())
    xd = x.cuda().requires_grad_(True)
    with _router.use_backend("cuda"):
        dev(xd).backward(g.cuda())
    torch.testing.assert_close(xd.grad.cpu().double(), xc.grad, atol=2e-2, rtol=2e-2)
