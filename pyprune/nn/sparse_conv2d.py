"""SparseConv2d: a drop-in nn.Conv2d whose weight is stored CSR, BSR or 2:4 and multiplied by pyprune's
sparse kernels, never densified (but for the few floats of a depthwise conv's weight, below).

A convolution is a GEMM over the pixels with a reduction over the kh * kw * C_in inputs of each receptive
field (Fast Sparse ConvNets, Elsen et al. 2020, for the 1x1 case).

- **csr** (any kernel, stride, padding, dilation, groups, memory format): ``pyprune::csr_conv2d``, an
  implicit GEMM that reads each channel's pixels as contiguous runs (the C++ kernel stages zero-padded planes
  per stride phase once per call, or through 16x16 transposes from channels_last input; see
  csrc/cpu/csr_conv2d.cpp for the cases it reads in place or copies / transposes per tile).
  Depthwise convs (one input channel per group, groups == in_channels) on channels_last input instead run
  pruned_conv2d's depthwise kernel (channels as vectors) on the (C_out, 1, kh, kw) weight scattered from the
  stored entries at every call: that weight is C_out * kh * kw floats and the conv 2 * kh * kw FLOPs an
  output, while the implicit GEMM staged the whole input through transposes for about one nonzero a row
  (MobileNetV2's depthwise convs at 90%: 0.16-0.56x the dense conv's speed that way; its csr variant
  0.79-0.82x the time this way, 2 threads, Xeon VM). The zeros are multiplied there: no gain from the
  sparsity, no loss against the dense conv either. On NCHW input, where the planes are copied rather than
  transposed, csr_conv2d stays (the other route cost 1.06-1.07x on MobileNetV2 there).
- **bsr**: ``pyprune::bsr_conv2d``, the same implicit GEMM over the stored blocks (csrc/cpu/bsr_conv2d.cpp:
  RB rows of a block share each loaded run of pixels); an unpadded 1x1 conv on channels_last input runs
  bsr_linear's kernel inside it, over the (pixels, C_in) matrix as it lies. On CUDA bsr_conv2d runs a Triton
  implicit GEMM over the blocks (kernels/bsr_conv2d.py), else builds the patch matrix for bsr_linear's GPU
  kernels; there the unpadded channels_last 1x1 conv goes to bsr_linear as below.
- **2:4** with C_in a multiple of 8 (any kernel): ``pyprune::sparse24_conv2d``, an implicit GEMM with
  sparse24_linear's kernel, each output pixel's inputs read from x itself (channels_last, unpadded) or from
  one zero-bordered NHWC copy of it, the epilogue fused. On NCHW 1x1 convs of ResNet-50 at batch 1 it took
  0.55-1.0x the time of the route below (one process, 2 threads, Zen 4 VM), the same on channels_last.
- **2:4** otherwise (and bsr's channels_last 1x1 on CUDA): the sparse-linear ops in the NHWC (channels_last)
  arrangement, where a pixel's channels are contiguous:
  - 1x1, channels_last input: the input *is* the (N*H*W, C_in) activation matrix (a view, no copy), and the
    op's (N*H*W, C_out) output *is* the channels_last result.
  - 1x1, NCHW input: per image and in ~1 MiB chunks of pixels, the op gets the (pixels, C) transposed view
    of the chunk (which 2:4 transposes into rows through 16x16 register transposes), and its (pixels, C_out)
    output is transposed back to (C_out, pixels) (benchmarks/results/cpu/sparse_conv2d.md measures the
    transposes). Traced (torch.compile, torch.export, torch.jit.trace), the whole batch is transposed at once
    instead.
  - kxk (and padded 1x1; 2:4 with C_in not a multiple of 8): **explicit im2col**: the (N*OH*OW, kh*kw*C_in)
    patch matrix is materialised from a strided view of the zero-padded NHWC input, then multiplied. This
    costs kh*kw times the input's bytes in memory traffic. Past 4 MiB of patches it goes per image, a few
    output rows per op call, so each chunk's patches stay in cache and no multi-MB buffer is mapped and
    unmapped per call (eager only; traced, the whole batch goes in one call).

Because of that arrangement the stored weight is the (C_out, kh*kw*C_in) matrix in **tap-major column
order**: column ``(i * kw + j) * C_in + c`` holds ``conv.weight[o, c, i, j]`` (``conv.weight.permute(0, 2, 3,
1)``), so a patch row is a contiguous run of channels per tap. For 1x1 convs this is conv.weight's own order.
Block (bsr) and 2:4 patterns therefore group channels of one tap: a 2:4 group is 4 consecutive input
channels at one kernel position. ``pyprune.sparsify(pattern="2:4")`` groups (C_in, kh, kw)-ordered inputs
instead, so its masks on kxk convs are generally not 2:4 here (``convert`` leaves such layers dense and says why); use
``from_dense(conv, sparsity=0.5, layout="2:4")`` for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..sparse import BSR, CSR, Sparse24
from ..sparse.base import compressed_rows
from ..sparse.bsr import check_block
from ..ops.pruned_conv2d import check_relu_max
from ..sparse.select import block_mask, magnitude_mask, nm_mask
from ._dtype import weight_dtype_input
from ._trainable import copy_requires_grad, trains
from .sparse_linear import LAYOUTS, _check_layout, check_stored_shape

# activations per op call on the NCHW 1x1 path (measured: 1 MiB chunks beat whole images of 3 MiB and more)
_NCHW_CHUNK_BYTES = 1 << 20
# im2col per op call on the 2:4 kxk path past this size (measured when bsr took it too): rows of each image
# at a time. Whole 58 MiB patch matrices (64->64 3x3 @56, batch 8) were allocated, page-faulted and unmapped
# on every call: 2 threads, Zen 5 VM, bsr 90% channels_last 29.7 -> 4.6 ms, 2:4 26.8 -> 6.5 ms (dense 4.1-4.2
# ms); chunks of 1 and 16 MiB did no better than 4 on the ResNet-50 3x3 shapes at batch 1 and 8
_KXK_CHUNK_BYTES = 4 << 20


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _channels_last(x: Tensor) -> bool:
    """channels_last when the channels are the innermost of C, W (ties: the layouts coincide, NCHW chosen)."""
    return x.stride(1) < x.stride(3)


def tap_major(weight: Tensor) -> Tensor:
    """(C_out, C_in, kh, kw) -> (C_out, kh*kw*C_in), column (i*kw + j)*C_in + c: the im2col order of NHWC."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _embed_groups(w: Tensor, groups: int) -> Tensor:
    """Grouped weight (C_out, kh, kw, C_in/g) -> block-diagonal (C_out, kh, kw, C_in): zeros across groups."""
    o, kh, kw, cg = w.shape
    full = w.new_zeros(groups, o // groups, kh, kw, groups, cg)
    torch.diagonal(full, dim1=0, dim2=4).copy_(
        w.reshape(groups, o // groups, kh, kw, cg).permute(1, 2, 3, 4, 0)
    )
    return full.reshape(o, kh, kw, groups * cg)


class SparseConv2d(nn.Module):
    """``conv2d(input, W, bias, stride, padding, dilation, groups)`` with W sparse (layout "csr", "bsr" with
    tiles ``block`` = (bh, bw), or "2:4"), through ``pyprune.ops.{csr,bsr,sparse24}_conv2d`` or
    ``pyprune.ops.{bsr,sparse24}_linear`` (see the module docstring for which runs when).

    input: (N, C_in, H, W) or (C_in, H, W), NCHW or channels_last; returns (N, C_out, OH, OW) in the same
    memory format. ``weight`` is a ``pyprune.sparse`` format of shape (C_out, kh*kw*C_in) in tap-major column
    order (see the module docstring); for ``groups > 1`` (csr only) it is the block-diagonal embedding of
    the grouped weight, whose cross-group zeros are not stored.

    ``relu=True`` applies a ReLU to the output (capped at ``relu_max`` if given: 6 is ReLU6), and
    ``module(input, residual)`` adds ``residual`` (the output's shape) before it: a ResNet block's last conv,
    skip connection and ReLU in one call. csr_conv2d, bsr_conv2d and sparse24_conv2d apply both in the
    kernel's stores (no pass over the output of their own); the linear routes (2:4 with C_in not a multiple of
    8, bsr's channels_last 1x1 on CUDA) after the op, in place on its new output.

    Build it with :meth:`from_dense`; the constructor makes an all-zero weight of the right layout, which
    ``load_state_dict`` then fills. Gradients reach the input, the stored nonzeros (``weight.values``), the
    bias and the residual; the pattern stays fixed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        layout: str = "csr",
        block: tuple[int, int] = (32, 32),
        device=None,
        dtype=None,
        relu: bool = False,
        relu_max: float | None = None,
    ):
        super().__init__()
        _check_layout(layout)
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        check_relu_max(relu, relu_max, "relu_max")
        self.relu = relu
        self.relu_max = None if relu_max is None else float(relu_max)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels!r}, {out_channels!r}"
            )
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if (
            min(self.kernel_size) < 1
            or min(self.stride) < 1
            or min(self.dilation) < 1
            or min(self.padding) < 0
        ):
            raise ValueError(
                f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got kernel_size="
                f"{self.kernel_size}, stride={self.stride}, dilation={self.dilation}, padding={self.padding}"
            )
        if (
            not isinstance(groups, int)
            or groups < 1
            or self.in_channels % groups
            or self.out_channels % groups
        ):
            raise ValueError(
                f"groups must be a positive int dividing in_channels ({self.in_channels}) and out_channels "
                f"({self.out_channels}), got {groups!r}"
            )
        if groups != 1 and layout != "csr":
            raise ValueError(
                f"groups={groups} is supported with layout 'csr' only (the block-diagonal weight would store "
                f"its cross-group zeros in '{layout}'); got layout={layout!r}"
            )
        self.groups, self.layout = groups, layout
        dtype = dtype or torch.get_default_dtype()
        shape = (self.out_channels, self.kernel_size[0] * self.kernel_size[1] * self.in_channels)
        if layout == "csr":
            self.weight = CSR.empty(shape, dtype=dtype, device=device)
        elif layout == "bsr":
            self.weight = BSR.empty(shape, check_block(block), dtype=dtype, device=device)
        else:
            self.weight = Sparse24.empty(shape, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        sparsity: float | None = None,
        layout: str = "csr",
        block: tuple[int, int] = (32, 32),
        relu: bool = False,
        relu_max: float | None = None,
    ) -> SparseConv2d:
        """With ``sparsity``, drops the smallest-magnitude weights (bsr: the smallest-norm (bh, bw) tiles of the
        tap-major weight matrix; 2:4: the two smallest of every four consecutive tap-major inputs, i.e. input
        channels at one kernel position when in_channels % 4 == 0, so sparsity must be 0.5); with
        ``sparsity=None`` keeps exactly the zeros already in ``conv.weight``. ``relu`` fuses a ReLU after the
        conv (and after the residual a call passes), capped at ``relu_max`` if given."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        _check_layout(layout)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"conv must use numeric zero padding, got padding={conv.padding!r} "
                f"padding_mode={conv.padding_mode!r}"
            )
        w = conv.weight.detach()
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=conv.bias is not None, layout=layout, block=block, device=w.device, dtype=w.dtype,
            relu=relu, relu_max=relu_max,
        )  # fmt: skip
        w2 = tap_major(w)  # (C_out, kh*kw*C_in/groups)
        if sparsity is not None:
            if layout == "2:4":
                if sparsity != 0.5:
                    raise ValueError(f"sparsity for layout '2:4' must be 0.5 (or None), got {sparsity!r}")
                mask = nm_mask(w2, 2, 4)
            elif layout == "bsr":
                mask = block_mask(w2, sparsity, check_block(block))
            else:
                mask = magnitude_mask(w2, sparsity)
            w2 = w2 * mask
        if conv.groups != 1:
            kh, kw = conv.kernel_size
            w2 = _embed_groups(w2.reshape(conv.out_channels, kh, kw, -1), conv.groups)
            w2 = w2.reshape(conv.out_channels, -1)
        if layout == "csr":
            new.weight = CSR.from_dense(w2)
        elif layout == "bsr":
            new.weight = BSR.from_dense(w2, check_block(block))
        else:
            new.weight = Sparse24.from_dense(w2)
        new.weight.values.requires_grad_(trains(conv, "weight"))  # a frozen layer stays frozen
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=trains(conv, "bias"))
        return new

    def _linear(self, a: Tensor) -> Tensor:
        w = self.weight
        if self.layout == "csr":
            return ops.csr_linear(a, w.crow_indices, w.col_indices, w.values, self.out_channels, self.bias)
        if self.layout == "bsr":
            return ops.bsr_linear(a, w.crow_indices, w.col_indices, w.values, self.out_channels, self.bias)
        return ops.sparse24_linear(a, w.values, w.meta, self.out_channels, self.bias)

    def kernel_op(self, input: Tensor) -> str:
        """The pyprune op this module's forward calls on ``input`` (the profiler's label for it)."""
        if self.layout == "csr":
            return "pruned_conv2d" if self._depthwise(input) else "csr_conv2d"
        if self.layout == "bsr":
            return "bsr_linear" if self._bsr_as_linear(input) else "bsr_conv2d"
        return "sparse24_conv2d" if self._sparse24_as_conv() else "sparse24_linear"

    def _depthwise(self, x: Tensor) -> bool:
        """One input channel per group (csr only has groups) on channels_last input: the dense depthwise route
        (module docstring)."""
        cl = _channels_last(x if x.dim() == 4 else x.unsqueeze(0))
        return self.groups > 1 and self.groups == self.in_channels and cl

    def _depthwise_weight(self, wt, values: Tensor) -> Tensor:
        """The (C_out, 1, kh, kw) weight of a depthwise conv, its stored entries scattered in (differentiable
        in ``values``): entry (o, tap * C_in + c) of the block-diagonal embedding is tap ``tap`` of output
        o."""
        (kh, kw), o = self.kernel_size, self.out_channels
        rows = compressed_rows(wt.crow_indices, wt.col_indices.numel())
        flat = rows * (kh * kw) + wt.col_indices.long() // self.in_channels
        return values.new_zeros(o * kh * kw).index_put((flat,), values, accumulate=True).view(o, 1, kh, kw)

    def _sparse24_as_conv(self) -> bool:
        """2:4 on a conv whose 2:4 group pairs (8 tap-major inputs) each lie in one tap: the implicit-GEMM op.
        Other channel counts go through sparse24_linear here instead (the op would densify)."""
        return self.in_channels % 8 == 0

    def _bsr_as_linear(self, x: Tensor) -> bool:
        """bsr on an unpadded 1x1 conv over channels_last input off the CPU: the input is the (pixels, C_in)
        activation matrix as it lies, for bsr_linear's GPU kernels. (On the CPU bsr_conv2d runs bsr_linear's
        kernel on it itself, with the epilogue.)"""
        pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        return pointwise and x.device.type != "cpu" and _channels_last(x if x.dim() == 4 else x.unsqueeze(0))

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if residual is not None and not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must have shape (N, in_channels={self.in_channels}, H, W) or (in_channels, H, W), "
                f"got {tuple(input.shape)}"
            )
        wt = self.weight  # read once: a module attribute costs ~0.45 us a read
        values = wt.values
        if input.dtype != values.dtype:
            input = weight_dtype_input(input, values.dtype)
        if input.device != values.device:
            raise ValueError(f"input is on {input.device} but the weight is on {values.device}")
        x = input if input.dim() == 4 else input.unsqueeze(0)
        res = None
        if residual is not None:
            if residual.dim() != input.dim():
                raise ValueError(
                    f"residual must have the output's shape (as many dimensions as input, {input.dim()}), "
                    f"got {tuple(residual.shape)}"
                )
            if residual.device != values.device:
                raise ValueError(f"residual is on {residual.device} but the weight is on {values.device}")
            res = weight_dtype_input(residual, values.dtype) if residual.dtype != values.dtype else residual
            res = res if res.dim() == 4 else res.unsqueeze(0)
        if self.layout == "csr" and self._depthwise(x):
            y = ops.pruned_conv2d(
                x, self._depthwise_weight(wt, values), self.bias, None, None, self.out_channels, self.stride,
                self.padding, self.dilation, self.groups, self.relu, None, self.relu_max, res,
            )  # fmt: skip
            return y if input.dim() == 4 else y.squeeze(0)
        if self.layout == "csr":  # the op checks the spatial size (and the residual's shape) itself
            y = ops.csr_conv2d(
                x, wt.crow_indices, wt.col_indices, values, self.out_channels, self.kernel_size, self.bias,
                self.stride, self.padding, self.dilation, self.relu, res, self.relu_max,
            )  # fmt: skip
            if _channels_last(x):
                y = y.contiguous(memory_format=torch.channels_last)
            return y if input.dim() == 4 else y.squeeze(0)
        if self.layout == "2:4" and self._sparse24_as_conv():
            y = ops.sparse24_conv2d(
                x, values, wt.meta, self.out_channels, self.kernel_size, self.bias, self.stride, self.padding,
                self.dilation, self.relu, res, self.relu_max,
            )  # fmt: skip
        elif self.layout == "bsr" and not self._bsr_as_linear(x):
            y = ops.bsr_conv2d(
                x, wt.crow_indices, wt.col_indices, values, self.out_channels, self.kernel_size, self.bias,
                self.stride, self.padding, self.dilation, self.relu, res, self.relu_max,
            )  # fmt: skip
        else:
            y = self._forward_unfused(x, wt, values, res)
        return y if input.dim() == 4 else y.squeeze(0)

    def _forward_unfused(self, x: Tensor, wt, values: Tensor, res: Tensor | None) -> Tensor:
        """The routes whose ops have no epilogue (2:4 through sparse24_linear, bsr's channels_last 1x1 on
        CUDA): the op, then the residual and the ReLU in place on its new output."""
        y = self._conv(x, wt, values)
        if res is not None:
            if res.shape != y.shape:
                raise ValueError(
                    f"residual must have the output's shape {tuple(y.shape)}, got {tuple(res.shape)}"
                )
            y.add_(res)
        if self.relu:
            y.relu_()
        return y.clamp_max_(self.relu_max) if self.relu_max is not None else y

    def _conv(self, x: Tensor, wt, values: Tensor) -> Tensor:
        """conv2d of 4-D x through the linear ops (2:4 with C_in not a multiple of 8; bsr's channels_last 1x1
        on CUDA)."""
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(
                f"input's spatial size {(h, w)} is smaller than the dilated kernel "
                f"{(dh * (kh - 1) + 1, dw * (kw - 1) + 1)} after padding {self.padding}"
            )
        channels_last = _channels_last(x)
        pointwise = (kh, kw) == (1, 1) and (ph, pw) == (0, 0)
        # loops over images / rows only in eager mode: a traced graph (dynamo, export, torch.jit.trace) would
        # unroll them for the example's batch and leave the rest of another batch's output unwritten
        eager = not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        if pointwise and not channels_last and n > 0 and eager:
            # NCHW 1x1, one image at a time, its pixels in chunks of about _NCHW_CHUNK_BYTES of activations:
            # image i is (C, H*W) with the pixels contiguous, so a chunk's (pixels, C) operand is a transposed
            # view that the op transposes once. Cache-sized chunks keep that copy and the
            # kernel's packed activations in L2, and keep glibc from unmapping and re-faulting multi-MB
            # buffers on every call, which cost more than the multiply (benchmarks/results/cpu/sparse_conv2d.md).
            xs = x[:, :, ::sh, ::sw]
            pixels = oh * ow
            n_chunks = -(-pixels * c * x.element_size() // _NCHW_CHUNK_BYTES)
            step = -(-pixels // n_chunks)
            # each chunk's (pixels, C_out) result is transposed straight into its place in y (one copy; a
            # concatenation per image and a stack of the images made two)
            y = x.new_empty(n, self.out_channels, pixels)
            for i in range(n):
                xi = xs[i].reshape(c, pixels)
                for j in range(0, pixels, step):
                    y[i, :, j : j + step] = self._linear(xi[:, j : j + step].t()).t()
            return y.view(n, self.out_channels, oh, ow)
        xl = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view; contiguous iff the input is channels_last
        if pointwise:
            # 1x1: pixels are rows. A view for dense channels_last input; else one NHWC copy of the pixels
            y = self._linear(xl[:, ::sh, ::sw].reshape(n * oh * ow, c)).view(n, oh, ow, self.out_channels)
        else:
            # explicit im2col from strided views of the padded NHWC input (F.pad writes it NHWC-contiguous);
            # past _KXK_CHUNK_BYTES (eager only) per image, `rows` output rows per op call
            xp = F.pad(xl, (0, 0, pw, pw, ph, ph)) if ph or pw else xl
            patch_row = ow * kh * kw * c * x.element_size()  # bytes of im2col per output row
            if n * oh * patch_row > _KXK_CHUNK_BYTES and eager:
                rows = max(1, _KXK_CHUNK_BYTES // patch_row)
                y = x.new_empty(n, oh, ow, self.out_channels)
                for i in range(n):
                    for r0 in range(0, oh, rows):
                        r1 = min(oh, r0 + rows)
                        a = self._im2col(xp[i, r0 * sh : (r1 - 1) * sh + dh * (kh - 1) + 1])
                        y[i, r0:r1] = self._linear(a).view(r1 - r0, ow, self.out_channels)
            else:
                y = self._linear(self._im2col(xp)).view(n, oh, ow, self.out_channels)
        y = y.permute(0, 3, 1, 2)  # channels_last strides
        return y if channels_last else y.contiguous()

    def _im2col(self, xp: Tensor) -> Tensor:
        """(..., H, W, C) padded NHWC rows -> the (pixels, kh * kw * C) patch matrix in tap-major order."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        if torch.compiler.is_compiling():
            # the same patches through F.unfold: inductor's CPU backward of two chained Tensor.unfold corrupted
            # the heap (torch 2.13; "double free or corruption", or a wrong gradient)
            x4 = xp.reshape(-1, *xp.shape[-3:]).permute(0, 3, 1, 2)  # (images, C, H, W)
            cols = F.unfold(x4, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
            cols = cols.view(x4.shape[0], x4.shape[1], kh * kw, -1)
            return cols.permute(0, 3, 2, 1).reshape(-1, kh * kw * x4.shape[1])  # (images, OH * OW, kh, kw, C)
        patches = xp.unfold(-3, dh * (kh - 1) + 1, sh).unfold(-3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return patches.movedim(-3, -1).reshape(-1, kh * kw * xp.shape[-1])  # (..., OH, OW, kh, kw, C)

    def to_dense(self) -> nn.Module:
        """An equivalent plain-PyTorch module: the nn.Conv2d of :meth:`dense_conv`, followed by an nn.ReLU (or
        nn.ReLU6 / nn.Hardtanh(0, relu_max)) when ``relu`` is on (for calls without a residual, which the ReLU
        would follow)."""
        conv = self.dense_conv()
        if not self.relu:
            return conv
        if self.relu_max is None:
            return nn.Sequential(conv, nn.ReLU())
        return nn.Sequential(conv, nn.ReLU6() if self.relu_max == 6.0 else nn.Hardtanh(0.0, self.relu_max))

    def dense_conv(self) -> nn.Conv2d:
        """The nn.Conv2d holding this conv's weight (its zeros stored) and bias, without the fused ReLU."""
        kh, kw = self.kernel_size
        w = self.weight.to_dense().reshape(self.out_channels, kh, kw, self.in_channels)
        if self.groups != 1:
            g, cg = self.groups, self.in_channels // self.groups
            blocks = w.reshape(g, self.out_channels // g, kh, kw, g, cg)
            w = (
                torch.diagonal(blocks, dim1=0, dim2=4)
                .permute(4, 0, 1, 2, 3)
                .reshape(self.out_channels, kh, kw, cg)
            )
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, bias=self.bias is not None, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w.permute(0, 3, 1, 2))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return copy_requires_grad(conv, self, {"weight": "weight.values", "bias": "bias"})

    def get_extra_state(self):
        return {"layout": self.layout, "kernel_size": self.kernel_size, "groups": self.groups}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        for key in ("layout", "kernel_size", "groups"):
            theirs = tuple(state[key]) if key == "kernel_size" else state[key]
            if theirs != mine[key]:
                raise ValueError(
                    f"state_dict holds a weight with {key}={theirs!r} but this module has {mine[key]!r}"
                )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        want = (self.out_channels, self.kernel_size[0] * self.kernel_size[1] * self.in_channels)
        if prefix + "_extra_state" in state_dict:  # layout and geometry first: the more specific message
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        check_stored_shape(state_dict, prefix, want, "C_out, kh*kw*C_in")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.relu:
            s += ", relu=True"
        if self.relu_max is not None:
            s += f", relu_max={self.relu_max}"
        s += f", layout={self.layout}"
        if self.layout == "bsr":
            s += f", block={self.weight.block}"
        # density of the real (per-group) weights, not of the block-diagonal embedding
        return s + f", density={self.weight.density * self.groups:.3f}"


__all__ = ["LAYOUTS", "SparseConv2d", "tap_major"]
