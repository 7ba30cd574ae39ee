"""Which precision each device runs (the bytes each precision stores are in hetrun.formats).

Policy: an explicit request (the call's `precision`, else the profile group's `precision`) must be one the device
has -- its catalog entry's `precisions` list -- and one its backend runs, or it is an error that names the
device and what it has. Without one, each device runs the first precision of its catalog list (the list is in
order of preference) that its backend runs; when that is not the first, it says so with one warning per device
group. Variants such as fp8-w8a16 or int4-g32 need their base precision (fp8, int4) in the catalog.
"""

from __future__ import annotations

import logging

from hetrun.backends.registry import backend_class, resolve_backend
from hetrun.errors import PrecisionError
from hetrun.formats import PRECISIONS, base_precision, expert_bytes, get_format
from hetrun.profile import Device, Profile

log = logging.getLogger("hetrun")


def runnable_precisions(device: Device) -> set[str]:
    """Every precision name this device's backend executes (variants included when it runs their base)."""
    cls = backend_class(resolve_backend(device))
    if cls is None:  # backend not importable here: it says why when it is loaded
        return set(PRECISIONS)
    return {p for p in PRECISIONS if cls.supports(p)}


def resident_expert_bytes(device: Device, precision: str, hidden: int, intermediate: int) -> float:
    """Bytes one expert at `precision` keeps resident on `device` once its backend has loaded it (a CPU runtime may
    hold a format expanded to FP32): what the planner counts against the device's memory."""
    cls = backend_class(resolve_backend(device))
    if cls is None:  # backend not importable here: its stored bytes
        return float(expert_bytes(precision, hidden, intermediate))
    return cls.resident_expert_bytes(precision, device.type, hidden, intermediate)


def _check_explicit(device: Device, precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    have = device.type.precisions
    if base_precision(precision) not in have:
        raise PrecisionError(f"device '{device.id}' ({device.type.name}) has no {base_precision(precision)}; its "
                             f"precisions are {', '.join(have)}; ask for one of those or leave precision unset")
    # simulation-only formats (FP4) have no graphs on any backend: plans and simulations may use them, running them
    # is refused where graphs are built (hetrun.runtime.graphs)
    if precision not in runnable_precisions(device) and get_format(precision).graph:
        raise PrecisionError(f"backend '{device.backend}' of device '{device.id}' cannot run {precision} graphs; it "
                             f"runs {', '.join(sorted(runnable_precisions(device)))}; pick one of those or another backend")
    return precision


def _choose(device: Device, requested: str | None) -> tuple[str, str | None]:
    """(precision, fallback message or None)."""
    explicit = requested or device.precision
    if explicit is not None:
        return _check_explicit(device, explicit), None
    have = device.type.precisions
    runnable = runnable_precisions(device)
    cls = backend_class(resolve_backend(device))
    order = cls.preferred_precisions(device.type) if cls is not None else list(have)
    for p in order:
        if p in runnable:
            if p == have[0]:
                return p, None
            if p == order[0]:  # the backend knows better for the hardware it finds (a CPU's real capabilities)
                return p, (f"device group '{device.group}' ({device.type.name}) runs {p} by default: backend "
                            f"'{device.backend}' prefers it on this hardware to the catalog's first, {have[0]} "
                            "(see `hetrun devices`); ask for a precision explicitly to change it")
            return p, (f"device group '{device.group}' ({device.type.name}) prefers {have[0]}, which backend "
                       f"'{device.backend}' cannot run; it runs {p} instead")
    raise PrecisionError(f"device '{device.id}' ({device.type.name}) has {', '.join(have)} but backend "
                         f"'{device.backend}' runs none of them; choose another backend for it in the profile")


def device_precision(device: Device, requested: str | None = None) -> str:
    """The precision `device` runs: `requested` or the profile's (an error if unsupported), else its best runnable."""
    precision, fallback = _choose(device, requested)
    if fallback:
        log.warning("%s", fallback)
    return precision


def plan_precisions(profile: Profile, requested: str | None = None) -> dict[str, str]:
    """Device id -> precision for every device of a profile; one warning per device group that falls back."""
    out, warned = {}, set()
    for d in profile.devices:
        out[d.id], fallback = _choose(d, requested)
        if fallback and d.group not in warned:
            warned.add(d.group)
            log.warning("%s", fallback)
    return out
