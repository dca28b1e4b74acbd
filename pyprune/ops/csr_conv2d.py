"""pyprune::csr_conv2d: conv2d whose weight is stored CSR, computed as an implicit GEMM over the nonzeros.

The weight is the (out_channels, kh*kw*C_in) matrix in tap-major column order: column ``(i*kw + j)*C_in + c``
holds ``w[o, c, i, j]`` (``w.permute(0, 2, 3, 1).reshape(out_channels, -1)``); a grouped conv stores the
block-diagonal embedding of its weight, whose cross-group zeros are simply not stored. The output has x's
memory format (channels_last when x is laid out so, else contiguous), like F.conv2d.

Backward: the input gradient and the stored values' gradient (the dense weight gradient sampled at the stored
positions) go through ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` on the densified weight, so training
costs dense time; only the forward is sparse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from ..sparse.base import check_compressed, compressed_rows
from . import (
    _library,  # noqa: F401
    _router,
)
from ._common import call_op, check_csr_arrays
from ._router import Backend, route
from .pruned_conv2d import output_size, pair

OP = "pyprune::csr_conv2d"


def csr_conv2d(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_channels: int,
    kernel_size: int | Sequence[int],
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """x: (N, C_in, H, W); W: (out_channels, kh*kw*C_in) in tap-major columns as CSR with int32 crow_indices
    (out_channels + 1,) and col_indices (nnz,), values (nnz,); bias: (out_channels,) or None.
    Returns conv2d(x, W, bias, stride, padding, dilation): (N, out_channels, OH, OW) in x's memory format."""
    return call_op(
        torch.ops.pyprune.csr_conv2d.default, x, crow_indices, col_indices, values, out_channels,
        pair(kernel_size, "kernel_size"), bias, pair(stride, "stride"), pair(padding, "padding"),
        pair(dilation, "dilation"),
    )  # fmt: skip


def check_args(x, crow, col, values, out_channels, kernel_size, bias, stride, padding, dilation):
    """Shape, dtype and device checks (no index values: the kernels check those); returns (OH, OW)."""
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    check_csr_arrays(OP, x, crow, col, values, out_channels, "out_channels")
    arrays = {"crow_indices": crow, "col_indices": col, "values": values}
    return check_conv_args(OP, x, arrays, out_channels, kernel_size, bias, stride, padding, dilation)


def check_conv_args(op, x, arrays, out_channels, kernel_size, bias, stride, padding, dilation):
    """What the sparse-weight conv ops (``op``: "pyprune::csr_conv2d", "pyprune::bsr_conv2d",
    "pyprune::sparse24_conv2d") check alike: the weight's ``arrays`` ({argument name: tensor}) on x's device,
    the conv arguments, the bias, and an output of at least one pixel. Returns (OH, OW)."""
    for name, t in arrays.items():
        if t.device != x.device:
            raise ValueError(f"{op}: argument '{name}' must be on {x.device} (x's device), got {t.device}")
    for name, v, low in (
        ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)
    ):  # fmt: skip
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"{op}: argument '{name}' must be two ints >= {low}, got {list(v)}")
    if bias is not None and (
        bias.dtype != x.dtype or bias.shape != (out_channels,) or bias.device != x.device
    ):
        raise ValueError(
            f"{op}: argument 'bias' must be a {x.dtype} tensor of shape ({out_channels},) on {x.device}, got "
            f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    oh, ow = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{op}: argument 'x' has spatial size {tuple(x.shape[2:])}, smaller than the dilated kernel "
            f"{list(kernel_size)} (dilation {list(dilation)}) after padding {list(padding)}"
        )
    return oh, ow


@torch.library.register_fake(OP)
def _(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation):
    oh, ow = check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation
    )
    y = x.new_empty((x.shape[0], out_channels, oh, ow))
    return y.contiguous(memory_format=reference._memory_format(x))


