"""`hetrun bench NAME`: run one of hetrun's benchmarks; each is a subcommand built from hetrun.bench's registry."""

from __future__ import annotations

import argparse

from hetrun.bench import benchmarks
from hetrun.cli import Command, _Parser, add_command
from hetrun.errors import HetrunError


def _add(p: argparse.ArgumentParser) -> None:
    # Every `hetrun` command builds this parser, and gathering the benchmarks imports torch: the benchmarks become
    # subcommands only when `hetrun bench` itself parses its arguments (--help included).
    def parse_with_benchmarks(args=None, namespace=None):
        del p.parse_known_args  # once; argparse's own from here on
        _add_benchmarks(p, list(args or []))
        return p.parse_known_args(args, namespace)

    p.parse_known_args = parse_with_benchmarks


def _add_benchmarks(p: argparse.ArgumentParser, argv: list[str]) -> None:
    found = benchmarks()
    name = next((a for a in argv if not a.startswith("-")), None)
    if name is not None and name not in found:
        raise HetrunError(f"unknown benchmark '{name}'; choose one of: {', '.join(found)}")
    sub = p.add_subparsers(dest="benchmark", metavar="NAME", required=True, parser_class=_Parser)
    for bench_name, bench in found.items():
        add_command(sub, bench_name, bench)


def _run(args: argparse.Namespace) -> int:  # never runs: the benchmark's subcommand sets its own
    raise HetrunError("name a benchmark: `hetrun bench --help` lists them")


COMMANDS = {
    "bench": Command("run a benchmark (`hetrun bench --help` lists them)", _add, _run,
                     "  hetrun bench --help\n"
                     "  hetrun bench precision --tokens 1,64 --runtimes openvino --json\n"
                     "  hetrun bench placement --help"),
}
