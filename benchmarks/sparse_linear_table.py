"""Interleaved timing of every sparse-linear provider against dense, written as markdown + JSON.

Every round times each provider of a case once (a batch of calls of >= --batch-ms), in a shuffled order, so
drift on a shared VM hits all providers alike; speedups are the median over rounds of the same-round ratio
time(dense) / time(provider). Usage:
    python benchmarks/sparse_linear_table.py [--quick] [--rounds 7] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sparse_linear_providers import (
    DENSE,
    PROVIDERS,
    SHAPES,
    SPARSITIES,
    TOKENS,  # noqa: E402
    dense_weight,
    environment,
    interleaved_samples,
    write_table,
)


def run_case(k, n, m, sparsities, providers, rounds, batch_s, rng):
    lin = dense_weight(k, n)
    x = torch.randn(m, k)
    fns = {}
    for p in providers:
        for s in [sparsities[0]] if p in DENSE else sparsities:
            fn = PROVIDERS[p](lin, x, s)
            if fn is not None:
                fns[(p, None if p in DENSE else s)] = fn
    with torch.no_grad():
        samples = interleaved_samples(fns, rounds, batch_s, rng)
    dense = samples[("torch_dense", None)]
    best_dense = [min(a, b) for a, b in zip(dense, samples.get(("numpy_dense", None), dense))]
    rows = []
    for (p, s), ts in samples.items():
        rows.append(
            {
                "in": k,
                "out": n,
                "tokens": m,
                "provider": p,
                "sparsity": s,
                "median_s": statistics.median(ts),
                "spread": (max(ts) - min(ts)) / statistics.median(ts),
                "speedup_vs_torch_dense": statistics.median(d / t for d, t in zip(dense, ts)),
                "speedup_vs_best_dense": statistics.median(d / t for d, t in zip(best_dense, ts)),
                "dense_equivalent_gflops": 2.0 * m * k * n / statistics.median(ts) / 1e9,
            }
        )
    return rows


def to_markdown(rows, env) -> str:
    lines = [
        f"CPU: {env['cpu']} ({env['kernel_isa']}), {env['threads']} threads, torch {env['torch']}, "
        f"numpy {env['numpy']}, commit {env['git_commit']}",
        "",
        "Speedup = median over interleaved rounds of time(dense)/time(provider); `best` = the faster of "
        "F.linear and numpy/OpenBLAS in the same round.",
        "",
        "| tokens | in->out | provider | sparsity | median ms | vs F.linear | vs best dense | spread |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = "-" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
        lines.append(
            f"| {r['tokens']} | {r['in']}->{r['out']} | {r['provider']} | {s} | "
            f"{r['median_s'] * 1e3:.3f} | {r['speedup_vs_torch_dense']:.2f}x | "
            f"{r['speedup_vs_best_dense']:.2f}x | {r['spread']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, 128 tokens, three sparsities")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-ms", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument(
        "--out", default=None, help="directory for sparse_linear.md / .json (default: print only)"
    )
    args = ap.parse_args(argv)
    shapes, tokens, sparsities = SHAPES, args.tokens or TOKENS, SPARSITIES
    if args.quick:
        shapes, tokens, sparsities = SHAPES[:1], args.tokens or [128], [0.5, 0.9, 0.95]
    env = environment()
    rng = random.Random(0)
    rows = []
    for k, n in shapes:
        for m in tokens:
            case = run_case(k, n, m, sparsities, args.providers, args.rounds, args.batch_ms / 1e3, rng)
            rows += case
            for r in case:
                s = "-" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
                print(
                    f"M={m:<5} {k}->{n:<5} {r['provider']:<19} s={s:<5} {r['median_s'] * 1e3:9.3f} ms  "
                    f"{r['speedup_vs_torch_dense']:5.2f}x F.linear  {r['speedup_vs_best_dense']:5.2f}x best",
                    flush=True,
                )
    md = to_markdown(rows, env)
    if args.out:
        write_table(args.out, "sparse_linear", md, {"environment": env, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
