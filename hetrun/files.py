"""Files hetrun writes (profiles, plans, reports, traces, charts): whole or not at all; and what it prints: JSON,
and tables wide enough to read in a pipe."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from hetrun.errors import HetrunError


def write_atomic(path: "str | os.PathLike", data: "str | bytes") -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace: readers never see half a
    file, and an interrupted write leaves the old one. A missing folder or an OS error is a one-line HetrunError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise HetrunError(f"cannot write '{path}': folder '{folder}' does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise HetrunError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise HetrunError(f"cannot write '{path}': {e.strerror or e}") from None
        raise
    return path


def strict_json(text: "str | bytes"):
    """json.loads for files users hand hetrun: NaN, Infinity and a key given twice in one object are ValueErrors
    (json.JSONDecodeError is one too), never silently read."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed (JSON numbers must be finite)")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup[:60]!r} is given twice in one object")
    return out


def table_console(min_width: int):
    """A rich Console for tables `min_width` columns wide: a terminal's own (rich fits tables to it), and for a pipe
    or a file, where rich would assume 80 columns and cut wider tables' cells short, at least `min_width`."""
    from rich.console import Console  # display: loaded when a table is printed

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, min_width))


def print_json(obj) -> None:
    """Write one JSON document to stdout (for --json)."""
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")
