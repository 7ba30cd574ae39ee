"""Files a distributed run writes (plans, reports, traces): whole or not at all, even if the rank is killed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hetrun.errors import HetrunError


def write_atomic(path: "str | os.PathLike", text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and os.replace: readers never see half."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise HetrunError(f"cannot write '{path}': folder '{folder}' does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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
