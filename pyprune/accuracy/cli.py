"""``pyprune accuracy``: the subcommand's arguments and handler (hooked into pyprune.cli by ``register``)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``accuracy`` subcommand; its handler is stored as the parser's ``func`` default."""
    from ..compare.cli import friendly, positive
    from .models import MODELS
    from .pipeline import METHODS

    p = subparsers.add_parser(
        "accuracy",
        help="accuracy vs measured speedup of every pruning method on real (offline) data",
        description="Train a dense model on scikit-learn's digits, prune with every method at matched FLOPs, "
        "fine-tune, run prune -> low-rank -> int8, and time everything in one interleaved run.",
    )
    p.add_argument("--model", default="lenet5", help=f"one of {', '.join(MODELS)} (default lenet5)")
    p.add_argument(
        "--methods", nargs="+", default=None, help=f"subset of {', '.join(METHODS)} (default: all)"
    )
    p.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.5, 0.75],
        help="fractions of FLOPs removed (unstructured: of weights zeroed), in (0, 1)",
    )
    p.add_argument(
        "--epochs",
        type=positive(int, zero=True),
        default=None,
        help="dense training epochs (default 20 lenet5, 8 resnet)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=positive(int, zero=True),
        default=None,
        help="fine-tune epochs (default 5 lenet5, 3 resnet)",
    )
    p.add_argument(
        "--distill", action="store_true", help="fine-tune with knowledge distillation from the dense model"
    )
    p.add_argument(
        "--iterative",
        type=positive(int),
        default=1,
        help="pruning steps with fine-tuning between (default 1)",
    )
    p.add_argument("--no-pipeline", action="store_true", help="skip the prune -> low-rank -> int8 rows")
    p.add_argument("--quick", action="store_true", help="fewer epochs and methods (under 2 minutes)")
    p.add_argument(
        "--threads", type=positive(int), default=1, help="torch threads for training and timing (default 1)"
    )
    p.add_argument(
        "--batch", type=positive(int), default=64, help="batch size of the timed forward (default 64)"
    )
    p.add_argument(
        "--budget",
        type=positive(float),
        default=None,
        help="seconds for the timing rounds (default 30, quick 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write accuracy_<model>[_quick].md/.json/.csv/.png here (- in the model name becomes _)"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=friendly(run))


def run(args: argparse.Namespace) -> int:
    from .study import accuracy_study

    report = accuracy_study(
        model=args.model,
        methods=args.methods,
        levels=args.levels,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        distill=args.distill,
        iterative=args.iterative,
        run_pipeline=not args.no_pipeline,
        quick=args.quick,
        threads=args.threads,
        time_batch=args.batch,
        budget_s=args.budget,
        seed=args.seed,
    )
    report.print()
    print(f"({report.settings['wall_s']:.1f} s)")
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.out:
        stem = "accuracy_" + args.model.replace("-", "_") + ("_quick" if args.quick else "")
        for path in report.write(args.out, stem):
            print(f"wrote {os.path.relpath(path)}")
    return 0
