"""csr_linear and sparse24_linear on CUDA: their routers (pyprune/ops/_router.py), the CUDA CSR kernel
(csrc/cuda/csr_linear.cu, private op pyprune::_csr_linear_cuda) and 2:4 through torch's semi-structured sparsity.

CPU (CI): the routers' decisions and messages (dtype, device, compute capability, missing build), the index
checks, the cache keyed on tensor identity and version, the 2:4 -> padded dense conversion, and the routed
reference path on CPU tensors. GPU (`-m gpu`): both CSR kernels (decode, rows) and 2:4 against float64 with
the 2x-naive-error rule for fp16/bf16, opcheck, torch.compile, gradients.
"""

from __future__ import annotations

import random
import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from pyprune import _extension
from pyprune.nn import SparseLinear
from pyprune.ops import _router, csr_linear, sparse24_linear
from pyprune.sparse import CSR, Sparse24

from .linear_cases import pruned_weight

HAS_CUDA = torch.cuda.is_available()


def csr_args(n, k, sparsity=0.9, dtype=torch.float32, device="cpu", empty_rows=()):
    w = pruned_weight(n, k, sparsity, "csr")
    for r in empty_rows:
        w[r] = 0
    w = w.to(dtype)
    f = CSR.from_dense(w)
    return w.to(device), f.crow_indices.to(device), f.col_indices.to(device), f.values.detach().to(device)


def s24_args(n, k, dtype=torch.float32, device="cpu"):
    w = pruned_weight(n, k, 0.5, "2:4").to(dtype)
    f = Sparse24.from_dense(w)
    return w.to(device), f.values.detach().to(device), f.meta.to(device)


def ref64(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def fake_cuda_x(dtype):
    """Stands in for a CUDA tensor where only dtype and device are read."""
    return types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0))


# ---- CPU: router decisions and messages -----------------------------------------------------------------


def test_sparse24_semi_reasons(monkeypatch):
    _, vals, meta = s24_args(64, 64)
    reason = _router.sparse24_semi_unavailable(torch.randn(2, 64), vals, meta, 64, None)
    assert "float16 or bfloat16" in reason and "torch.float32" in reason
    reason = _router.sparse24_semi_unavailable(torch.randn(2, 64).half(), vals.half(), meta, 64, None)
    assert "needs CUDA tensors" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = _router.sparse24_semi_unavailable(fake_cuda_x(torch.float16), vals, meta, 64, None)
    assert "compute capability >= 8.0" in reason and "Tesla T4 is 7.5" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_router, "_semi_structured_kind", lambda: ("cusparselt", ""))
    assert _router.sparse24_semi_unavailable(fake_cuda_x(torch.bfloat16), vals, meta, 64, None) is None
    monkeypatch.setattr(_router, "_semi_structured_kind", lambda: (None, "torch 9.9 is not a CUDA build"))
    assert _router.sparse24_semi_unavailable(fake_cuda_x(torch.float16), vals, meta, 64, None) == (
        "torch 9.9 is not a CUDA build"
    )


