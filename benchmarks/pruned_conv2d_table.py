"""Interleaved timing of PrunedConv2d (the fused-gather C++ kernel) against dense F.conv2d (oneDNN) on the
ResNet-50 conv shapes, written as markdown + JSON.

Providers per case (keep ratio r on both sides):
- dense: F.conv2d on the unpruned conv (the baseline);
- onednn_compact: F.conv2d with the pruned weight on an input compacted beforehand (what a physically
  shrunk model runs; the compaction itself is not timed);
- ours: pyprune.ops.pruned_conv2d (the op as users call it) reading the kept channels of the full input in place (the fused gather);
- ours_compact: the same function on the same pre-compacted input (so ours / ours_compact is the
  cost of fusing the gather);
- x_read: torch.sum over the full input, which reads every line of it once (the read floor's calibration);
- call_floor: the same op on a tiny conv (8 -> 4 channels kept of 1x1 on a 4x4 map): what a call costs at
  these threads besides its FMAs (Python, the dispatcher, setup, the parallel region's fork and join).
Each round times every provider once, in shuffled order (a batch of calls of >= --batch-ms); figures are
medians over rounds of same-round ratios. "of ideal" = speedup vs dense / (1 / r^2).

"x-read bound" is the most any kernel that reads the kept channels in place could gain on this machine:
dense / (x_read times the fraction of x's 64-byte lines that hold a kept channel). On channels_last x a line
holds 16 channels of one pixel, so a quarter of the channels at random touches nearly every line; NCHW planes
are whole lines. Where it is below the ideal 1 / r^2, reading x, not the FLOPs, bounds the fused gather; "of
reachable" = speedup / min(ideal, x-read bound). (The bound leaves out the weight and output traffic and
counts one op call's overhead, which x_read pays too.)

"call floor" is call_floor's median in microseconds, and "ideal us" the time a call takes at the ideal
speedup (dense / (1 / r^2)): where the floor is a ninth of that or more, 0.9 of the ideal (ideal us / 0.9)
leaves the kernel at most ideal us, i.e. it must run its FLOPs at dense oneDNN's rate or faster.

"page faults a call" (dense / oneDNN compact / ours): minor page faults a call over 10 calls after the timing
(getrusage). A call faults when glibc handed a multi-MB buffer of an earlier call back to the system, which
depends on the process's heap more than on the kernel (oneDNN's NCHW convs took ~1,400-1,700 a call in one
process and none in another; ~1 us each on the Xeon VM): a row whose dense faults and whose ours does not
shows a speedup that the next process may not.
    python benchmarks/pruned_conv2d_table.py [--quick] [--rounds 7] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from sparse_linear_providers import environment, interleaved_samples, write_table

from pyprune.compare.timing import page_faults
from pyprune.ops import pruned_conv2d

# (C_in, C_out, kernel, feature map side) of ResNet-50's convs named in issue #3
SHAPES = [
    (64, 64, 3, 56),
    (256, 64, 1, 56),
    (128, 128, 3, 28),
    (256, 256, 3, 14),
    (512, 512, 3, 7),
    (1024, 256, 1, 14),
    (2048, 512, 1, 7),
]
KEEPS = (0.75, 0.5, 0.25)
BATCHES = (1, 8)


CLOCK = time.perf_counter


def providers(cin, cout, k, side, batch, keep, channels_last, gen):
    x = torch.randn(batch, cin, side, side, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    ci, co = max(1, round(cin * keep)), max(1, round(cout * keep))
    ii = torch.sort(torch.randperm(cin, generator=gen)[:ci]).values
    oi = torch.sort(torch.randperm(cout, generator=gen)[:co]).values
    wk = w[oi][:, ii].contiguous()
    bk = b[oi].contiguous()
    xk = x.index_select(1, ii).contiguous(memory_format=fmt)
    pad = k // 2
    op = pruned_conv2d
    tiny_x = torch.randn(1, 8, 4, 4, generator=gen)
    tiny_w, tiny_i = torch.randn(4, 4, 1, 1, generator=gen), torch.arange(0, 8, 2)
    fns = {
        "x_read": lambda: torch.sum(x),
        "call_floor": lambda: op(tiny_x, tiny_w, None, tiny_i, None, 4, [1, 1], [0, 0], [1, 1], 1, False),
        "dense": lambda: F.conv2d(x, w, b, 1, pad),
        "onednn_compact": lambda: F.conv2d(xk, wk, bk, 1, pad),
        "ours": lambda: op(x, wk, bk, ii, None, co, [1, 1], [pad, pad], [1, 1], 1, False),
        "ours_compact": lambda: op(xk, wk, bk, None, None, co, [1, 1], [pad, pad], [1, 1], 1, False),
    }
    # the check that the timed kernels agree (a benchmark of a wrong result is worthless)
    ref = F.conv2d(xk, wk, bk, 1, pad)
    for name in ("ours", "ours_compact"):
        torch.testing.assert_close(fns[name](), ref, rtol=1e-3, atol=1e-3)
    return fns, x_lines_fraction(x, ii)


def x_lines_fraction(x: torch.Tensor, index: torch.Tensor) -> float:
    """The fraction of x's 64-byte lines that hold an element of a channel in ``index`` (images of whole
    lines: C * H * W * 4 a multiple of 64; x 64-byte aligned, as torch's CPU allocator aligns it)."""
    _, _, h, w = x.shape
    pixels = (torch.arange(h)[:, None] * x.stride(2) + torch.arange(w)[None, :] * x.stride(3)).reshape(-1)
    elems = index[:, None] * x.stride(1) + pixels[None, :]
    lines = torch.unique(elems * x.element_size() // 64).numel()
    return lines / (x[0].numel() * x.element_size() / 64)


def run_case(shape, batch, keep, channels_last, rounds, batch_s, rng, gen):
    cin, cout, k, side = shape
    fns, lines = providers(cin, cout, k, side, batch, keep, channels_last, gen)
    with torch.no_grad():
        samples = interleaved_samples(fns, rounds, batch_s, rng, CLOCK)
        # every fn already ran in the timing rounds: no warm-up call needed
        faults = {name: page_faults(fns[name], calls=10) for name in ("dense", "onednn_compact", "ours")}
    dense = samples["dense"]
    ideal = 1.0 / (keep * keep)
    row = {
        "c_in": cin, "c_out": cout, "kernel": k, "side": side, "batch": batch, "keep": keep,
        "format": "channels_last" if channels_last else "nchw", "ideal": ideal,
        "dense_median_s": statistics.median(dense),
    }  # fmt: skip
    for name in ("onednn_compact", "ours", "ours_compact"):
        ts = samples[name]
        sp = statistics.median(d / t for d, t in zip(dense, ts))
        row[f"{name}_median_s"] = statistics.median(ts)
        row[f"{name}_speedup"] = sp
        row[f"{name}_of_ideal"] = sp / ideal
    row["x_lines_fraction"] = lines
    row["x_read_median_s"] = statistics.median(samples["x_read"])
    row["x_read_bound"] = statistics.median(d / (t * lines) for d, t in zip(dense, samples["x_read"]))
    row["ours_of_reachable"] = row["ours_speedup"] / min(ideal, row["x_read_bound"])
    row["call_floor_median_s"] = statistics.median(samples["call_floor"])
    row["gather_cost"] = statistics.median(
        a / c - 1 for a, c in zip(samples["ours"], samples["ours_compact"])
    )
    row["ours_vs_onednn_compact"] = statistics.median(
        o / t for o, t in zip(samples["onednn_compact"], samples["ours"])
    )
    for name, n in faults.items():
        row[f"{name}_faults_per_call"] = n
    return row


def _faults(r) -> str:
    counts = [r.get(f"{name}_faults_per_call") for name in ("dense", "onednn_compact", "ours")]
    return " / ".join("-" if n is None else f"{n:.0f}" for n in counts)


def markdown(rows, env) -> str:
    lines = [
        (
            f"# PrunedConv2d vs dense F.conv2d (CPU)\n\n{env['cpu']}, ISA {env['kernel_isa']}, {env['threads']} threads, "
            f"torch {env['torch']}, fp32. Keep ratio r on both sides; ideal speedup 1/r^2. Medians of same-round "
            "ratios over interleaved rounds. x lines read: the share of x's 64-byte lines that hold a kept "
            "channel; x-read bound: dense / (torch.sum over x, times that share), the most a kernel reading "
            "the kept channels in place could gain; of reachable: ours / min(ideal, x-read bound). "
            "Call floor: the same op on a tiny conv, us a call; ideal us: dense / ideal. "
            "Page faults a call (dense / oneDNN compact / ours): over 10 calls after the timing; a row "
            "whose dense faults and whose ours does not shows a speedup the next process may not (see "
            "the script's docstring).\n"
        ),
        (
            "| conv | batch | format | keep | ideal | oneDNN compact | ours (fused gather) | of ideal | "
            "ours / oneDNN compact | gather cost | x lines read | x-read bound | of reachable | dense ms | "
            "ideal us | call floor us | page faults a call |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['c_in']}->{r['c_out']} {r['kernel']}x{r['kernel']} @{r['side']} | {r['batch']} | {r['format']} | "
            f"{r['keep']} | {r['ideal']:.1f} | {r['onednn_compact_speedup']:.2f} | {r['ours_speedup']:.2f} | "
            f"{r['ours_of_ideal']:.2f} | {r['ours_vs_onednn_compact']:.2f} | {100 * r['gather_cost']:+.1f}% | "
            f"{100 * r['x_lines_fraction']:.0f}% | {r['x_read_bound']:.1f} | {r['ours_of_reachable']:.2f} | "
            f"{1e3 * r['dense_median_s']:.3f} | {1e6 * r['dense_median_s'] / r['ideal']:.1f} | "
            f"{1e6 * r['call_floor_median_s']:.1f} | {_faults(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, keep 0.5, NCHW only, 3 rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-ms", type=float, default=20.0)
    ap.add_argument("--shapes", type=int, nargs="+", default=None, help="indices into SHAPES")
    ap.add_argument("--formats", nargs="+", default=["nchw", "channels_last"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the thread's CPU clock (single thread; steadier on a shared machine)",
    )
    ap.add_argument("--out", default=None, help="directory for pruned_conv2d.md / .json")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.formats, args.batches, args.keeps = 3, ["nchw"], [1], [0.5]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            ap.error("--cpu-time needs --threads 1 (it reads the calling thread's CPU clock)")
        global CLOCK
        CLOCK = time.thread_time
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    env = environment()
    rows = []
    for shape in shapes:
        for batch in args.batches:
            for fmt in args.formats:
                for keep in args.keeps:
                    row = run_case(shape, batch, keep, fmt == "channels_last", args.rounds, args.batch_ms / 1e3,
                                   rng, gen)  # fmt: skip
                    rows.append(row)
                    print(markdown([row], env).splitlines()[-1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, "pruned_conv2d", md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
