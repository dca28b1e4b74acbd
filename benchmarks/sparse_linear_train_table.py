"""Interleaved timing of one training step (forward + backward, gradients for x and the kept weights) of
SparseLinear (csr) against nn.Linear, written as markdown + JSON.

Each round times both providers once, in shuffled order (a batch of steps of >= --batch-ms); figures are medians
over rounds, and "x dense" is the median of the same-round ratios. The step: y = layer(x); y.backward(g) with x
requiring grad, the weight's gradients accumulated (zeroed between steps, not timed).
    python benchmarks/sparse_linear_train_table.py [--rounds 7] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from sparse_linear_providers import environment, interleaved_samples, write_table

from pyprune.nn import SparseLinear

SHAPES = [(768, 3072), (4096, 4096)]  # (in_features, out_features)
TOKENS = [8, 64, 512, 2048]
SPARSITIES = [0.5, 0.9]


def step_fn(layer, x, g):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(g)

    return step


def run_case(k, n, m, sparsity, rounds, batch_s, rng):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    fns = {"dense": lin, "csr": SparseLinear.from_dense(lin, sparsity=sparsity, layout="csr")}
    x = torch.randn(m, k, requires_grad=True)
    g = torch.randn(m, n)
    fns = {name: step_fn(layer, x, g) for name, layer in fns.items()}
    samples = interleaved_samples(fns, rounds, batch_s, rng)
    return {
        "in_features": k, "out_features": n, "tokens": m, "sparsity": sparsity,
        "dense_median_s": statistics.median(samples["dense"]),
        "csr_median_s": statistics.median(samples["csr"]),
        "csr_vs_dense": statistics.median(d / c for d, c in zip(samples["dense"], samples["csr"])),
    }  # fmt: skip


def markdown(rows, env) -> str:
    lines = [
        (
            f"# One training step (forward + backward): SparseLinear csr vs nn.Linear (CPU)\n\n{env['cpu']}, "
            f"{env['threads']} threads, torch {env['torch']}, commit {env['git_commit']}, fp32. Medians over "
            "interleaved rounds; x dense = median of same-round ratios.\n"
        ),
        "| in->out | tokens | sparsity | dense ms | csr ms | csr x dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['in_features']}->{r['out_features']} | {r['tokens']} | {r['sparsity']} | "
            f"{1e3 * r['dense_median_s']:.2f} | {1e3 * r['csr_median_s']:.2f} | {r['csr_vs_dense']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-ms", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    ap.add_argument("--quick", action="store_true", help="the smaller shape, 8 and 64 tokens, 3 rounds")
    ap.add_argument("--out", default=None, help="directory for sparse_linear_train.md / .json")
    ap.add_argument("--name", default="sparse_linear_train", help="file name stem under --out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, tokens = SHAPES, TOKENS
    if args.quick:
        shapes, tokens, args.rounds = SHAPES[:1], TOKENS[:2], 3
    rng = random.Random(0)
    env = environment()
    rows = []
    for k, n in shapes:
        for m in tokens:
            for sp in SPARSITIES:
                rows.append(run_case(k, n, m, sp, args.rounds, args.batch_ms / 1e3, rng))
                print(markdown(rows[-1:], env).splitlines()[-1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, args.name, md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
