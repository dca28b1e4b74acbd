"""The `pyprune` command line."""

from __future__ import annotations

import argparse
import sys
import time

MODELS = ("bert-small", "resnet18", "lenet5")


def _model_and_inputs(name: str, batch: int, seq: int, image: int | None):
    """The named zoo model and its example inputs (random weights; the timings do not depend on values)."""
    import torch

    from . import models

    gen = torch.Generator().manual_seed(0)
    if name == "bert-small":
        m = models.bert("small")
        return m, (torch.randint(0, m.config.vocab_size, (batch, seq), generator=gen),)
    if name == "resnet18":
        # 64x64 keeps the default run under two minutes on 2 cores; pass --image 224 for the real shape
        return models.resnet18(), (torch.randn(batch, 3, image or 64, image or 64, generator=gen),)
    if name == "lenet5":
        return models.lenet5(), (torch.randn(batch, 1, image or 32, image or 32, generator=gen),)
    raise ValueError(f"--model must be one of {list(MODELS)}, got {name!r}")


def _compare(args) -> int:
    from .compare import compare

    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {list(MODELS)}, got {args.model!r}")
    model, inputs = _model_and_inputs(args.model, args.batch, args.seq, args.image)
    t0 = time.perf_counter()
    report = compare(
        model,
        inputs,
        methods=args.methods,
        levels=args.levels,
        threads=args.threads,
        rounds=args.rounds,
        budget_s=args.budget,
        name=args.model,
    )
    report.print()
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .compare import METHODS

    parser = argparse.ArgumentParser(prog="pyprune", description="pruning speedups measured on your hardware")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available, and why not")
    cp = sub.add_parser("compare", help="time dense, masked, channel-pruned and sparse variants side by side")
    cp.add_argument("--model", default="bert-small", help=f"one of {', '.join(MODELS)} (default bert-small)")
    cp.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.9], help="sparsity levels in (0, 1)")
    cp.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    cp.add_argument("--batch", type=int, default=1)
    cp.add_argument("--seq", type=int, default=128, help="sequence length (bert)")
    cp.add_argument("--image", type=int, default=None, help="image side (default 64 for resnet18, 32 lenet5)")
    cp.add_argument("--rounds", type=int, default=7)
    cp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    cp.add_argument("--budget", type=float, default=30.0, help="seconds for the timing rounds (default 30)")
    cp.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    from .accuracy.cli import register as _register_accuracy  # pyprune accuracy (issue #7)

    _register_accuracy(sub)
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        return args.func(args)
    if args.command == "info":
        from . import info

        info()
    elif args.command == "compare":
        return _compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
