"""pyprune::csr_conv2d: conv2d whose weight is stored CSR, computed as an implicit GEMM over the nonzeros.

The weight is the (out_channels, kh*kw*C_in) matrix in tap-major column order: column ``(i*kw + j)*C_in + c``
holds ``w[o, c, i, j]`` (``w.permute(0, 2, 3, 1).reshape(out_channels, -1)``); a grouped conv stores the
block-diagonal embedding of its weight, whose cross-group zeros are simply not stored. The output has x's
memory format (channels_last when x is laid out so, else contiguous), like F.conv2d.

Backward: the input gradient is this op again, on the output gradient with the weight flipped and transposed
(its structure made once per weight structure and kept, see ``transposed_structure``), one stride-1 conv per
stride phase of x over the taps that reach that phase (``input_grad_phases``); for kxk weights only up to 30%
density, past which ATen's route (``torch.nn.grad.conv2d_input`` on the densified weight) was faster; traced
(torch.compile), strided kxk convs take ATen's route too (a phase's count of entries depends on the indices'
values, which a traced graph cannot hold). The stored values' gradient is computed at the stored positions alone (the private op ``_conv2d_weight_sampled``,
csrc/cpu/conv2d_weight_sampled.cpp) on the CPU in fp32 when at most a tenth of the weight is stored;
otherwise it is the dense weight gradient (``reference.conv2d_weight``: ATen's, or one contraction for 1x1
convs) sampled there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..sparse.base import check_compressed, compressed_rows, row_pointers
from . import (
    _library,  # noqa: F401
    _router,
)
from .._extension import HAS_CPP
from ._common import call_op, check_csr_arrays, eager, register_cpu_fallback
from ._router import Backend, TensorCache, route
from .pruned_conv2d import check_relu_max, check_residual, epilogue_backward, output_size, pair

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
    relu: bool = False,
    residual: Tensor | None = None,
    relu_max: float | None = None,
) -> Tensor:
    """x: (N, C_in, H, W); W: (out_channels, kh*kw*C_in) in tap-major columns as CSR with int32 crow_indices
    (out_channels + 1,) and col_indices (nnz,), values (nnz,); bias: (out_channels,) or None; residual: a
    tensor of the output's shape added after the bias (a ResNet block's skip connection), or None; relu: a
    ReLU applied last, capped at relu_max if given (6: ReLU6). Returns relu?(conv2d(x, W, bias, stride,
    padding, dilation) + residual): (N, out_channels, OH, OW) in x's memory format."""
    return call_op(
        torch.ops.pyprune.csr_conv2d.default, x, crow_indices, col_indices, values, out_channels,
        pair(kernel_size, "kernel_size"), bias, pair(stride, "stride"), pair(padding, "padding"),
        pair(dilation, "dilation"), relu, residual, relu_max,
    )  # fmt: skip


