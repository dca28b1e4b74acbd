import importlib

import pytest
import torch

import pyprune
from pyprune.ops import csr_linear
from pyprune.reference import csr_linear_ref
from pyprune.sparse import CSR

from .linear_cases import (
    SHAPES,
    check_column_major_input,
    check_gradcheck,
    check_gradients,
    check_many_tokens,
    check_matches_reference,
    check_opcheck,
    check_shapes_and_empty,
    pruned_weight,
)


def make_args(w, b):
    f = CSR.from_dense(w)
    return f.crow_indices, f.col_indices, f.values.detach(), w.shape[0], b


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_reference(m, k, n, sparsity):
    check_matches_reference(csr_linear, csr_linear_ref, make_args, m, k, n, sparsity, "csr")


def test_shapes_and_empty():
    check_shapes_and_empty(csr_linear, make_args, "csr")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tokens_pack_their_own_tiles(threads):
    check_many_tokens(csr_linear, make_args, threads)


def test_skewed_rows():
    # one dense row among empty ones: the load-balanced split must still cover every row exactly once
    w = torch.zeros(300, 128)
    w[7] = torch.randn(128)
    w[299, ::3] = torch.randn(43)
    x = torch.randn(33, 128)
    torch.testing.assert_close(csr_linear(x, *make_args(w, None)), x @ w.t(), atol=1e-4, rtol=1e-4)


def test_gradients_match_reference():
    check_gradients(csr_linear, csr_linear_ref, make_args, 2, "csr")


def test_gradcheck_float64():
    check_gradcheck(csr_linear, make_args, 2, "csr")


@pytest.mark.parametrize("m,way", [(3, "sampled"), (400, "dense")])  # density 0.5: 1.5 and 200 <= / > 128
def test_values_gradient_both_ways_match_float64(monkeypatch, m, way):
    # the module: pyprune.ops.csr_linear is the function
    mod = importlib.import_module("pyprune.ops.csr_linear")
    used = []
    for name in ("_grad_values_sampled", "_grad_values_dense"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, fn=fn, name=name: used.append(name) or fn(*a))
    w = pruned_weight(48, 40, 0.5, "csr")
    crow, col, vals, n, _ = make_args(w, None)
    vals.requires_grad_(True)
    x, g = torch.randn(m, 40), torch.randn(m, 48)
    csr_linear(x, crow, col, vals, n).backward(g)
    assert used == [f"_grad_values_{way}"]
    rows = torch.repeat_interleave(torch.arange(48), (crow[1:] - crow[:-1]).long())
    want = (g.double().t() @ x.double())[rows, col.long()]
    torch.testing.assert_close(vals.grad.double(), want, atol=1e-4, rtol=1e-5)


def test_backward_sees_a_structure_changed_in_place():
    # the backward keeps W^T's structure between steps; rewriting crow / col / values in place must not reuse it
    w = pruned_weight(40, 24, 0.7, "csr")
    crow, col, vals, n, _ = make_args(w, None)
    vals.requires_grad_(True)
    x = torch.randn(6, 24, requires_grad=True)
    g = torch.randn(6, 40)
    for weight in (w, w.flip(0), w.flip(1)):  # the same nonzero count, other rows and columns
        f = CSR.from_dense(weight)
        with torch.no_grad():
            crow.copy_(f.crow_indices)
            col.copy_(f.col_indices)
            vals.copy_(f.values)
        x.grad = None
        csr_linear(x, crow, col, vals, n).backward(g)
        torch.testing.assert_close(x.grad, g @ weight, atol=1e-5, rtol=1e-5)


def test_opcheck():
    check_opcheck(torch.ops.pyprune.csr_linear.default, make_args, 2, "csr")


def test_bad_input_raises_clearly():
    w = pruned_weight(8, 16, 0.5, "csr")
    crow, col, vals, n, _ = make_args(w, None)
    with pytest.raises(TypeError, match="values"):
        csr_linear(torch.randn(2, 16), crow, col, vals.double(), n)
    with pytest.raises(TypeError, match="col_indices"):
        csr_linear(torch.randn(2, 16), crow, col.long(), vals, n)
    with pytest.raises(ValueError, match="crow_indices"):
        csr_linear(torch.randn(2, 16), crow[:-1], col, vals, n)
    with pytest.raises(ValueError, match="bias"):
        csr_linear(torch.randn(2, 16), crow, col, vals, n, torch.randn(n + 1))
    bad = crow.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match="crow_indices"):
        csr_linear(torch.randn(2, 16), bad, col, vals, n)


@pytest.mark.parametrize("m", [1, 40], ids=["gather", "tiles"])
@pytest.mark.parametrize(
    "crow, col, match",
    [
        ([0, 1, 2, 3, 4], [0, 1, 2, 100000000], "'col_indices' must lie in \\[0, in_features = 8\\)"),
        ([0, 1, 2, 3, 4], [0, 1, 2, -5], "'col_indices' must lie in"),
        ([0, 1000000, 2, 3, 4], [0, 1, 2, 3], "'crow_indices' must be non-decreasing"),
        ([0, 3, 1, 3, 4], [0, 1, 2, 3], "'crow_indices' must be non-decreasing"),
    ],
)
def test_index_values_are_checked(m, crow, col, match):
    # the kernels read x and the values at these indices: out of range they crashed or read garbage
    x = torch.randn(m, 8)
    crow, col = torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        csr_linear(x, crow, col, torch.randn(4), 4, None)


@pytest.mark.parametrize("m", [1, 40], ids=["gather", "tiles"])
def test_index_writes_through_data_are_checked(m):
    # a write through .data moves no version counter: the kept validation of these indices segfaulted
    w = pruned_weight(16, 32, 0.7, "csr")
    crow, col, vals, n, _ = make_args(w, None)
    x = torch.randn(m, 32)
    torch.testing.assert_close(csr_linear(x, crow, col, vals, n), x @ w.T, rtol=1e-4, atol=1e-4)
    old = int(col[0])
    col.data[0] = 10**9
    with pytest.raises(ValueError, match="'col_indices' must lie in"):
        csr_linear(x, crow, col, vals, n)
    col.data[0] = (old + 1) % 32  # valid again
    expected = csr_linear_ref(x, crow, col, vals, n, None)
    torch.testing.assert_close(csr_linear(x, crow, col, vals, n), expected, rtol=1e-4, atol=1e-4)


def test_cpp_backend_is_the_cpu_kernel():
    assert pyprune._extension.HAS_CPP, pyprune._extension.CPP_REASON


def test_column_major_input():
    check_column_major_input(csr_linear, make_args, "csr")
