"""Triton channel-pruned conv2d: y[:, out_index] = relu?(conv2d(x[:, in_index], weight) + bias), as an implicit GEMM.

GEMM view, per group g: rows M = N * OH * OW output pixels, columns = the group's kept output channels
(COUT_G), reduction K = CIN_G * KH * KW. No im2col and no compacted copy of x: each (BLOCK_M x BLOCK_K) tile
of the implicit im2col matrix is loaded straight from x, the input channel read through ``in_index`` and the
padding handled by the load mask. Bias, ReLU and the scatter of the kept output channels through ``out_index``
happen on the fp32 accumulator before the single rounding to x's dtype.

Layouts: x and the output may be NCHW or channels_last (any strides work; the output takes x's memory format,
as F.conv2d does). The reduction walks (kernel tap, block of BLOCK_K channels) in one flat loop, so a tile's
padding test is per pixel and its channel bound per column. The weight is read per tap along channels, from
a channels_last weight: the launcher copies an NCHW k x k weight (small; 1x1 weights are already both, and a
model converted with ``.to(memory_format=torch.channels_last)`` has channels_last weights). x tiles are loaded
with x's contiguous dimension last (NCHW: pixels; channels_last: channels) so the loads coalesce, and
transposed in registers for ``tl.dot``; the output is stored the same way.

Numerics: fp16/bf16 multiply on tensor cores (``tl.dot``) with fp32 accumulation. fp32 inputs use TF32 tensor
cores when ``allow_tf32`` is true; by default that follows ``torch.backends.cudnn.allow_tf32`` (True unless
the user turned it off), which is what ``F.conv2d`` on CUDA follows, so fp32 matches cuDNN's fp32 in both
settings. Tests turn TF32 off.

Depthwise-like convolutions (one input channel per group, e.g. depthwise 3x3) have K = KH * KW and one or a
few columns per group: a GEMM tile would be mostly padding, so they take ``_pruned_conv2d_dw_kernel``, a plain
multiply-add over the window on CUDA cores.

Offsets into x and y are int64: N * C * H * W passes 2**31 for large activations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import channels_last, interpreting, on_device

INTERPRET = interpreting()


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    # The interpreter runs every config it is given; one small config keeps the CPU tests quick and still
    # makes their shapes span several M, N and K tiles. PYPRUNE_TRITON_AUTOTUNE=0 uses one config on a GPU.
    if INTERPRET:
        return [_cfg(16, 16, 16, 4, 1)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [_cfg(128, 64, 32, 4, 4)]
    # Hopper (wgmma, 228 KiB smem) likes 128-row tiles with 3-4 stages; all of these also fit Ampere's
    # 164 KiB. 32- and 64-row tiles give small M (batch 1 at 7x7 = 49 pixels) more programs; 32-wide N tiles
    # serve the 32-channel groups of pruned early layers; BLOCK_K 32 / 16 serve groups of 32 / <= 16 channels.
    return [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 32, 8, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 32, 32, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(64, 32, 32, 4, 4),
        _cfg(32, 64, 64, 4, 4),
        _cfg(64, 64, 16, 4, 3),
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep tiles no bigger than the problem (rounded up to a power of two >= 16) and stages that fit shared
    memory; big M keeps only big row tiles (many programs already)."""
    m_bucket = named_args["M_BUCKET"]
    n_cap = max(16, triton.next_power_of_2(named_args["COUT_G"]))
    k_cap = max(16, triton.next_power_of_2(max(1, named_args["CIN_G"])))
    elem = named_args["x_ptr"].element_size()
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bm > max(32, m_bucket) or (m_bucket >= 8192 and bm < 64):
            continue
        if bn > n_cap or bk > k_cap:
            continue
        if c.num_stages * (bm * bk + bk * bn) * elem > 160 * 1024:  # A100 has 164 KiB per SM, H100 228 KiB
            continue
        kept.append(c)
    if kept:
        return kept
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "COUT_G", "CIN_G", "KH", "KW", "X_M_MAJOR", "Y_M_MAJOR", "HAS_PAD"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _pruned_conv2d_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    in_idx_ptr,
    out_idx_ptr,
    y_ptr,
    res_ptr,
    M,
    M_BUCKET,
    H,
    W,
    OH,
    OW,
    CIN_G,
    COUT_G,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    CONV_SH,
    CONV_SW,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    RELU_MAX,
    KH: tl.constexpr,
    KW: tl.constexpr,
    X_M_MAJOR: tl.constexpr,
    Y_M_MAJOR: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IN_INDEX: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RELU_MAX: tl.constexpr,
    HAS_RES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid (no 65535 limit), output-channel tiles fastest: the programs running together share one tile of
    # gathered x (the big operand) from L2 while the small weight stays resident. Groups are outermost.
    # Only builtins of tl here (no tl.cdiv / tl.zeros, which are @jit helpers): the CPU tests interpret a copy
    # of this file after triton was imported in compile mode, and an interpreted kernel cannot call those.
    n_ntiles = (COUT_G + BLOCK_N - 1) // BLOCK_N
    n_mtiles = (M + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    g = pid // (n_mtiles * n_ntiles)
    rest = pid % (n_mtiles * n_ntiles)
    pid_m = rest // n_ntiles
    pid_n = rest % n_ntiles

    # output pixels of this tile: m -> (image, oh, ow); the window's top-left corner in x (may be in padding)
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

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel inside the group
    mask_n = offs_n < COUT_G
    co = g * COUT_G + offs_n  # kept output channel (weight row)
    w_row = co.to(tl.int64) * stride_wo

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # One flat loop over (kernel tap, channel block), as torch inductor's conv template does: the tap and the
    # block come from scalar arithmetic, the padding test is per row and the channel bound per column (no
    # per-element index math), and a single loop is what Triton's software pipeliner overlaps.
    n_cblocks = (CIN_G + BLOCK_K - 1) // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    for it in range(KH * KW * n_cblocks):
        c0 = (it % n_cblocks) * BLOCK_K
        tap = it // n_cblocks
        r = tap // KW
        s = tap % KW
        row_ok = mask_m
        if HAS_PAD:
            ih = ih0 + r * DIL_H
            iw = iw0 + s * DIL_W
            row_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tap = x_row + ((r * DIL_H).to(tl.int64) * stride_xh + (s * DIL_W).to(tl.int64) * stride_xw)
        c = c0 + offs_k  # input channel inside the group
        mask_c = c < CIN_G
        chan = g * CIN_G + c  # kept input channel
        if HAS_IN_INDEX:
            chan = tl.load(in_idx_ptr + chan, mask=mask_c, other=0)
        x_col = chan.to(tl.int64) * stride_xc
        if X_M_MAJOR:  # (BLOCK_K, BLOCK_M): pixels are contiguous in NCHW, so threads run along them
            a = tl.load(
                x_ptr + (x_tap[None, :] + x_col[:, None]), mask=mask_c[:, None] & row_ok[None, :], other=0.0
            )
            a = tl.trans(a)
        else:  # channels_last: channels contiguous
            a = tl.load(
                x_ptr + (x_tap[:, None] + x_col[None, :]), mask=row_ok[:, None] & mask_c[None, :], other=0.0
            )
        # weight as (BLOCK_N, BLOCK_K): channels contiguous in the channels_last weight the launcher passes
        w_col = c * stride_wc + (r * stride_wh + s * stride_ww)
        b = tl.load(
            w_ptr + (w_row[:, None] + w_col[None, :]), mask=mask_n[:, None] & mask_c[None, :], other=0.0
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    oc = co
    if HAS_OUT_INDEX:
        oc = tl.load(out_idx_ptr + co, mask=mask_n, other=0)
    if HAS_RES:  # the residual at the output's element (its own strides), added before the ReLU
        r_row = img.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
        r_off = r_row[:, None] + (oc.to(tl.int64) * stride_rc)[None, :]
        acc += tl.load(res_ptr + r_off, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as F.relu does (tl.maximum need not)
    if HAS_RELU_MAX:
        acc = tl.where(acc > RELU_MAX, RELU_MAX, acc)  # the ReLU's cap (ReLU6); NaN stays, as in F.relu6
    y_row = img.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    y_col = oc.to(tl.int64) * stride_yc
    out = acc.to(y_ptr.dtype.element_ty)
    if Y_M_MAJOR:  # NCHW output: pixels contiguous
        tl.store(
            y_ptr + (y_row[None, :] + y_col[:, None]), tl.trans(out), mask=mask_n[:, None] & mask_m[None, :]
        )
    else:
        tl.store(y_ptr + (y_row[:, None] + y_col[None, :]), out, mask=mask_m[:, None] & mask_n[None, :])


def _dw_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=1)
        for bm, bc, w in ((64, 32, 4), (128, 32, 4), (32, 64, 4), (64, 64, 8))
    ]


@triton.autotune(configs=_dw_configs(), key=["M_BUCKET", "C_OUT", "COUT_G", "KH", "KW", "HAS_PAD"])
@triton.jit
def _pruned_conv2d_dw_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    in_idx_ptr,
    out_idx_ptr,
    y_ptr,
    res_ptr,
    M,
    M_BUCKET,
    H,
    W,
    OH,
    OW,
    C_OUT,
    COUT_G,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wh,
    stride_ww,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    CONV_SH,
    CONV_SW,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    RELU_MAX,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IN_INDEX: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RELU_MAX: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One input channel per group: kept output channel co reads kept input channel co // COUT_G.
    n_ctiles = (C_OUT + BLOCK_C - 1) // BLOCK_C
    pid = tl.program_id(0)
    pid_m = pid // n_ctiles
    pid_c = pid % n_ctiles
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

    co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = co < C_OUT
    chan = co // COUT_G
    if HAS_IN_INDEX:
        chan = tl.load(in_idx_ptr + chan, mask=mask_c, other=0)
    x_col = chan.to(tl.int64) * stride_xc
    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            m_ok = mask_m
            if HAS_PAD:
                ih = ih0 + r * DIL_H
                iw = iw0 + s * DIL_W
                m_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            # tl.cast: with dilation 1 (a constexpr once Triton specializes the 1) r * DIL_H is a Python int
            tap = tl.cast(r * DIL_H, tl.int64) * stride_xh + tl.cast(s * DIL_W, tl.int64) * stride_xw
            xv = tl.load(x_ptr + (x_row[:, None] + (x_col + tap)[None, :]), mask=m_ok[:, None] & mask_c[None, :],
                         other=0.0)  # fmt: skip
            wv = tl.load(w_ptr + (co.to(tl.int64) * stride_wo + r * stride_wh + s * stride_ww), mask=mask_c,
                         other=0.0)  # fmt: skip
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    oc = co
    if HAS_OUT_INDEX:
        oc = tl.load(out_idx_ptr + co, mask=mask_c, other=0)
    if HAS_RES:  # the residual at the output's element, added before the ReLU
        r_row = img.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
        r_off = r_row[:, None] + (oc.to(tl.int64) * stride_rc)[None, :]
        acc += tl.load(res_ptr + r_off, mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as F.relu does (tl.maximum need not)
    if HAS_RELU_MAX:
        acc = tl.where(acc > RELU_MAX, RELU_MAX, acc)  # the ReLU's cap (ReLU6); NaN stays, as in F.relu6
    y_row = img.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    tl.store(
        y_ptr + (y_row[:, None] + (oc.to(tl.int64) * stride_yc)[None, :]),
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_c[None, :],
    )


def pruned_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_index: torch.Tensor | None,
    out_index: torch.Tensor | None,
    out_channels: int,
    stride,
    padding,
    dilation,
    groups: int,
    relu: bool,
    *,
    allow_tf32: bool | None = None,
    relu_max: float | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (N, C, H, W), any strides (NCHW and channels_last are the fast ones); weight: (C_out_kept,
    C_in_kept / groups, kh, kw); bias: (C_out_kept,) or None; in_index / out_index: int64 sorted unique channels
    or None; stride, padding, dilation: pairs of ints; relu_max: with relu, the ReLU's cap (ReLU6: 6) or
    None; residual: (N, out_channels, OH, OW) in x's dtype, any strides, added before the ReLU, or None.
    Returns y: (N, out_channels, OH, OW) in x's dtype and memory format; channels not in out_index are zero
    (with a residual: the residual through the ReLU).

    Checks only what the kernel needs to run; the index values are trusted (the router checks them first, see
    pyprune.ops._router). ``allow_tf32`` (fp32 only): None follows ``torch.backends.cudnn.allow_tf32``."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"pruned_conv2d_triton: x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"pruned_conv2d_triton: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pruned_conv2d_triton: weight and bias must have x's dtype ({x.dtype})")
    n, _, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = (tuple(int(v) for v in p) for p in (stride, padding, dilation))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"pruned_conv2d_triton: empty output ({oh} x {ow})")
    groups = int(groups)
    cout_g = c_out // groups
    cl = channels_last(x)
    fmt = torch.channels_last if cl else torch.contiguous_format
    partial = out_index is not None and out_index.numel() < out_channels
    y = torch.empty((n, out_channels, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if residual is not None and (residual.shape != y.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"pruned_conv2d_triton: residual must be {x.dtype} {tuple(y.shape)}, got {residual.dtype} "
            f"{tuple(residual.shape)}"
        )
    if partial and residual is None:
        y.zero_()  # the channels outside out_index
    elif partial:  # the channels outside out_index: the residual through the ReLU (the kernel writes the rest)
        y.copy_(residual)
        if relu:
            y.clamp_(min=0.0, max=relu_max)
    m = n * oh * ow
    if m == 0 or c_out == 0:
        return y
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    precision = "tf32" if (x.dtype != torch.float32 or allow_tf32) else "ieee"
    # x tiles are loaded with x's densest dimension last: width (NCHW-like) or channels (channels_last-like)
    x_m_major = x.stride(3) <= x.stride(1)
    # the kernel reads the weight per tap along channels: channels_last (a copy for an NCHW k x k weight;
    # 1x1 weights are both)
    cl_w = torch.channels_last
    wt = weight if weight.is_contiguous(memory_format=cl_w) else weight.contiguous(memory_format=cl_w)
    in_idx = in_index.contiguous() if in_index is not None else x  # never read without HAS_IN_INDEX
    out_idx = out_index.contiguous() if out_index is not None else x  # never read without HAS_OUT_INDEX
    b_arg = bias.contiguous() if bias is not None else x  # never read without HAS_BIAS
    res = residual if residual is not None else y  # never read without HAS_RES
    common = {
        "HAS_PAD": ph > 0 or pw > 0,
        "HAS_BIAS": bias is not None,
        "HAS_IN_INDEX": in_index is not None,
        "HAS_OUT_INDEX": out_index is not None,
        "RELU": bool(relu),
        "HAS_RELU_MAX": relu_max is not None,
        "HAS_RES": residual is not None,
    }
    cap = float(relu_max) if relu_max is not None else 0.0  # (never read without HAS_RELU_MAX)
    m_bucket = triton.next_power_of_2(m)
    ctx = on_device(x)
    with ctx:
        if cin_g == 1:

            def dw_grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_C"]),)

            _pruned_conv2d_dw_kernel[dw_grid](
                x, wt, b_arg, in_idx, out_idx, y, res,
                m, m_bucket, h, w, oh, ow, c_out, cout_g,
                *x.stride(), wt.stride(0), wt.stride(2), wt.stride(3), *y.stride(), *res.stride(),
                sh, sw, ph, pw, dh, dw, cap,
                KH=kh, KW=kw, **common,
            )  # fmt: skip
        else:

            def grid(meta):
                return (groups * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]),)

            _pruned_conv2d_fwd_kernel[grid](
                x, wt, b_arg, in_idx, out_idx, y, res,
                m, m_bucket, h, w, oh, ow, cin_g, cout_g,
                *x.stride(), *wt.stride(), *y.stride(), *res.stride(),
                sh, sw, ph, pw, dh, dw, cap,
                KH=kh, KW=kw, X_M_MAJOR=x_m_major, Y_M_MAJOR=not cl, INPUT_PRECISION=precision, **common,
            )  # fmt: skip
    return y


__all__ = ["INTERPRET", "_pruned_conv2d_dw_kernel", "_pruned_conv2d_fwd_kernel", "pruned_conv2d_triton"]