def test_sparse24_route_falls_back_with_message_or_raises_when_named(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    _router._warn_fallback.cache_clear()
    impl = _router.route("sparse24_linear", _router.SPARSE24_LINEAR_BACKENDS)
    w, vals, meta = s24_args(40, 36)
    x, b = torch.randn(3, 5, 36), torch.randn(40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = impl(x, vals, meta, 40, b)  # CPU tensors: the cuda backend cannot run; auto takes the reference
    assert any("cuda: torch semi-structured" in str(c.message) for c in caught)
    torch.testing.assert_close(y.double(), ref64(x, w, b), atol=1e-4, rtol=0)
    with _router.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        impl(x, vals, meta, 40, b)
    with _router.use_backend("reference"), pytest.raises(ValueError, match="K4/2"):
        impl(x, vals[:-4], meta, 40, b)


def test_sparse24_padded_dense_is_the_weight_and_stays_2_4():
    for n, k in [(40, 36), (64, 128), (1, 8), (130, 70)]:
        w, vals, meta = s24_args(n, k)
        d = _router._sparse24_to_padded_dense(vals, meta, n, k)
        assert d.shape[0] % 64 == 0 and d.shape[1] % 64 == 0 and d.shape[0] >= n and d.shape[1] >= k
        torch.testing.assert_close(d[:n, :k], w, atol=0, rtol=0)
        assert bool((d[n:] == 0).all()) and bool((d[:, k:] == 0).all())
        assert int(d.reshape(d.shape[0], -1, 4).ne(0).sum(-1).max()) <= 2


def test_csr_reasons_and_index_checks(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    _, crow, col, vals = csr_args(30, 50)
    reason = _router._csr_cuda_unavailable(torch.randn(2, 50), crow, col, vals, 30, None)
    if not _extension.HAS_CUDA:
        assert "pyprune._C has no CUDA kernels" in reason
    monkeypatch.setattr(_extension, "HAS_CUDA", True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    assert "float16, bfloat16 or float32" in _router._csr_cuda_unavailable(torch.randn(2, 50).double())
    assert _router._csr_cuda_unavailable(torch.randn(2, 50).half()) is None
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    assert "without csrc/cuda/csr_linear.cu" in _router._csr_cuda_unavailable(torch.randn(2, 50))

    _router.check_csr_index_values(crow, col, 50)  # a valid structure passes
    top = int(col.max())  # with in_features = the largest column, that column is out of range
    with pytest.raises(ValueError, match=rf"in \[0, in_features = {top}\)"):
        _router.check_csr_index_values(crow, col, top)
    bad = crow.clone()
    bad[-2] = -1  # below the row before it
    with pytest.raises(ValueError, match="non-decreasing"):
        _router.check_csr_index_values(bad, col, 50)
    with pytest.raises(ValueError, match="end at nnz"):
        _router.check_csr_index_values(crow[:-1], col, 50)


def test_csr_route_reference_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    # a CUDA build would route to its kernel, which takes CUDA tensors only (the route is the op's CUDA impl)
    monkeypatch.setattr(_extension, "HAS_CUDA", False)
    _router._warn_fallback.cache_clear()
    impl = _router.route("csr_linear", _router.CSR_LINEAR_BACKENDS)
    w, crow, col, vals = csr_args(30, 50, empty_rows=(0, 7))
    x, b = torch.randn(2, 3, 50), torch.randn(30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = impl(x, crow, col, vals, 30, b)
    assert any("cuda: pyprune._C has no CUDA kernels" in str(c.message) for c in caught)
    torch.testing.assert_close(y.double(), ref64(x, w, b), atol=1e-4, rtol=0)
    with _router.use_backend("reference"):
        with pytest.raises(TypeError, match="col_indices"):
            impl(x, crow, col.long(), vals, 30, b)
        with pytest.raises(ValueError, match="out_features \\+ 1"):
            impl(x, crow, col, vals, 31, None)
        with pytest.raises(ValueError, match="bias"):
            impl(x, crow, col, vals, 30, b[:-1])


def test_tensor_cache_keys_on_identity_and_version():
    cache = _router.TensorCache(max_entries=2)
    a, b = torch.zeros(3), torch.zeros(3)
    calls = []

    def make(tag):
        return lambda: calls.append(tag) or tag

    assert cache.get((a, b), make("ab")) == "ab"
    assert cache.get((a, b), make("again")) == "ab" and calls == ["ab"]  # hit
    a.add_(1)  # in place: a new version
    assert cache.get((a, b), make("ab2")) == "ab2"
    assert cache.get((b, a), make("ba")) == "ba"  # order matters: another key
    c = torch.zeros(3)
    assert cache.get((c,), make("c")) == "c"  # evicts the oldest entry (max 2)
    assert cache.get((a, b), make("ab3")) == "ab3"
    assert calls == ["ab", "ab2", "ba", "c", "ab3"]
    with torch.inference_mode():
        a.add_(1)  # a normal tensor still counts versions in inference mode
        assert cache.get((a, b), make("ab4")) == "ab4"
        assert cache.get((a, b), make("again")) == "ab4"
        d = torch.zeros(3)  # an inference tensor has no version: never kept
        assert cache.get((d,), make("d")) == "d" and cache.get((d,), make("d2")) == "d2"
    assert calls == ["ab", "ab2", "ba", "c", "ab3", "ab4", "d", "d2"]


def test_reference_backends_check_index_values():
    # the router's reference backends computed with a negative column (Python indexing from the end) or a
    # decreasing crow_indices (rows dropped) instead of refusing, as the CPU kernels and the CUDA path do
    csr_ref = {b.name: b.fn for b in _router.CSR_LINEAR_BACKENDS}["reference"]
    bsr_ref = {b.name: b.fn for b in _router.BSR_LINEAR_BACKENDS}["reference"]
    x, i32 = torch.randn(3, 8), torch.int32
    for crow, col, match in (([0, 1, 2], [0, -1], "col_indices"), ([0, 2, 1, 2], [0, 1], "crow_indices")):
        with pytest.raises(ValueError, match=match):
            crow_t, col_t = torch.tensor(crow, dtype=i32), torch.tensor(col, dtype=i32)
            csr_ref(x, crow_t, col_t, torch.randn(2), len(crow) - 1, None)
    with pytest.raises(ValueError, match="col_indices"):
        crow_t, col_t = torch.tensor([0, 1, 2], dtype=i32), torch.tensor([0, -2], dtype=i32)
        bsr_ref(x, crow_t, col_t, torch.randn(2, 2, 4), 4, None)


def test_bsr_reference_backend_without_input_features():
    # x (3, 0): reshape(-1, 0) cannot infer the rows; the CPU op gives the bias broadcast (here zeros)
    bsr_ref = {b.name: b.fn for b in _router.BSR_LINEAR_BACKENDS}["reference"]
    crow, col = torch.tensor([0, 0], dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    y = bsr_ref(torch.randn(3, 0), crow, col, torch.zeros(0, 16, 16), 16, None)
    assert torch.equal(y, torch.zeros(3, 16))


def test_tensor_cache_sees_a_parameter_converted_in_place():
    # Module.half() / .to() set param.data: same object, same version, new data, dtype (or device)
    cache = _router.TensorCache()
    lin = torch.nn.Linear(4, 4).half()
    assert cache.get((lin.weight,), lambda: lin.weight.dtype) == torch.float16
    lin.bfloat16()
    assert cache.get((lin.weight,), lambda: lin.weight.dtype) == torch.bfloat16


def test_tensor_cache_under_threads():
    # six threads sharing one cache (as autograd's backward threads share csr_linear's transposes) raised
    # KeyError / "dictionary changed size" and let the byte count drift above the entries' real total
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    cache = _router.TensorCache(max_entries=4, max_bytes=1 << 12)
    keys = [(torch.zeros(1), torch.zeros(1)) for _ in range(16)]
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                cache.get(rng.choice(keys), lambda: torch.zeros(100))
        except Exception as e:  # noqa: BLE001  (any exception is the failure)
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert cache._bytes == sum(e[3] for e in cache._entries.values()) and len(cache._entries) <= 4


def test_tensor_cache_drops_the_least_recently_used_past_its_byte_budget():
    cache = _router.TensorCache(max_entries=10, max_bytes=100)  # 100 bytes: two 40-byte values, not three
    keys = [torch.zeros(1) for _ in range(3)]
    made = []

    def make(i):
        return lambda: made.append(i) or (torch.zeros(10), i)  # 40 bytes of tensor, plus an int

    cache.get((keys[0],), make(0))
    cache.get((keys[1],), make(1))
    cache.get((keys[0],), make(0))  # a hit: 0 becomes the most recently used
    cache.get((keys[2],), make(2))  # over budget: 1, the least recently used, goes
    cache.get((keys[0],), make(0))
    cache.get((keys[1],), make(1))
    assert made == [0, 1, 2, 1]


def test_tensor_cache_counts_tensors_nested_in_its_values():
    # the conv backward keeps (sizes, (crow, col, perm)) and lists of such tuples: their tensors count against
    # the byte budget as top-level ones do (they counted as 0 bytes, so the budget never evicted them)
    cache = _router.TensorCache(max_entries=10, max_bytes=100)
    keys = [torch.zeros(1) for _ in range(3)]
    for i, key in enumerate(keys):
        cache.get((key,), lambda: ((3, 4), [(torch.zeros(5), torch.zeros(5)), None]))  # 40 bytes
        assert cache._bytes == 40 * min(i + 1, 2)
    assert len(cache._entries) == 2


# ---- GPU -------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _csr_cuda_or_skip():
    reason = _router._csr_cuda_unavailable(torch.empty(1, device="cuda"))
    if reason:
        pytest.skip(reason)


def _close_to_float64(y, x, w, b, dtype, k):
    want = ref64(x, w, b)
    err = (y.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * k**0.5 * 4, err
    else:
        naive = (F.linear(x, w, b).double() - want).abs().max().item()
        assert err <= 2 * naive + 1e-6, (err, naive)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["decode", "rows", "auto"])
@pytest.mark.parametrize(
    "m,k,n", [(1, 4096, 300), (5, 1025, 97), (16, 64, 130), (64, 333, 64), (300, 1025, 97)]
)
def test_gpu_csr_cuda_matches_float64(monkeypatch, dtype, path, m, k, n):
    _csr_cuda_or_skip()
    monkeypatch.setenv("PYPRUNE_CSR_PATH", path)
    w, crow, col, vals = csr_args(n, k, dtype=dtype, device="cuda", empty_rows=(0, n - 1))
    x, b = torch.randn(m, k, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype)
    with _router.use_backend("cuda"):
        y = csr_linear(x, crow, col, vals, n, b)
    assert y.dtype == dtype and y.shape == (m, n)
    _close_to_float64(y, x, w, b, dtype, k)


@pytest.mark.gpu
@gpu
def test_gpu_csr_cuda_edges():
    _csr_cuda_or_skip()
    # k too long for a token row of x in shared memory: the decode request falls back to the rows kernel
    w, crow, col, vals = csr_args(33, 70000, sparsity=0.99, dtype=torch.float16, device="cuda")
    x = torch.randn(3, 70000, device="cuda").half()
    with _router.use_backend("cuda"):
        _close_to_float64(csr_linear(x, crow, col, vals, 33, None), x, w, None, torch.float16, 70000)
        # all-empty weight: bias only; non-contiguous x; no tokens
        _, crow0, col0, vals0 = csr_args(40, 50, sparsity=1.0, device="cuda")
        b = torch.randn(40, device="cuda")
        xs = torch.randn(50, 6, device="cuda").t()
        torch.testing.assert_close(csr_linear(xs, crow0, col0, vals0, 40, b), b.expand(6, 40))
        w1, crow1, col1, vals1 = csr_args(40, 50, device="cuda")
        _close_to_float64(csr_linear(xs, crow1, col1, vals1, 40, b), xs, w1, b, torch.float32, 50)
        assert csr_linear(xs[:0], crow1, col1, vals1, 40, b).shape == (0, 40)
        bad = col1.clone()
        bad[0] = 50
        with pytest.raises(ValueError, match="in_features"):
            csr_linear(xs, crow1, bad, vals1, 40, b)
        # no input features: y is the bias on both paths (the rows path refused the 0-byte x^T, a null
        # pointer)
        _, crow_k0, col_k0, vals_k0 = csr_args(40, 0, sparsity=1.0, device="cuda")
        for m in (3, 100):
            y = csr_linear(torch.randn(m, 0, device="cuda"), crow_k0, col_k0, vals_k0, 40, b)
            torch.testing.assert_close(y, b.expand(m, 40))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["decode", "rows"])
def test_gpu_csr_cuda_16_bit_columns(monkeypatch, path):
    # in_features <= 65536: the kernels read 16-bit column indices (columns from 32768 on included), the same
    # sums as with the 32-bit ones; an in-place change of the structure is seen (the 16-bit columns and the
    # rows kernel's row order, both kept between calls, are rebuilt)
    _csr_cuda_or_skip()
    monkeypatch.setenv("PYPRUNE_CSR_PATH", path)
    n, k = 24, 40000
    w, crow, col, vals = csr_args(n, k, sparsity=0.99, dtype=torch.float16, device="cuda")
    assert int(col.max()) >= 32768
    x = torch.randn(5, k, device="cuda").half()
    with _router.use_backend("cuda"):
        y16 = csr_linear(x, crow, col, vals, n, None)
        monkeypatch.setenv("PYPRUNE_CSR_INDEX", "int32")
        y32 = csr_linear(x, crow, col, vals, n, None)
        monkeypatch.delenv("PYPRUNE_CSR_INDEX")
        assert torch.equal(y16, y32)
        _close_to_float64(y16, x, w, None, torch.float16, k)
        # the rows in reverse order: other row lengths and columns, the same nnz, written in place
        f = CSR.from_dense(w.flip(0).cpu())
        crow.copy_(f.crow_indices)
        col.copy_(f.col_indices)
        vals.copy_(f.values.detach())
        _close_to_float64(csr_linear(x, crow, col, vals, n, None), x, w.flip(0), None, torch.float16, k)


@pytest.mark.gpu
@gpu
def test_gpu_csr_cuda_opcheck_compile_gradients():
    _csr_cuda_or_skip()
    _, crow, col, vals = csr_args(40, 33, sparsity=0.7, device="cuda")
    x = torch.randn(5, 33, device="cuda", requires_grad=True)
    with _router.use_backend("cuda"):
        torch.library.opcheck(
            torch.ops.pyprune.csr_linear.default,
            (x, crow, col, vals.clone().requires_grad_(True), 40, torch.randn(40, device="cuda")),
        )
        f = lambda x: torch.relu(csr_linear(x, crow, col, vals, 40, None))
        xe = torch.randn(17, 33, device="cuda")
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(xe), f(xe))
        lin = torch.nn.Linear(70, 50)
        cpu = SparseLinear.from_dense(lin, sparsity=0.8, layout="csr").double()
        dev = SparseLinear.from_dense(lin, sparsity=0.8, layout="csr").cuda()
        xc = torch.randn(3, 8, 70, requires_grad=True)
        xd = xc.detach().cuda().requires_grad_(True)
        g = torch.randn(3, 8, 50)
        cpu(xc.double()).backward(g.double())
        dev(xd).backward(g.cuda())
    torch.testing.assert_close(xd.grad.cpu().double(), xc.grad.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        dev.weight.values.grad.cpu().double(), cpu.weight.values.grad, atol=1e-4, rtol=1e-4
    )


def _semi_or_skip(dtype=torch.float16):
    x = torch.empty(1, 8, device="cuda", dtype=dtype)
    reason = _router.sparse24_semi_unavailable(x, None, None, 0, None)
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (37, 200, 130), (300, 1032, 96), (128, 4096, 4096)])
def test_gpu_sparse24_semi_structured_matches_float64(dtype, m, k, n):
    _semi_or_skip(dtype)
    w, vals, meta = s24_args(n, k, dtype=dtype, device="cuda")
    x, b = torch.randn(m, k, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype)
    with (
        _router.use_backend("cuda"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        y = sparse24_linear(x, vals, meta, n, b)
    assert "pyprune::sparse24_linear/cuda" in {e.name for e in prof.events()}
    assert y.dtype == dtype and y.shape == (m, n)
    _close_to_float64(y, x, w, b, dtype, k)


@pytest.mark.gpu
@gpu
def test_gpu_sparse24_cache_invalidates_and_fp32_falls_back(monkeypatch):
    _semi_or_skip()
    monkeypatch.delenv(_router.ENV_VAR, raising=False)
    w, vals, meta = s24_args(64, 128, dtype=torch.float16, device="cuda")
    x = torch.randn(8, 128, device="cuda").half()
    _router._SEMI_CACHE.clear()
    with _router.use_backend("cuda"):
        y1 = sparse24_linear(x, vals, meta, 64, None)
        y1b = sparse24_linear(x, vals, meta, 64, None)
        vals.mul_(2)  # in-place update (an optimizer step): the cached semi-structured weight is rebuilt
        y2 = sparse24_linear(x, vals, meta, 64, None)
    torch.testing.assert_close(y1b, y1)
    torch.testing.assert_close(y2, 2 * y1, atol=1e-2, rtol=1e-2)
    _router._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y32 = sparse24_linear(x.float(), vals.float(), meta, 64, None)
    assert any("float16 or bfloat16" in str(c.message) for c in caught)
    torch.testing.assert_close(y32, F.linear(x.float(), 2 * w.float()), atol=1e-3, rtol=1e-3)
    with _router.use_backend("cuda"), pytest.raises(RuntimeError, match="float16 or bfloat16"):
        sparse24_linear(x.float(), vals.float(), meta, 64, None)


@pytest.mark.gpu
@gpu
def test_gpu_sparse24_opcheck_compile_gradients():
    _semi_or_skip()
    w, vals, meta = s24_args(64, 96, dtype=torch.float16, device="cuda")
    x = torch.randn(5, 96, device="cuda").half()
    with _router.use_backend("cuda"):
        torch.library.opcheck(
            torch.ops.pyprune.sparse24_linear.default,
            (x.requires_grad_(True), vals.clone().requires_grad_(True), meta, 64, None),
        )
        f = lambda x: torch.relu(sparse24_linear(x, vals, meta, 64, None))
        xe = torch.randn(17, 96, device="cuda").half()
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(xe), f(xe))
        v = vals.clone().requires_grad_(True)
        xg = x.detach().clone().requires_grad_(True)
        sparse24_linear(xg, v, meta, 64, None).float().sum().backward()
    # d/dx of sum(x W^T) is the column sums of W; d/dvalues is the x column sums at the stored positions
    torch.testing.assert_close(xg.grad.float(), w.float().sum(0).expand(5, 96), atol=1e-2, rtol=1e-2)
    assert v.grad is not None and v.grad.shape == vals.shape
