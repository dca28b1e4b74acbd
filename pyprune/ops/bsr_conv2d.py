"""pyprune::bsr_conv2d: conv2d whose weight is stored BSR, computed as an implicit GEMM over the stored
blocks.

The weight is the (out_channels, kh*kw*C_in) matrix in tap-major column order, as for csr_conv2d: column
``(i*kw + j)*C_in + c`` holds ``w[o, c, i, j]``, so a block's columns are consecutive input channels of one
tap when bw divides C_in. Blocks (bh x bw) are zero-padded past the weight's edges, as in bsr_linear. The
output has x's memory format (channels_last when x is laid out so, else contiguous), like F.conv2d.

On the CPU the C++ kernel (csrc/cpu/bsr_conv2d.cpp) reads the input through staged planes and never builds a
patch matrix. On CUDA the router tries the Triton implicit-GEMM kernel (kernels/bsr_conv2d.py: patch tiles
loaded straight from x, the blocks on tensor cores), then ``im2col`` (the patches built by F.unfold and
multiplied by bsr_linear's GPU kernels), then the reference.

Backward: as csr_conv2d's. The input gradient is this op again with the weight's blocks flipped and
transposed (bw x bh blocks over the (C_in, kh*kw*out_channels) weight of the input gradient's conv), one
stride-1 conv per stride phase of x, when bh divides out_channels and bw divides C_in, so that every block
stays inside one tap; otherwise ATen's conv gradient on the densified weight. The stored blocks' gradient is
computed at their entries alone by csr_conv2d's sampled kernel under the same rule (fp32 on the CPU, at most
a tenth of the weight stored; up to 30% for stride-1 kxk convs with >= 14x14 outputs in blocks of >= 4 rows,
``BSR_KXK_SAMPLED_MAX_DENSITY``), else the dense weight gradient sampled at the stored blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..sparse.base import check_compressed, compressed_rows
from . import (
    _library,  # noqa: F401
    _router,
)
from ._common import call_op, check_bsr_arrays, eager
from ._router import Backend, route
from .csr_conv2d import (
    cached_entries,
    cached_transpose,
    check_conv_args,
    check_epilogue,
    dense_weight_grad,
    entry_order,
    sampled_grad_applies,
    sampled_weight_grad,
    setup_context,
    sparse_backward,
    transposed_structure,
)
from .pruned_conv2d import pair

OP = "pyprune::bsr_conv2d"


def bsr_conv2d(
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
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """x: (N, C_in, H, W); W: (out_channels, kh*kw*C_in) in tap-major columns as BSR with int32 crow_indices
    (ceil(out_channels / bh) + 1,) and col_indices (nnz_blocks,), values (nnz_blocks, bh, bw) zero past the
    weight's edges; bias: (out_channels,) or None; residual, relu, relu_max: the epilogue, as in csr_conv2d.
    Returns relu?(conv2d(x, W, bias, stride, padding, dilation) + residual): (N, out_channels, OH, OW) in x's
    memory format."""
    return call_op(
        torch.ops.pyprune.bsr_conv2d.default, x, crow_indices, col_indices, values, out_channels,
        pair(kernel_size, "kernel_size"), bias, pair(stride, "stride"), pair(padding, "padding"),
        pair(dilation, "dilation"), relu, residual, relu_max,
    )  # fmt: skip


def check_args(x, crow, col, values, out_channels, kernel_size, bias, stride, padding, dilation, relu=False,
               residual=None, relu_max=None):  # fmt: skip
    """Shape, dtype and device checks (no index values: the kernels check those); returns (OH, OW)."""
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    check_bsr_arrays(OP, x, crow, col, values, out_channels, "out_channels")
    arrays = {"crow_indices": crow, "col_indices": col, "values": values}
    oh, ow = check_conv_args(OP, x, arrays, out_channels, kernel_size, bias, stride, padding, dilation)
    check_epilogue(OP, x, out_channels, (oh, ow), relu, residual, relu_max)
    return oh, ow


@torch.library.register_fake(OP)
def _(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
      relu=False, residual=None, relu_max=None):  # fmt: skip
    oh, ow = check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip
    y = x.new_empty((x.shape[0], out_channels, oh, ow))
    return y.contiguous(memory_format=reference._memory_format(x))


def dense_matrix(crow: Tensor, col: Tensor, values: Tensor, out_channels: int, k: int) -> Tensor:
    """The (out_channels, k) matrix the BSR stores (blocks given twice add up, as in the kernels)."""
    nnzb, bh, bw = values.shape
    n_brows, n_bcols = crow.numel() - 1, -(-k // bw)
    grid = values.new_zeros(n_brows, n_bcols, bh, bw)
    grid.index_put_((compressed_rows(crow, nnzb), col.long()), values, accumulate=True)
    return grid.permute(0, 2, 1, 3).reshape(n_brows * bh, n_bcols * bw)[:out_channels, :k]


def dense_weight(
    crow: Tensor, col: Tensor, values: Tensor, out_channels: int, kernel_size, c_in: int
) -> Tensor:
    """The (out_channels, C_in, kh, kw) weight the BSR stores."""
    kh, kw = kernel_size
    w = dense_matrix(crow, col, values, out_channels, kh * kw * c_in)
    return w.reshape(out_channels, kh, kw, c_in).permute(0, 3, 1, 2)


def _sample_blocks(gw: Tensor, crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
    """The stored blocks of the (out_channels, K) dense gradient gw, zero-padded past its edges."""
    nnzb, bh, bw = values.shape
    n_brows, n_bcols = crow.numel() - 1, -(-gw.shape[1] // bw)
    gw = F.pad(gw, (0, n_bcols * bw - gw.shape[1], 0, n_brows * bh - gw.shape[0]))
    return gw.reshape(n_brows, bh, n_bcols, bw).permute(0, 2, 1, 3)[compressed_rows(crow, nnzb), col.long()]


def _transpose(crow: Tensor, col: Tensor, values: Tensor, out_channels: int, taps: int, c_in: int):
    """The flipped, transposed blocks (see csr_conv2d.transposed_structure, here over block coordinates), or
    None when a block would straddle two taps or output-channel ranges."""
    nnzb, bh, bw = values.shape
    if c_in % bw or out_channels % bh:
        return None

    def make():
        rows = compressed_rows(crow, nnzb)
        return transposed_structure(rows, col.long(), out_channels // bh, taps, c_in // bw)

    return cached_transpose(crow, col, (out_channels, taps, c_in, bh, bw), make)


# the blocks' share of the weight at most for the sampled values' gradient of a stride-1 kxk conv with an
# output of >= 14x14 pixels in blocks of >= 4 rows (its 4x4 tiles of rows and columns): one step of
# ResNet-50's 3x3s in 32x32 blocks at 30% density (forward + values' gradient, batch 8, 2 threads, Xeon VM)
# took 0.72-0.85x the time of the dense gradient's, at 20% 0.63-0.71x; on 7x7 outputs, strided 3x3s and 1x1
# convs 30% lost (1.04-1.45x), so those keep SAMPLED_MAX_DENSITY
BSR_KXK_SAMPLED_MAX_DENSITY = 0.3


def _values_grad(x: Tensor, grad: Tensor, crow: Tensor, col: Tensor, values: Tensor, conv) -> Tensor:
    out_channels, kernel_size, stride = conv[:3]
    taps, c_in = math.prod(kernel_size), x.shape[1]
    k = taps * c_in
    nnzb, bh, bw = values.shape
    tiled = taps > 1 and tuple(stride) == (1, 1) and bh >= 4 and grad.shape[2] * grad.shape[3] >= 196
    # blocks past the weight's edges hold positions outside it, dropped by a count that depends on the
    # indices' values: traced (torch.compile), such a weight takes the dense gradient
    ragged = bool(out_channels % bh or k % bw)
    limit = BSR_KXK_SAMPLED_MAX_DENSITY if tiled else None
    if not sampled_grad_applies(x, grad, nnzb * bh * bw, out_channels, k, bh * bw, limit) or (
        ragged and not eager(crow, col)
    ):
        return _sample_blocks(dense_weight_grad(x, grad, conv), crow, col, values)

    def make():
        # every position of the stored blocks inside the weight: its row, its column, its flat index in values
        r = (compressed_rows(crow, nnzb) * bh)[:, None, None] + torch.arange(bh, device=col.device)[:, None]
        c = (col.long() * bw)[:, None, None] + torch.arange(bw, device=col.device)
        r, c = r.expand(nnzb, bh, bw).reshape(-1), c.expand(nnzb, bh, bw).reshape(-1)
        if ragged:
            pos = ((r < out_channels) & (c < k)).nonzero().squeeze(1)
        else:
            pos = torch.arange(r.numel(), device=col.device)
        perm = entry_order(r[pos], c[pos], taps, c_in)
        pos = pos[perm]
        return r[pos], c[pos], pos

    rows, cols, pos = cached_entries(crow, col, (out_channels, taps, c_in, bh, bw), make)
    out = values.new_zeros(nnzb * bh * bw).index_copy_(0, pos, sampled_weight_grad(x, grad, rows, cols, conv))
    return out.view(nnzb, bh, bw)


torch.library.register_autograd(
    OP, sparse_backward(torch.ops.pyprune.bsr_conv2d.default, _transpose, dense_weight, _values_grad),
    setup_context=setup_context,
)  # fmt: skip


def bsr_conv2d_checked_ref(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride,
                           padding, dilation, relu=False, residual=None, relu_max=None):  # fmt: skip
    """The reference behind the full argument checks: the CPU kernel when _C lacks one, and the CUDA router's
    last resort."""
    check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip
    kh, kw = kernel_size
    try:
        check_compressed(
            crow_indices, col_indices, -(-out_channels // values.shape[1]),
            -(-kh * kw * x.shape[1] // values.shape[2]), "ceil(out_channels / bh)", "ceil(kh*kw*C_in / bw)",
            "nnz_blocks",
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{OP}: {e}") from None
    return reference.bsr_conv2d_ref(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(bsr_conv2d_checked_ref)


def _bsr_conv2d_im2col(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                       dilation, relu=False, residual=None, relu_max=None):  # fmt: skip
    """The patch matrix (N*OH*OW, kh*kw*C_in), tap-major, times the BSR weight through bsr_linear (which
    routes to its own GPU kernels and checks the index values); the epilogue after it."""
    oh, ow = check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, OH*OW)
    cols = cols.view(n, c, kernel_size[0] * kernel_size[1], oh * ow).permute(0, 3, 2, 1)
    y = torch.ops.pyprune.bsr_linear(cols.reshape(n * oh * ow, -1), crow_indices, col_indices, values,
                                     out_channels, bias)  # fmt: skip
    y = y.view(n, oh, ow, out_channels).permute(0, 3, 1, 2)
    y = y.contiguous(memory_format=reference._memory_format(x))
    return reference.sparse_conv_epilogue(y, relu, residual, relu_max)


# (crow, col) -> the block-column bound ceil(kh*kw*C_in / bw) their values were checked against: an
# out-of-range block column would make the kernel read x out of bounds, and the check costs a device sync, so
# each structure version is checked once
_BSR_CONV2D_CHECKED = _router.TensorCache()


def _check_block_columns(crow: Tensor, col: Tensor, bound: int) -> None:
    _router.check_csr_index_values(crow, col, bound, OP, "ceil(kh*kw*C_in / bw)")


def _bsr_conv2d_triton(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                       dilation, relu=False, residual=None, relu_max=None):  # fmt: skip
    args = (x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation)
    check_args(*args, relu, residual, relu_max)
    bound = -(-kernel_size[0] * kernel_size[1] * x.shape[1] // values.shape[2])
    _router._checked(_BSR_CONV2D_CHECKED, _check_block_columns, crow_indices, col_indices, bound)
    mod, _ = _router.load_triton_kernels()
    # the epilogue after the Triton kernel, on its new output (not fused there yet)
    return reference.sparse_conv_epilogue(mod.bsr_conv2d_triton(*args), relu, residual, relu_max)


def _bsr_conv2d_triton_unavailable(x, *args) -> str | None:
    return _router.triton_unavailable("bsr_conv2d_triton", "bsr_conv2d", x.dtype)


BSR_CONV2D_BACKENDS = [
    Backend("triton", _bsr_conv2d_triton, _bsr_conv2d_triton_unavailable),
    Backend("im2col", _bsr_conv2d_im2col),
    Backend("reference", bsr_conv2d_checked_ref),
]
torch.library.impl(OP, "CUDA")(route("bsr_conv2d", BSR_CONV2D_BACKENDS))

__all__ = [
    "BSR_CONV2D_BACKENDS",
    "BSR_KXK_SAMPLED_MAX_DENSITY",
    "bsr_conv2d",
    "check_args",
    "dense_matrix",
    "dense_weight",
]
