"""GPU timings of CSR decode and 2:4: pyprune's CUDA CSR kernel (pyprune::_csr_linear_cuda, and the routed
pyprune.ops.csr_linear) vs cuBLAS (F.linear) and torch.sparse CSR (cuSPARSE) at few tokens; 2:4 through
pyprune.ops.sparse24_linear (router backend "cuda": torch semi-structured, cuSPARSELt or CUTLASS) vs cuBLAS at
8192^3. Writes csr_sparse24.md and csr_sparse24.json to --out.

Timing: triton.testing.do_bench medians; each provider cycles through input sets (x and W) whose total size
passes 3x the L2, so no run finds its weight cached by the previous one. Data random normal.

Floor of a case: max(bytes / copy bandwidth, useful FLOPs / dense matmul rate), both measured in this run.
CSR bytes = x + values + column indices as the kernel reads them (16-bit when K <= 65536, else int32) + int32
row pointers + y, useful FLOPs = 2 M nnz. "ours int32 idx" times the same kernel with PYPRUNE_CSR_INDEX=int32. 2:4 bytes = x + the
kept half of W + 2-bit metadata + y, useful FLOPs = M N K (half of the dense 2 M N K); the floor uses the dense
matmul rate, so 2:4 sparse tensor cores (2x the dense peak) can beat it.

--dry (CPU machine): imports and argument parsing only; writes a stub table marked DRY with no timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_bsr_linear_gpu import bench, environment, fmt, measure_floors, n_sets, rotating

CSR_SHAPES = [(4096, 4096), (4096, 11008)]  # (K, N)
CSR_MS = [1, 16, 64]
CSR_SPARSITY = 0.9
CSR_DTYPE = "float16"
SEMI_CASES = [(8192, 8192, 8192, "float16"), (8192, 8192, 8192, "bfloat16")]  # (M, K, N, dtype)


def planned_cases():
    csr = [
        {"kind": "csr", "M": m, "K": k, "N": n, "dtype": CSR_DTYPE, "sparsity": CSR_SPARSITY}
        for (k, n) in CSR_SHAPES
        for m in CSR_MS
    ]
    semi = [
        {"kind": "2:4", "M": m, "K": k, "N": n, "dtype": dt, "sparsity": 0.5} for m, k, n, dt in SEMI_CASES
    ]
    return csr, semi


def random_csr(n, k, sparsity, dtype, gen):
    """Dense weight with an exact random fraction of zeros and its CSR arrays (int32), made on gen's device
    (on the CPU a 4096 x 11008 set took 1.5 s, and a case builds up to 8)."""
    dev = gen.device
    keep = max(1, round(n * k * (1 - sparsity)))
    idx = torch.randperm(n * k, generator=gen, device=dev)[:keep].sort().values
    w = torch.zeros(n * k, dtype=dtype, device=dev)
    w[idx] = torch.randn(keep, generator=gen, device=dev).to(dtype)
    w = w.reshape(n, k)
    rows, cols = idx // k, idx % k
    crow = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return w, crow, cols.to(torch.int32), w.reshape(-1)[idx].contiguous()


def run_csr(c, floors, l2, quick):
    from pyprune.ops import _router, csr_linear

    dtype = getattr(torch, c["dtype"])
    m, k, n = c["M"], c["K"], c["N"]
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k * 3 + n)
    nnz = round(n * k * (1 - c["sparsity"]))
    r = n_sets(nnz * 6 + m * k * 2, l2)
    ws = [random_csr(n, k, c["sparsity"], dtype, gen) for _ in range(r)]
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(r)]
    out = dict(c, sets=r, nnz=nnz)
    idx_bytes = 2 if k <= 65536 else 4  # what the glue hands the kernel
    bytes_ = m * k * 2 + nnz * (2 + idx_bytes) + (n + 1) * 4 + m * n * 2
    flops = 2 * m * nnz
    out.update(bytes=bytes_, useful_flops=flops, index_bytes=idx_bytes)
    out["floor_ms"] = (
        max(bytes_ / floors["copy_bytes_per_s"], flops / floors["matmul_flops_per_s"][c["dtype"]]) * 1e3
    )
    out["dense_ms"] = bench(rotating([lambda i=i: F.linear(xs[i], ws[i][0]) for i in range(r)]), quick)
    try:
        csrs = [w.to_sparse_csr() for w, *_ in ws]
        xts = [x.t().contiguous() for x in xs]
        out["cusparse_ms"] = bench(rotating([lambda i=i: torch.mm(csrs[i], xts[i]) for i in range(r)]), quick)
    except Exception as e:  # noqa: BLE001
        out["cusparse_error"] = repr(e)[:300]
    reason = _router._csr_cuda_unavailable(xs[0])
    if reason:
        out["ours_error"] = reason[:300]
        return out
    try:
        y = torch.ops.pyprune._csr_linear_cuda(xs[0], *ws[0][1:], n, None)
        ref = F.linear(xs[0].float(), ws[0][0].float())
        out["ours_max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
        op = torch.ops.pyprune._csr_linear_cuda
        out["ours_ms"] = bench(
            rotating([lambda i=i: op(xs[i], *ws[i][1:], n, None) for i in range(r)]), quick
        )
        os.environ["PYPRUNE_CSR_INDEX"] = "int32"
        try:
            out["ours_int32_ms"] = bench(
                rotating([lambda i=i: op(xs[i], *ws[i][1:], n, None) for i in range(r)]), quick
            )
        finally:
            del os.environ["PYPRUNE_CSR_INDEX"]
        with _router.use_backend("cuda"):
            out["routed_ms"] = bench(
                rotating([lambda i=i: csr_linear(xs[i], *ws[i][1:], n, None) for i in range(r)]), quick
            )
    except Exception as e:  # noqa: BLE001
        out["ours_error"] = repr(e)[:300]
    return out


def run_semi(c, floors, quick):
    from pyprune.ops import _router, sparse24_linear
    from pyprune.sparse import Sparse24
    from pyprune.sparse.select import nm_mask

    dtype = getattr(torch, c["dtype"])
    m, k, n = c["M"], c["K"], c["N"]
    out = dict(c)
    bytes_ = m * k * 2 + n * k // 2 * 2 + n * k // 8 + m * n * 2
    flops = m * n * k
    out.update(bytes=bytes_, useful_flops=flops)
    out["floor_ms"] = (
        max(bytes_ / floors["copy_bytes_per_s"], flops / floors["matmul_flops_per_s"][c["dtype"]]) * 1e3
    )
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    w = w * nm_mask(w, 2, 4)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out["dense_ms"] = bench(lambda: F.linear(x, w), quick)
    reason = _router.sparse24_semi_unavailable(x, None, None, n, None)
    if reason:
        out["ours_error"] = reason[:300]
        return out
    try:
        f = Sparse24.from_dense(w)
        vals, meta = f.values.detach(), f.meta
        with _router.use_backend("cuda"):
            t0 = time.time()
            y = sparse24_linear(x, vals, meta, n, None)  # converts and caches the semi-structured weight
            torch.cuda.synchronize()
            out["convert_s"] = time.time() - t0
            ref = F.linear(x.float(), w.float())
            out["ours_max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
            out["ours_ms"] = bench(lambda: sparse24_linear(x, vals, meta, n, None), quick)
        out["backend"] = _router._semi_structured_kind()[0]
    except Exception as e:  # noqa: BLE001
        out["ours_error"] = repr(e)[:300]
    return out


# ---- report -----------------------------------------------------------------------------------------


def _ratio(a, b):
    return fmt(a / b, 2) if a and b else "-"


def csr_table(rows):
    head = (
        "| K->N | M | dtype | sparsity | cuBLAS ms | cuSPARSE ms | ours ms | ours int32 idx ms | routed ms | "
        "x cuBLAS | x cuSPARSE | floor ms | floor/ours | rel err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, s, o = r.get("dense_ms"), r.get("cusparse_ms"), r.get("ours_ms")
        cells = [
            f"{r['K']}->{r['N']}",
            str(r["M"]),
            r["dtype"],
            fmt(r["sparsity"], 2),
            fmt(d),
            fmt(s) if s is not None else ("ERR" if "cusparse_error" in r else "-"),
            fmt(o) if o is not None else ("ERR" if "ours_error" in r else "-"),
            fmt(r.get("ours_int32_ms")),
            fmt(r.get("routed_ms")),
            _ratio(d, o),
            _ratio(s, o),
            fmt(r.get("floor_ms"), 4),
            _ratio(r.get("floor_ms"), o),
            fmt(r.get("ours_max_rel_err"), 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def semi_table(rows):
    head = "| M | K | N | dtype | backend | cuBLAS ms | 2:4 ms | x cuBLAS | floor ms | floor/ours | convert s | rel err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, o = r.get("dense_ms"), r.get("ours_ms")
        cells = [
            str(r["M"]),
            str(r["K"]),
            str(r["N"]),
            r["dtype"],
            str(r.get("backend", "-")),
            fmt(d),
            fmt(o) if o is not None else ("ERR" if "ours_error" in r else "-"),
            _ratio(d, o),
            fmt(r.get("floor_ms")),
            _ratio(r.get("floor_ms"), o),
            fmt(r.get("convert_s"), 2),
            fmt(r.get("ours_max_rel_err"), 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, payload: dict, dry: bool):
    (out / "csr_sparse24.json").write_text(json.dumps(payload, indent=1, default=str))
    md = [
        "# pyprune GPU suite: CSR decode and 2:4" + (" (DRY: no timings, wiring check only)" if dry else ""),
        "",
    ]
    md.append("| key | value |\n|---|---|")
    md += [f"| {k} | {v} |" for k, v in payload["environment"].items()]
    fl = payload.get("floors")
    if fl:
        md += [
            "",
            f"Floors measured in this run: copy {fl['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write); dense matmul "
            + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in fl["matmul_flops_per_s"].items())
            + " (8192^3). Floor = max(bytes / copy bandwidth, useful FLOPs / matmul rate).",
        ]
    md += [
        "",
        "## CSR linear, few tokens (y = x W^T), median ms",
        "",
        (
            "ours: the private op pyprune::_csr_linear_cuda (16-bit column indices when K <= 65536); ours int32 "
            "idx: the same with PYPRUNE_CSR_INDEX=int32; routed: pyprune.ops.csr_linear (router + checks). "
            "cuSPARSE: torch.mm(W.to_sparse_csr(), x^T). x cuBLAS / x cuSPARSE: speedup of ours."
        ),
        "",
        csr_table(payload["csr"]),
        "",
        "## 2:4 (pyprune.ops.sparse24_linear, router backend cuda), median ms",
        "",
        semi_table(payload["semi_structured"]),
    ]
    errs = [r for r in payload["csr"] + payload["semi_structured"] if any(k.endswith("_error") for k in r)]
    if errs:
        md += ["", "### Errors", ""] + [
            f"- {r['kind']} M={r['M']} {r['K']}->{r['N']} {r['dtype']}: "
            + "; ".join(f"{k}={v}" for k, v in r.items() if k.endswith("_error"))
            for r in errs
        ]
    if payload.get("skipped"):
        md += ["", f"Skipped for the time budget: {payload['skipped']} cases."]
    (out / "csr_sparse24.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry", action="store_true", help="check wiring on a CPU machine; no timings")
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--budget-s", type=float, default=60.0, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import pyprune  # noqa: F401  (the ops and their routers)

    env = environment()
    csr, semi = planned_cases()
    if args.dry:
        write(args.out, {"dry": True, "environment": env, "csr": csr, "semi_structured": semi}, dry=True)
        print(f"DRY: {len(csr)} CSR and {len(semi)} 2:4 cases planned; wrote {args.out / 'csr_sparse24.md'}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry on a CPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    floors = measure_floors(args.quick)
    l2 = env.get("l2_bytes") or 50 * 2**20
    payload = {"dry": False, "environment": env, "floors": floors, "csr": [], "semi_structured": []}
    skipped = 0
    for kind, cases in (("csr", csr), ("semi_structured", semi)):
        for c in cases:
            if time.time() - t0 > args.budget_s:
                skipped += 1
                continue
            try:
                row = run_csr(c, floors, l2, args.quick) if kind == "csr" else run_semi(c, floors, args.quick)
            except Exception as e:  # noqa: BLE001
                row = dict(c, ours_error=f"case failed: {e!r}"[:300])
                traceback.print_exc()
            payload[kind].append(row)
            torch.cuda.empty_cache()
            print(
                f"[{kind} M={c['M']} {c['K']}->{c['N']}] {time.time() - t0:.0f}s", file=sys.stderr, flush=True
            )
        write(args.out, payload, dry=False)
    payload["skipped"] = skipped
    payload["elapsed_s"] = time.time() - t0
    write(args.out, payload, dry=False)
    print(csr_table(payload["csr"]))
    print(semi_table(payload["semi_structured"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
