"""The resident memory each device's compiled experts take in this process, measured as they are compiled.

ExpertRuntime.compile wraps every expert's build and load in `ResidentMemory.measure(device)`: the growth of the
process's resident set across it, after freed heap memory is handed back to the OS (glibc malloc_trim), is what
that device's backend kept. `report()` sets it beside what the plan predicts for the device (the format's bytes,
hetrun.formats.expert_bytes), the figure `hetrun plan` and the simulator show.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager

import numpy as np

from hetrun.placement.plan import Plan, device_weight_bytes

_LIBC = None


def release_freed_heap() -> None:
    """Hand heap memory that was freed but kept by the C allocator back to the OS (glibc's malloc_trim; nothing
    elsewhere). Graph building frees hundreds of MB of transients in malloc arenas that glibc would otherwise keep
    resident (145-165 MB after deploying the Mixtral-shaped benchmark model)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set size in bytes after malloc_trim (Linux; 0 elsewhere). No garbage collection: a
    full one costs a large process a quarter of a second, and the transients measured here are freed by refcount."""
    release_freed_heap()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ResidentMemory:
    """Bytes of resident memory each device's compiled experts added, and how many experts."""

    def __init__(self, devices: int):
        self.bytes = np.zeros(devices, np.int64)  # [D]
        self.experts = np.zeros(devices, np.int64)  # [D]

    @contextmanager
    def measure(self, device: int):
        """Count the resident memory the block adds (its transients freed) towards `device`."""
        before = resident_bytes()
        yield
        self.bytes[device] += resident_bytes() - before
        self.experts[device] += 1

    def report(self, plan: Plan, local: "set[int] | frozenset[int] | None" = None) -> dict[str, dict]:
        """Per device id: measured resident bytes, the plan's predicted expert bytes, their ratio, experts compiled.
        Devices of other processes (not in `local`) are left out."""
        # the planner's figure (as each backend holds each format); a plan without one: the stored bytes
        figures = plan.predicted.get("devices", {})
        planned = all("weight_bytes" in figures.get(d, {}) for d in plan.device_ids)
        stored = None if planned else device_weight_bytes(plan)
        out = {}
        for i, did in enumerate(plan.device_ids):
            if local is not None and i not in local:
                continue
            want = stored[did] if stored is not None else figures[did]["weight_bytes"]
            out[did] = {"measured_bytes": int(self.bytes[i]), "predicted_bytes": int(want),
                        "ratio": float(self.bytes[i] / want) if want else None, "experts": int(self.experts[i])}
        return out
