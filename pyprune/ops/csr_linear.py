"""pyprune::csr_linear: y = x W^T + b with W in CSR."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..sparse.base import compressed_rows, row_pointers
from . import _library  # noqa: F401
from ._common import autograd_bias_grad, call_op, eager, register_cpu_fallback
from ._router import TensorCache, register_cuda


def csr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """x: (..., K); W: (out_features, K) as CSR with int32 crow_indices (out_features + 1,) and
    col_indices (nnz,), values (nnz,); bias: (out_features,) or None. Returns (..., out_features)."""
    return call_op(
        torch.ops.pyprune.csr_linear.default, x, crow_indices, col_indices, values, out_features, bias
    )


@torch.library.register_fake("pyprune::csr_linear")
def _(x, crow_indices, col_indices, values, out_features, bias):
    torch._check(values.dtype == x.dtype, lambda: "csr_linear: values must have the dtype of x")
    return x.new_empty((*x.shape[:-1], out_features))


def csr_transpose(crow_indices: Tensor, col_indices: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of W^T for W (len(crow_indices) - 1, n_cols): (crow, col, perm) with values_T = values[perm].

    Kept while the structure is unchanged (the backward of every training step asks for it, and the sort costs
    a multiple of the forward: 34 ms against 3 ms for a 4096^2 weight at 90% and 64 tokens on this project's
    CPU); not while tracing, and not for tensor subclasses (fake or functional tensors)."""
    if not eager(crow_indices, col_indices):
        return _transpose(crow_indices, col_indices, n_cols)
    kept = _TRANSPOSES.get(
        (crow_indices, col_indices), lambda: (n_cols, *_transpose(crow_indices, col_indices, n_cols))
    )
    return kept[1:] if kept[0] == n_cols else _transpose(crow_indices, col_indices, n_cols)


# (crow, col) -> (n_cols, the transposed structure): up to 1 GiB of index tensors, least recently used out first
_TRANSPOSES = TensorCache(max_entries=1024, max_bytes=1 << 30)


def _transpose(crow_indices: Tensor, col_indices: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    rows = compressed_rows(crow_indices, col_indices.numel()).to(torch.int32)
    # stable sort by column keeps the rows ascending inside each new row
    perm = torch.sort(col_indices, stable=True).indices
    return row_pointers(col_indices, n_cols), rows[perm], perm


def _setup_context(ctx, inputs, output):
    x, crow_indices, col_indices, values, out_features, bias = inputs
    ctx.save_for_backward(x, crow_indices, col_indices, values)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, crow, col, values = ctx.saved_tensors
    k = x.shape[-1]
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        t_crow, t_col, perm = csr_transpose(crow, col, k)
        grad_x = torch.ops.pyprune.csr_linear(grad, t_crow, t_col, values[perm], k, None)
    if ctx.needs_input_grad[3]:
        grad_values = grad_values_csr(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, k), crow, col)
    return grad_x, None, None, grad_values, None, autograd_bias_grad(ctx, grad)


def grad_values_csr(g2: Tensor, x2: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """dL/dw[o, c] = sum_m grad[m, o] x[m, c] at the stored positions only, for g2 (M, N), x2 (M, K).

    Two ways: the dense product g2^T x2 (N x K) then a gather of the stored entries, or torch's sampled
    product (``torch.sparse.sampled_addmm``), which computes only the stored dot products but less efficiently
    per FLOP. On the CPU, in float32 / float64, the sampled one runs when density x M <= 128 (measured on this
    project's 2-core CPU, 768x3072 to 4096x4096 at 50% and 90%, M 8 to 2048: at 90% and 64 tokens 7.7 vs
    38.9 ms for 4096^2, and no case where the rule picked the slower way by more than 1.5x). Tracing (fake or
    functional tensors, torch.compile) takes the dense way."""
    n, k = g2.shape[1], x2.shape[1]
    nnz = col.numel()
    sampled = (
        g2.device.type == "cpu"
        and g2.dtype in (torch.float32, torch.float64)
        and eager(g2, x2, crow, col)
        and g2.shape[0] * nnz <= 128 * n * k
    )
    return _grad_values_sampled(g2, x2, crow, col) if sampled else _grad_values_dense(g2, x2, crow, col)


def _grad_values_dense(g2: Tensor, x2: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    return (g2.t() @ x2)[compressed_rows(crow, col.numel()), col.long()]


def _grad_values_sampled(g2: Tensor, x2: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    n, k = g2.shape[1], x2.shape[1]
    with warnings.catch_warnings():  # torch flags its sparse CSR support as beta
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        mask = torch.sparse_csr_tensor(crow, col, g2.new_zeros(col.numel()), (n, k), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, g2.t(), x2, beta=0.0).values()


torch.library.register_autograd("pyprune::csr_linear", _backward, setup_context=_setup_context)
register_cpu_fallback("csr_linear")
register_cuda("csr_linear")
