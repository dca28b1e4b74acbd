"""pyprune::max_pool2d: F.max_pool2d (dilation 1, floor mode, no indices) with the CPU kernel of
pruned_conv2d's fused max pool.

ATen's max pool on NCHW input runs an order of magnitude slower on the CPU than this kernel (ResNet-50's
stem pool, benchmarks/results/*/max_pool.md), and a pruned model whose convs got faster spends a growing share
of its time there. The output has x's memory format; a NaN in a window wins, as in F.max_pool2d. On CUDA the
op runs ATen's max pool (cuDNN); dtypes other than float32 take ATen's on the CPU too.

Backward: the gradient goes to each window's maximum as in F.max_pool2d's (ATen's indices of x, recomputed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from . import _library  # noqa: F401
from ._common import call_op
from ._router import Backend, route
from .pruned_conv2d import pair

OP = "pyprune::max_pool2d"


def max_pool2d(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> Tensor:
    """x: (N, C, H, W); kernel_size, stride (None: kernel_size) and padding (at most half the kernel): an int
    or a pair. Returns F.max_pool2d(x, kernel_size, stride, padding): (N, C, OH, OW) in x's memory format."""
    k = _pair(kernel_size, "kernel_size")
    no_stride = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
    s = k if no_stride else _pair(stride, "stride")
    return call_op(torch.ops.pyprune.max_pool2d.default, x, k, s, _pair(padding, "padding"))


def _pair(v, name: str):
    try:
        return pair(v, name)
    except ValueError:
        raise ValueError(f"{OP}: argument '{name}' must be an int or a pair of ints, got {v!r}") from None


def check_args(x, kernel_size, stride, padding) -> tuple[int, int]:
    """Shape and window checks; returns (OH, OW)."""
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1)):
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"{OP}: argument '{name}' must be two ints >= {low}, got {list(v)}")
    if len(padding) != 2 or min(padding) < 0 or any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(
            f"{OP}: argument 'padding' must be two ints in [0, kernel_size / 2], got {list(padding)} for "
            f"kernel_size {list(kernel_size)}"
        )
    h, w = x.shape[2:]
    if h + 2 * padding[0] < kernel_size[0] or w + 2 * padding[1] < kernel_size[1]:
        raise ValueError(
            f"{OP}: argument 'x' is too small for the window: {h} x {w} with padding {list(padding)} gives "
            f"an empty output for kernel_size {list(kernel_size)}"
        )
    return tuple((x.shape[2 + i] + 2 * padding[i] - kernel_size[i]) // stride[i] + 1 for i in range(2))


@torch.library.register_fake(OP)
def _(x, kernel_size, stride, padding):
    oh, ow = check_args(x, kernel_size, stride, padding)
    y = x.new_empty((x.shape[0], x.shape[1], oh, ow))
    return y.contiguous(memory_format=reference._memory_format(x))


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding = inputs
    ctx.save_for_backward(x)
    ctx.window = (list(kernel_size), list(stride), list(padding))


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    k, s, p = ctx.window
    with torch.no_grad():
        _, where = torch.ops.aten.max_pool2d_with_indices.default(x, k, s, p)
    back = torch.ops.aten.max_pool2d_with_indices_backward.default
    return back(grad, x, k, s, p, [1, 1], False, where), None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def max_pool2d_checked_ref(x, kernel_size, stride, padding):
    """The reference behind the argument checks: the CPU kernel when _C lacks one, and CUDA's only backend
    (ATen's max pool is cuDNN's there)."""
    check_args(x, kernel_size, stride, padding)
    return reference.max_pool2d_ref(x, kernel_size, stride, padding)


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(max_pool2d_checked_ref)
MAX_POOL2D_BACKENDS = [Backend("reference", max_pool2d_checked_ref)]
torch.library.impl(OP, "CUDA")(route("max_pool2d", MAX_POOL2D_BACKENDS))

__all__ = ["MAX_POOL2D_BACKENDS", "check_args", "max_pool2d"]
