"""The spec of every op in plain PyTorch: densify the weight, then F.linear. Readable, slow, never edited to
make a kernel pass. Tests compare kernels against these in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def csr_linear_ref(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    w = torch.zeros(out_features, x.shape[-1], dtype=values.dtype, device=values.device)
    for row in range(out_features):
        start, end = int(crow_indices[row]), int(crow_indices[row + 1])
        # a column given twice in a row adds up, as in the kernels (and torch.sparse)
        w[row].index_add_(0, col_indices[start:end].long(), values[start:end])
    return F.linear(x, w.to(x.dtype), bias)


def bsr_linear_ref(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    w = _bsr_matrix(crow_indices, col_indices, values, out_features, x.shape[-1])
    return F.linear(x, w.to(x.dtype), bias)


def _bsr_matrix(
    crow_indices: Tensor, col_indices: Tensor, values: Tensor, n_rows: int, n_cols: int
) -> Tensor:
    """The (n_rows, n_cols) matrix a BSR stores (blocks zero-padded past its edges; a block given twice
    adds)."""
    bh, bw = values.shape[1], values.shape[2]
    n_brows = crow_indices.numel() - 1
    w = torch.zeros(n_brows * bh, -(-n_cols // bw) * bw, dtype=values.dtype, device=values.device)
    for brow in range(n_brows):
        for blk in range(int(crow_indices[brow]), int(crow_indices[brow + 1])):
            c = int(col_indices[blk])
            w[brow * bh : (brow + 1) * bh, c * bw : (c + 1) * bw] += values[blk]
    return w[:n_rows, :n_cols]


def _sparse24_matrix(values: Tensor, meta: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The (n_rows, n_cols) matrix a 2:4 weight stores."""
    w = torch.zeros(n_rows, meta.shape[0] * 8, dtype=values.dtype, device=values.device)
    for r in range(values.shape[0]):  # value row r: group r // 2, meta byte r // 4, bit field r % 4
        pos = (meta[r // 4].long() >> (2 * (r % 4))) & 3
        cols = 4 * (r // 2) + pos
        w[torch.arange(n_rows), cols] += values[r]
    return w[:, :n_cols]


def sparse24_linear_ref(
    x: Tensor, values: Tensor, meta: Tensor, out_features: int, bias: Tensor | None = None
) -> Tensor:
    return F.linear(x, _sparse24_matrix(values, meta, out_features, x.shape[-1]).to(x.dtype), bias)


def _conv2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int = 1) -> Tensor:
    """F.conv2d, also for a weight without output or input channels (F.conv2d rejects the first and gives no
    output channels for the second): then the output is the bias, or zeros."""
    if w.shape[0] and w.shape[1]:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    oh, ow = (
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in (0, 1)
    )
    y = x.new_zeros(x.shape[0], w.shape[0], oh, ow)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _tap_major_conv2d(x: Tensor, w: Tensor, kernel_size, bias, stride, padding, dilation) -> Tensor:
    """conv2d with the (C_out, kh*kw*C_in) tap-major weight matrix w, output in x's memory format."""
    kh, kw = kernel_size
    w = w.reshape(w.shape[0], kh, kw, x.shape[1]).permute(0, 3, 1, 2)
    y = _conv2d(x, w.to(x.dtype), bias, stride, padding, dilation)
    return y.contiguous(memory_format=_memory_format(x))


def csr_conv2d_ref(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_channels: int,
    kernel_size: list[int],
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """The weight is (out_channels, kh*kw*C_in) in tap-major columns: column (i*kw + j)*C_in + c is
    w[o, c, i, j]. Epilogue: relu?(conv + bias + residual), capped at relu_max."""
    kh, kw = kernel_size
    c_in = x.shape[1]
    w = torch.zeros(out_channels, kh * kw * c_in, dtype=values.dtype, device=values.device)
    for row in range(out_channels):
        start, end = int(crow_indices[row]), int(crow_indices[row + 1])
        # a column given twice in a row adds up, as in the kernels (and torch.sparse)
        w[row].index_add_(0, col_indices[start:end].long(), values[start:end])
    y = _tap_major_conv2d(x, w, kernel_size, bias, stride, padding, dilation)
    return sparse_conv_epilogue(y, relu, residual, relu_max)


def bsr_conv2d_ref(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    out_channels: int,
    kernel_size: list[int],
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """The weight is (out_channels, kh*kw*C_in) in tap-major columns, as in csr_conv2d_ref, stored as BSR
    blocks (bh x bw) zero-padded past its edges. Epilogue as csr_conv2d_ref's."""
    kh, kw = kernel_size
    w = _bsr_matrix(crow_indices, col_indices, values, out_channels, kh * kw * x.shape[1])
    y = _tap_major_conv2d(x, w, kernel_size, bias, stride, padding, dilation)
    return sparse_conv_epilogue(y, relu, residual, relu_max)


def sparse_conv_epilogue(
    y: Tensor, relu: bool, residual: Tensor | None, relu_max: float | None = None
) -> Tensor:
    """The sparse-weight convs' epilogue on their conv output ``y`` (a new tensor, changed in place):
    ``relu?(y + residual)``, capped at ``relu_max`` (with relu)."""
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y.clamp_max_(relu_max) if relu and relu_max is not None else y


def conv2d_weight(x: Tensor, w_shape, grad: Tensor, stride, padding, dilation, groups: int = 1) -> Tensor:
    """``torch.nn.grad.conv2d_weight``, except for strided unpadded 1x1 convs on x that is not NCHW-contiguous:
    there the gradient over the pixels the conv reads (x[:, :, ::sh, ::sw] cropped to the output, as rows of
    channels), one matrix product per group. ATen 2.13's CPU route for them corrupts the heap when a group
    has fewer than 16 input channels (channels_last fp32 x (3, 4, 16, 16), 3 output channels, stride 2, 2
    threads: a segfault or glibc abort within 300 calls; none with NCHW x, 16 inputs or oneDNN disabled;
    oneDNN issue 6035: the 1x1 weight-gradient kernel writes past its reduce-to-unit-stride buffer). The
    product is also faster there (ResNet-50's strided 1x1 convs at batch 8, channels_last, 2 threads, Xeon VM:
    0.40-0.87x ATen's time). Every pyprune backward that takes a weight gradient comes here."""
    stride = tuple(stride)
    if tuple(w_shape[2:]) == (1, 1) and tuple(padding) == (0, 0) and stride != (1, 1) and x.dim() == 4:
        if not x.is_contiguous():
            oh, ow = grad.shape[2], grad.shape[3]
            xs = x[:, :, :: stride[0], :: stride[1]][:, :, :oh, :ow]
            rows = xs.permute(0, 2, 3, 1).reshape(-1, groups, x.shape[1] // groups)
            g = grad.permute(0, 2, 3, 1).reshape(-1, groups, grad.shape[1] // groups)
            if groups == 1:
                return (g[:, 0].t() @ rows[:, 0]).reshape(w_shape)
            return torch.einsum("pgo,pgc->goc", g, rows).reshape(w_shape)
    return torch.nn.grad.conv2d_weight(x, w_shape, grad, stride, padding, dilation, groups)


def _conv2d_weight_sampled_ref(
    x: Tensor,
    grad: Tensor,
    rows: Tensor,
    cols: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """The gradient of conv2d's weight given the output's gradient grad, as the tap-major (C_out, kh*kw*C_in)
    matrix, read at the entries (rows[e], cols[e])."""
    out_channels, c_in = grad.shape[1], x.shape[1]
    gw = conv2d_weight(x, (out_channels, c_in, *kernel_size), grad, stride, padding, dilation)
    return gw.permute(0, 2, 3, 1).reshape(out_channels, -1)[rows, cols]


def sparse24_conv2d_ref(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    out_channels: int,
    kernel_size: list[int],
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """The weight is (out_channels, kh*kw*C_in) in tap-major columns, as in csr_conv2d_ref, stored 2:4 as in
    sparse24_linear_ref. Epilogue as csr_conv2d_ref's."""
    kh, kw = kernel_size
    w = _sparse24_matrix(values, meta, out_channels, kh * kw * x.shape[1])
    y = _tap_major_conv2d(x, w, kernel_size, bias, stride, padding, dilation)
    return sparse_conv_epilogue(y, relu, residual, relu_max)


def pruned_conv2d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_channels: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    max_pool: list[int] = (),
    relu_max: float | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """max_pool: [] or (kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w), applied last;
    relu_max: the ReLU's cap (relu_max=6 with relu: ReLU6); residual: added to the scattered output before
    the ReLU."""
    xs = x if in_index is None else x.index_select(1, in_index)
    y = _conv2d(xs, weight, bias, stride, padding, dilation, groups)
    if out_index is not None:
        full = y.new_zeros(y.shape[0], out_channels, y.shape[2], y.shape[3])
        full[:, out_index] = y
        y = full
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    if relu_max is not None:
        y = y.clamp_max(relu_max)
    if max_pool:
        y = torch.nn.functional.max_pool2d(y, max_pool[:2], max_pool[2:4], max_pool[4:])
    return y.contiguous(memory_format=_memory_format(x))


def max_pool2d_ref(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """F.max_pool2d with dilation 1 and floor mode, in x's memory format."""
    y = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)
    return y.contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out so (and not trivially both), else contiguous: what F.conv2d returns."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
