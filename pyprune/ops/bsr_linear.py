"""pyprune::bsr_linear: y = x W^T + b with W in BSR."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sparse.base import compressed_rows
from . import _library  # noqa: F401
from ._common import autograd_bias_grad, call_op, eager, register_cpu_fallback, rows2d
from ._router import register_cuda
from .csr_linear import csr_transpose


def bsr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """x: (..., K); W: (out_features, K) as BSR: int32 crow_indices (ceil(out_features / bh) + 1,),
    col_indices (nnz_blocks,), values (nnz_blocks, bh, bw) zero past the weight's edges. Returns
    (..., out_features)."""
    return call_op(
        torch.ops.pyprune.bsr_linear.default, x, crow_indices, col_indices, values, out_features, bias
    )


@torch.library.register_fake("pyprune::bsr_linear")
def _(x, crow_indices, col_indices, values, out_features, bias):
    torch._check(values.dtype == x.dtype, lambda: "bsr_linear: values must have the dtype of x")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, crow_indices, col_indices, values, out_features, bias = inputs
    ctx.save_for_backward(x, crow_indices, col_indices, values)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, crow, col, values = ctx.saved_tensors
    k = x.shape[-1]
    bh, bw = values.shape[1], values.shape[2]
    n_bcols = -(-k // bw)
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        # W^T is BSR with (bw x bh) blocks: the block structure transposed, each block transposed
        t_crow, t_col, perm = csr_transpose(crow, col, n_bcols)
        grad_x = torch.ops.pyprune.bsr_linear(
            grad, t_crow, t_col, values[perm].transpose(1, 2).contiguous(), k, None
        )
    if ctx.needs_input_grad[3]:
        if grad.is_cuda:
            # only the stored blocks of grad^T @ x (Triton SDDMM through the router)
            grad_values = torch.ops.pyprune._bsr_linear_grad_values(grad, x, crow, col, bh, bw)
        else:
            grad_values = bsr_grad_values_cpu(grad, x, crow, col, bh, bw)
    return grad_x, None, None, grad_values, None, autograd_bias_grad(ctx, grad)


def bsr_grad_values_dense(grad: Tensor, x: Tensor, crow: Tensor, col: Tensor, bh: int, bw: int) -> Tensor:
    """The values' gradient sampled from the dense grad^T @ x: grad (..., N), x (..., K) ->
    (nnz_blocks, bh, bw). The CPU path, and the reference backend of the CUDA SDDMM."""
    n, k = grad.shape[-1], x.shape[-1]
    n_brows, n_bcols = crow.numel() - 1, -(-k // bw)
    gw = rows2d(grad).t() @ rows2d(x)
    gw = torch.nn.functional.pad(gw, (0, n_bcols * bw - k, 0, n_brows * bh - n))
    grid = gw.reshape(n_brows, bh, n_bcols, bw).permute(0, 2, 1, 3)
    return grid[compressed_rows(crow, col.numel()), col.long()]


def bsr_grad_values_cpu(grad: Tensor, x: Tensor, crow: Tensor, col: Tensor, bh: int, bw: int) -> Tensor:
    """The values' gradient on the CPU: only the stored blocks (bsr_grad_values_blocks) when density x tokens
    <= 16, else sampled from the dense product (measured on this project's 2-core CPU, blocks of 32, 768x3072
    and 4096^2 at 50% and 90%, 8 to 2048 tokens: at 90% and 64 tokens 9.1 vs 63 ms for 4096^2; the rule's worst
    pick 1.45x slower than the other way). Tracing takes the dense way."""
    m = grad.numel() // max(1, grad.shape[-1])
    density = col.numel() * bh * bw / max(1, grad.shape[-1] * x.shape[-1])
    # the blocks' bmm writes into one output (out=), which autograd cannot differentiate: a double backward
    # (create_graph=True) takes the dense way
    differentiated = torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad)
    blocks = eager(grad, x, crow, col) and density * m <= 16 and not differentiated
    return (bsr_grad_values_blocks if blocks else bsr_grad_values_dense)(grad, x, crow, col, bh, bw)


def bsr_grad_values_blocks(grad: Tensor, x: Tensor, crow: Tensor, col: Tensor, bh: int, bw: int) -> Tensor:
    """Only the stored blocks of grad^T @ x: block (r, c) is grad[:, rows of r]^T @ x[:, cols of c], batched
    (bmm) over chunks of blocks whose gathered operands take at most ~32 MB."""
    n, k = grad.shape[-1], x.shape[-1]
    g2, x2 = rows2d(grad), rows2d(x)
    m, nnzb = g2.shape[0], col.numel()
    n_brows, n_bcols = crow.numel() - 1, -(-k // bw)
    gt = torch.nn.functional.pad(g2, (0, n_brows * bh - n)).t().reshape(n_brows, bh, m)
    xt = torch.nn.functional.pad(x2, (0, n_bcols * bw - k)).t().reshape(n_bcols, bw, m)
    rows, cols = compressed_rows(crow, nnzb), col.long()
    out = g2.new_empty((nnzb, bh, bw))
    chunk = max(1, (32 << 20) // max(1, (bh + bw) * m * g2.element_size()))
    for s in range(0, nnzb, chunk):
        e = min(nnzb, s + chunk)
        torch.bmm(gt[rows[s:e]], xt[cols[s:e]].transpose(1, 2), out=out[s:e])
    return out


@torch.library.register_fake("pyprune::_bsr_linear_grad_values")
def _(grad, x, crow_indices, col_indices, bh, bw):
    return x.new_empty((col_indices.shape[0], bh, bw))


torch.library.register_autograd("pyprune::bsr_linear", _backward, setup_context=_setup_context)
register_cpu_fallback("bsr_linear")
register_cuda("bsr_linear")
register_cuda("_bsr_linear_grad_values")
