"""Which precision each device runs: the profile's explicit request, else the device's best that its backend runs."""

from __future__ import annotations

import logging

from hetrun.errors import PrecisionError
from hetrun.profile import Device, Profile

log = logging.getLogger("hetrun")
_warned: set[tuple[str, str, str]] = set()


def _executable(device: Device) -> set[str]:
    """Precisions this device's backend and hetrun's graph builders can both run."""
    from hetrun.backends.registry import backend_class
    from hetrun.graphs import BUILDERS

    cls = backend_class(device.backend) if device.backend != "auto" else None
    runnable = set(cls.caps.precisions) if cls is not None else set(BUILDERS)
    return runnable & set(BUILDERS)


def device_precision(device: Device, requested: str | None = None) -> str:
    """The precision `device` runs: `requested` (an error if unsupported), the profile's, or its best supported."""
    explicit = requested or device.precision
    supported = device.type.precisions
    if explicit is not None:
        if explicit not in supported:
            raise PrecisionError(f"device '{device.id}' ({device.type.name}) has no {explicit}; it supports "
                                 f"{', '.join(supported)}; ask for one of those or leave precision unset")
        if explicit not in _executable(device):
            raise PrecisionError(f"backend '{device.backend}' of device '{device.id}' cannot run {explicit} graphs; "
                                 f"it runs {', '.join(sorted(_executable(device)))}")
        return explicit
    runnable = _executable(device)
    for p in supported:
        if p in runnable:
            if p != supported[0]:
                key = (device.group, supported[0], p)
                if key not in _warned:
                    _warned.add(key)
                    log.warning("device '%s' (%s) prefers %s, which backend '%s' cannot run here; using %s",
                                device.group, device.type.name, supported[0], device.backend, p)
            return p
    raise PrecisionError(f"device '{device.id}' supports {', '.join(supported)} but backend '{device.backend}' runs "
                         f"none of them; choose another backend for it in the profile")


def plan_precisions(profile: Profile, requested: str | None = None) -> dict[str, str]:
    """Device id -> precision for every device of a profile."""
    return {d.id: device_precision(d, requested) for d in profile.devices}


def matrix_bytes(precision: str, rows: int, cols: int, group: int = 128) -> float:
    """Stored bytes of one [rows, cols] weight at a precision, scales and zero points included."""
    n = rows * cols
    if precision == "fp32":
        return 4.0 * n
    if precision in ("bf16", "fp16"):
        return 2.0 * n
    if precision == "fp8":  # E4M3 values + one FP32 scale per 128x128 block
        return n + 4.0 * (-(-rows // 128)) * (-(-cols // 128))
    if precision == "int8":  # values + one FP32 scale per output row
        return n + 4.0 * rows
    if precision == "int4":  # packed nibbles + FP32 scale and 4-bit zero point per group
        groups = rows * (-(-cols // group))
        return n / 2 + groups * 4.5
    raise PrecisionError(f"unknown precision {precision!r}")


def expert_bytes(precision: str, hidden: int, intermediate: int) -> float:
    """Stored bytes of one SwiGLU expert (gate, up: [I, D]; down: [D, I])."""
    return 2 * matrix_bytes(precision, intermediate, hidden) + matrix_bytes(precision, hidden, intermediate)
