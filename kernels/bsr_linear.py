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

Schedules (``schedule=``, or ``PYPRUNE_BSR_SCHEDULE``): "rows" gives every (block row, token tile) one program
in block-row order, so a block row with many more blocks than the others is the critical path while most
programs finish early. "balanced" launches a grid over work items: long block rows are cut into chunks of at
most ``split_blocks`` blocks (each chunk writes an fp32 partial tile, summed afterwards in block-row order, so
the result is deterministic) and items are ordered longest first, so the hardware scheduler hands the longest
work out first (LPT). The work list depends only on the structure: it is built once on the host (one device
sync) and cached while ``crow_indices`` is the same tensor at the same version. "auto" (the default) takes
"balanced" only where the argument for it holds without a measurement: the rows schedule's programs all fit
on the GPU at once (one wave; few tokens) and its longest block row holds more than twice the blocks of a
balanced work item, so that row alone sets the time; else "rows". It reads the row lengths from the same
host copy of ``crow_indices`` the balanced plan is built from (one sync per structure). The GPU suite times both schedules on a skewed structure to check the rule.

Backward pieces: the input gradient is this same forward on the transposed structure (see
pyprune/ops/bsr_linear.py); the values' gradient is ``bsr_linear_grad_values_triton``, a sampled dense-dense
product (SDDMM) computing, for each stored block (r, c) only, grad[:, rows of r]^T @ x[:, cols of c].
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from ._common import interpreting, on_device

INTERPRET = interpreting()


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
    key=["M_BUCKET", "N", "K", "BH", "BW", "BALANCED"],
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
    item_row_ptr,
    item_start_ptr,
    item_end_ptr,
    item_slot_ptr,
    part_ptr,
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
    BALANCED: tl.constexpr,
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
    sub = pid_r % N_SUB
    if BALANCED:
        # work item: a block row or a chunk of one (longest first); slot >= 0 marks a chunk of a split row
        item = pid_r // N_SUB
        brow = tl.load(item_row_ptr + item)
        start = tl.load(item_start_ptr + item).to(tl.int64)
        end = tl.load(item_end_ptr + item).to(tl.int64)
        slot = tl.load(item_slot_ptr + item)
    else:
        brow = pid_r // N_SUB
        start = tl.load(crow_ptr + brow).to(tl.int64)
        end = tl.load(crow_ptr + brow + 1).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = sub * BLOCK_N + tl.arange(0, BLOCK_N)  # row inside the block
    offs_w = tl.arange(0, BLOCK_K)  # column inside the block (chunk)
    mask_m = offs_m < M
    # int64: M * K and nnz_blocks * BH * BW pass 2**31 for large layers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # one flat loop over (stored block, BLOCK_K chunk of its columns): the pipeliner buffers one chunk per
    # stage whatever BW is (an unrolled inner chunk loop multiplied shared memory by BW / BLOCK_K)
    N_CHUNK: tl.constexpr = (BW + BLOCK_K - 1) // BLOCK_K
    for it in range(start * N_CHUNK, end * N_CHUNK):
        blk = it // N_CHUNK
        bcol = tl.load(col_ptr + blk).to(tl.int64)
        v_base = values_ptr + blk * stride_vb
        w_in = (it % N_CHUNK) * BLOCK_K + offs_w
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
    if BALANCED:
        # a chunk of a split row leaves its fp32 partial (M, BH) in part[slot]; the launcher sums them
        # the slot as a vector: a scalar mask term trips the interpreter
        is_part = (offs_h * 0 + slot) >= 0
        p_ptrs = (
            part_ptr
            + tl.maximum(slot, 0).to(tl.int64) * M * BH
            + offs_m.to(tl.int64)[:, None] * BH
            + offs_h[None, :]
        )
        tl.store(p_ptrs, acc, mask=mask_m[:, None] & ((offs_h < BH) & is_part)[None, :])
        out_mask = mask_m[:, None] & (mask_n & (~is_part))[None, :]
    else:
        out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


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
    schedule: str | None = None,
    split_blocks: int | None = None,
) -> torch.Tensor:
    """x2d: (M, K); crow: (ceil(N / BH) + 1,) int32; col: (nnz_blocks,) int32; values: (nnz_blocks, BH, BW),
    zero past the weight's edges; bias: (N,) or None; N = out_features. Returns y: (M, N) in x2d's dtype.

    ``allow_tf32`` (fp32 only): None follows ``torch.backends.cuda.matmul.allow_tf32``.
    ``schedule``: "auto", "rows" or "balanced" (see the module docstring); None reads ``PYPRUNE_BSR_SCHEDULE``
    (default "auto"). ``split_blocks`` (balanced only): most blocks per work item; None picks one from the
    number of blocks and SMs."""
    if x2d.dim() != 2 or values.dim() != 3:
        raise ValueError(
            f"bsr_linear_triton: x2d must be 2-D and values 3-D, got {tuple(x2d.shape)} and "
            f"{tuple(values.shape)}"
        )
    if values.dtype != x2d.dtype:
        raise TypeError(f"bsr_linear_triton: values ({values.dtype}) must have x's dtype ({x2d.dtype})")
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bsr_linear_triton: dtype must be float16, bfloat16 or float32, got {x2d.dtype}")
    if schedule is None:
        schedule = os.environ.get("PYPRUNE_BSR_SCHEDULE", "auto").strip().lower() or "auto"
    if schedule not in ("auto", "rows", "balanced"):
        raise ValueError(
            f"bsr_linear_triton: schedule must be 'auto', 'rows' or 'balanced', got {schedule!r}"
        )
    if split_blocks is not None and split_blocks < 1:
        raise ValueError(f"bsr_linear_triton: split_blocks must be >= 1, got {split_blocks}")
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

    b_arg = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    if split_blocks is None and schedule != "rows":
        split_blocks = _default_split_blocks(nnzb, triton.cdiv(M, 64), x2d.device)
    if schedule == "auto":
        schedule = auto_schedule(crow, M, n_sub, split_blocks, x2d.device)
    balanced = schedule == "balanced"
    if balanced:
        plan = _balanced_plan(crow, split_blocks)
        n_items = plan.n_items
        items = (plan.row, plan.start, plan.end, plan.slot)
        # one spare zero slot: the padding of plan.slot_table
        part = torch.empty((plan.n_slots + 1, M, bh), dtype=torch.float32, device=x2d.device)
        part[plan.n_slots].zero_()
    else:
        n_items = n_brows
        items = (crow, crow, crow, crow)  # never read without BALANCED
        part = y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * n_items * n_sub,)

    ctx = on_device(x2d)
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
            *items,
            part,
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
            BALANCED=balanced,
        )
    if balanced and plan.n_slots:
        _sum_partials(y, part, plan, bias, bh, N)
    return y


