"""Shared cases for the sparse linear ops: each op file builds its arguments from a dense weight with
`make_args(dense, bias)` and calls the checks below."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune.sparse.select import block_mask, magnitude_mask, nm_mask

# Tolerances vs the float64 reference, for unit-variance inputs, relative to sqrt(K) (the size of one dot).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

SHAPES = [  # (M tokens, in_features K, out_features N): 1, 7, 97, 1025 and sides that blocks don't divide
    (1, 7, 5),
    (7, 97, 33),
    (97, 64, 48),
    (3, 1025, 17),
    (130, 256, 97),
    (1025, 40, 24),
]


def pruned_weight(n: int, k: int, sparsity: float, layout: str, block=(16, 8), dtype=torch.float32):
    w = torch.randn(n, k, dtype=dtype)
    if layout == "2:4":
        mask = nm_mask(w, 2, 4) if sparsity < 1.0 else torch.zeros_like(w, dtype=torch.bool)
        if sparsity == 0.0:  # densest legal 2:4 weight
            return w * mask
        return w * mask * (magnitude_mask(w * mask, sparsity) if sparsity > 0.5 else 1)
    if layout == "bsr":
        return w * block_mask(w, sparsity, block)
    return w * magnitude_mask(w, sparsity)


def check_matches_reference(op, ref, make_args, m, k, n, sparsity, layout, bias=True, dtype=torch.float32):
    w = pruned_weight(n, k, sparsity, layout, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    x = torch.randn(m, k, dtype=dtype)
    args = make_args(w, b)
    y = op(x, *args)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=TOL[dtype] * max(1.0, k) ** 0.5 * 4)
    # the reference is the spec: it must agree too
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.testing.assert_close(ref(x.double(), *args64), expected, rtol=0, atol=1e-10)


def check_column_major_input(op, make_args, layout, k=40, n=36):
    # x as the transposed view of a (K, L) tensor's column slice (stride 1 along the tokens, row stride L >=
    # M), as SparseConv2d passes NCHW images: the kernels pack it without a contiguous copy
    w = pruned_weight(n, k, 0.7, layout)
    b = torch.randn(n)
    for m, extra in ((3, 0), (70, 0), (70, 13), (200, 5)):
        big = torch.randn(k, m + extra)
        x = big[:, extra:].t()
        assert x.stride(0) == 1 and not x.is_contiguous()
        expected = F.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(op(x, *make_args(w, b)).double(), expected, rtol=0, atol=1e-4)


def check_many_tokens(op, make_args, threads):
    # x over 8 MiB (8203 x 260 floats): each unit range packs the token tiles it reaches (tile-outer units);
    # a ragged last tile, blocks or rows past the edges, ranges that start mid-tile at 3 threads
    w = pruned_weight(37, 260, 0.7, "csr")
    x = torch.randn(8203, 260)
    b = torch.randn(37)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = op(x, *make_args(w, b))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y.double(), F.linear(x.double(), w.double(), b.double()), atol=1e-4, rtol=0)


def _with_values(args, values_index, values):
    args = list(args)
    args[values_index] = values
    return args


def check_gradients(op, ref, make_args, values_index, layout, n=24, k=40):
    """Gradients of input, stored values and bias vs the float64 reference's autograd."""
    w = pruned_weight(n, k, 0.7 if layout != "2:4" else 0.5, layout)
    args = make_args(w, torch.randn(n))
    b = args[-1].clone().requires_grad_(True)
    vals = args[values_index].clone().requires_grad_(True)
    x = torch.randn(2, 9, k, requires_grad=True)
    y = op(x, *_with_values(args[:-1], values_index, vals), b)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, vals, b), g)
    x2, v2, b2 = (t.detach().double().requires_grad_(True) for t in (x, vals, b))
    y2 = ref(x2, *_with_values(args[:-1], values_index, v2), b2)
    want = torch.autograd.grad(y2, (x2, v2, b2), g.double())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4)


def check_gradcheck(op, make_args, values_index, layout, n=6, k=9):
    w = pruned_weight(n, k, 0.5, layout, dtype=torch.float64)
    args = make_args(w, None)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    v = args[values_index].detach().clone().requires_grad_(True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: op(x, *_with_values(args[:-1], values_index, v), b), (x, v, b)
    )


def check_opcheck(opoverload, make_args, values_index, layout, n=20, k=33):
    w = pruned_weight(n, k, 0.6 if layout != "2:4" else 0.5, layout)
    args = make_args(w, torch.randn(n))
    vals = args[values_index].clone().requires_grad_(True)
    x = torch.randn(5, k, requires_grad=True)
    torch.library.opcheck(opoverload, (x, *_with_values(args, values_index, vals)))


def check_shapes_and_empty(op, make_args, layout):
    """3-D non-contiguous input with and without bias, empty batch, all-zero weight."""
    w = pruned_weight(40, 64, 0.8 if layout != "2:4" else 0.5, layout)
    for b in (torch.randn(40), None):
        x = torch.randn(64, 5, 3).permute(1, 2, 0)
        assert not x.is_contiguous()
        y = op(x, *make_args(w, b))
        assert y.shape == (5, 3, 40)
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert op(torch.randn(0, 64), *make_args(w, None)).shape == (0, 40)
    b = torch.randn(40)
    torch.testing.assert_close(op(torch.randn(4, 64), *make_args(torch.zeros(40, 64), b)), b.expand(4, 40))
    # no input features: the bias (tokens counted from the leading sizes; numel / K returned an empty tensor)
    for _ in range(3):
        torch.full((4, 40), 1e30)  # leaves garbage where an uninitialised output would be allocated
        torch.testing.assert_close(op(torch.randn(2, 2, 0), *make_args(torch.zeros(40, 0), b)), b.expand(2, 2, 40))
    # the dtypes the kernel lacks: the bias checked like fp32's, and an output of its own (at::linear's is a
    # view for 3-D x, and an in-place op on an op's view output fails under autograd)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    w64 = w.double()
    y = op(x, *make_args(w64, b.double()))
    assert not y._is_view()
    torch.testing.assert_close(y.relu_(), F.linear(x, w64, b.double()).relu())
    with pytest.raises(TypeError, match="argument 'bias' must be Double"):
        op(x, *make_args(w64, b))
    with pytest.raises(ValueError, match="argument 'bias' must have shape \\(40\\)"):
        op(x, *make_args(w64, torch.randn(3, dtype=torch.float64)))
