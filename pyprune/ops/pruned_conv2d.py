"""pyprune::pruned_conv2d: a convolution over a subset of input channels producing a subset of output channels.

The channel gather is part of the op (the kernel reads ``x[:, in_index]`` in place; the CPU kernel restages the
kept channels of NCHW x as channels_last in the same pass for large kxk convs), as is the optional
ReLU, the scatter of the kept outputs into a full-width output (so a residual add still lines up when only
one side of it was pruned) and an optional max pool after it all (a CNN stem's conv -> BN -> ReLU -> max pool
as one op: ATen's NCHW max pool runs an order of magnitude slower than the CPU kernel's)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from . import _library  # noqa: F401
from ._common import call_op
from ._router import register_cuda

OP = "pyprune::pruned_conv2d"


def pruned_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    in_index: Tensor | None = None,
    out_index: Tensor | None = None,
    out_channels: int | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = False,
    max_pool: Sequence | None = None,
    relu_max: float | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """x: (N, C_in, H, W) in NCHW or channels_last; weight: (C_out_kept, C_in_kept / groups, kh, kw);
    bias: (C_out_kept,); in_index: int64 (C_in_kept,) sorted unique channels of x (None: all of them);
    out_index: int64 (C_out_kept,) sorted unique channels of an out_channels-wide output (None: the output
    is compact, (N, C_out_kept, OH, OW)); max_pool: (kernel_size, stride, padding), each an int or a pair, of
    a max pool applied last (dilation 1, floor mode, as ``F.max_pool2d``), or None; relu_max: with relu, the
    ReLU's cap (6: ReLU6, as ``F.relu6``), or None; residual: a tensor of the output's shape added before the
    ReLU (a ResNet block's skip connection; not with max_pool), or None. Returns max_pool?(min(relu?(y +
    residual), relu_max)), y = conv2d(x[:, in_index], weight, bias) scattered to out_index (zero elsewhere), in
    x's memory format."""
    if out_channels is None:
        if out_index is not None and out_index.numel() == 0:
            raise ValueError(f"{OP}: argument 'out_channels' must be given when out_index is empty")
        out_channels = weight.shape[0] if out_index is None else int(out_index.max()) + 1
    args = (x, weight, bias, in_index, out_index, out_channels, pair(stride, "stride"), pair(padding, "padding"),
            pair(dilation, "dilation"), groups, relu, pool_list(max_pool), relu_max, residual)  # fmt: skip
    return call_op(torch.ops.pyprune.pruned_conv2d.default, *args)


def pair(v, name: str) -> list[int] | tuple[int, int]:
    if isinstance(v, int):
        return [v, v]
    if type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v  # the common case, checked without a copy (a module's stride is a tuple)
    try:  # a numpy or 0-d tensor integer, or a pair of them (as F.conv2d takes)
        items = [operator.index(v)] * 2 if not isinstance(v, Sequence) else [operator.index(i) for i in v]
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise ValueError(f"pruned_conv2d: argument '{name}' must be an int or a pair of ints, got {v!r}")
    return items


def pool_list(max_pool) -> list[int]:
    """(kernel_size, stride, padding) as the op's flat [kh, kw, sh, sw, ph, pw]; None: []."""
    if max_pool is None:
        return []
    if not isinstance(max_pool, (tuple, list)) or len(max_pool) != 3:
        raise ValueError(
            f"{OP}: argument 'max_pool' must be (kernel_size, stride, padding) or None, got {max_pool!r}"
        )
    names = ("max_pool kernel_size", "max_pool stride", "max_pool padding")
    return [v for part, name in zip(max_pool, names) for v in pair(part, name)]


def check_pool(max_pool) -> None:
    """The op's flat max_pool: 6 ints, kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2 (as in
    F.max_pool2d)."""
    if len(max_pool) != 6:
        raise ValueError(
            f"{OP}: argument 'max_pool' must be empty or (kernel_h, kernel_w, stride_h, stride_w, padding_h, "
            f"padding_w), got {list(max_pool)}"
        )
    k, st, p = max_pool[:2], max_pool[2:4], max_pool[4:]
    if min(k) < 1 or min(st) < 1 or min(p) < 0 or 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        raise ValueError(
            f"{OP}: argument 'max_pool' needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, got "
            f"{list(max_pool)}"
        )


