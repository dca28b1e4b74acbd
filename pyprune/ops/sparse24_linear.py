"""pyprune::sparse24_linear: y = x W^T + b with W 2:4 sparse (storage in pyprune/sparse/sparse24.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sparse.sparse24 import dense_matrix, kept_entries
from . import _library  # noqa: F401
from ._common import autograd_bias_grad, call_op, register_cpu_fallback
from ._router import register_cuda


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    """x: (..., K); values: (K4/2, out_features); meta: (K4/8, out_features) uint8, K4 = K rounded up to a
    multiple of 8. Returns (..., out_features)."""
    return call_op(torch.ops.pyprune.sparse24_linear.default, x, values, meta, out_features, bias)


@torch.library.register_fake("pyprune::sparse24_linear")
def _(x, values, meta, out_features, bias):
    torch._check(values.dtype == x.dtype, lambda: "sparse24_linear: values must have the dtype of x")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, values, meta, out_features, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    k = x.shape[-1]
    n = values.shape[1]
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dense_matrix(values, meta, k)
    if ctx.needs_input_grad[1]:
        grad_values = kept_entries(grad.reshape(-1, n).t() @ x.reshape(-1, k), meta)
    return grad_x, grad_values, None, None, autograd_bias_grad(ctx, grad)


torch.library.register_autograd("pyprune::sparse24_linear", _backward, setup_context=_setup_context)
register_cpu_fallback("sparse24_linear")
register_cuda("sparse24_linear")
