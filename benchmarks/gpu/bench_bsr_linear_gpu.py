"""GPU timings of BSR linear: cuBLAS dense (F.linear), torch.sparse BSR (bsr_dense_mm), ours (Triton), our CUDA
kernel (the private op pyprune::_bsr_linear_cuda, when pyprune._C was built with CUDA), plus 2:4 through
torch.sparse.to_sparse_semi_structured, and the Triton kernel's two schedules ("rows", "balanced") on a
skewed structure (blocks per block row following a Zipf law), the data for choosing between them. Writes
results.md and results.json to --out.

Timing: triton.testing.do_bench (median of the timed runs after its warmup). Each provider cycles through
several input sets (x and W) whose total size is a few times the L2, so no run finds its operands cached by the
previous one. Data are random normal, never zeros (zeros make tensor cores look faster than they are).

Floor of a case: max(bytes / copy bandwidth, useful FLOPs / dense matmul rate), both measured in this run;
bytes = x + stored blocks + indices + y, useful FLOPs = 2 M N K density.

--dry (CPU machine): imports and argument parsing only; writes a stub table marked DRY with no timings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (768, 3072)]  # (in_features K, out_features N)
MS = [2048, 128, 16]  # most telling first: the time budget may cut the tail
BLOCKS = [32, 64]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]
DTYPES = ["float16", "bfloat16"]
SEMI_CASES = [(128, 4096, 4096), (2048, 4096, 4096), (8192, 8192, 8192)]  # (M, K, N)
# skewed block rows, for choosing between the Triton kernel's schedules: (K, N, block, sparsity) x M, fp16
SKEW_SHAPE = (4096, 4096, 64, 0.9)
SKEW_MS = [16, 128, 2048]


# Issue #4's goal cases first, as the time budget may cut the tail: block 64 at 90% with M=4096 on 4096->4096
# and 4096->16384 (>= 6x cuBLAS, bf16 the goal's dtype), then block 32's break-even sweep on 4096->4096 (<= 50%)
GOAL_CASES = [
    *(
        {"K": 4096, "N": n, "M": 4096, "dtype": dt, "block": 64, "sparsity": 0.9}
        for dt in ("bfloat16", "float16")
        for n in (4096, 16384)
    ),
    *({"K": 4096, "N": 4096, "M": 4096, "dtype": "bfloat16", "block": 32, "sparsity": sp} for sp in (0.3, 0.5, 0.7)),
]


def planned_cases(quick: bool):
    yield from GOAL_CASES
    ms = [2048, 128] if quick else MS
    dtypes = DTYPES[:1] if quick else DTYPES
    for dt, m, (k, n), blk, sp in itertools.product(dtypes, ms, SHAPES, BLOCKS, SPARSITIES):
        yield {"K": k, "N": n, "M": m, "dtype": dt, "block": blk, "sparsity": sp}


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"missing ({e})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            l2_bytes=getattr(p, "L2_cache_size", None),
            memory_gib=round(p.total_memory / 2**30, 1),
        )
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                check=False,
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({e})"
    return env


# ---- timing helpers ---------------------------------------------------------------------------------


def bench(fn, quick: bool) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=30 if quick else 50, return_mode="median"))


def n_sets(bytes_per_set: int, l2: int) -> int:
    """Enough input sets to cover 3x the L2, at least 2, at most 8."""
    return max(2, min(8, math.ceil(3 * l2 / max(1, bytes_per_set))))


def rotating(fns):
    it = itertools.cycle(range(len(fns)))
    return lambda: fns[next(it)]()


def run_budgeted(cases, budget_s: float, run_one, save, save_every: int = 1) -> tuple[list, int]:
    """run_one(case) -> row for each case until budget_s seconds have passed (the rest are counted as
    skipped); a case that raises leaves a row with ``case_error``. save(rows) every ``save_every`` cases, so
    partial results survive a kill. Returns (rows, skipped)."""
    t0 = time.time()
    rows, skipped = [], 0
    for i, c in enumerate(cases):
        if time.time() - t0 > budget_s:
            skipped += 1
            continue
        try:
            rows.append(run_one(c))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(c, case_error=f"case failed: {e!r}"[:300]))
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[{i + 1}/{len(cases)}] {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if (i + 1) % save_every == 0:
            save(rows)
    return rows, skipped


def measure_floors(quick: bool) -> dict:
    n = 1 << 28  # 512 MiB fp16 source
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), quick)
    bw = 2 * a.numel() * a.element_size() / (t * 1e-3)
    rates = {}
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        x = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        w = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        t = bench(lambda x=x, w=w: F.linear(x, w), quick)
        rates[dt] = 2 * 8192**3 / (t * 1e-3)
    return {"copy_bytes_per_s": bw, "matmul_flops_per_s": rates}


# ---- cases ------------------------------------------------------------------------------------------


def random_bsr_weight(n, k, blk, sparsity, dtype, gen):
    """Dense weight with a random exact fraction of (blk x blk) blocks zeroed, and its pyprune BSR arrays."""
    nb_r, nb_c = -(-n // blk), -(-k // blk)
    total = nb_r * nb_c
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[: max(1, round(total * (1 - sparsity)))]] = True
    return (*bsr_weight(keep.reshape(nb_r, nb_c), n, k, blk, dtype), float(keep.float().mean()))


def bsr_weight(keep, n, k, blk, dtype):
    """A random (n, k) weight whose (blk x blk) blocks are zero where the CPU bool mask ``keep`` (block rows x
    block cols) is False, and its pyprune BSR arrays: (w, crow, col, values) on the GPU."""
    nb_r, nb_c = keep.shape
    mask = keep.cuda().repeat_interleave(blk, 0).repeat_interleave(blk, 1)[:n, :k]
    w = (torch.randn(n, k, device="cuda") * mask).to(dtype)
    brow, bcol = torch.nonzero(keep, as_tuple=True)
    crow = torch.zeros(nb_r + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(torch.bincount(brow, minlength=nb_r), 0)
    wp = F.pad(w, (0, nb_c * blk - k, 0, nb_r * blk - n))
    vals = wp.reshape(nb_r, blk, nb_c, blk).permute(0, 2, 1, 3)[brow.cuda(), bcol.cuda()].contiguous()
    return w, crow.cuda(), bcol.to(torch.int32).cuda(), vals


def skewed_crow(nb_r: int, nb_c: int, nnzb: int, gen) -> torch.Tensor:
    """Blocks per block row following a Zipf law (row of rank i gets a share ~ 1 / (i + 1), capped at nb_c),
    ranks shuffled over the rows: the structure whose longest rows dominate the "rows" schedule."""
    share = 1.0 / torch.arange(1, nb_r + 1, dtype=torch.float64)
    counts = torch.clamp(torch.round(share / share.sum() * nnzb), 1, nb_c).long()
    return counts[torch.randperm(nb_r, generator=gen)]


def skewed_bsr_weight(n, k, blk, sparsity, dtype, gen):
    """Like random_bsr_weight, with Zipf-distributed blocks per block row (random columns within a row); the
    last item is the blocks per block row."""
    nb_r, nb_c = -(-n // blk), -(-k // blk)
    counts = skewed_crow(nb_r, nb_c, max(1, round(nb_r * nb_c * (1 - sparsity))), gen)
    keep = torch.zeros(nb_r, nb_c, dtype=torch.bool)
    for r, c in enumerate(counts.tolist()):
        keep[r, torch.randperm(nb_c, generator=gen)[:c]] = True
    return (*bsr_weight(keep, n, k, blk, dtype), counts)


def planned_skew_cases():
    k, n, blk, sp = SKEW_SHAPE
    return [{"K": k, "N": n, "M": m, "dtype": "float16", "block": blk, "sparsity": sp} for m in SKEW_MS]


def run_skew_case(c, quick, l2, triton_fn):
    """One skewed structure: dense, the "rows", "balanced" and "auto" schedules of the Triton kernel, each checked
    against dense first, and which one auto picks; the longest and mean row lengths say how skewed it is."""
    m, k, n, blk = c["M"], c["K"], c["N"], c["block"]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    set_bytes = m * k * 2 + int(n * k * (1 - c["sparsity"])) * 2 + m * n * 2
    r = n_sets(set_bytes, l2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(r)]
    weights = [skewed_bsr_weight(n, k, blk, c["sparsity"], torch.float16, gen) for _ in range(r)]
    counts = weights[0][4]
    out = dict(c, sets=r, longest_row=int(counts.max()), mean_row=float(counts.float().mean()))
    out["dense_ms"] = bench(rotating([lambda i=i: F.linear(xs[i], weights[i][0]) for i in range(r)]), quick)
    y_ref = F.linear(xs[0].float(), weights[0][0].float())
    kernels = sys.modules[triton_fn.__module__]
    crow0, nnzb = weights[0][1], weights[0][3].shape[0]
    split = kernels._default_split_blocks(nnzb, -(-m // 64), crow0.device)
    out["auto_pick"] = kernels.auto_schedule(crow0, m, -(-blk // 128), split, crow0.device)
    for sched in ("rows", "balanced", "auto"):
        try:
            y = triton_fn(xs[0], *weights[0][1:4], n, None, schedule=sched)
            out[f"{sched}_max_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
            out[f"{sched}_ms"] = bench(
                rotating([lambda i=i, s=sched: triton_fn(xs[i], *weights[i][1:4], n, None, schedule=s)
                          for i in range(r)]), quick,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            out[f"{sched}_error"] = repr(e)[:300]
    return out


def skew_table(rows):
    lines = [
        (
            "| K->N | M | block | sparsity | longest / mean row (blocks) | dense ms | rows ms | balanced ms | "
            "rows / balanced | auto picks | auto ms | x dense (best) | rel err rows / balanced |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ro, ba, d = r.get("rows_ms"), r.get("balanced_ms"), r.get("dense_ms")
        best = min(v for v in (ro, ba) if v) if (ro or ba) else None
        lines.append(
            f"| {r['K']}->{r['N']} | {r['M']} | {r['block']} | {fmt(r['sparsity'], 2)} | "
            f"{r.get('longest_row', '-')} / {fmt(r.get('mean_row'), 1)} | {fmt(d)} | "
            f"{fmt(ro) if ro else 'ERR' if 'rows_error' in r else '-'} | "
            f"{fmt(ba) if ba else 'ERR' if 'balanced_error' in r else '-'} | "
            f"{fmt(ro / ba, 2) if ro and ba else '-'} | {r.get('auto_pick', '-')} | {fmt(r.get('auto_ms'))} | "
            f"{fmt(d / best, 2) if d and best else '-'} | "
            f"{fmt(r.get('rows_max_rel_err'), 4)} / {fmt(r.get('balanced_max_rel_err'), 4)} |"
        )
    return "\n".join(lines)


def torch_bsr_mm():
    """torch's Triton bsr_dense_mm if importable, else torch.mm on a sparse BSR tensor (name, fn)."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        return "bsr_dense_mm", bsr_dense_mm
    except Exception:  # noqa: BLE001
        return "torch.mm", torch.mm


