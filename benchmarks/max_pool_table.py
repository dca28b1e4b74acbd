"""Interleaved timing of PrunedConv2d's fused max pool: conv -> bias -> ReLU -> max pool as one op against the
same conv followed by ATen's pool, and against the dense ATen chain; and of its kernel alone
(pyprune.ops.max_pool2d, what pyprune.nn.MaxPool2d runs) against ATen's pool. Written as markdown + JSON.

Cases: ResNet-50's stem (3->64 7x7 stride 2 @224, max pool 3x3 stride 2 padding 1) and VGG-16's last block
(512->512 3x3 @14, max pool 2x2), unpruned and with half the output channels kept, batch 1 and 8, NCHW and
channels_last. Providers per case:
- aten: F.conv2d -> F.relu -> F.max_pool2d on the pruned weight (what a channel-pruned model runs);
- ours_aten_pool: pyprune.ops.pruned_conv2d (bias and ReLU fused) -> F.max_pool2d;
- ours_fused: pyprune.ops.pruned_conv2d with max_pool;
- aten_pool_alone: F.max_pool2d on the conv's output (what the fusion replaces);
- ours_pool_alone: pyprune.ops.max_pool2d on the conv's output.
Each round times every provider once, in shuffled order; figures are medians over rounds of same-round ratios.
    python benchmarks/max_pool_table.py [--rounds 7] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
import torch.nn.functional as F
from sparse_linear_providers import environment, interleaved_samples, write_table

from pyprune.ops import max_pool2d, pruned_conv2d

# (name, C_in, C_out, kernel, stride, padding, side, (pool kernel, stride, padding))
CASES = [
    ("ResNet-50 stem", 3, 64, 7, 2, 3, 224, (3, 2, 1)),
    ("VGG-16 block 5", 512, 512, 3, 1, 1, 14, (2, 2, 0)),
]
KEEPS = (1.0, 0.5)
BATCHES = (1, 8)


def providers(case, batch, keep, channels_last, gen):
    _, cin, cout, k, s, p, side, pool = case
    co = max(1, round(cout * keep))
    x = torch.randn(batch, cin, side, side, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w = torch.randn(co, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(co, generator=gen)
    conv = lambda: pruned_conv2d(x, w, b, stride=s, padding=p, relu=True)  # noqa: E731
    fns = {
        "aten": lambda: F.max_pool2d(F.relu(F.conv2d(x, w, b, s, p)), *pool),
        "ours_aten_pool": lambda: F.max_pool2d(conv(), *pool),
        "ours_fused": lambda: pruned_conv2d(x, w, b, stride=s, padding=p, relu=True, max_pool=pool),
    }
    y = conv()
    fns["aten_pool_alone"] = lambda: F.max_pool2d(y, *pool)
    fns["ours_pool_alone"] = lambda: max_pool2d(y, *pool)
    # the check that the timed paths agree (a benchmark of a wrong result is worthless)
    want = fns["aten"]()
    torch.testing.assert_close(fns["ours_fused"](), want, rtol=1e-3, atol=1e-3)
    assert torch.equal(fns["ours_fused"](), fns["ours_aten_pool"]())
    assert torch.equal(fns["ours_pool_alone"](), fns["aten_pool_alone"]())
    return fns


def run_case(case, batch, keep, channels_last, rounds, batch_s, rng, gen):
    fns = providers(case, batch, keep, channels_last, gen)
    with torch.no_grad():
        t = interleaved_samples(fns, rounds, batch_s, rng)
    med = {name: statistics.median(ts) for name, ts in t.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))  # noqa: E731
    return {
        "case": case[0], "c_in": case[1], "c_out": case[2], "keep": keep, "batch": batch,
        "format": "channels_last" if channels_last else "nchw",
        **{f"{name}_median_s": v for name, v in med.items()},
        "fused_vs_ours_aten_pool": ratio("ours_aten_pool", "ours_fused"),
        "fused_vs_aten": ratio("aten", "ours_fused"),
        "pool_alone_vs_aten": ratio("aten_pool_alone", "ours_pool_alone"),
    }  # fmt: skip


def markdown(rows, env) -> str:
    lines = [
        "# PrunedConv2d's fused max pool and pyprune.ops.max_pool2d (CPU)\n\n"
        f"{env['cpu']}, ISA {env['kernel_isa']}, {env['threads']} threads, torch {env['torch']}, fp32. Median "
        "times, and medians of same-round ratios, over interleaved rounds.\n",
        "| case | keep | batch | format | aten conv+pool ms | ours + ATen pool ms | ours fused ms | "
        "ATen pool alone ms | ours pool alone ms | fused vs ours + ATen pool | fused vs aten | "
        "ours pool alone vs ATen pool |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['keep']} | {r['batch']} | {r['format']} | {1e3 * r['aten_median_s']:.3f} | "
            f"{1e3 * r['ours_aten_pool_median_s']:.3f} | {1e3 * r['ours_fused_median_s']:.3f} | "
            f"{1e3 * r['aten_pool_alone_median_s']:.3f} | {1e3 * r['ours_pool_alone_median_s']:.3f} | "
            f"{r['fused_vs_ours_aten_pool']:.2f}x | {r['fused_vs_aten']:.2f}x | "
            f"{r['pool_alone_vs_aten']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, NCHW, the stem unpruned, 3 rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-ms", type=float, default=40.0)
    ap.add_argument("--out", default=None, help="directory for max_pool.md / .json")
    args = ap.parse_args(argv)
    cases, batches, keeps, formats = CASES, BATCHES, KEEPS, (False, True)
    if args.quick:
        args.rounds, cases, batches, keeps, formats = 3, CASES[:1], (1,), (1.0,), (False,)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    env = environment()
    rows = []
    for case in cases:
        for keep in keeps:
            for batch in batches:
                for cl in formats:
                    rows.append(run_case(case, batch, keep, cl, args.rounds, args.batch_ms / 1e3, rng, gen))
                    print(markdown(rows[-1:], env).splitlines()[-1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, "max_pool", md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
