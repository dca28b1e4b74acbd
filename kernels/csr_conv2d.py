"""Triton CSR-weight conv2d: y = conv2d(x, W) + bias with W stored as CSR over (C_out, kh*kw*C_in), tap-major.

Column ``(i*kw + j)*C_in + c`` of row o holds ``w[o, c, i, j]``. Each program owns one output channel o (one
CSR row) and BLOCK_P output pixels of one image (flattened ``oh*OW + ow``). It walks the row's nonzeros
BLOCK_K at a time: each column decodes to (tap i, tap j, channel c), and the BLOCK_P pixels of x it touches
are gathered straight from x (no im2col), the zero padding handled by the load mask. The weighted sum over the
nonzeros happens in fp32 on CUDA cores; a scattered weight gives no dense tile for ``tl.dot``.

Layouts: x is read through its own strides, so NCHW and channels_last (or any other strides) need no copy; the
output takes x's memory format, as F.conv2d does (channels_last when x is so laid out and not also plainly
contiguous, else contiguous) and is written through its strides. Programs are numbered with the output channel
fastest, so those running together read the same x pixels from L2.

Numerics: products and the sum in fp32, bias added in fp32, one rounding to x's dtype at the store. Offsets
into x and y are int64: N * C * H * W passes 2**31 for large activations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import channels_last, interpreting, on_device

INTERPRET = interpreting()


def _cfg(bp, bk, warps):
    return triton.Config({"BLOCK_P": bp, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


def _configs() -> list[triton.Config]:
    # The interpreter runs every config it is given; one small one keeps the CPU tests quick and still makes
    # their shapes span several pixel blocks and nonzero chunks. PYPRUNE_TRITON_AUTOTUNE=0: one GPU config.
    if INTERPRET:
        return [_cfg(16, 4, 4)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [_cfg(128, 8, 4)]
    # Small maps (7x7 = 49 pixels) want short pixel blocks so the grid has work; big ones long blocks per row.
    # BLOCK_K nonzeros in flight per step hide the latency of the gathered loads.
    return [
        _cfg(64, 8, 2),
        _cfg(64, 16, 4),
        _cfg(128, 8, 4),
        _cfg(128, 16, 4),
        _cfg(256, 8, 4),
        _cfg(256, 16, 8),
        _cfg(32, 16, 2),
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep pixel blocks no longer than a map (rounded up to a power of two >= 32)."""
    p_cap = max(32, triton.next_power_of_2(named_args["OHW"]))
    kept = [c for c in configs if c.kwargs["BLOCK_P"] <= p_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"])]


@triton.autotune(
    configs=_configs(),
    key=["OHW_BUCKET", "C_OUT", "C_IN", "KH", "KW", "HAS_PAD"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _csr_conv2d_fwd_kernel(
    x_ptr,
    crow_ptr,
    col_ptr,
    val_ptr,
    bias_ptr,
    y_ptr,
    C_OUT,
    C_IN,
    H,
    W,
    OW,
    OHW,
    OHW_BUCKET,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    CONV_SH,
    CONV_SW,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Only builtins of tl here (no tl.cdiv / tl.zeros, which are @jit helpers): the CPU tests interpret a copy
    # of this file after triton was imported in compile mode, and an interpreted kernel cannot call those.
    pid = tl.program_id(0)
    o = pid % C_OUT
    rest = pid // C_OUT
    n_pblocks = (OHW + BLOCK_P - 1) // BLOCK_P
    img = rest // n_pblocks
    pb = rest % n_pblocks

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OHW
    oh = offs_p // OW
    ow = offs_p % OW
    ih0 = oh * CONV_SH - PAD_H
    iw0 = ow * CONV_SW - PAD_W
    x_img = img.to(tl.int64) * stride_xn

    start = tl.load(crow_ptr + o)
    end = tl.load(crow_ptr + o + 1)
    acc = tl.full((BLOCK_P,), 0.0, tl.float32)
    # BLOCK_K nonzeros per step, unrolled: their scalar index loads and pixel gathers are independent, so
    # they overlap in flight. (Unrolled rather than one (BLOCK_K, BLOCK_P) tile reduced with tl.sum, which is
    # a @jit helper the interpreted tests cannot call; see above.)
    for k0 in range(start, end, BLOCK_K):
        for kk in tl.static_range(BLOCK_K):
            k = k0 + kk
            ok = k < end
            col = tl.load(col_ptr + k, mask=ok, other=0)
            v = tl.load(val_ptr + k, mask=ok, other=0.0).to(tl.float32)
            c = col % C_IN
            tap = col // C_IN
            ih = ih0 + (tap // KW) * DIL_H
            iw = iw0 + (tap % KW) * DIL_W
            # mask_p, or empty past the row's end (not `mask_p & ok`: the interpreter mistypes that)
            m = offs_p < tl.where(ok, OHW, 0)
            if HAS_PAD:
                m = m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off = (
                x_img + c.to(tl.int64) * stride_xc + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            )
            acc += v * tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(tl.float32)
    y_off = (
        img.to(tl.int64) * stride_yn
        + o.to(tl.int64) * stride_yc
        + oh.to(tl.int64) * stride_yh
        + ow.to(tl.int64) * stride_yw
    )
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_p)


def csr_conv2d_triton(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    out_channels: int,
    kernel_size,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
) -> torch.Tensor:
    """x: (N, C_in, H, W), any strides; crow_indices: int32 (out_channels + 1,); col_indices: int32 (nnz,)
    in tap-major columns (``(i*kw + j)*C_in + c``); values: (nnz,) in x's dtype; bias: (out_channels,) or
    None; kernel_size, stride, padding, dilation: pairs of ints. Returns y: (N, out_channels, OH, OW) in x's
    dtype and memory format.

    Checks only what the kernel needs to run; the index values are trusted (the router checks the structure
    and the column range against kh*kw*C_in first, see pyprune.ops.csr_conv2d)."""
    if x.dim() != 4:
        raise ValueError(f"csr_conv2d_triton: x must be 4-D (N, C_in, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"csr_conv2d_triton: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"csr_conv2d_triton: values and bias must have x's dtype ({x.dtype})")
    if crow_indices.dtype != torch.int32 or col_indices.dtype != torch.int32:
        raise TypeError("csr_conv2d_triton: crow_indices and col_indices must be torch.int32")
    out_channels = int(out_channels)
    if crow_indices.numel() != out_channels + 1 or col_indices.numel() != values.numel():
        raise ValueError(
            f"csr_conv2d_triton: need out_channels + 1 = {out_channels + 1} row pointers and one column per "
            f"value, got {crow_indices.numel()} and {col_indices.numel()} for {values.numel()} values"
        )
    n, c_in, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        tuple(int(v) for v in p) for p in (kernel_size, stride, padding, dilation)
    )
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"csr_conv2d_triton: empty output ({oh} x {ow})")
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    y = torch.empty((n, out_channels, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if n == 0 or out_channels == 0:
        return y
    crow = crow_indices.contiguous()
    col = col_indices.contiguous()
    val = values.contiguous()
    b_arg = bias.contiguous() if bias is not None else x  # never read without HAS_BIAS
    ohw = oh * ow

    def grid(meta):
        return (out_channels * n * triton.cdiv(ohw, meta["BLOCK_P"]),)

    ctx = on_device(x)
    with ctx:
        _csr_conv2d_fwd_kernel[grid](
            x, crow, col, val, b_arg, y,
            out_channels, c_in, h, w, ow, ohw, triton.next_power_of_2(ohw),
            *x.stride(), *y.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, HAS_PAD=ph > 0 or pw > 0, HAS_BIAS=bias is not None,
        )  # fmt: skip
    return y


__all__ = ["INTERPRET", "_csr_conv2d_fwd_kernel", "csr_conv2d_triton"]
