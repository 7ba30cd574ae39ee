"""Warnings said once per process: an implicit fallback warns the first time it happens, not on every expert."""

from __future__ import annotations

import logging

log = logging.getLogger("hetrun")
said: set[tuple] = set()  # keys already warned about (tests clear it)


def warn_once(key: tuple, message: str, *args) -> None:
    """log.warning(message, *args) on logger "hetrun" the first time `key` (a tuple naming the module and the case)
    comes; nothing after."""
    if key not in said:
        said.add(key)
        log.warning(message, *args)
