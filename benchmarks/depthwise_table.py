"""Interleaved timing of PrunedConv2d on depthwise convs (MobileNetV2's 3x3 + ReLU6) against ATen's chain,
written as markdown + JSON.

Cases: MobileNetV2's depthwise shapes (3x3, padding 1, stride 1 and 2, 96-960 channels on 112x112-7x7
maps), batch 1 and 8, NCHW and channels_last, every channel kept and half of them (scattered: the fused
gather). Providers per case:
- aten: F.conv2d (groups = channels) -> F.relu6 on the compacted input (what a channel-pruned model runs);
- ours: pyprune.ops.pruned_conv2d with relu=True, relu_max=6 on the full-width input (gather fused).
Each round times both once, in shuffled order; speedups are medians over rounds of same-round ratios.
    python benchmarks/depthwise_table.py [--rounds 7] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
import torch.nn.functional as F
from sparse_linear_providers import environment, interleaved_samples, write_table

from pyprune.ops import pruned_conv2d

# (channels, input side, stride): MobileNetV2's depthwise convs at 224x224 input
CASES = [(96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (384, 14, 1), (576, 14, 2), (960, 7, 1)]
KEEPS = (1.0, 0.5)
BATCHES = (1, 8)


def providers(case, batch, keep, channels_last, gen):
    c, side, s = case
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, side, side, generator=gen).contiguous(memory_format=fmt)
    ck = max(1, round(c * keep))
    kept = None if ck == c else torch.sort(torch.randperm(c, generator=gen)[:ck]).values
    xk = x if kept is None else x.index_select(1, kept).contiguous(memory_format=fmt)
    w = torch.randn(ck, 1, 3, 3, generator=gen)
    b = torch.randn(ck, generator=gen)
    fns = {
        "aten": lambda: F.relu6(F.conv2d(xk, w, b, s, 1, 1, ck)),
        "ours": lambda: pruned_conv2d(x, w, b, kept, None, None, s, 1, 1, ck, relu=True, relu_max=6.0),
    }
    # the check that the timed paths agree (a benchmark of a wrong result is worthless)
    torch.testing.assert_close(fns["ours"](), fns["aten"](), rtol=1e-4, atol=1e-4)
    return fns


def run_case(case, batch, keep, channels_last, rounds, batch_s, rng, gen):
    fns = providers(case, batch, keep, channels_last, gen)
    with torch.no_grad():
        t = interleaved_samples(fns, rounds, batch_s, rng)
    return {
        "channels": case[0], "side": case[1], "stride": case[2], "keep": keep, "batch": batch,
        "format": "channels_last" if channels_last else "nchw",
        **{f"{name}_median_s": statistics.median(ts) for name, ts in t.items()},
        "ours_vs_aten": statistics.median(a / o for a, o in zip(t["aten"], t["ours"])),
    }  # fmt: skip


def markdown(rows, env) -> str:
    lines = [
        f"# PrunedConv2d on depthwise 3x3 + ReLU6 (CPU)\n\n{env['cpu']}, ISA {env['kernel_isa']}, "
        f"{env['threads']} threads, torch {env['torch']}, fp32. aten: F.conv2d + F.relu6 on the compacted "
        "input; ours: pruned_conv2d (gather, ReLU6 fused) on the full-width input. Median times, and medians of "
        "same-round ratios, over interleaved rounds.\n",
        "| channels | side | stride | keep | batch | format | aten ms | ours ms | ours vs aten |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['channels']} | {r['side']} | {r['stride']} | {r['keep']} | {r['batch']} | {r['format']} | "
            f"{1e3 * r['aten_median_s']:.3f} | {1e3 * r['ours_median_s']:.3f} | {r['ours_vs_aten']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, every channel kept, 3 rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-ms", type=float, default=40.0)
    ap.add_argument("--out", default=None, help="directory for depthwise.md / .json")
    args = ap.parse_args(argv)
    batches, keeps = BATCHES, KEEPS
    if args.quick:
        args.rounds, batches, keeps = 3, (1,), (1.0,)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    env = environment()
    rows = []
    for case in CASES:
        for keep in keeps:
            for batch in batches:
                for cl in (False, True):
                    rows.append(run_case(case, batch, keep, cl, args.rounds, args.batch_ms / 1e3, rng, gen))
                    print(markdown(rows[-1:], env).splitlines()[-1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, "depthwise", md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
