"""GPU timings of BSR-weight conv2d on ResNet-50 conv shapes (32x32 blocks of the tap-major weight, a random
half or tenth of them kept): pyprune's Triton implicit-GEMM kernel against its im2col route (F.unfold, then
bsr_linear) and against cuDNN on the dense conv. Writes bsr_conv2d.md and bsr_conv2d.json to --out.

Providers, each a median of triton.testing.do_bench:
  dense      F.conv2d(x, W) with the unpruned weight (cuDNN)
  triton     kernels.bsr_conv2d_triton (the kernel and its launcher, no argument checks)
  im2col     the router's im2col backend: the patch matrix by F.unfold, then pyprune::bsr_linear
  triton_op  torch.ops.pyprune.bsr_conv2d routed to Triton: what SparseConv2d.forward costs, with the
             router's argument checks (the index-value check runs once per structure, then is cached)
Every provider cycles through input sets a few times the L2 in size. Data are random normal; fp16.

--dry (CPU machine): imports and argument parsing only; writes a stub table marked DRY with no timings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from bench_bsr_linear_gpu import environment, n_sets, rotating, run_budgeted
from bench_pruned_conv2d_gpu import bench, cell, fmt, ratio
from pruned_conv2d_table import SHAPES  # (C_in, C_out, kernel, H = W); stride 1, padding kernel // 2

BATCH = 32
LAYOUTS = ["channels_last", "nchw"]
SPARSITIES = [0.5, 0.9]
BLOCK = (32, 32)
DTYPE = "float16"
PROVIDERS = ["dense", "triton", "im2col", "triton_op"]


def planned_cases():
    # 3x3 convs first (im2col's patch matrix is 9x the input there); the budget may cut the tail
    shapes = sorted(SHAPES, key=lambda s: -s[2])
    for layout, (cin, cout, k, hw), sp in itertools.product(LAYOUTS, shapes, SPARSITIES):
        yield {"C_in": cin, "C_out": cout, "k": k, "hw": hw, "batch": BATCH, "layout": layout, "sparsity": sp}


def run_case(c, quick, l2, triton_fn):
    from pyprune.nn.sparse_conv2d import tap_major
    from pyprune.ops._router import use_backend
    from pyprune.ops.bsr_conv2d import _bsr_conv2d_im2col
    from pyprune.sparse import BSR

    dtype = getattr(torch, DTYPE)
    cin, cout, k, hw, batch = c["C_in"], c["C_out"], c["k"], c["hw"], c["batch"]
    fmt_ = torch.channels_last if c["layout"] == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    wt = tap_major(w)
    bh, bw = BLOCK
    keep = torch.rand(-(-cout // bh), -(-wt.shape[1] // bw), generator=gen) >= c["sparsity"]
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:cout, : wt.shape[1]]
    bsr = BSR.from_dense((wt * mask).to(dtype), BLOCK)
    crow, col, val = (t.cuda() for t in (bsr.crow_indices, bsr.col_indices, bsr.values))
    w_pruned = (wt * mask).reshape(cout, k, k, cin).permute(0, 3, 1, 2).cuda()
    w_dense = w.to("cuda", dtype).contiguous(memory_format=fmt_)
    b = torch.randn(cout, generator=gen).to("cuda", dtype)
    pad = k // 2
    r = n_sets(batch * hw * hw * (cin + cout) * 2, l2)
    xs = [
        torch.randn(batch, cin, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=fmt_)
        for _ in range(r)
    ]
    conv = ((k, k), b, (1, 1), (pad, pad), (1, 1))
    out = dict(c, sets=r, blocks_kept=int(col.numel()), blocks=int(keep.numel()))
    y_ref = F.conv2d(xs[0].float(), w_pruned, b.float(), 1, pad)

    def op_args(i):
        return (xs[i], crow, col, val, cout, *conv)

    fns = {
        "dense": lambda i: F.conv2d(xs[i], w_dense, b, 1, pad),
        "im2col": lambda i: _bsr_conv2d_im2col(*op_args(i)),
    }
    if triton_fn is not None:
        fns["triton"] = lambda i: triton_fn(*op_args(i))
        fns["triton_op"] = lambda i: torch.ops.pyprune.bsr_conv2d(*op_args(i))
    for name, fn in fns.items():
        try:
            with use_backend("triton"):
                if name != "dense":
                    y = fn(0)
                    out[f"{name}_max_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
                    if not y.is_contiguous(memory_format=fmt_):
                        out[f"{name}_layout"] = "output not in x's memory format"
                out[f"{name}_ms"] = bench(rotating([lambda i=i, fn=fn: fn(i) for i in range(r)]), quick)
        except Exception as e:  # noqa: BLE001
            out[f"{name}_error"] = repr(e)[:300]
    return out


def table(rows):
    head = (
        "| C_in->C_out | k | HxW | N | layout | sparsity | dense ms | triton ms | im2col ms | triton op ms "
        "| dense / triton | im2col / triton | triton rel err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [
            f"{r['C_in']}->{r['C_out']}", f"{r['k']}x{r['k']}", str(r["hw"]), str(r["batch"]),
            "NHWC" if r["layout"] == "channels_last" else "NCHW", str(r["sparsity"]),
            cell(r, "dense"), cell(r, "triton"), cell(r, "im2col"), cell(r, "triton_op"),
            ratio(r, "dense", "triton"), ratio(r, "im2col", "triton"), fmt(r.get("triton_max_rel_err"), 4),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, payload: dict, dry: bool):
    (out / "bsr_conv2d.json").write_text(json.dumps(payload, indent=1, default=str))
    env = payload["environment"]
    md = ["# pyprune GPU suite: BSR conv2d" + (" (DRY: no timings, wiring check only)" if dry else ""), ""]
    md.append("| key | value |\n|---|---|")
    md += [f"| {k} | {v} |" for k, v in env.items()]
    md += [
        "",
        f"ResNet-50 convs {SHAPES} (C_in, C_out, k, HxW; stride 1, padding k // 2), batch {BATCH}, {DTYPE}, "
        f"{BLOCK[0]}x{BLOCK[1]} blocks of the tap-major weight, sparsities {SPARSITIES} (of the blocks), "
        f"layouts {LAYOUTS}.",
        "",
    ]
    if dry:
        md += ["DRY run: planned cases (no timings)", "", table(payload["cases"])]
    else:
        md += ["## Median ms; ratios > 1 mean the Triton kernel is faster", "", table(payload["cases"])]
        errs = [r for r in payload["cases"] if any(k.endswith("_error") for k in r)]
        if errs:
            md += ["", "### Errors", ""] + [
                f"- {r['C_in']}->{r['C_out']} k{r['k']} {r['layout']} {r['sparsity']}: "
                + "; ".join(f"{k}={v}" for k, v in r.items() if k.endswith("_error"))
                for r in errs
            ]
        if payload.get("skipped"):
            md += ["", f"Skipped for the time budget: {payload['skipped']} cases."]
    (out / "bsr_conv2d.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry", action="store_true", help="check wiring on a CPU machine; no timings")
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--budget-s", type=float, default=40.0, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import pyprune  # noqa: F401  (the ops, their router)
    from pyprune.ops._router import load_triton_kernels

    kernels, why = load_triton_kernels()
    env = environment()
    env["pyprune_kernels"] = "ok" if kernels is not None else why
    cases = list(planned_cases())
    if args.dry:
        write(args.out, {"dry": True, "environment": env, "cases": cases}, dry=True)
        print(f"DRY: {len(cases)} BSR conv2d cases planned; wrote {args.out / 'bsr_conv2d.md'}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry on a CPU machine", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape, as in training
    t0 = time.time()
    l2 = env.get("l2_bytes") or 50 * 2**20
    triton_fn = getattr(kernels, "bsr_conv2d_triton", None) if kernels is not None else None
    payload = {"dry": False, "environment": env, "cases": []}

    def save(rows):
        write(args.out, dict(payload, cases=rows), dry=False)

    payload["cases"], payload["skipped"] = run_budgeted(
        cases, args.budget_s, lambda c: run_case(c, args.quick, l2, triton_fn), save
    )
    payload["elapsed_s"] = time.time() - t0
    write(args.out, payload, dry=False)
    print(table(payload["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
