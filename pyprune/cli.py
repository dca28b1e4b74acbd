"""The `pyprune` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyprune", description="pruning speedups measured on your hardware")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available, and why not")
    from .compare.cli import register as _register_compare  # compare, profile, advise (issue #6)

    _register_compare(sub)
    from .accuracy.cli import register as _register_accuracy  # pyprune accuracy (issue #7)

    _register_accuracy(sub)
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        return args.func(args)
    if args.command == "info":
        from . import info

        info()
    elif args.command in ("compare", "profile", "advise"):
        return args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