def output_size(x_hw, weight_hw, stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        (x_hw[i] + 2 * padding[i] - dilation[i] * (weight_hw[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


def check_args(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu,
               max_pool=(), relu_max=None, residual=None):  # fmt: skip
    """Shape, dtype and device checks (no index values: see check_index_values). Returns the output's size."""
    check_relu_max(relu, relu_max, f"{OP}: argument 'relu_max'")
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"{OP}: argument 'weight' must be 4-D (C_out, C_in / groups, kh, kw), got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: argument 'weight' must be {x.dtype} (x's dtype), got {weight.dtype}")
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"{OP}: argument '{name}' must be two ints >= {low}, got {list(v)}")
    if groups < 1:
        raise ValueError(f"{OP}: argument 'groups' must be >= 1, got {groups}")
    c_out = weight.shape[0]
    c_in = x.shape[1] if in_index is None else in_index.numel()
    for name, idx in (("in_index", in_index), ("out_index", out_index)):
        if idx is None:
            continue
        if idx.dtype != torch.int64:
            raise TypeError(f"{OP}: argument '{name}' must be torch.int64, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"{OP}: argument '{name}' must be 1-D, got shape {tuple(idx.shape)}")
        if idx.device != x.device:
            raise ValueError(f"{OP}: argument '{name}' must be on {x.device} (x's device), got {idx.device}")
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"{OP}: argument 'groups' ({groups}) must divide the kept input channels ({c_in}) and the "
            f"output channels ({c_out})"
        )
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"{OP}: argument 'weight' must have C_in_kept / groups = {c_in // groups} input channels "
            f"(C_in_kept = {c_in}), got shape {tuple(weight.shape)}"
        )
    if out_channels < 0:
        raise ValueError(f"{OP}: argument 'out_channels' must be >= 0, got {out_channels}")
    if out_index is None:
        if out_channels != c_out:
            raise ValueError(
                f"{OP}: argument 'out_channels' must equal weight.shape[0] ({c_out}) when out_index is None, "
                f"got {out_channels}"
            )
    elif out_index.numel() != c_out:
        raise ValueError(
            f"{OP}: argument 'out_index' must have one entry per weight row ({c_out}), got {out_index.numel()}"
        )
    if bias is not None:
        if bias.dtype != x.dtype or bias.shape != (c_out,) or bias.device != x.device:
            raise ValueError(
                f"{OP}: argument 'bias' must be a {x.dtype} tensor of shape ({c_out},) on {x.device}, got "
                f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
            )
    if weight.device != x.device:
        raise ValueError(f"{OP}: argument 'weight' must be on {x.device} (x's device), got {weight.device}")
    oh, ow = output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{OP}: the output would be empty ({oh} x {ow}) for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}"
        )
    if residual is not None:
        check_residual(OP, x, (x.shape[0], out_channels, oh, ow), residual)
        if max_pool:
            raise ValueError(
                f"{OP}: argument 'residual' cannot be combined with max_pool (the pool would follow the add)"
            )
    if not max_pool:
        return oh, ow
    check_pool(max_pool)
    k, st, p = max_pool[:2], max_pool[2:4], max_pool[4:]
    if oh + 2 * p[0] < k[0] or ow + 2 * p[1] < k[1]:
        raise ValueError(
            f"{OP}: argument 'max_pool' gives an empty output for the conv's {oh} x {ow} output, got "
            f"{list(max_pool)}"
        )
    return output_size((oh, ow), k, st, p, (1, 1))


def check_residual(op: str, x, want: tuple, residual) -> None:
    """A fused residual (pruned_conv2d's, csr_conv2d's, bsr_conv2d's; ``op`` names the op): x's dtype and
    device, the output's shape ``want``."""
    if residual.dtype != x.dtype or tuple(residual.shape) != want or residual.device != x.device:
        raise ValueError(
            f"{op}: argument 'residual' must be a {x.dtype} tensor of the output's shape {want} on "
            f"{x.device}, got {residual.dtype} {tuple(residual.shape)} on {residual.device}"
        )


def check_relu_max(relu: bool, relu_max, what: str) -> None:
    """relu_max must be None, or a number > 0 with relu on; ``what`` names the argument in the message."""
    if relu_max is not None and not (relu and relu_max > 0):  # (NaN fails the comparison too)
        raise ValueError(
            f"{what} must be None, or a number > 0 with relu=True, got {relu_max!r} with relu={relu!r}"
        )