def dense_weight(
    crow: Tensor, col: Tensor, values: Tensor, out_channels: int, kernel_size, c_in: int
) -> Tensor:
    """The (out_channels, C_in, kh, kw) weight the CSR stores."""
    kh, kw = kernel_size
    w = values.new_zeros(out_channels, kh * kw * c_in)
    w[compressed_rows(crow, col.numel()), col.long()] = values
    return w.view(out_channels, kh, kw, c_in).permute(0, 3, 1, 2)


def setup_context(ctx, inputs, output):
    """What the sparse-weight conv ops (csr_conv2d, bsr_conv2d) keep for backward."""
    x, crow, col, values, out_channels, kernel_size, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, crow, col, values)
    ctx.conv = (out_channels, kernel_size, stride, padding, dilation)
    ctx.has_bias = bias is not None


def dense_backward(dense_weight_fn, sample_fn):
    """The backward of a sparse-weight conv op: ATen's conv gradients on the weight densified by
    ``dense_weight_fn(crow, col, values, out_channels, kernel_size, C_in)``; the values' gradient is
    ``sample_fn(gw, crow, col, values)`` of the tap-major (out_channels, kh*kw*C_in) dense weight gradient."""

    def backward(ctx, grad):
        x, crow, col, values = ctx.saved_tensors
        out_channels, kernel_size, stride, padding, dilation = ctx.conv
        w = dense_weight_fn(crow, col, values, out_channels, kernel_size, x.shape[1])
        grad_x = grad_values = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, w, grad, stride, padding, dilation)
        if ctx.needs_input_grad[3]:
            gw = torch.nn.grad.conv2d_weight(x, w.shape, grad, stride, padding, dilation)
            grad_values = sample_fn(gw.permute(0, 2, 3, 1).reshape(out_channels, -1), crow, col, values)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, None, None, grad_values, None, None, grad_b, None, None, None

    return backward


def _sample(gw: Tensor, crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
    return gw[compressed_rows(crow, col.numel()), col.long()]


torch.library.register_autograd(OP, dense_backward(dense_weight, _sample), setup_context=setup_context)


def csr_conv2d_checked_ref(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                           dilation):  # fmt: skip
    """The reference behind the full argument checks: the CPU kernel when _C lacks one, and the CUDA router's
    last resort."""
    check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation
    )
    kh, kw = kernel_size
    try:
        check_compressed(
            crow_indices, col_indices, out_channels, kh * kw * x.shape[1],
            "out_channels", "kh*kw*C_in", "nnz",
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{OP}: {e}") from None
    return reference.csr_conv2d_ref(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation
    )


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(csr_conv2d_checked_ref)

# (crow, col) -> the column bound kh*kw*C_in their values were checked against: an out-of-range column would
# make the kernel read x out of bounds, and the check costs a device sync, so each structure version is checked
# once
_CSR_CONV2D_CHECKED = _router.TensorCache()


def _check_columns(crow: Tensor, col: Tensor, bound: int) -> None:
    _router.check_csr_index_values(crow, col, bound, OP, "kh*kw*C_in")


def _csr_conv2d_triton(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                       dilation):  # fmt: skip
    args = (x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation)
    check_args(*args)
    bound = kernel_size[0] * kernel_size[1] * x.shape[1]
    _router._checked(_CSR_CONV2D_CHECKED, _check_columns, crow_indices, col_indices, bound)
    mod, _ = _router.load_triton_kernels()
    return mod.csr_conv2d_triton(*args)


def _csr_conv2d_triton_unavailable(x, *args) -> str | None:
    return _router.triton_unavailable("csr_conv2d_triton", "csr_conv2d", x.dtype)


CSR_CONV2D_BACKENDS = [
    Backend("triton", _csr_conv2d_triton, _csr_conv2d_triton_unavailable),
    Backend("reference", csr_conv2d_checked_ref),
]
torch.library.impl(OP, "CUDA")(route("csr_conv2d", CSR_CONV2D_BACKENDS))

__all__ = [
    "CSR_CONV2D_BACKENDS",
    "check_args",
    "check_conv_args",
    "csr_conv2d",
    "dense_backward",
    "dense_weight",
    "setup_context",
]
