"""hetrun's benchmarks, one module each; `hetrun bench NAME` runs them.

Each module lists its benchmarks in a BENCHMARKS table of Benchmark entries, as the modules of hetrun.cli list
their commands in COMMANDS. The modules import torch and hetrun's runtime at their top: gathering them is not light.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from hetrun.errors import HetrunError


@dataclass(frozen=True)
class Benchmark:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    examples: str = ""


def benchmarks() -> dict[str, Benchmark]:
    """Every benchmark, gathered from the modules of hetrun.bench. A module that cannot be imported because a
    package it needs is missing still lists its benchmark, under the module's name, which says so when run."""
    found: dict[str, Benchmark] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except ModuleNotFoundError as e:
            if (e.name or "hetrun").partition(".")[0] == "hetrun":  # hetrun itself is broken: not a user error
                raise
            found[info.name] = _unavailable(info.name, e)
            continue
        found.update(getattr(mod, "BENCHMARKS", {}))
    return found


def _unavailable(name: str, e: ModuleNotFoundError) -> Benchmark:
    def run(args: argparse.Namespace) -> int:
        raise HetrunError(f"benchmark '{name}' is not available here: {e}")

    return Benchmark(f"not available here: {e}",
                     lambda p: p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS), run)


def comma_list(text: str, kind=str) -> list:
    """The comma-separated values of an option, each read as `kind`; a one-line HetrunError when one cannot be."""
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HetrunError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None
