"""pyprune::sparse24_conv2d: conv2d whose weight is 2:4 sparse, computed as an implicit GEMM over the kept
half.

The weight is the (out_channels, kh*kw*C_in) matrix in tap-major column order, as for csr_conv2d (column
``(i*kw + j)*C_in + c`` holds ``w[o, c, i, j]``), so a 2:4 group is 4 consecutive input channels of one tap;
it is stored as sparse24_linear's weight (values (K4/2, out_channels), meta (K4/8, out_channels) uint8, K4 =
kh*kw*C_in rounded up to a multiple of 8). The output has x's memory format, like F.conv2d. Epilogue as
csr_conv2d's: relu?(conv + bias + residual), capped at relu_max.

On the CPU the C++ kernel (csrc/cpu/sparse24_conv2d.cpp) runs sparse24_linear's panels with each output
pixel's inputs read from x itself (channels_last, unpadded) or a zero-bordered NHWC copy of it (no patch
matrix) when C_in is a multiple of 8, else ATen's conv on the decoded weight; the epilogue is applied as the
panels store. On CUDA the patches are built (F.unfold) and multiplied by sparse24_linear's GPU route, the
epilogue applied after.

Backward: the input gradient and the kept values' gradient (the dense weight gradient sampled at the kept
positions) go through ``torch.nn.grad.conv2d_input`` / ``reference.conv2d_weight`` on the decoded weight, so
training costs dense time; only the forward is sparse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..sparse.sparse24 import dense_matrix, kept_entries, padded_in_features
from . import _library  # noqa: F401
from ._common import call_op
from ._router import Backend, route
from .csr_conv2d import check_conv_args, check_epilogue
from .pruned_conv2d import epilogue_backward, pair

OP = "pyprune::sparse24_conv2d"


def sparse24_conv2d(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    out_channels: int,
    kernel_size: int | Sequence[int],
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """x: (N, C_in, H, W); W: (out_channels, kh*kw*C_in) in tap-major columns, 2:4 along them, as values
    (K4/2, out_channels) and meta (K4/8, out_channels) uint8; bias: (out_channels,) or None; residual: a
    tensor of the output's shape added after the bias, or None; relu: a ReLU applied last, capped at relu_max
    if given (6: ReLU6). Returns relu?(conv2d(x, W, bias, stride, padding, dilation) + residual):
    (N, out_channels, OH, OW) in x's memory format."""
    return call_op(
        torch.ops.pyprune.sparse24_conv2d.default, x, values, meta, out_channels,
        pair(kernel_size, "kernel_size"), bias, pair(stride, "stride"), pair(padding, "padding"),
        pair(dilation, "dilation"), relu, residual, relu_max,
    )  # fmt: skip