# ---- backward: the values' gradient (SDDMM) ----------------------------------------------------------------


def _gv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    if os.environ.get("PYPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]


def _gv_prune(configs, named_args, **kwargs):
    """Keep token tiles no longer than M (rounded up) and stages that fit shared memory."""
    m_bucket = named_args["M_BUCKET"]
    bh, bw = (
        kwargs.get("BLOCK_H", named_args.get("BLOCK_H")),
        kwargs.get("BLOCK_W", named_args.get("BLOCK_W")),
    )
    elem = named_args["x_ptr"].element_size()
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, m_bucket)
        and c.num_stages * c.kwargs["BLOCK_M"] * (bh + bw) * elem <= 160 * 1024
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]


@triton.autotune(
    configs=_gv_configs(),
    key=["M_BUCKET", "N", "K", "BH", "BW"],
    prune_configs_by={"early_config_prune": _gv_prune},
)
@triton.jit
def _bsr_linear_grad_values_kernel(
    grad_ptr,
    x_ptr,
    brow_ptr,
    col_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    stride_ob,
    stride_oh,
    stride_ow,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # One program per (stored block, BLOCK_H x BLOCK_W tile of it): out[blk] = grad[:, rows]^T @ x[:, cols],
    # reduced over all M tokens in fp32. Only stored blocks are computed: the dense grad^T @ x is never formed.
    N_SUB_H: tl.constexpr = (BH + BLOCK_H - 1) // BLOCK_H
    N_SUB_W: tl.constexpr = (BW + BLOCK_W - 1) // BLOCK_W
    pid = tl.program_id(0)
    blk = pid // (N_SUB_H * N_SUB_W)
    sub = pid % (N_SUB_H * N_SUB_W)
    offs_h = (sub // N_SUB_W) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (sub % N_SUB_W) * BLOCK_W + tl.arange(0, BLOCK_W)
    brow = tl.load(brow_ptr + blk).to(tl.int64)
    bcol = tl.load(col_ptr + blk).to(tl.int64)
    rows = brow * BH + offs_h
    cols = bcol * BW + offs_w
    mask_h = (offs_h < BH) & (rows < N)
    mask_w = (offs_w < BW) & (cols < K)
    # grad^T tile (BLOCK_H x BLOCK_M): tokens along the reduction axis
    g_ptrs = grad_ptr + rows[:, None] * stride_gn
    x_ptrs = x_ptr + cols[None, :] * stride_xk
    acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        g = tl.load(g_ptrs + offs_m[None, :] * stride_gm, mask=mask_h[:, None] & mask_m[None, :], other=0.0)
        xt = tl.load(x_ptrs + offs_m[:, None] * stride_xm, mask=mask_m[:, None] & mask_w[None, :], other=0.0)
        acc = tl.dot(g, xt, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    # int64: nnz_blocks * BH * BW passes 2**31 for large layers
    o_ptrs = (
        out_ptr + blk.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh + offs_w[None, :] * stride_ow
    )
    # entries past the weight's edge get 0 (their loads were masked), as the padding of values must stay zero
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_h < BH)[:, None] & (offs_w < BW)[None, :])


def bsr_linear_grad_values_triton(
    grad2d: torch.Tensor,
    x2d: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bh: int,
    bw: int,
    *,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """The gradient of bsr_linear's values: grad2d (M, N), x2d (M, K), crow / col the BSR structure of W
    (N x K) in (bh x bw) blocks. Returns (nnz_blocks, bh, bw) in x2d's dtype: for stored block i at
    (block row r, block column c), grad2d[:, r*bh:(r+1)*bh]^T @ x2d[:, c*bw:(c+1)*bw] (zero past the edges)."""
    if grad2d.dim() != 2 or x2d.dim() != 2 or grad2d.shape[0] != x2d.shape[0]:
        raise ValueError(
            "bsr_linear_grad_values_triton: grad2d (M, N) and x2d (M, K) must be 2-D with the same M, got "
            f"{tuple(grad2d.shape)} and {tuple(x2d.shape)}"
        )
    if grad2d.dtype != x2d.dtype or x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "bsr_linear_grad_values_triton: grad and x must share a dtype among float16, bfloat16, float32, "
            f"got {grad2d.dtype} and {x2d.dtype}"
        )
    M, N = grad2d.shape
    K = x2d.shape[1]
    nnzb = col.numel()
    if crow.numel() != -(-N // bh) + 1:
        raise ValueError(
            f"bsr_linear_grad_values_triton: crow has {crow.numel()} entries, expected ceil({N} / {bh}) + 1"
        )
    out = torch.empty((nnzb, bh, bw), dtype=x2d.dtype, device=x2d.device)
    if nnzb == 0:
        return out
    if M == 0:
        return out.zero_()
    crow = crow.to(torch.int32)
    col = col.to(torch.int32).contiguous()
    n_brows = crow.numel() - 1
    # block row of every stored block, without a device sync (output_size is known)
    brow = torch.repeat_interleave(
        torch.arange(n_brows, device=crow.device, dtype=torch.int32),
        (crow[1:] - crow[:-1]).long(),
        output_size=nnzb,
    )
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (x2d.dtype != torch.float32 or allow_tf32) else "ieee"
    block_h, block_w = _pad_side(bh, 64), _pad_side(bw, 64)
    n_sub = -(-bh // block_h) * -(-bw // block_w)
    ctx = on_device(x2d)
    with ctx:
        _bsr_linear_grad_values_kernel[(nnzb * n_sub,)](
            grad2d,
            x2d,
            brow,
            col,
            out,
            M,
            N,
            K,
            triton.next_power_of_2(M),
            grad2d.stride(0),
            grad2d.stride(1),
            x2d.stride(0),
            x2d.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            BH=bh,
            BW=bw,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            INPUT_PRECISION=precision,
        )
    return out


# ---- the balanced schedule's work list --------------------------------------------------------------------


class _Plan:
    """Work items of the balanced schedule, longest first, as device arrays: block row, block range
    [start, end), and the partial-tile slot (-1: the item is a whole block row and writes y itself; a row of
    more than ``split_blocks`` blocks becomes several chunks, each with its own slot)."""

    def __init__(self, crow_cpu: torch.Tensor, split_blocks: int, device):
        lengths = (crow_cpu[1:] - crow_cpu[:-1]).tolist()
        starts = crow_cpu[:-1].tolist()
        items, slot_row, split_rows = [], [], []
        for r, (s0, n) in enumerate(zip(starts, lengths)):
            if n <= split_blocks:
                items.append((n, r, s0, s0 + n, -1))
                continue
            split_rows.append(r)
            for c0 in range(0, n, split_blocks):
                c1 = min(n, c0 + split_blocks)
                items.append((c1 - c0, r, s0 + c0, s0 + c1, len(slot_row)))
                slot_row.append(len(split_rows) - 1)
        items.sort(key=lambda t: (-t[0], t[1], t[2]))  # longest first; stable among equals
        cols = list(zip(*items)) if items else [(), (), (), (), ()]

        def dev(v, dtype=torch.int32):
            return torch.tensor(list(v), dtype=dtype).to(device)

        self.n_items = len(items)
        self.row, self.start, self.end, self.slot = (dev(c) for c in cols[1:])
        self.n_slots = len(slot_row)
        self.n_split = len(split_rows)
        # (n_split, most chunks of a row): the slots of each split row, padded with the zero slot n_slots
        per_row = [0] * self.n_split
        for i in slot_row:
            per_row[i] += 1
        width = max(per_row, default=0)
        table = [[self.n_slots] * width for _ in range(self.n_split)]
        for slot, i in enumerate(slot_row):
            table[i][table[i].index(self.n_slots)] = slot
        self.slot_table = torch.tensor(table, dtype=torch.int64).reshape(self.n_split, width).to(device)
        self._split_rows = split_rows
        self._device = device
        self._cols: dict[tuple[int, int], torch.Tensor] = {}

    def split_cols(self, bh: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Output columns of the split rows below n, and their positions in the (n_split * bh) partial sums."""
        if (bh, n) not in self._cols:
            flat = [r * bh + h for r in self._split_rows for h in range(bh)]
            pos = [i for i, c in enumerate(flat) if c < n]
            self._cols[bh, n] = (
                torch.tensor([flat[i] for i in pos], dtype=torch.int64).to(self._device),
                torch.tensor(pos, dtype=torch.int64).to(self._device),
            )
        return self._cols[bh, n]


# id(crow) -> (weakref to crow, its version, what was derived from it: {"host": crow on the CPU, ("plan",
# split_blocks): _Plan, "longest": int}); checked on every hit, so a freed tensor whose id is reused, or crow
# modified in place, never gets stale entries. One device sync (the host copy) per structure.
_DERIVED: dict[int, tuple] = {}


def _derived(crow: torch.Tensor) -> dict:
    hit = _DERIVED.get(id(crow))
    if hit is not None and hit[0]() is crow and hit[1] == crow._version:
        return hit[2]
    if len(_DERIVED) > 256:
        _DERIVED.clear()
    d = {"host": crow.detach().to("cpu", torch.int64)}
    _DERIVED[id(crow)] = (weakref.ref(crow), crow._version, d)
    return d


def _balanced_plan(crow: torch.Tensor, split_blocks: int) -> _Plan:
    d = _derived(crow)
    if ("plan", split_blocks) not in d:
        d["plan", split_blocks] = _Plan(d["host"], split_blocks, crow.device)
    return d["plan", split_blocks]


def auto_schedule(crow: torch.Tensor, m: int, n_sub: int, split_blocks: int, device) -> str:
    """The schedule "auto" runs for this structure and token count (see the module docstring): "balanced" when
    the rows schedule is one wave (its programs, with token tiles of 64, or of m when fewer, at most one per
    SM) and its longest block row exceeds 2 * split_blocks blocks; else "rows"."""
    programs = -(-m // 64) * (crow.numel() - 1) * n_sub
    if programs > _sm_count(device):
        return "rows"
    d = _derived(crow)
    if "longest" not in d:
        host = d["host"]
        d["longest"] = int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0
    return "balanced" if d["longest"] > 2 * split_blocks else "rows"


def _sm_count(device) -> int:
    """The device's multiprocessors (4 for the CPU, where the interpreter runs the kernels)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _default_split_blocks(nnzb: int, m_tiles: int, device) -> int:
    """About four items' worth of blocks per SM over the whole launch, never under 8 blocks per item; a power
    of two, so that token counts close to each other share one cached plan."""
    return triton.next_power_of_2(max(8, -(-nnzb * m_tiles // (4 * _sm_count(device)))))


def _sum_partials(y, part, plan: _Plan, bias, bh: int, n: int) -> None:
    """y[:, rows of split row r] = sum of r's partial tiles (+ bias), in fp32 and a fixed order (no atomics)."""
    m = y.shape[0]
    acc = part[plan.slot_table].sum(1)  # (n_split, M, bh)
    cols, pos = plan.split_cols(bh, n)
    acc = acc.permute(1, 0, 2).reshape(m, -1)[:, pos]
    if bias is not None:
        acc = acc + bias.float()[cols]
    y.index_copy_(1, cols, acc.to(y.dtype))


__all__ = [
    "INTERPRET",
    "_bsr_linear_fwd_kernel",
    "_bsr_linear_grad_values_kernel",
    "auto_schedule",
    "bsr_linear_grad_values_triton",
    "bsr_linear_triton",
]
