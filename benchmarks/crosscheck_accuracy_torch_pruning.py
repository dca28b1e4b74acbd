"""Cross-check of the accuracy study against Torch-Pruning: LeNet-5 on the digits task, 50% (and 75%) of the
FLOPs removed by Torch-Pruning's L1 (MagnitudeImportance p=1) and by each pyprune criterion, every model
fine-tuned identically (same epochs, optimiser, seed, batches). Writes
benchmarks/results/cpu/accuracy_crosscheck_torch_pruning.md.

Not a test dependency: exits cleanly (status 0, a message) when torch_pruning is not installed.

    python benchmarks/crosscheck_accuracy_torch_pruning.py [--levels 0.5 0.75] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import pyprune
from pyprune.accuracy import FineTune, Prune, build_model, digits, evaluate, train
from pyprune.accuracy.pipeline import apply_prune

CRITERIA = ("l1", "l2", "taylor", "fpgm", "thinet", "random")


def _tp_prune(model, x, level, tp):
    """Torch-Pruning L1 at the pruning_ratio whose FLOPs removed first reaches ``level`` (bisection)."""
    dense = pyprune.count_flops(model, x)

    def run(r):
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(
            m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r, ignored_layers=[m.fc3]
        )
        pruner.step()
        return m, 1 - pyprune.count_flops(m, x) / dense

    lo, hi = 0.0, 0.99
    best = run(hi) + (hi,)
    for _ in range(14):
        mid = (lo + hi) / 2
        m, got = run(mid)
        if got >= level:
            hi, best = mid, (m, got, mid)
        else:
            lo = mid
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results/cpu/accuracy_crosscheck_torch_pruning.md")
    )
    args = parser.parse_args()
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch_pruning is not installed (pip install --no-deps torch-pruning): cross-check skipped")
        return 0

    torch.set_num_threads(1)
    task = digits()
    x = task.val.x[:1]
    torch.manual_seed(0)
    dense = build_model("lenet5")
    train(dense, task.train, args.epochs, lr=2e-3, description="dense")
    dense_acc = evaluate(dense.eval(), task.val)
    ft = FineTune(args.finetune_epochs)

    def finetune(m):
        torch.manual_seed(0)
        train(m, task.train, ft.epochs, lr=ft.lr, description="fine-tune")
        return evaluate(m, task.val)

    lines = [
        "# Accuracy cross-check: pyprune criteria vs Torch-Pruning L1 (LeNet-5, digits)",
        "",
        (
            f"Dense LeNet-5, {args.epochs} epochs: validation accuracy {dense_acc:.2%} ({len(task.val.y)} images). "
            f"Every pruned model fine-tuned {ft.epochs} epochs (Adam lr {ft.lr}, cosine, seed 0, same batches). "
            f"torch-pruning {getattr(tp, '__version__', '?')}, torch {torch.__version__}."
        ),
        "",
        "| level | pruner | FLOPs removed | params | acc before FT | acc after FT |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    verdicts = []
    dflops = pyprune.count_flops(dense, x)
    for lv in args.levels:
        tp_model, got, ratio = _tp_prune(dense, x, lv, tp)
        before = evaluate(tp_model, task.val)
        after = finetune(tp_model)
        lines.append(
            f"| {lv:g} | Torch-Pruning L1 (ratio {ratio:.3f}) | {got:.1%} | {pyprune.count_params(tp_model)} | "
            f"{before:.2%} | {after:.2%} |"
        )
        ours = {}
        for c in CRITERIA:
            torch.manual_seed(0)
            m, _ = apply_prune(dense, Prune(c, lv), (x,), task.train, dense_flops=dflops)
            b = evaluate(m, task.val)
            a = finetune(m)
            ours[c] = a
            rem = 1 - pyprune.count_flops(m, x) / dflops
            lines.append(
                f"| {lv:g} | pyprune {c} | {rem:.1%} | {pyprune.count_params(m)} | {b:.2%} | {a:.2%} |"
            )
        best = max(ours, key=ours.get)
        ok = ours[best] >= after
        verdicts.append(
            f"- level {lv:g}: our best criterion ({best}) {ours[best]:.2%} vs Torch-Pruning L1 {after:.2%}: "
            f"{'at least as accurate' if ok else 'LESS accurate'} ({(ours[best] - after) * 100:+.2f} points)."
        )
        print(verdicts[-1], flush=True)
    lines += ["", *verdicts, ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
