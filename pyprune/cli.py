"""The `pyprune` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyprune", description="pruning speedups measured on your hardware")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available, and why not")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
