"""`hetrun bench NAME`: run one of hetrun's benchmarks; each lives in its own module with a main(argv)."""

from __future__ import annotations

import argparse
import importlib

from hetrun.cli import Command
from hetrun.errors import HetrunError

# Benchmark name -> "module:function"; the function takes the remaining arguments and returns an exit code.
BENCHMARKS = {
    "precision": "hetrun.bench.precision:main",
    "moe": "hetrun.bench.moe:main",
    "placement": "hetrun.bench.placement:main",
    "simulate": "hetrun.bench.simulate:main",
    "distributed": "hetrun.bench.distributed:main",
}


def benchmark(name: str):
    """The main function of benchmark `name`, imported now; a one-line HetrunError when unknown or not built."""
    if name not in BENCHMARKS:
        raise HetrunError(f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}")
    module, _, func = BENCHMARKS[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the benchmark exists but something it needs is missing
            raise HetrunError(f"benchmark '{name}' cannot start: {e}") from None
        raise HetrunError(f"benchmark '{name}' is not available in this version of hetrun ({module} is missing)") from None
    return getattr(mod, func)


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help=f"which benchmark: {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help lists them)")


def _run(args: argparse.Namespace) -> int:
    return int(benchmark(args.name)(args.args) or 0)


COMMANDS = {
    "bench": Command("run a benchmark: " + ", ".join(BENCHMARKS), _add, _run,
                     "  hetrun bench precision\n  hetrun bench precision --tokens 1,64 --runtimes openvino --json\n"
                     "  hetrun bench precision --help"),
}