def check_args(x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation, relu=False,
               residual=None, relu_max=None):  # fmt: skip
    """Shape, dtype and device checks; returns (OH, OW)."""
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"{OP}: argument 'values' must be {x.dtype} (x's dtype), got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"{OP}: argument 'meta' must be torch.uint8, got {meta.dtype}")
    if out_channels < 0:
        raise ValueError(f"{OP}: argument 'out_channels' must be >= 0, got {out_channels}")
    oh_ow = check_conv_args(
        OP, x, {"values": values, "meta": meta}, out_channels, kernel_size, bias, stride, padding, dilation
    )
    k4 = padded_in_features(kernel_size[0] * kernel_size[1] * x.shape[1])
    for name, t, rows in (("values", values, k4 // 2), ("meta", meta, k4 // 8)):
        if tuple(t.shape) != (rows, out_channels):
            raise ValueError(
                f"{OP}: argument '{name}' must have shape ({rows}, {out_channels}) for kh*kw*C_in = "
                f"{kernel_size[0] * kernel_size[1] * x.shape[1]} and out_channels {out_channels}, got "
                f"{tuple(t.shape)}"
            )
    check_epilogue(OP, x, out_channels, oh_ow, relu, residual, relu_max)
    return oh_ow


@torch.library.register_fake(OP)
def _(x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation, relu=False, residual=None,
      relu_max=None):  # fmt: skip
    oh, ow = check_args(
        x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation, relu, residual, relu_max
    )
    y = x.new_empty((x.shape[0], out_channels, oh, ow))
    return y.contiguous(memory_format=reference._memory_format(x))


def dense_weight(values: Tensor, meta: Tensor, out_channels: int, kernel_size, c_in: int) -> Tensor:
    """The (out_channels, C_in, kh, kw) weight the 2:4 storage holds."""
    kh, kw = kernel_size
    w = dense_matrix(values, meta, kh * kw * c_in)
    return w.reshape(out_channels, kh, kw, c_in).permute(0, 3, 1, 2)


def _setup_context(ctx, inputs, output):
    """With relu, the output is kept too (the gradient passes where it is positive, and below relu_max)."""
    x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation = inputs[:9]
    relu = len(inputs) > 9 and inputs[9]
    ctx.save_for_backward(x, values, meta, output if relu else None)
    ctx.conv = (out_channels, kernel_size, stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.has_residual = len(inputs) > 10 and inputs[10] is not None
    ctx.relu_max = inputs[11] if len(inputs) > 11 else None


def _backward(ctx, grad):
    x, values, meta, y = ctx.saved_tensors
    grad, grad_res = epilogue_backward(grad, y, ctx.relu_max, ctx.has_residual and ctx.needs_input_grad[10])
    out_channels, kernel_size, stride, padding, dilation = ctx.conv
    w = dense_weight(values, meta, out_channels, kernel_size, x.shape[1])
    grad_x = grad_values = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.nn.grad.conv2d_input(x.shape, w, grad, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        gw = reference.conv2d_weight(x, w.shape, grad, stride, padding, dilation)
        grad_values = kept_entries(gw.permute(0, 2, 3, 1).reshape(out_channels, -1), meta)  # tap-major
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_values, None, None, None, grad_b, None, None, None, None, grad_res, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def sparse24_conv2d_checked_ref(x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation,
                                relu=False, residual=None, relu_max=None):  # fmt: skip
    """The reference behind the full argument checks: the CPU kernel when _C lacks one, and the CUDA router's
    last resort."""
    args = (x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation, relu, residual,
            relu_max)  # fmt: skip
    check_args(*args)
    return reference.sparse24_conv2d_ref(*args)


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(sparse24_conv2d_checked_ref)


def _sparse24_conv2d_im2col(x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation,
                            relu=False, residual=None, relu_max=None):  # fmt: skip
    """The patch matrix (N*OH*OW, kh*kw*C_in), tap-major, times the 2:4 weight through sparse24_linear (which
    routes to its own GPU backends), then the epilogue."""
    oh, ow = check_args(
        x, values, meta, out_channels, kernel_size, bias, stride, padding, dilation, relu, residual, relu_max
    )
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, OH*OW)
    cols = cols.view(n, c, kernel_size[0] * kernel_size[1], oh * ow).permute(0, 3, 2, 1)
    y = torch.ops.pyprune.sparse24_linear(cols.reshape(n * oh * ow, -1), values, meta, out_channels, bias)
    y = y.view(n, oh, ow, out_channels).permute(0, 3, 1, 2)
    y = y.contiguous(memory_format=reference._memory_format(x))
    return reference.sparse_conv_epilogue(y, relu, residual, relu_max)


SPARSE24_CONV2D_BACKENDS = [
    Backend("im2col", _sparse24_conv2d_im2col),
    Backend("reference", sparse24_conv2d_checked_ref),
]
torch.library.impl(OP, "CUDA")(route("sparse24_conv2d", SPARSE24_CONV2D_BACKENDS))

__all__ = ["SPARSE24_CONV2D_BACKENDS", "check_args", "dense_weight", "sparse24_conv2d"]