def check_args(x, crow, col, values, out_channels, kernel_size, bias, stride, padding, dilation, relu=False,
               residual=None, relu_max=None):  # fmt: skip
    """Shape, dtype and device checks (no index values: the kernels check those); returns (OH, OW)."""
    if x.dim() != 4:
        raise ValueError(f"{OP}: argument 'x' must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    check_csr_arrays(OP, x, crow, col, values, out_channels, "out_channels")
    arrays = {"crow_indices": crow, "col_indices": col, "values": values}
    oh, ow = check_conv_args(OP, x, arrays, out_channels, kernel_size, bias, stride, padding, dilation)
    check_epilogue(OP, x, out_channels, (oh, ow), relu, residual, relu_max)
    return oh, ow


def check_epilogue(op, x, out_channels, out_size, relu, residual, relu_max=None) -> None:
    """The fused epilogue's arguments of csr_conv2d / bsr_conv2d (``op``): relu a bool, relu_max None or a
    number > 0 with relu, residual None or a tensor of the output's shape, x's dtype and device."""
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: argument 'relu' must be a bool, got {type(relu).__name__}")
    check_relu_max(relu, relu_max, f"{op}: argument 'relu_max'")
    if residual is not None:
        check_residual(op, x, (x.shape[0], out_channels, *out_size), residual)


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
def _(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
      relu=False, residual=None, relu_max=None):  # fmt: skip
    oh, ow = check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip
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
    """What the sparse-weight conv ops (csr_conv2d, bsr_conv2d) keep for backward: with relu, the output too
    (the gradient passes where it is positive, and below relu_max)."""
    x, crow, col, values, out_channels, kernel_size, bias, stride, padding, dilation = inputs[:10]
    relu = len(inputs) > 10 and inputs[10]
    ctx.save_for_backward(x, crow, col, values, output if relu else None)
    ctx.conv = (out_channels, kernel_size, stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.has_residual = len(inputs) > 11 and inputs[11] is not None
    ctx.relu_max = inputs[12] if len(inputs) > 12 else None


def sparse_backward(op, transpose_fn, dense_weight_fn, values_grad_fn):
    """The backward of a sparse-weight conv op ``op`` (torch.ops.pyprune.csr_conv2d or bsr_conv2d).

    The input gradient goes through ``op`` itself, as a stride-1 conv per stride phase (see
    ``input_grad_phases``), with the structure of the flipped, transposed weight from ``transpose_fn(crow,
    col, values, out_channels, taps, C_in)`` -> (crow_t, col_t, perm), its entries ``values[perm]`` (blocks
    transposed), or None where that weight cannot be stored so (then ATen's conv gradient on the weight
    densified by ``dense_weight_fn(crow, col, values, out_channels, kernel_size, C_in)``). The values'
    gradient is ``values_grad_fn(x, grad, crow, col, values, conv)``, conv = (out_channels, kernel_size,
    stride, padding, dilation)."""

    def backward(ctx, grad):
        x, crow, col, values, y = ctx.saved_tensors
        wants_res = ctx.has_residual and ctx.needs_input_grad[11]
        grad, grad_res = epilogue_backward(grad, y, ctx.relu_max, wants_res)
        out_channels, kernel_size, stride, padding, dilation = ctx.conv
        c_in = x.shape[1]
        grad_x = grad_values = grad_b = None
        if ctx.needs_input_grad[0]:
            taps = math.prod(kernel_size)
            phases = input_grad_phases(kernel_size, stride, padding, dilation, x.shape[2:], grad.shape[2:])
            if phases is not None and not eager(crow, col) and _filters_taps(phases, taps):
                phases = None  # a phase's share of the entries has a data-dependent size: traced, ATen's
            t = None if phases is None else transpose_fn(crow, col, values, out_channels, taps, c_in)
            if t is None:
                w = dense_weight_fn(crow, col, values, out_channels, kernel_size, c_in)
                grad_x = torch.nn.grad.conv2d_input(x.shape, w, grad, stride, padding, dilation)
            else:
                grad_x = _input_grad(op, grad, x, values, t, out_channels, taps, stride, phases)
        if ctx.needs_input_grad[3]:
            grad_values = values_grad_fn(x, grad, crow, col, values, ctx.conv)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, None, None, grad_values, None, None, grad_b, None, None, None, None, grad_res, None

    return backward


class Phase(NamedTuple):
    """One stride phase of a conv's input gradient: x's pixels ``start + stride * m`` (m < ``size``) get
    the stride-1 conv of the output gradient with the flipped weight's ``taps`` (row-major indices into the
    flipped kernel, ascending) as a ``kernel_size`` kernel of that ``dilation``, padded by ``padding``, its
    result read from ``crop`` on; ``taps`` None where no tap reaches these pixels (their gradient is 0)."""

    start: tuple[int, int]
    size: tuple[int, int]
    taps: tuple[int, ...] | None
    kernel_size: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    crop: tuple[int, int]


def input_grad_phases(kernel_size, stride, padding, dilation, in_size, out_size) -> list[Phase] | None:
    """The input gradient of a conv (x's spatial size ``in_size``, the output's ``out_size``) as stride-1
    convs of the output gradient, one per stride phase.

    Along one dimension, x's pixel i = r + s * m (phase r < s) received tap t from output pixel m + e with
    e = (r + p - t * d) / s wherever that is an integer: the taps of one phase lie s / gcd(s, d) apart,
    their output pixels d / gcd(s, d) apart, so the phase's gradient is a stride-1 conv of the output
    gradient with those taps of the flipped weight, padded far enough on both sides and cropped to the
    phase's pixels. Stride 1 is one phase with every tap (padding d * (k - 1) - p, nothing cropped when that
    is >= 0); an unpadded strided 1x1 conv is one phase with the tap, the others have none. Together the
    phases cost the conv's own FLOPs. (None would send the backward to ATen's route: the benchmarks'
    dense-backward baseline patches this function so.)"""
    dims = [_phases_1d(*a) for a in zip(kernel_size, stride, padding, dilation, in_size, out_size)]
    kw = kernel_size[1]
    phases = []
    for h, w in itertools.product(*dims):
        if h.taps is None or w.taps is None:
            phases.append(Phase((h.start, w.start), (h.size, w.size), None, (0, 0), (0, 0), (1, 1), (0, 0)))
            continue
        taps = tuple(i * kw + j for i in h.taps for j in w.taps)
        phases.append(Phase(
            (h.start, w.start), (h.size, w.size), taps, (len(h.taps), len(w.taps)), (h.padding, w.padding),
            (h.dilation, w.dilation), (h.crop, w.crop),
        ))  # fmt: skip
    return phases


class _Phase1d(NamedTuple):
    start: int
    size: int
    taps: tuple[int, ...] | None
    padding: int
    dilation: int
    crop: int


def _phases_1d(k: int, s: int, p: int, d: int, n: int, out: int) -> list[_Phase1d]:
    phases = []
    for r in range(min(s, n)):
        size = (n - r + s - 1) // s
        # original taps, last first: their flipped indices k - 1 - t ascend, their offsets e ascend
        taps = [t for t in range(k - 1, -1, -1) if (r + p - t * d) % s == 0]
        if not taps:
            phases.append(_Phase1d(r, size, None, 0, 1, 0))
            continue
        e = [(r + p - t * d) // s for t in taps]
        step = e[1] - e[0] if len(e) > 1 else 1
        # output m' of the padded conv reads from m' - pad: pixel m needs m' = m + e[0] + pad, and the last
        # pixel's window must end inside the padded gradient
        pad = max(0, -e[0], e[0] + size + e[-1] - e[0] - out)
        phases.append(_Phase1d(r, size, tuple(k - 1 - t for t in taps), pad, step, e[0] + pad))
    return phases


def _input_grad(op, grad: Tensor, x: Tensor, values: Tensor, t, out_channels: int, taps: int, stride,
                phases: list[Phase]) -> Tensor:  # fmt: skip
    """x's gradient, phase by phase (input_grad_phases), from ``t`` = (crow_t, col_t, perm): the structure of
    the flipped, transposed weight of ``taps`` taps, whose entries are ``values[perm]`` (see
    transposed_structure)."""
    crow_t, col_t, perm_t = t
    c_in = x.shape[1]
    # the transposed weight's columns per tap: out_channels entries (csr), out_channels // bh blocks (bsr)
    units = out_channels // (values.shape[1] if values.dim() == 3 else 1)
    parts = cached_transpose(
        crow_t, col_t, (out_channels, taps, tuple(p.taps for p in phases)),
        lambda: [_phase_structure(crow_t, col_t, perm_t, units, taps, p.taps) for p in phases],
    )  # fmt: skip
    p = phases[0] if len(phases) == 1 and parts[0] is not None else None
    if p is not None and p.crop == (0, 0) and p.size == tuple(x.shape[2:]):
        crow_p, col_p, perm_p = parts[0]  # stride 1, padding within the kernel's reach
        return op(grad, crow_p, col_p, _transposed_values(values, perm_p), c_in, list(p.kernel_size), None,
                  [1, 1], list(p.padding), list(p.dilation))  # fmt: skip
    fmt = reference._memory_format(grad)
    grad_x = torch.empty(x.shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
    for p, part in zip(phases, parts):
        pixels = grad_x[:, :, p.start[0] :: stride[0], p.start[1] :: stride[1]]
        if part is None:
            pixels.zero_()
            continue
        crow_p, col_p, perm_p = part
        values_p = _transposed_values(values, perm_p)
        g = op(grad, crow_p, col_p, values_p, c_in, list(p.kernel_size), None, [1, 1], list(p.padding),
               list(p.dilation))  # fmt: skip
        pixels.copy_(g[:, :, p.crop[0] : p.crop[0] + p.size[0], p.crop[1] : p.crop[1] + p.size[1]])
    return grad_x


def _filters_taps(phases: list[Phase], taps: int) -> bool:
    """Whether some phase keeps part of the taps (strided kxk convs): its structure is the transposed one's
    entries at those taps, a count that depends on the indices' values."""
    return any(p.taps is not None and len(p.taps) < taps for p in phases)


def _phase_structure(crow_t: Tensor, col_t: Tensor, perm_t: Tensor, units: int, taps: int, kept):
    """The entries of the flipped, transposed weight (``units`` columns per tap) whose tap is in ``kept``
    (ascending), their columns renumbered to kept's taps: (crow, col, perm), the entries being the original
    ``values[perm]``; None for no taps kept, the structure itself for all of them."""
    if kept is None:
        return None
    if len(kept) == taps:
        return crow_t, col_t, perm_t
    new_tap = torch.full((taps,), -1, dtype=torch.long, device=col_t.device)
    new_tap[list(kept)] = torch.arange(len(kept), device=col_t.device)
    cols = col_t.long()
    tap = new_tap[cols // units]
    pos = (tap >= 0).nonzero().squeeze(1)
    crow_p = row_pointers(compressed_rows(crow_t, col_t.numel())[pos], crow_t.numel() - 1)
    return crow_p, (tap[pos] * units + cols[pos] % units).to(torch.int32), perm_t[pos]


def _transposed_values(values: Tensor, perm: Tensor) -> Tensor:
    """The transposed weight's entries: ``values[perm]``, each block transposed for bsr's (nnzb, bh, bw)."""
    v = values[perm]
    return v.transpose(1, 2).contiguous() if v.dim() == 3 else v


def transposed_structure(
    rows: Tensor, cols: Tensor, out_channels: int, taps: int, c_in: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The flipped, transposed weight of a conv as a compressed structure: the entry (o, t * C_in + c) of the
    tap-major (out_channels, taps * C_in) weight moves to row c, column (taps - 1 - t) * out_channels + o of
    the (C_in, taps * out_channels) weight of the input gradient's conv (its tap t' = taps - 1 - t is tap t
    rotated by 180 degrees). ``rows``, ``cols``: the entries' coordinates (long). Returns (crow, col, perm),
    int32 indices in row-major order, with the entries' values ``values[perm]``."""
    tap, c = cols // c_in, cols % c_in
    new_cols = (taps - 1 - tap) * out_channels + rows
    perm = torch.sort(c * (taps * out_channels) + new_cols).indices
    return row_pointers(c, c_in), new_cols[perm].to(torch.int32), perm


def cached_transpose(crow: Tensor, col: Tensor, key: tuple, make):
    """``make()`` kept while (crow, col) are unchanged and ``key`` (the conv's sizes) is the same: the
    backward of every training step asks for the same structure. Not while tracing."""
    return _kept(_TRANSPOSES, crow, col, key, make)


def cached_entries(crow: Tensor, col: Tensor, key: tuple, make):
    """As cached_transpose, for the entries ``sampled_weight_grad`` reads."""
    return _kept(_ENTRIES, crow, col, key, make)


def _kept(cache: TensorCache, crow: Tensor, col: Tensor, key: tuple, make):
    if not eager(crow, col):
        return make()
    kept = cache.get((crow, col), lambda: (key, make()))
    return kept[1] if kept[0] == key else make()


# (crow, col) -> (sizes, what the backward derives from the structure): up to 256 MiB of index tensors each,
# least recently used out first
_TRANSPOSES = TensorCache(max_entries=1024, max_bytes=1 << 28)
_ENTRIES = TensorCache(max_entries=1024, max_bytes=1 << 28)

# the sampled weight gradient's share of stored entries at most: at 10% density it took 0.61-1.05x the time of
# ATen's dense weight gradient on ResNet-50's convs with unstructured entries (batch 8, 2 threads, Xeon VM; 5%:
# 0.30-0.78x, 20%: 0.74-1.33x) and 0.31-0.71x with 32x32 blocks (30%: 0.65-1.82x)
SAMPLED_MAX_DENSITY = 0.1


def sampled_grad_applies(
    x: Tensor, grad: Tensor, entries: int, out_channels: int, k: int, granule: int = 1, max_density=None
) -> bool:
    """Whether the values' gradient of a conv with ``entries`` stored of its (out_channels, k) weight, in
    units of ``granule`` entries (bsr: a block), takes ``_conv2d_weight_sampled``: fp32 on the CPU with the
    C++ kernel, at most ``max_density`` (default SAMPLED_MAX_DENSITY) of the weight stored
    (``within_density``), and no double backward (the op has no derivative of its own)."""
    max_density = SAMPLED_MAX_DENSITY if max_density is None else max_density
    differentiated = torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad)
    return (
        HAS_CPP
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and within_density(entries, out_channels * k, max_density, granule)
        and not differentiated
    )


def within_density(entries: int, total: int, density: float, granule: int = 1) -> bool:
    """``entries`` of ``total`` are at most ``density`` of it, counted as the pruning masks count: a weight
    of n units (entries, or blocks of ``granule`` entries) pruned to sparsity 1 - density keeps n - round((1 -
    density) * n) of them (235930 of 2359296 for ResNet-50's 512->512 3x3 at 90%, past a plain ``entries <=
    0.1 * total``)."""
    n = -(-total // granule)
    return entries <= granule * (n - round((1 - density) * n))


def entry_order(rows: Tensor, cols: Tensor, taps: int, c_in: int) -> Tensor:
    """The permutation that puts entries by row, and within a row by (channel, tap): the order in which
    ``_conv2d_weight_sampled`` reads neighbouring runs of one channel's planes."""
    key = rows * (taps * c_in) + (cols % c_in) * taps + cols // c_in
    return torch.sort(key).indices


def sampled_weight_grad(x, grad, rows, cols, conv) -> Tensor:
    """``_conv2d_weight_sampled`` at the entries (rows, cols), in entry_order."""
    _, kernel_size, stride, padding, dilation = conv
    return torch.ops.pyprune._conv2d_weight_sampled(
        x, grad, rows, cols, list(kernel_size), list(stride), list(padding), list(dilation)
    )


def dense_weight_grad(x: Tensor, grad: Tensor, conv) -> Tensor:
    """ATen's weight gradient as the tap-major (out_channels, kh*kw*C_in) matrix."""
    out_channels, kernel_size, stride, padding, dilation = conv
    w_shape = (out_channels, x.shape[1], *kernel_size)
    gw = reference.conv2d_weight(x, w_shape, grad, stride, padding, dilation)
    return gw.permute(0, 2, 3, 1).reshape(out_channels, -1)


# a kxk weight's share of stored entries at most for its input gradient to run csr_conv2d (1x1 convs always
# do): one training step of ResNet-50's 3x3 convs (batch 8, 2 threads, Xeon VM) took 1.03-1.18x the time of
# the ATen route at 50% sparsity, 0.97-1.06x at 70%, 0.46-0.84x at 90% (sparse_conv2d_train.md)
KXK_INPUT_GRAD_MAX_DENSITY = 0.3


def _transpose(crow: Tensor, col: Tensor, values: Tensor, out_channels: int, taps: int, c_in: int):
    """The flipped, transposed structure, or None for a kxk weight denser than KXK_INPUT_GRAD_MAX_DENSITY."""
    if taps > 1 and not within_density(col.numel(), out_channels * taps * c_in, KXK_INPUT_GRAD_MAX_DENSITY):
        return None

    def make():
        return transposed_structure(compressed_rows(crow, col.numel()), col.long(), out_channels, taps, c_in)

    return cached_transpose(crow, col, (out_channels, taps, c_in), make)


def _values_grad(x: Tensor, grad: Tensor, crow: Tensor, col: Tensor, values: Tensor, conv) -> Tensor:
    out_channels, kernel_size = conv[:2]
    taps, c_in = math.prod(kernel_size), x.shape[1]
    nnz = col.numel()
    if not sampled_grad_applies(x, grad, nnz, out_channels, taps * c_in):
        return dense_weight_grad(x, grad, conv)[compressed_rows(crow, nnz), col.long()]

    def make():
        rows, cols = compressed_rows(crow, nnz), col.long()
        perm = entry_order(rows, cols, taps, c_in)
        return rows[perm], cols[perm], perm

    rows, cols, perm = cached_entries(crow, col, (out_channels, taps, c_in), make)
    return values.new_empty(nnz).index_copy_(0, perm, sampled_weight_grad(x, grad, rows, cols, conv))


@torch.library.register_fake("pyprune::_conv2d_weight_sampled")
def _(x, grad, rows, cols, kernel_size, stride, padding, dilation):
    return x.new_empty(rows.shape)


# no GPU kernel: CUDA tensors take the reference (ATen's dense weight gradient, read at the entries)
torch.library.impl("pyprune::_conv2d_weight_sampled", "CUDA")(reference._conv2d_weight_sampled_ref)
register_cpu_fallback("_conv2d_weight_sampled")

torch.library.register_autograd(
    OP, sparse_backward(torch.ops.pyprune.csr_conv2d.default, _transpose, dense_weight, _values_grad),
    setup_context=setup_context,
)  # fmt: skip


def csr_conv2d_checked_ref(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                           dilation, relu=False, residual=None, relu_max=None):  # fmt: skip
    """The reference behind the full argument checks: the CPU kernel when _C lacks one, and the CUDA router's
    last resort."""
    check_args(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip
    kh, kw = kernel_size
    try:
        check_compressed(
            crow_indices, col_indices, out_channels, kh * kw * x.shape[1],
            "out_channels", "kh*kw*C_in", "nnz",
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{OP}: {e}") from None
    return reference.csr_conv2d_ref(
        x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation,
        relu, residual, relu_max,
    )  # fmt: skip


if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
    torch.library.impl(OP, "CPU")(csr_conv2d_checked_ref)

# (crow, col) -> the column bound kh*kw*C_in their values were checked against: an out-of-range column would
# make the kernel read x out of bounds, and the check costs a device sync, so each structure version is checked
# once
_CSR_CONV2D_CHECKED = _router.TensorCache()


def _check_columns(crow: Tensor, col: Tensor, bound: int) -> None:
    _router.check_csr_index_values(crow, col, bound, OP, "kh*kw*C_in")


def _csr_conv2d_triton(x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding,
                       dilation, relu=False, residual=None, relu_max=None):  # fmt: skip
    args = (x, crow_indices, col_indices, values, out_channels, kernel_size, bias, stride, padding, dilation)
    check_args(*args, relu, residual, relu_max)
    bound = kernel_size[0] * kernel_size[1] * x.shape[1]
    _router._checked(_CSR_CONV2D_CHECKED, _check_columns, crow_indices, col_indices, bound)
    mod, _ = _router.load_triton_kernels()
    # the epilogue after the Triton kernel, on its new output (not fused there yet)
    return reference.sparse_conv_epilogue(mod.csr_conv2d_triton(*args), relu, residual, relu_max)


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
    "check_epilogue",
    "KXK_INPUT_GRAD_MAX_DENSITY",
    "SAMPLED_MAX_DENSITY",
    "cached_entries",
    "cached_transpose",
    "csr_conv2d",
    "dense_weight",
    "dense_weight_grad",
    "entry_order",
    "Phase",
    "input_grad_phases",
    "sampled_grad_applies",
    "sampled_weight_grad",
    "setup_context",
    "sparse_backward",
    "transposed_structure",
    "within_density",
]
