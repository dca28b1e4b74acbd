"""Triton BSR-weight conv2d: y = conv2d(x, W) + bias with W stored as a CSR of (BH x BW) blocks over the
(C_out, kh*kw*C_in) matrix in tap-major columns (column ``(i*kw + j)*C_in + c`` holds ``w[o, c, i, j]``).

An implicit GEMM over the stored blocks: rows M = N * OH * OW output pixels, columns the C_out output
channels, reduction the kh*kw*C_in tap-major columns. One program computes a (BLOCK_M pixels) x (BLOCK_N
output channels) tile inside one block row, walking that block row's stored blocks as bsr_linear's kernel
does. For each block (in chunks of BLOCK_K columns) it loads the (BLOCK_M x BLOCK_K) tile of the implicit
patch matrix straight from x (no im2col; the zero padding is the load mask) and multiplies it by the block
with ``tl.dot`` (tensor cores for fp16/bf16) in fp32.

Column decode: a column's offset into x, ``c * stride_c + (i * dil_h) * stride_h + (j * dil_w) * stride_w``,
depends on the column only, and a pixel's on the pixel only, so a tile's addresses are one add of two
vectors. When BW divides C_in (``TAP_BLOCKS``: the usual 16/32/64-wide blocks over 64+ channels) every column
of a block lies in one tap, so the tap and the padding test are per pixel row; otherwise each column decodes
its own tap and the padding test is per element.

Layouts: x is read through its strides, so NCHW and channels_last need no copy; tiles are loaded with x's
contiguous dimension fastest (NCHW: pixels, then transposed in registers for ``tl.dot``) and the output,
which takes x's memory format as F.conv2d does, is stored the same way. Programs are numbered with pixel
tiles fastest, so the programs running together share one block row of W.

Numerics: fp16/bf16 multiply on tensor cores with fp32 accumulation; bias added in fp32 and one rounding to
x's dtype. fp32 uses TF32 tensor cores only when ``allow_tf32`` is true; by default that follows
``torch.backends.cudnn.allow_tf32``, as F.conv2d on CUDA does. Offsets into x and y are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import channels_last, interpreting, on_device

INTERPRET = interpreting()


def _cfg(bm, warps, stages):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    # The interpreter runs every config it is given; one small one keeps the CPU tests quick and still makes
    # their shapes span several pixel tiles. PYPRUNE_TRITON_AUTOTUNE=0: one GPU config.
    if INTERPRET:
        return [_cfg(16, 4, 1)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [_cfg(64, 4, 3)]  # spills in no case of the register survey below
    # 128-row tiles for the big maps, 32/64 rows give small maps (batch 1 at 7x7 = 49 pixels) more programs;
    # 128 rows only on 8 warps (on 4 they spill, see _prune_configs). The block sets BLOCK_N and BLOCK_K.
    return [_cfg(bm, w, s) for bm, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for s in (3, 4)]


def _prune_configs(configs, named_args, **kwargs):
    """Keep pixel tiles no longer than M (rounded up to a power of two >= 32), only 64+ rows for big M, and
    stages that fit shared memory."""
    m_bucket = named_args["M_BUCKET"]
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
    tap_blocks = kwargs.get("TAP_BLOCKS", named_args.get("TAP_BLOCKS"))
    elem = named_args["x_ptr"].element_size()
    kept = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm > max(32, m_bucket) or (m_bucket >= 8192 and bm < 64):
            continue
        if c.num_stages * (bm * block_k + block_k * block_n) * elem > 160 * 1024:  # A100: 164 KiB per SM
            continue
        # register pressure (ptxas -v for sm_90 over every config, as Triton 3.6 compiles them): tiles with
        # more than 48 elements of accumulator and x tile a thread spill (128 rows on 4 warps: 52-964 B with
        # 32x32 and 64x64 blocks), and so do more than 16 x-tile elements a thread where each column has its
        # own tap (2-D offsets and padding tests; 404-848 B at 128 x 32 on 4 warps)
        if bm * (block_n + block_k) > 48 * 32 * c.num_warps:
            continue
        if not tap_blocks and bm * block_k > 16 * 32 * c.num_warps:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "C_OUT", "C_IN", "KH", "KW", "BH", "BW", "X_M_MAJOR", "Y_M_MAJOR", "HAS_PAD"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _bsr_conv2d_fwd_kernel(
    x_ptr,
    crow_ptr,
    col_ptr,
    values_ptr,
    bias_ptr,
    y_ptr,
    M,
    M_BUCKET,
    C_OUT,
    C_IN,
    H,
    W,
    OH,
    OW,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_vb,
    stride_vh,
    stride_vw,
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
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_BLOCKS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_M_MAJOR: tl.constexpr,
    Y_M_MAJOR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Only builtins of tl here (no tl.cdiv / tl.zeros, which are @jit helpers): the CPU tests interpret a copy
    # of this file after triton was imported in compile mode, and an interpreted kernel cannot call those.
    N_SUB: tl.constexpr = (BH + BLOCK_N - 1) // BLOCK_N
    N_CHUNK: tl.constexpr = (BW + BLOCK_K - 1) // BLOCK_K
    n_mtiles = (M + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_m = pid % n_mtiles
    pid_r = pid // n_mtiles
    sub = pid_r % N_SUB
    brow = pid_r // N_SUB
    start = tl.load(crow_ptr + brow).to(tl.int64)
    end = tl.load(crow_ptr + brow + 1).to(tl.int64)

    # output pixels m -> (image, oh, ow); the window's top-left corner in x (may lie in the padding)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ohw = OH * OW
    img = offs_m // ohw
    pix = offs_m % ohw
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * CONV_SH - PAD_H
    iw0 = ow * CONV_SW - PAD_W
    x_row = img.to(tl.int64) * stride_xn + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw

    offs_h = sub * BLOCK_N + tl.arange(0, BLOCK_N)  # row inside the block
    offs_w = tl.arange(0, BLOCK_K)  # column inside the block's chunk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # one flat loop over (stored block, BLOCK_K chunk of its columns), which Triton's pipeliner overlaps
    for it in range(start * N_CHUNK, end * N_CHUNK):
        blk = it // N_CHUNK
        w_in = (it % N_CHUNK) * BLOCK_K + offs_w
        k0 = tl.load(col_ptr + blk) * BW + (it % N_CHUNK) * BLOCK_K  # int32: the router checks the columns
        mask_k = w_in < BW
        if TAP_BLOCKS:  # the chunk lies in one tap: tap and padding test per pixel row
            tap = k0 // C_IN
            c = (k0 % C_IN) + offs_w
            r = tap // KW
            s = tap % KW
            x_tap = (r * DIL_H).to(tl.int64) * stride_xh + (s * DIL_W) * stride_xw
            x_col = c.to(tl.int64) * stride_xc + x_tap
            row_ok = mask_m
            if HAS_PAD:
                ih = ih0 + r * DIL_H
                iw = iw0 + s * DIL_W
                row_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if X_M_MAJOR:
                ok = mask_k[:, None] & row_ok[None, :]
            else:
                ok = row_ok[:, None] & mask_k[None, :]
        else:  # every column its own tap; columns past kh*kw*C_in are padding of the edge block
            k = k0 + offs_w
            mask_k = mask_k & (k < KH * KW * C_IN)
            tap = k // C_IN
            c = k % C_IN
            r = tap // KW
            s = tap % KW
            x_tap = (r * DIL_H).to(tl.int64) * stride_xh + (s * DIL_W) * stride_xw
            x_col = c.to(tl.int64) * stride_xc + x_tap
            if X_M_MAJOR:
                ok = mask_k[:, None] & mask_m[None, :]
                if HAS_PAD:
                    ih = ih0[None, :] + (r * DIL_H)[:, None]
                    iw = iw0[None, :] + (s * DIL_W)[:, None]
                    ok = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            else:
                ok = mask_m[:, None] & mask_k[None, :]
                if HAS_PAD:
                    ih = ih0[:, None] + (r * DIL_H)[None, :]
                    iw = iw0[:, None] + (s * DIL_W)[None, :]
                    ok = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if X_M_MAJOR:  # (BLOCK_K, BLOCK_M): pixels are contiguous in NCHW, so threads run along them
            a = tl.trans(tl.load(x_ptr + (x_row[None, :] + x_col[:, None]), mask=ok, other=0.0))
        else:  # channels_last: channels contiguous
            a = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=ok, other=0.0)
        # block^T chunk (BLOCK_K x BLOCK_N); padding past the weight's edge is stored as zeros
        v_ptrs = values_ptr + blk * stride_vb + w_in[:, None] * stride_vw + offs_h[None, :] * stride_vh
        if (BH % BLOCK_N != 0) or (BW % BLOCK_K != 0):
            b = tl.load(v_ptrs, mask=mask_k[:, None] & (offs_h < BH)[None, :], other=0.0)
        else:
            b = tl.load(v_ptrs)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    co = brow * BH + offs_h
    mask_n = (co < C_OUT) & (offs_h < BH)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_row = img.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    y_col = co.to(tl.int64) * stride_yc
    out = acc.to(y_ptr.dtype.element_ty)
    if Y_M_MAJOR:  # NCHW output: pixels contiguous
        tl.store(
            y_ptr + (y_row[None, :] + y_col[:, None]), tl.trans(out), mask=mask_n[:, None] & mask_m[None, :]
        )
    else:
        tl.store(y_ptr + (y_row[:, None] + y_col[None, :]), out, mask=mask_m[:, None] & mask_n[None, :])


def _pad_side(side: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(side, 16)), cap)


def bsr_conv2d_triton(
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
    *,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """x: (N, C_in, H, W), any strides; crow_indices: int32 (ceil(out_channels / BH) + 1,); col_indices: int32
    (nnz_blocks,) block columns of the tap-major (out_channels, kh*kw*C_in) weight; values: (nnz_blocks, BH,
    BW) in x's dtype, zero past the weight's edges; bias: (out_channels,) or None; kernel_size, stride,
    padding, dilation: pairs of ints. Returns y: (N, out_channels, OH, OW) in x's dtype and memory format.
    ``allow_tf32`` (fp32 only): None follows ``torch.backends.cudnn.allow_tf32``.

    Checks only what the kernel needs to run; the index values are trusted (the router checks the structure
    and the block columns against ceil(kh*kw*C_in / BW) first, see pyprune.ops.bsr_conv2d)."""
    if x.dim() != 4 or values.dim() != 3:
        raise ValueError(
            f"bsr_conv2d_triton: x must be 4-D (N, C_in, H, W) and values 3-D (nnz_blocks, BH, BW), got "
            f"{tuple(x.shape)} and {tuple(values.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bsr_conv2d_triton: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"bsr_conv2d_triton: values and bias must have x's dtype ({x.dtype})")
    if crow_indices.dtype != torch.int32 or col_indices.dtype != torch.int32:
        raise TypeError("bsr_conv2d_triton: crow_indices and col_indices must be torch.int32")
    out_channels = int(out_channels)
    nnzb, bh, bw = values.shape
    if crow_indices.numel() != -(-out_channels // bh) + 1 or col_indices.numel() != nnzb:
        raise ValueError(
            f"bsr_conv2d_triton: need ceil(out_channels / BH) + 1 = {-(-out_channels // bh) + 1} row "
            f"pointers and one column per block, got {crow_indices.numel()} and {col_indices.numel()} for "
            f"{nnzb} blocks"
        )
    n, c_in, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        tuple(int(v) for v in p) for p in (kernel_size, stride, padding, dilation)
    )
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"bsr_conv2d_triton: empty output ({oh} x {ow})")
    m = n * oh * ow
    if m >= 2**31:
        raise ValueError(f"bsr_conv2d_triton: N * OH * OW = {m} output pixels, more than 2**31 - 1")
    cl = channels_last(x)
    y = torch.empty(
        (n, out_channels, oh, ow), dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )  # fmt: skip
    if m == 0 or out_channels == 0:
        return y
    if nnzb == 0 or c_in == 0:
        return y.copy_(bias.view(1, -1, 1, 1).expand_as(y)) if bias is not None else y.zero_()
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    precision = "tf32" if (x.dtype != torch.float32 or allow_tf32) else "ieee"
    block_n, block_k = _pad_side(bh, 128), _pad_side(bw, 64)
    n_sub = -(-bh // block_n)
    n_brows = crow_indices.numel() - 1
    crow = crow_indices.contiguous()
    col = col_indices.contiguous()
    b_arg = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    # NCHW (or any layout whose width stride is 1 and channel stride is not): pixels are the contiguous side
    x_m_major = x.stride(3) == 1 and x.stride(1) != 1

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * n_brows * n_sub,)

    with on_device(x):
        _bsr_conv2d_fwd_kernel[grid](
            x, crow, col, values, b_arg, y,
            m, triton.next_power_of_2(m), out_channels, c_in, h, w, oh, ow,
            *x.stride(), *values.stride(), *y.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, BH=bh, BW=bw, BLOCK_N=block_n, BLOCK_K=block_k, TAP_BLOCKS=c_in % bw == 0,
            HAS_PAD=ph > 0 or pw > 0, HAS_BIAS=bias is not None, X_M_MAJOR=x_m_major, Y_M_MAJOR=not cl,
            INPUT_PRECISION=precision,
        )  # fmt: skip
    return y


__all__ = ["INTERPRET", "_bsr_conv2d_fwd_kernel", "bsr_conv2d_triton"]