def cuda_bsr_unavailable(x, crow, col, vals, n) -> str | None:
    """Why pyprune's CUDA BSR kernel cannot run these arguments (not built, dtype, block), or None."""
    from pyprune.ops import _router

    return _router._bsr_cuda_unavailable(x, crow, col, vals, n, None)


def run_cuda_provider(out, xs, weights, n, y_ref, quick):
    """Times the CUDA kernel through its private op (no router, no index check), like ours through its
    launcher; records cuda_ms and cuda_max_rel_err, cuda_unavailable (why it cannot run here) or cuda_error."""
    r = len(xs)
    reason = cuda_bsr_unavailable(xs[0], *weights[0][1:4], n)
    if reason:
        out["cuda_unavailable"] = reason[:300]
        return
    op = torch.ops.pyprune._bsr_linear_cuda
    try:
        y = op(xs[0], *weights[0][1:4], n, None)
        out["cuda_max_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
        out["cuda_ms"] = bench(
            rotating([lambda i=i: op(xs[i], *weights[i][1:4], n, None) for i in range(r)]), quick
        )
    except Exception as e:  # noqa: BLE001
        out["cuda_error"] = repr(e)[:300]


def run_case(c, floors, quick, l2, triton_fn, dense_cache):
    dtype = getattr(torch, c["dtype"])
    m, k, n, blk = c["M"], c["K"], c["N"], c["block"]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    nnz_bytes = int(n * k * (1 - c["sparsity"])) * 2
    set_bytes = m * k * 2 + nnz_bytes + m * n * 2
    r = n_sets(set_bytes, l2)
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(r)]
    weights = [random_bsr_weight(n, k, blk, c["sparsity"], dtype, gen) for _ in range(r)]
    density = weights[0][4]
    out = dict(c, sets=r, density=density)
    nnzb = weights[0][3].shape[0]
    bytes_ = m * k * 2 + nnzb * blk * blk * 2 + (nnzb + n // blk + 1) * 4 + m * n * 2
    flops = 2 * m * n * k * density
    floor = max(bytes_ / floors["copy_bytes_per_s"], flops / floors["matmul_flops_per_s"][c["dtype"]]) * 1e3
    out.update(floor_ms=floor, bytes=bytes_, useful_flops=flops)
    # correctness of ours on one set, vs dense in the same dtype (fp32 accumulate in both)
    w0, crow0, col0, vals0, _ = weights[0]
    y_ref = F.linear(xs[0].float(), w0.float())
    try:
        y = triton_fn(xs[0], crow0, col0, vals0, n, None)
        out["ours_max_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
    except Exception as e:  # noqa: BLE001
        out["ours_error"] = repr(e)[:300]
    key = (m, k, n, c["dtype"])
    if key not in dense_cache:
        dws = [w for w, *_ in weights]
        dense_cache[key] = bench(rotating([lambda i=i: F.linear(xs[i], dws[i]) for i in range(r)]), quick)
    out["dense_ms"] = dense_cache[key]
    if "ours_error" not in out:
        try:
            out["ours_ms"] = bench(
                rotating([lambda i=i: triton_fn(xs[i], *weights[i][1:4], n, None) for i in range(r)]), quick
            )
        except Exception as e:  # noqa: BLE001
            out["ours_error"] = repr(e)[:300]
    name, mm = torch_bsr_mm()
    out["torch_bsr_impl"] = name
    try:
        bsrs = [w.to_sparse_bsr((blk, blk)) for w, *_ in weights]
        xts = [x.t().contiguous() for x in xs]  # (K, M): W_bsr @ x^T is y^T
        out["torch_bsr_ms"] = bench(rotating([lambda i=i: mm(bsrs[i], xts[i]) for i in range(r)]), quick)
    except Exception as e:  # noqa: BLE001
        out["torch_bsr_error"] = repr(e)[:300]
    # last: a fault in the untested kernel would poison the CUDA context for whatever runs after it
    run_cuda_provider(out, xs, weights, n, y_ref, quick)
    return out


def run_semi_structured(quick, floors):
    rows = []
    try:
        from torch.sparse import to_sparse_semi_structured
    except Exception as e:  # noqa: BLE001
        return [{"error": f"torch.sparse.to_sparse_semi_structured missing: {e!r}"}]
    for m, k, n in SEMI_CASES[:2] if quick else SEMI_CASES:
        row = {"M": m, "K": k, "N": n, "dtype": "float16"}
        try:
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, k // 4)
            w = w * mask
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row["dense_ms"] = bench(lambda x=x, w=w: F.linear(x, w), quick)
            ws = to_sparse_semi_structured(w)
            row["backend"] = type(ws).__name__
            y = F.linear(x, ws)
            ref = F.linear(x, w)
            row["max_rel_err"] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            row["sparse24_ms"] = bench(lambda x=x, ws=ws: F.linear(x, ws), quick)
            row["speedup"] = row["dense_ms"] / row["sparse24_ms"]
        except Exception as e:  # noqa: BLE001
            row["error"] = (
                f"2:4 via to_sparse_semi_structured failed on this GPU/torch "
                f"({torch.cuda.get_device_name(0)}): {e!r}"
            )[:400]
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(rows):
    head = (
        "| K->N | M | dtype | block | sparsity | dense ms | torch BSR ms | ours ms | x dense | x torch BSR | "
        "floor ms | floor/ours | rel err | cuda ms | cuda x dense | cuda rel err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, t, o, cu = r.get("dense_ms"), r.get("torch_bsr_ms"), r.get("ours_ms"), r.get("cuda_ms")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['K']}->{r['N']}",
                    str(r["M"]),
                    r["dtype"].replace("float", "f").replace("bf", "bf"),
                    str(r["block"]),
                    fmt(r["sparsity"], 2),
                    fmt(d),
                    fmt(t) if t is not None else "ERR" if "torch_bsr_error" in r else "-",
                    fmt(o) if o is not None else "ERR" if "ours_error" in r else "-",
                    fmt(d / o, 2) if d and o else "-",
                    fmt(t / o, 2) if t and o else "-",
                    fmt(r.get("floor_ms")),
                    fmt(r["floor_ms"] / o, 2) if o and r.get("floor_ms") else "-",
                    fmt(r.get("ours_max_rel_err"), 4) if "ours_max_rel_err" in r else "-",
                    fmt(cu)
                    if cu is not None
                    else "ERR"
                    if "cuda_error" in r
                    else "n/a"
                    if "cuda_unavailable" in r
                    else "-",
                    fmt(d / cu, 2) if d and cu else "-",
                    fmt(r.get("cuda_max_rel_err"), 4) if "cuda_max_rel_err" in r else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write(out: Path, payload: dict, dry: bool):
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    env = payload["environment"]
    md = ["# pyprune GPU suite: BSR linear" + (" (DRY: no timings, wiring check only)" if dry else ""), ""]
    md.append("| key | value |\n|---|---|")
    md += [f"| {k} | {v} |" for k, v in env.items()]
    if dry:
        md += [
            "",
            "DRY run: planned cases (no timings)",
            "",
            (
                f"{len(payload['cases'])} BSR cases: {len(GOAL_CASES)} goal cases first, then shapes {SHAPES}, "
                f"M {MS}, blocks {BLOCKS}, "
                f"sparsities {SPARSITIES}, dtypes {DTYPES}; 2:4 cases {SEMI_CASES}; skewed-structure "
                f"schedule cases {SKEW_SHAPE} x M {SKEW_MS}."
            ),
            "",
            table(payload["cases"]),
            "",
            skew_table(payload.get("skew", [])),
        ]
    else:
        fl = payload.get("floors", {})
        if fl:
            md += [
                "",
                f"Floors measured in this run: copy {fl['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write); "
                "dense matmul "
                + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in fl["matmul_flops_per_s"].items())
                + " (8192^3).",
            ]
        md += [
            "",
            "## BSR linear (y = x W^T), median ms",
            "",
            (
                "ours: the Triton kernel; cuda: the CUDA kernel (n/a: it cannot run here, see pyprune_cuda_bsr above). "
                "x dense / x torch BSR: speedup of ours; cuda x dense: speedup of the CUDA kernel; "
                "floor/ours: fraction of the floor reached (1.0 = at the floor)."
            ),
            "",
            table(payload["cases"]),
        ]
        errs = [
            r for r in payload["cases"] if "ours_error" in r or "torch_bsr_error" in r or "cuda_error" in r
        ]
        if errs:
            md += ["", "### Errors", ""] + [
                f"- {r['K']}->{r['N']} M={r['M']} {r['dtype']} b{r['block']} "
                f"s{r['sparsity']}: ours={r.get('ours_error', 'ok')} "
                f"torch_bsr={r.get('torch_bsr_error', 'ok')} cuda={r.get('cuda_error', 'ok')}"
                for r in errs
            ]
        md += [
            "",
            "## 2:4 (torch.sparse.to_sparse_semi_structured, fp16)",
            "",
            "| M | K | N | backend | dense ms | 2:4 ms | x dense | rel err | error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload.get("semi_structured", []):
            md.append(
                f"| {r.get('M', '-')} | {r.get('K', '-')} | {r.get('N', '-')} | {r.get('backend', '-')} | "
                f"{fmt(r.get('dense_ms'))} | {fmt(r.get('sparse24_ms'))} | {fmt(r.get('speedup'), 2)} | "
                f"{fmt(r.get('max_rel_err'), 4)} | {r.get('error', '')} |"
            )
        md += [
            "",
            "## Skewed block rows: the Triton kernel's schedules (fp16)",
            "",
            (
                "Blocks per block row follow a Zipf law (see skewed_crow). rows: one program per (block row, "
                "token tile); balanced: long rows split into work items, longest first, partial tiles summed "
                "after. rows / balanced > 1: balanced is faster."
            ),
            "",
            skew_table(payload.get("skew", [])),
        ]
        if payload.get("skipped"):
            md += ["", f"Skipped for the time budget: {payload['skipped']} cases."]
    (out / "results.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry", action="store_true", help="check wiring on a CPU machine; no timings")
    ap.add_argument("--quick", action="store_true", help="fewer cases and shorter timing")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import pyprune  # noqa: F401  (the op, its router)
    from pyprune.ops._router import load_triton_kernels

    kernels, why = load_triton_kernels()
    env = environment()
    env["pyprune_kernels"] = "ok" if kernels is not None else why
    # the build and dtype part of the CUDA kernel's availability (CPU probe: no device or capability check)
    probe = torch.empty(1, 32, dtype=torch.float16)
    env["pyprune_cuda_bsr"] = (
        cuda_bsr_unavailable(probe, None, None, torch.empty(0, 32, 32, dtype=torch.float16), 32) or "ok"
    )
    cases = list(planned_cases(args.quick))
    if args.dry:
        write(
            args.out,
            {"dry": True, "environment": env, "cases": cases, "skew": planned_skew_cases()},
            dry=True,
        )
        print(f"DRY: {len(cases)} cases planned; wrote {args.out / 'results.md'}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry on a CPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    floors = measure_floors(args.quick)
    l2 = env.get("l2_bytes") or 50 * 2**20
    triton_fn = kernels.bsr_linear_triton if kernels is not None else None
    rows, dense_cache, skipped = [], {}, 0
    payload = {"dry": False, "environment": env, "floors": floors, "cases": rows}
    payload["semi_structured"] = run_semi_structured(args.quick, floors)  # short; before the budgeted loop
    payload["skew"] = []
    for c in planned_skew_cases():  # short too (3 cases)
        try:
            if triton_fn is None:
                raise RuntimeError(f"pyprune_kernels unavailable: {why}")
            payload["skew"].append(run_skew_case(c, args.quick, l2, triton_fn))
        except Exception as e:  # noqa: BLE001
            payload["skew"].append(dict(c, rows_error=f"case failed: {e!r}"[:300]))
            traceback.print_exc()
    write(args.out, payload, dry=False)
    for i, c in enumerate(cases):
        if time.time() - t0 > args.budget_s:
            skipped += 1
            continue
        try:
            if triton_fn is None:
                raise RuntimeError(f"pyprune_kernels unavailable: {why}")
            rows.append(run_case(c, floors, args.quick, l2, triton_fn, dense_cache))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(c, ours_error=f"case failed: {e!r}"[:300]))
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(f"[{i + 1}/{len(cases)}] {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if (i + 1) % 8 == 0:
            write(args.out, payload, dry=False)  # partial results survive a kill
    payload["skipped"] = skipped
    payload["elapsed_s"] = time.time() - t0
    write(args.out, payload, dry=False)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
