"""Interleaved timing of SparseConv2d (CSR / BSR / 2:4) against dense F.conv2d (oneDNN) on ResNet-50's 1x1
and 3x3 convolutions (stride 1), NCHW and channels_last, written as markdown + JSON.

Every round times each provider of a case once (the median single call of a batch of >= --batch-ms), in a
shuffled order, so drift on a shared VM hits all providers alike; a speedup is the median over rounds of the
same-round ratio time(dense) / time(provider). For NCHW input to a 1x1 conv the table also times
`nchw_transposes` alone: the chunked transposes of the input to (pixels, C) and of the output back that
SparseConv2d did around the bsr / 2:4 linear ops, as ATen copies (the ops now take the input's transposed
view themselves: bsr packs it with plain copies, 2:4 through register transposes; csr runs `csr_conv2d` on
NCHW directly). Usage:
    python benchmarks/sparse_conv2d_table.py [--quick] [--rounds 9] [--threads 2] [--shapes 0 1]
        [--out benchmarks/results/cpu] [--name sparse_conv2d]

The providers and cases are shared with bench_sparse_conv2d.py (pytest-benchmark).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from sparse_linear_providers import environment, write_table

from pyprune.nn import SparseConv2d
from pyprune.nn.sparse_conv2d import _NCHW_CHUNK_BYTES

# ResNet-50 bottleneck convs: (C_in, C_out, H=W, kernel), 1x1 then the stride-1 3x3s (padding 1)
SHAPES = [
    (256, 64, 56, 1), (1024, 256, 14, 1), (2048, 512, 7, 1),
    (64, 64, 56, 3), (128, 128, 28, 3), (256, 256, 14, 3), (512, 512, 7, 3),
]  # fmt: skip
BATCHES = [1, 8]
SPARSITIES = [0.5, 0.6, 0.7, 0.9]
FORMATS = ["nchw", "channels_last"]


def dense_conv(c_in: int, c_out: int, k: int = 1) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)


def make_input(n: int, c: int, hw: int, fmt: str) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(n, c, hw, hw)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


def torch_dense(conv, x, sparsity):
    w, b = conv.weight.detach(), conv.bias.detach()
    if x.is_contiguous(memory_format=torch.channels_last):
        w = w.contiguous(memory_format=torch.channels_last)
    return lambda: F.conv2d(x, w, b, padding=conv.padding)


def _ours(layout, block=(32, 32)):
    def make(conv, x, sparsity):
        if layout == "2:4" and sparsity != 0.5:
            return None
        sc = SparseConv2d.from_dense(conv, sparsity=sparsity, layout=layout, block=block).requires_grad_(
            False
        )
        return lambda: sc(x)

    return make


def nchw_transposes(conv, x, sparsity):
    """Only the copies SparseConv2d makes around the op for NCHW input, chunked as it does in eager mode: each
    chunk's (C, pixels) -> (pixels, C) input transpose as an ATen copy (the ops now take the transposed view
    themselves, so this is an upper bound of the input side) and the copy of each (pixels, C_out) output
    chunk into its place in (C_out, pixels) (None for channels_last and kxk convs)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() or conv.kernel_size != (1, 1):
        return None
    n, c, h, w = x.shape
    pixels = h * w
    step = -(-pixels // -(-pixels * c * x.element_size() // _NCHW_CHUNK_BYTES))
    ys = [torch.randn(min(step, pixels - j), conv.out_channels) for j in range(0, pixels, step)]

    def run():
        out = x.new_empty(n, conv.out_channels, pixels)
        for i in range(n):
            xi = x[i].reshape(c, pixels)
            for q, j in enumerate(range(0, pixels, step)):
                xi[:, j : j + step].t().contiguous()
                out[i, :, j : j + step] = ys[q].t()
        return out

    return run


PROVIDERS = {
    "torch_dense": torch_dense,
    "cpp_csr": _ours("csr"),
    "cpp_bsr32": _ours("bsr", (32, 32)),
    "cpp_2:4": _ours("2:4"),
    "nchw_transposes": nchw_transposes,
}
DENSE = ("torch_dense", "nchw_transposes")  # do not depend on sparsity: built once per case


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_batch(fn, batch_s: float) -> tuple[float, int]:
    """Median of the single calls in a batch of >= batch_s: on a shared 2-core VM a call whose OpenMP team
    loses a core to another process stalls for a scheduler slice (several ms); the median ignores those calls,
    a batch mean would not."""
    fn()
    times, t_end = [], time.perf_counter() + batch_s
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= t_end and len(times) >= 3:
            return statistics.median(times), len(times)


def run_case(c_in, c_out, hw, k, n, fmt, sparsities, providers, rounds, batch_s, rng):
    conv = dense_conv(c_in, c_out, k)
    x = make_input(n, c_in, hw, fmt)
    fns = {}
    for p in providers:
        for s in [sparsities[0]] if p in DENSE else sparsities:
            fn = PROVIDERS[p](conv, x, s)
            if fn is not None:
                fns[(p, None if p in DENSE else s)] = fn
    samples = {key: [] for key in fns}
    faults = {key: [] for key in fns}
    with torch.no_grad():
        for _ in range(rounds):
            keys = list(fns)
            rng.shuffle(keys)
            for key in keys:
                f0 = minor_faults()
                t, calls = time_batch(fns[key], batch_s)
                samples[key].append(t)
                faults[key].append((minor_faults() - f0) / (calls + 1))
    dense = samples[("torch_dense", None)]
    flops = 2.0 * n * hw * hw * c_in * c_out * k * k
    rows = []
    for (p, s), ts in samples.items():
        med = statistics.median(ts)
        rows.append(
            {
                "in": c_in,
                "out": c_out,
                "hw": hw,
                "kernel": k,
                "batch": n,
                "format": fmt,
                "provider": p,
                "sparsity": s,
                "median_s": med,
                "spread": (max(ts) - min(ts)) / med,
                "speedup_vs_torch_dense": statistics.median(d / t for d, t in zip(dense, ts)),
                "dense_equivalent_gflops": flops / med / 1e9,
                "page_faults_per_call": statistics.median(faults[(p, s)]),
            }
        )
    return rows


def to_markdown(rows, env, load) -> str:
    lines = [
        (
            f"CPU: {env['cpu']} ({env['kernel_isa']}), {env['threads']} threads, torch {env['torch']}, "
            f"commit {env['git_commit']}; load average before / after: {load[0]} / {load[1]}"
        ),
        "",
        (
            "Speedup = median over interleaved rounds of time(F.conv2d) / time(provider) in the same round. "
            "GFLOP/s are dense-equivalent (2 N H W C_in C_out k^2 / time). `nchw_transposes` = the chunked "
            "input (C, pixels)->(pixels, C) and output (pixels, C_out)->(C_out, pixels) copies alone (its "
            "'speedup' column is dense / transposes). `faults` = minor page faults per call (4 KiB each): memory the allocator "
            "handed back to the OS and touched again."
        ),
        "",
        "| batch | conv | format | provider | sparsity | median ms | GFLOP/s | vs F.conv2d | spread | faults |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = "-" if r["sparsity"] is None else f"{r['sparsity']:.1f}"
        lines.append(
            f"| {r['batch']} | {r['in']}->{r['out']} {r['kernel']}x{r['kernel']} @{r['hw']} | {r['format']} | {r['provider']} | {s} | "
            f"{r['median_s'] * 1e3:.3f} | {r['dense_equivalent_gflops']:.0f} | "
            f"{r['speedup_vs_torch_dense']:.2f}x | {r['spread']:.0%} | {r['page_faults_per_call']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, batch 1, sparsity 0.5 and 0.9")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch-ms", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", nargs="*", choices=list(PROVIDERS), default=list(PROVIDERS))
    ap.add_argument(
        "--out", default=None, help="directory for sparse_conv2d.md / .json (default: print only)"
    )
    ap.add_argument("--name", default="sparse_conv2d", help="file name stem under --out")
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, batches, sparsities = SHAPES, BATCHES, SPARSITIES
    if args.shapes is not None:
        shapes = [SHAPES[i] for i in args.shapes]
    if args.quick:
        shapes, batches, sparsities = SHAPES[1:2] + SHAPES[5:6], [1], [0.5, 0.9]
    env = environment()
    load_before = _load()
    rng = random.Random(0)
    rows = []
    for c_in, c_out, hw, k in shapes:
        for n in batches:
            for fmt in FORMATS:
                case = run_case(
                    c_in, c_out, hw, k, n, fmt, sparsities, args.providers, args.rounds, args.batch_ms / 1e3, rng
                )
                rows += case
                for r in case:
                    s = "-" if r["sparsity"] is None else f"{r['sparsity']:.1f}"
                    print(
                        f"N={n} {c_in}->{c_out} {k}x{k}@{hw} {fmt:<13} {r['provider']:<15} s={s:<4} "
                        f"{r['median_s'] * 1e3:8.3f} ms {r['speedup_vs_torch_dense']:5.2f}x  "
                        f"spread {r['spread']:.0%} faults {r['page_faults_per_call']:.0f}",
                        flush=True,
                    )
    load = (load_before, _load())
    md = to_markdown(rows, env, load)
    if args.out:
        write_table(
            args.out, args.name, md,
            {"environment": env, "load_average": load, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
             "rows": rows},
        )  # fmt: skip
    print(md)


if __name__ == "__main__":
    main()
