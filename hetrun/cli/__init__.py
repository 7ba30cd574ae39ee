"""The `hetrun` command. Each module in this package contributes commands through a COMMANDS table.

Exit codes: 0 success, 2 user error (one line, no traceback), 1 internal error (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from dataclasses import dataclass
from typing import Callable

from hetrun import __version__
from hetrun.errors import HetrunError


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    examples: str = ""


def whole_number(minimum: int = 0, maximum: int | None = None, what: str = ""):
    """An argparse type: a whole number in [minimum, maximum]; anything else is a one-line usage error."""
    def parse(text: str) -> int:
        digits = text.strip().removeprefix("-").removeprefix("+")
        if not (digits.isascii() and digits.isdigit()):  # int() would also take '1_000' and non-ASCII digits
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a whole number")
        n = int(text)
        if n < minimum or (maximum is not None and n > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            sign = " is negative:" if n < 0 <= minimum else ":"
            raise argparse.ArgumentTypeError(f"{n}{sign} {what or 'it'} must be {bounds}")
        return n

    parse.__name__ = "whole number"  # argparse names the type in its message
    return parse


MAX_THREADS = 4096
threads_arg = whole_number(1, MAX_THREADS, "threads")  # --threads of every command


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse usage errors are user errors: one line, exit 2
        raise HetrunError(f"{self.prog}: {message} (see --help)")


def commands() -> dict[str, Command]:
    """Every command, gathered from the modules of hetrun.cli."""
    found: dict[str, Command] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        found.update(getattr(mod, "COMMANDS", {}))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hetrun", description="Deploy one MoE model across mixed accelerators; simulate and compare costs.",
                     epilog="Start with `hetrun demo`. Every command has --help with examples.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for every error")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in commands().items():
        add_command(sub, name, cmd)
    return parser


def add_command(sub, name: str, cmd) -> None:
    """Add `cmd` (a Command, or anything with its fields: a hetrun.bench.Benchmark) as subcommand `name`."""
    p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                       epilog=f"examples:\n{cmd.examples}" if cmd.examples else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    cmd.add_arguments(p)
    p.set_defaults(_run=cmd.run)


def _version() -> str:
    return f"hetrun {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hetrun` console script."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="hetrun: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "_run", None):
            build_parser().print_help()
            return 2
        return int(args._run(args) or 0)
    except HetrunError as e:
        if debug:
            raise
        print(f"hetrun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hetrun: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the last line of defence: no traceback unless asked
        if debug:
            raise
        print(f"hetrun: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
