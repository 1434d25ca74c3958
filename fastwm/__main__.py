"""Command line: ``python -m fastwm demo`` (the main job: a world model trained on a gymnasium environment, then
used to imagine and plan) and ``python -m fastwm bench`` (the benchmarks)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line: the ``demo`` and ``bench`` subcommands with their options."""
    parser = argparse.ArgumentParser(prog="python -m fastwm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: train a world model on a gymnasium environment, imagine, plan",
                          description="Train a world model on a gymnasium environment, then imagine and plan with "
                                      "it; writes DIR/metrics.json, DIR/*.png and DIR/checkpoint.pt.")
    bench = sub.add_parser("bench", help="the benchmark suite: a table on stdout and JSON rows")
    from .benchmarks.harness import add_arguments as bench_arguments
    from .demo import add_arguments as demo_arguments

    demo_arguments(demo)
    bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_from_args
    else:
        from .benchmarks.harness import run_from_args
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
