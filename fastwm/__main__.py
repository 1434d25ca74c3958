"""Command line: ``python -m fastwm demo`` (the main job) and ``python -m fastwm bench`` (the benchmarks)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastwm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job (until the world-model demo lands: the Gaussian benchmark)")
    bench = sub.add_parser("bench", help="the benchmark suite: a table on stdout and JSON rows")
    for p in (demo, bench):
        from .benchmarks.harness import add_arguments

        add_arguments(p)
    args = parser.parse_args(argv)
    from .benchmarks.harness import run_from_args

    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