def check_channel_index(idx: Tensor, bound: int, what: str) -> None:
    """idx must hold sorted, unique channels in [0, bound); ``what`` names the argument in the message. Reads
    the values (one device sync on GPU)."""
    if idx.numel() == 0:
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= bound:
        raise ValueError(f"{what} must hold channels in [0, {bound}), got values in [{low}, {high}]")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{what} must be sorted and free of duplicates")


def check_index_values(in_index, out_index, x_channels: int, out_channels: int) -> None:
    """Indices must be sorted, unique and in range."""
    for name, idx, bound in (("in_index", in_index, x_channels), ("out_index", out_index, out_channels)):
        if idx is not None:
            check_channel_index(idx, bound, f"{OP}: argument '{name}'")


@torch.library.register_fake(OP)
def _(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu,
      max_pool=(), relu_max=None, residual=None):  # fmt: skip
    oh, ow = check_args(
        x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu, max_pool,
        relu_max, residual,
    )
    y = x.new_empty((x.shape[0], out_channels, oh, ow))
    return y.contiguous(memory_format=reference._memory_format(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu = inputs[:11]
    max_pool = list(inputs[11]) if len(inputs) > 11 else []
    relu_max = inputs[12] if len(inputs) > 12 else None
    ctx.has_residual = len(inputs) > 13 and inputs[13] is not None
    # with a max pool the output says neither where each maximum came from nor where the ReLU cut: backward
    # recomputes the conv's output
    ctx.save_for_backward(x, weight, bias if max_pool else None, in_index, out_index,
                          output if relu and not max_pool else None)  # fmt: skip
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.pool = (max_pool, out_channels, relu, relu_max)


def _backward(ctx, grad):
    x, weight, bias, in_index, out_index, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    max_pool, out_channels, relu, relu_max = ctx.pool
    if max_pool:
        k, s, p = max_pool[:2], max_pool[2:4], max_pool[4:]
        with torch.no_grad():
            conv = (x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups)
            y0 = torch.ops.pyprune.pruned_conv2d.default(*conv, relu, [], relu_max)
            _, where = torch.ops.aten.max_pool2d_with_indices.default(y0, k, s, p)
        back = torch.ops.aten.max_pool2d_with_indices_backward.default
        grad = back(grad, y0, k, s, p, [1, 1], False, where)
        y = y0 if relu else None
    # the residual's gradient: the masked output gradient, every channel
    grad, grad_res = epilogue_backward(grad, y, relu_max, ctx.has_residual and ctx.needs_input_grad[13])
    if out_index is not None:
        grad = grad.index_select(1, out_index)
    grad_x = grad_w = grad_b = None
    xs = x if in_index is None else x.index_select(1, in_index)
    if ctx.needs_input_grad[0]:
        gx = torch.nn.grad.conv2d_input(xs.shape, weight, grad, stride, padding, dilation, groups)
        if in_index is None:
            grad_x = gx
        else:
            grad_x = torch.zeros_like(x).index_copy_(1, in_index, gx)  # in x's memory format
    if ctx.needs_input_grad[1]:
        grad_w = reference.conv2d_weight(xs, weight.shape, grad, stride, padding, dilation, groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, grad_res


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def epilogue_backward(grad: Tensor, y: Tensor | None, relu_max, residual_grad: bool):
    """The gradient through the convs' epilogue relu?(conv + bias + residual): ``grad`` masked where
    the ReLU let the value through (y, the op's output, positive and below relu_max, as F.relu6; y None: no
    ReLU), and the residual's gradient (the masked gradient, the residual being added before the ReLU) when
    ``residual_grad``. Returns (masked grad, residual grad or None)."""
    if y is not None:
        grad = grad * ((y > 0) if relu_max is None else ((y > 0) & (y < relu_max)))
    return grad, grad if residual_grad else None


def pruned_conv2d_checked_ref(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation,
                              groups, relu, max_pool=(), relu_max=None, residual=None):  # fmt: skip
    """The reference behind the full argument checks: the CPU kernel when _C lacks one, and the CUDA
    'reference' backend."""
    args = (x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu)
    check_args(*args, max_pool, relu_max, residual)
    check_index_values(in_index, out_index, x.shape[1], out_channels)
    return reference.pruned_conv2d_ref(*args, max_pool, relu_max, residual)


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(pruned_conv2d_checked_ref)
register_cuda("pruned_conv2d")
__all__ = [
    "check_args", "check_channel_index", "check_index_values", "check_pool", "check_relu_max",
    "check_residual", "epilogue_backward", "output_size", "pair", "pool_list", "pruned_conv2d",
]  # fmt: skip
