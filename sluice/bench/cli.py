"""`sluice bench BENCHMARK ...`: the benchmark group of the `sluice` command.

`sluice/entrypoints/cli.py` imports this module only when `bench` is the chosen subcommand and
calls `add_parser(subparsers)` then `run(args)`. Each benchmark module provides its own
`add_parser(subparsers)` that sets `bench_run` to its `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

BENCHMARKS = ("throughput", "serve")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` and its benchmarks (`throughput`, `serve`)."""
    from sluice.bench import serve, throughput
    parser = subparsers.add_parser(
        "bench", help="Benchmark throughput and latency.",
        description="Benchmarks. `sluice bench throughput --help` for the offline throughput "
                    "benchmark (sluice vs HF transformers); `sluice bench serve --help` for the "
                    "online benchmark against an OpenAI-compatible server.")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK",
                                parser_class=type(parser))
    throughput.add_parser(sub)
    serve.add_parser(sub)
    parser.set_defaults(bench_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; without one, print the group's help and return 2."""
    bench_run = getattr(args, "bench_run", None)
    if bench_run is None:
        args.bench_parser.print_help(sys.stderr)
        return 2
    return int(bench_run(args) or 0)
