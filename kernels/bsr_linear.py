"""Triton BSR linear: y = x W^T + b with W (N x K) stored as a CSR of (BH x BW) blocks.

One program computes a (BLOCK_M tokens) x (BLOCK_N outputs) tile of y inside one block row of W, walking that
block row's stored blocks: for each block it loads the matching (BLOCK_M x BW) slice of x and the block
itself, and accumulates x_slice @ block^T with ``tl.dot`` (tensor cores for fp16/bf16) in fp32. The bias is
added in fp32 and the tile is rounded once to x's dtype.

Numerics: fp16/bf16 multiply on tensor cores with fp32 accumulation. fp32 inputs use TF32 tensor cores only
when ``allow_tf32`` is true; by default that follows ``torch.backends.cuda.matmul.allow_tf32`` (False unless
the user opted in), so fp32 matches cuBLAS' fp32 in both settings.

Blocks of any size work: ``tl.dot`` needs every side >= 16 and ``tl.arange`` powers of two, so a block side is
padded (masked) up to the next power of two >= 16; blocks with sides in {16, 32, 64, ...} waste nothing.
Sides above 128 (rows) or 64 (cols) are split into several tiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = _interpreting()


def _configs() -> list[triton.Config]:
    # The interpreter runs every config it is given; one keeps CPU tests quick. PYPRUNE_TRITON_AUTOTUNE=0
    # does the same on a GPU (no tuning, one reasonable config).
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)]
    # Hopper and Ampere both like 64/128-row tiles with 3-4 stages; 16/32 rows serve decode (few tokens).
    big = [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]
    small = [triton.Config({"BLOCK_M": bm}, num_warps=4, num_stages=s) for bm in (16, 32) for s in (3, 4)]
    return small + big


def _prune_configs(configs, named_args, **kwargs):
    """Keep token tiles that fit M (no 128-row tile for 16 tokens) and stages that fit shared memory."""
    m_bucket = named_args["M_BUCKET"]
    block_n, block_k = (
        kwargs.get("BLOCK_N", named_args.get("BLOCK_N")),
        kwargs.get("BLOCK_K", named_args.get("BLOCK_K")),
    )
    elem = named_args["x_ptr"].element_size()
    cap = max(16, min(128, m_bucket))
    kept = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm > cap or (m_bucket >= 64 and bm < 64):
            continue
        smem = c.num_stages * (bm * block_k + block_k * block_n) * elem
        if smem > 160 * 1024:  # A100 has 164 KiB per SM, H100 228 KiB
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "BH", "BW"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _bsr_linear_fwd_kernel(
    x_ptr,
    crow_ptr,
    col_ptr,
    values_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    N_BROWS,
    stride_xm,
    stride_xk,
    stride_vb,
    stride_vh,
    stride_vw,
    stride_ym,
    stride_yn,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # 1-D grid, token tiles fastest: programs running together share a block row of W (the operand read
    # through indices) while x streams; it also avoids the 65535 limit of grid axes 1 and 2.
    N_SUB: tl.constexpr = (BH + BLOCK_N - 1) // BLOCK_N
    # Only builtins of tl here (no tl.cdiv / tl.zeros, which are @jit helpers): the CPU tests interpret a copy
    # of this file after triton was imported in compile mode, and an interpreted kernel cannot call those.
    n_mtiles = (M + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_m = pid % n_mtiles
    pid_r = pid // n_mtiles
    brow = pid_r // N_SUB
    sub = pid_r % N_SUB

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = sub * BLOCK_N + tl.arange(0, BLOCK_N)  # row inside the block
    offs_w = tl.arange(0, BLOCK_K)  # column inside the block (chunk)
    mask_m = offs_m < M
    # int64: M * K and nnz_blocks * BH * BW pass 2**31 for large layers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    start = tl.load(crow_ptr + brow).to(tl.int64)
    end = tl.load(crow_ptr + brow + 1).to(tl.int64)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for blk in range(start, end):
        bcol = tl.load(col_ptr + blk).to(tl.int64)
        v_base = values_ptr + blk * stride_vb
        for kk in tl.static_range(0, BW, BLOCK_K):
            w_in = kk + offs_w
            k_idx = bcol * BW + w_in
            x_mask = mask_m[:, None] & (k_idx < K)[None, :]
            if BW % BLOCK_K != 0:
                x_mask = x_mask & (w_in < BW)[None, :]
            x_tile = tl.load(x_rows + k_idx[None, :] * stride_xk, mask=x_mask, other=0.0)
            # block^T chunk (BLOCK_K x BLOCK_N); padding past the weight's edge is stored as zeros
            v_ptrs = v_base + w_in[:, None] * stride_vw + offs_h[None, :] * stride_vh
            if (BH % BLOCK_N != 0) or (BW % BLOCK_K != 0):
                w_tile = tl.load(v_ptrs, mask=(w_in < BW)[:, None] & (offs_h < BH)[None, :], other=0.0)
            else:
                w_tile = tl.load(v_ptrs)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    offs_n = brow * BH + offs_h
    mask_n = (offs_n < N) & (offs_h < BH)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pad_side(side: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(side, 16)), cap)


def bsr_linear_triton(
    x2d: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """x2d: (M, K); crow: (ceil(N / BH) + 1,) int32; col: (nnz_blocks,) int32; values: (nnz_blocks, BH, BW),
    zero past the weight's edges; bias: (N,) or None; N = out_features. Returns y: (M, N) in x2d's dtype.

    ``allow_tf32`` (fp32 only): None follows ``torch.backends.cuda.matmul.allow_tf32``."""
    if x2d.dim() != 2 or values.dim() != 3:
        raise ValueError(
            f"bsr_linear_triton: x2d must be 2-D and values 3-D, got {tuple(x2d.shape)} and "
            f"{tuple(values.shape)}"
        )
    if values.dtype != x2d.dtype:
        raise TypeError(f"bsr_linear_triton: values ({values.dtype}) must have x's dtype ({x2d.dtype})")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bsr_linear_triton: dtype must be float16, bfloat16 or float32, got {x2d.dtype}")
    M, K = x2d.shape
    N = int(out_features)
    nnzb, bh, bw = values.shape
    n_brows = crow.numel() - 1
    if n_brows != -(-N // bh):
        raise ValueError(f"bsr_linear_triton: crow has {crow.numel()} entries, expected ceil({N} / {bh}) + 1")
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if nnzb == 0 or K == 0:
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    crow = crow.to(torch.int32).contiguous()
    col = col.to(torch.int32).contiguous()
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (x2d.dtype != torch.float32 or allow_tf32) else "ieee"
    block_n, block_k = _pad_side(bh, 128), _pad_side(bw, 64)
    n_sub = -(-bh // block_n)
    m_bucket = triton.next_power_of_2(M)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * n_brows * n_sub,)

    b_arg = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    ctx = torch.cuda.device(x2d.device) if x2d.is_cuda else _NullCtx()
    with ctx:
        _bsr_linear_fwd_kernel[grid](
            x2d,
            crow,
            col,
            values,
            b_arg,
            y,
            M,
            N,
            K,
            m_bucket,
            n_brows,
            x2d.stride(0),
            x2d.stride(1),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            y.stride(0),
            y.stride(1),
            BH=bh,
            BW=bw,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=precision,
        )
    return y


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["INTERPRET", "_bsr_linear_fwd_kernel", "bsr_linear_triton"]
