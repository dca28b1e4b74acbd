"""GPU timings of channel-pruned conv2d on ResNet-50 conv shapes at keep 0.5 (half the input and half the output
channels, picked at random): pyprune's Triton and CUDA kernels (reading the full-width x through in_index)
against cuDNN on the equivalent compacted conv (F.conv2d on x[:, keep_in] compacted ahead of time, not timed)
and cuDNN on the dense, unpruned conv. Writes pruned_conv2d.md and pruned_conv2d.json to --out.

Providers, each a median of triton.testing.do_bench:
  dense        F.conv2d(x, W) with every channel (cuDNN)
  compact      F.conv2d(x[:, keep_in], W[keep_out][:, keep_in]) on a precompacted input (cuDNN)
  triton       kernels.pruned_conv2d_triton on the full x (the kernel and its launcher, no argument checks)
  cuda         torch.ops.pyprune._pruned_conv2d_cuda on the full x (when pyprune._C has CUDA kernels)
  triton_op    torch.ops.pyprune.pruned_conv2d routed to Triton: what PrunedConv2d.forward costs, including
               the router's index-value checks (a device sync per call)
The goal (issue #3): triton >= 0.9x compact, i.e. compact_ms / triton_ms >= 0.9.

Every provider cycles through several input sets whose total size is a few times the L2, so no run finds its
operands cached by the previous one. Data are random normal. channels_last cases convert x and the weights to
channels_last (as model.to(memory_format=torch.channels_last) does); NCHW cases keep both contiguous, so the
Triton rows of NCHW 3x3 cases include the launcher's per-call copy of the weight to channels_last.

--dry (CPU machine): imports and argument parsing only; writes a stub table marked DRY with no timings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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
from pruned_conv2d_table import SHAPES  # (C_in, C_out, kernel, H = W); stride 1, padding kernel // 2

BATCHES = [32, 1]
LAYOUTS = ["channels_last", "nchw"]
DTYPES = ["float16", "bfloat16"]
KEEP = 0.5
PROVIDERS = ["dense", "compact", "triton", "cuda", "triton_op"]


def planned_cases(quick: bool):
    # most telling first (fp16, batch 32): the time budget may cut the tail
    dtypes = DTYPES[:1] if quick else DTYPES
    batches = BATCHES[:1] if quick else BATCHES
    for dt, batch, layout, (cin, cout, k, hw) in itertools.product(dtypes, batches, LAYOUTS, SHAPES):
        yield {"C_in": cin, "C_out": cout, "k": k, "hw": hw, "batch": batch, "layout": layout, "dtype": dt}


def bench(fn, quick: bool) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=15 if quick else 30, return_mode="median"))


def run_case(c, quick, l2, triton_fn, cuda_ok):
    dtype = getattr(torch, c["dtype"])
    cin, cout, k, hw, batch = c["C_in"], c["C_out"], c["k"], c["hw"], c["batch"]
    fmt = torch.channels_last if c["layout"] == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    keep_in = torch.randperm(cin, generator=gen)[: round(cin * KEEP)].sort().values.cuda()
    keep_out = torch.randperm(cout, generator=gen)[: round(cout * KEEP)].sort().values.cuda()
    kin, kout = keep_in.numel(), keep_out.numel()
    pad = k // 2
    set_bytes = batch * hw * hw * (cin + kin + cout + kout) * 2
    r = n_sets(set_bytes, l2)

    def make_x():
        return torch.randn(batch, cin, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=fmt)

    xs = [make_x() for _ in range(r)]
    xcs = [x[:, keep_in].contiguous(memory_format=fmt) for x in xs]
    w_full = (torch.randn(cout, cin, k, k, device="cuda") / math.sqrt(cin * k * k)).to(dtype)
    w_full = w_full.contiguous(memory_format=fmt)
    b_full = torch.randn(cout, device="cuda", dtype=dtype)
    w = w_full[keep_out][:, keep_in].contiguous(memory_format=fmt)
    b = b_full[keep_out].contiguous()
    conv = (1, 1), (pad, pad), (1, 1)
    flops = 2 * batch * hw * hw * kout * kin * k * k
    out = dict(c, sets=r, kept_in=kin, kept_out=kout, useful_flops=flops)

    y_ref = F.conv2d(xcs[0].float(), w.float(), b.float(), 1, pad)

    def err(y):
        return float((y.float() - y_ref).abs().max() / y_ref.abs().max())

    def args(i):
        return (xs[i], w, b, keep_in, None, kout, *conv, 1, False)

    fns = {
        "dense": lambda i: F.conv2d(xs[i], w_full, b_full, 1, pad),
        "compact": lambda i: F.conv2d(xcs[i], w, b, 1, pad),
    }
    if triton_fn is not None:
        fns["triton"] = lambda i: triton_fn(*args(i))
        fns["triton_op"] = lambda i: torch.ops.pyprune.pruned_conv2d(*args(i))
    if cuda_ok:
        fns["cuda"] = lambda i: torch.ops.pyprune._pruned_conv2d_cuda(*args(i))
    from pyprune.ops._router import use_backend

    for name, fn in fns.items():
        try:
            with use_backend("triton"):
                if name in ("triton", "cuda", "triton_op"):
                    y = fn(0)
                    out[f"{name}_max_rel_err"] = err(y)
                    if not y.is_contiguous(memory_format=fmt):
                        out[f"{name}_layout"] = "output not in x's memory format"
                out[f"{name}_ms"] = bench(rotating([lambda i=i, fn=fn: fn(i) for i in range(r)]), quick)
        except Exception as e:  # noqa: BLE001
            out[f"{name}_error"] = repr(e)[:300]
    return out


# ---- report -----------------------------------------------------------------------------------------


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def cell(r, name, nd=3):
    v = r.get(f"{name}_ms")
    return fmt(v, nd) if v is not None else "ERR" if f"{name}_error" in r else "-"


def ratio(r, num, den):
    a, b = r.get(f"{num}_ms"), r.get(f"{den}_ms")
    return fmt(a / b, 2) if a and b else "-"


def table(rows):
    head = (
        "| C_in->C_out | k | HxW | N | layout | dtype | dense ms | compact ms | triton ms | cuda ms | triton op ms "
        "| triton / compact | cuda / compact | triton / dense | triton TFLOP/s | triton rel err |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.get("triton_ms")
        tflops = fmt(r["useful_flops"] / (t * 1e-3) / 1e12, 1) if t and "useful_flops" in r else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['C_in']}->{r['C_out']}",
                    f"{r['k']}x{r['k']}",
                    str(r["hw"]),
                    str(r["batch"]),
                    "NHWC" if r["layout"] == "channels_last" else "NCHW",
                    r["dtype"].replace("float", "f"),
                    cell(r, "dense"),
                    cell(r, "compact"),
                    cell(r, "triton"),
                    cell(r, "cuda"),
                    cell(r, "triton_op"),
                    ratio(r, "compact", "triton"),
                    ratio(r, "compact", "cuda"),
                    ratio(r, "dense", "triton"),
                    tflops,
                    fmt(r.get("triton_max_rel_err"), 4) if "triton_max_rel_err" in r else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write(out: Path, payload: dict, dry: bool):
    (out / "pruned_conv2d.json").write_text(json.dumps(payload, indent=1, default=str))
    env = payload["environment"]
    md = ["# pyprune GPU suite: pruned conv2d" + (" (DRY: no timings, wiring check only)" if dry else ""), ""]
    md.append("| key | value |\n|---|---|")
    md += [f"| {k} | {v} |" for k, v in env.items()]
    md += [
        "",
        (
            f"ResNet-50 convs {SHAPES} (C_in, C_out, k, HxW; stride 1, padding k // 2), keep {KEEP} of the input "
            f"and output channels, batches {BATCHES}, layouts {LAYOUTS}, dtypes {DTYPES}."
        ),
        "",
    ]
    if dry:
        md += ["DRY run: planned cases (no timings)", "", table(payload["cases"])]
    else:
        md += [
            "## Median ms; ratios > 1 mean pyprune is faster",
            "",
            (
                "compact: cuDNN on x[:, keep_in] compacted ahead (the goal: triton / compact >= 0.9); dense: "
                "cuDNN on the unpruned conv; triton op: the routed op with its per-call index checks."
            ),
            "",
            table(payload["cases"]),
        ]
        errs = [r for r in payload["cases"] if any(k.endswith("_error") for k in r)]
        if errs:
            md += ["", "### Errors", ""] + [
                f"- {r['C_in']}->{r['C_out']} k{r['k']} N={r['batch']} {r['layout']} {r['dtype']}: "
                + "; ".join(f"{k}={v}" for k, v in r.items() if k.endswith("_error"))
                for r in errs
            ]
        if payload.get("skipped"):
            md += ["", f"Skipped for the time budget: {payload['skipped']} cases."]
    (out / "pruned_conv2d.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry", action="store_true", help="check wiring on a CPU machine; no timings")
    ap.add_argument("--quick", action="store_true", help="fewer cases and shorter timing")
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import pyprune  # noqa: F401  (the ops, their router)
    from pyprune.ops._router import PRUNED_CONV2D_BACKENDS, load_triton_kernels

    kernels, why = load_triton_kernels()
    env = environment()
    env["pyprune_kernels"] = "ok" if kernels is not None else why
    cases = list(planned_cases(args.quick))
    probe = torch.empty(1, 1, 1, 1, dtype=torch.float16)
    cuda_why = {b.name: b for b in PRUNED_CONV2D_BACKENDS}["cuda"].unavailable(probe)
    env["pyprune_cuda_kernels"] = "ok" if not cuda_why else cuda_why
    if args.dry:
        write(args.out, {"dry": True, "environment": env, "cases": cases}, dry=True)
        print(f"DRY: {len(cases)} pruned conv2d cases planned; wrote {args.out / 'pruned_conv2d.md'}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry on a CPU machine", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape, as in training
    t0 = time.time()
    l2 = env.get("l2_bytes") or 50 * 2**20
    triton_fn = getattr(kernels, "pruned_conv2d_triton", None) if kernels is not None else None
    payload = {"dry": False, "environment": env, "cases": []}

    def save(rows):
        write(args.out, dict(payload, cases=rows), dry=False)

    def run_one(c):
        return run_case(c, args.quick, l2, triton_fn, not cuda_why)

    payload["cases"], payload["skipped"] = run_budgeted(cases, args.budget_s, run_one, save, save_every=4)
    payload["elapsed_s"] = time.time() - t0
    write(args.out, payload, dry=False)
    print(table(payload["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
