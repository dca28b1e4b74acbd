"""Every SIMD path of the C++ kernels (PYPRUNE_ISA=baseline / avx2 / avx512) on the same cases, against dense
in the same process, written as markdown + JSON.

The ISA is picked once per process, so each path runs in its own subprocess. Dense (oneDNN / MKL) picks its
own ISA whatever PYPRUNE_ISA says, so on an AVX-512 machine the capped paths' ratios against dense are lower
than a machine without AVX-512 would show; the times across paths are the comparison this table is for.
    python benchmarks/isa_paths_table.py [--rounds 5] [--out benchmarks/results/cpu-zen5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (name, kind, args): kind "linear" (in, out, tokens, layout, sparsity), "sparse_conv" (in, out, k, side,
# channels_last, sparsity), "pruned_conv" (in, out, k, side, channels_last, keep)
CASES = [
    ("csr linear 1024->1024 M=128 90%", "linear", (1024, 1024, 128, "csr", 0.9)),
    ("bsr linear 1024->1024 M=128 90%", "linear", (1024, 1024, 128, "bsr", 0.9)),
    ("csr conv 256->64 1x1 @56 nchw 90%", "sparse_conv", (256, 64, 1, 56, False, 0.9)),
    ("csr conv 256->64 1x1 @56 cl 90%", "sparse_conv", (256, 64, 1, 56, True, 0.9)),
    ("csr conv 128->128 3x3 @28 nchw 90%", "sparse_conv", (128, 128, 3, 28, False, 0.9)),
    ("pruned conv 64->64 3x3 @56 nchw keep 0.5", "pruned_conv", (64, 64, 3, 56, False, 0.5)),
    ("pruned conv 64->64 3x3 @56 cl keep 0.5", "pruned_conv", (64, 64, 3, 56, True, 0.5)),
    ("pruned conv 256->256 3x3 @14 cl keep 0.5", "pruned_conv", (256, 256, 3, 14, True, 0.5)),
]


def providers(kind, args, gen):
    """(ours, dense) callables of one case."""
    import torch
    import torch.nn.functional as F

    from pyprune.nn import SparseConv2d, SparseLinear
    from pyprune.ops import pruned_conv2d

    if kind == "linear":
        k, n, m, layout, s = args
        lin = torch.nn.Linear(k, n)
        sp = SparseLinear.from_dense(lin, sparsity=s, layout=layout)
        x = torch.randn(m, k, generator=gen)
        return (lambda: sp(x)), (lambda: lin(x))
    cin, cout, k, side, cl, r = args
    x = torch.randn(1, cin, side, side, generator=gen)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    if kind == "sparse_conv":
        sc = SparseConv2d.from_dense(conv, sparsity=r)
        return (lambda: sc(x)), (lambda: conv(x))
    ii = torch.sort(torch.randperm(cin, generator=gen)[: round(cin * r)]).values
    oi = torch.sort(torch.randperm(cout, generator=gen)[: round(cout * r)]).values
    wk = conv.weight.detach()[oi][:, ii].contiguous()
    bk = conv.bias.detach()[oi].contiguous()
    p = k // 2
    return (lambda: pruned_conv2d(x, wk, bk, ii, None, len(oi), [1, 1], [p, p], [1, 1], 1, False)), (lambda: conv(x))


def child(rounds: int, batch_s: float) -> None:
    """Runs in the subprocess: every case, interleaved rounds, JSON on stdout."""
    import torch
    from sparse_linear_providers import time_batch

    import pyprune

    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, kind, args in CASES:
            ours, dense = providers(kind, args, gen)
            t_ours, t_dense = [], []
            for _ in range(rounds):
                t_ours.append(time_batch(ours, batch_s))
                t_dense.append(time_batch(dense, batch_s))
            rows.append({
                "case": name, "ours_median_s": statistics.median(t_ours),
                "dense_median_s": statistics.median(t_dense),
                "speedup": statistics.median(d / o for d, o in zip(t_dense, t_ours)),
            })  # fmt: skip
    print(json.dumps({"isa": pyprune._extension.cpu_features()["kernel_isa"], "rows": rows}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-ms", type=float, default=30.0)
    ap.add_argument("--out", default=None, help="directory for isa_paths.md / .json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.rounds, args.batch_ms / 1e3)
        return 0
    import pyprune
    from sparse_linear_providers import environment, write_table

    have = pyprune._extension.cpu_features()
    isas = ["baseline"] + [i for i in ("avx2", "avx512") if have[i]]
    results = {}
    for isa in isas:
        env = dict(os.environ, PYPRUNE_ISA=isa)
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--batch-ms", str(args.batch_ms)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["isa"] == isa, (isa, got["isa"])
        results[isa] = got["rows"]
    env = environment()
    head = " | ".join(f"{i} ms | {i} vs dense" for i in isas)
    lines = [
        f"# C++ kernels on each SIMD path (PYPRUNE_ISA)\n\n{env['cpu']}, {env['threads']} threads, torch "
        f"{env['torch']}, fp32, batch 1 for the convs. Medians over {args.rounds} interleaved rounds; 'vs dense' "
        "is the median same-round ratio against dense (nn.Linear / nn.Conv2d, which choose their own ISA) in "
        "the same process.\n",
        f"| case | {head} |",
        "|---|" + "---:|" * (2 * len(isas)),
    ]
    for j, (name, _, _) in enumerate(CASES):
        cells = " | ".join(
            f"{1e3 * results[i][j]['ours_median_s']:.3f} | {results[i][j]['speedup']:.2f}x" for i in isas
        )
        lines.append(f"| {name} | {cells} |")
    md = "\n".join(lines) + "\n"
    if args.out:
        write_table(args.out, "isa_paths", md, {"environment": env, "isas": results})
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
