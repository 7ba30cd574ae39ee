"""Find backends by name, lazily: nothing heavy is imported until a backend is asked for."""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from hetrun.backends.base import Availability, Backend

from hetrun.errors import BackendUnavailable, HetrunError

if TYPE_CHECKING:
    from hetrun.profile import Device, DeviceType

log = logging.getLogger("hetrun")
_auto_reported: set[tuple[str, str, str]] = set()

ENTRY_POINT_GROUP = "hetrun.backends"


@functools.cache
def _entry_points() -> dict[str, str]:
    # name -> "module:Class" of every backend registered under the entry-point group (hetrun's own, declared in
    # its pyproject.toml, and other distributions'); the only list of backends there is.
    return {ep.name: ep.value for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)}


def backend_names() -> list[str]:
    """Every backend known: hetrun's own and those other packages register under the `hetrun.backends` entry points."""
    return list(_entry_points())


def _target(name: str) -> str:
    found = _entry_points().get(name)
    if found is None:
        raise HetrunError(f"unknown backend '{name}'; known backends: {', '.join(backend_names()) or 'none'} "
                          "(reinstall hetrun if this list is empty: backends are registered as entry points)")
    return found


@functools.cache
def backend_class(name: str) -> type[Backend] | None:
    """The backend class, or None when its module cannot be imported here (see probe_backend for why)."""
    mod, _, cls = _target(name).partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError:
        return None


@functools.cache
def probe_backend(name: str) -> Availability:
    """Whether a backend can run here, with the reason when not. Never raises for known names."""
    cls = backend_class(name)
    if cls is None:
        mod = _target(name).partition(":")[0]
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return Availability(False, f"cannot import {mod}: {e}")
    try:
        return cls.probe()
    except Exception as e:  # a probe must never take the program down
        return Availability(False, f"probe failed: {type(e).__name__}: {e}")


def require_backend(name: str) -> type[Backend]:
    """The backend class, or a one-line BackendUnavailable error saying what to install."""
    cls = backend_class(name)
    avail = probe_backend(name)
    if cls is None or not avail.ok:
        hint = f"; {cls.caps.install_hint}" if cls is not None and cls.caps.install_hint else ""
        raise BackendUnavailable(f"backend '{name}' is not available here: {avail.reason}{hint}")
    return cls


def has_device(name: str, device_type: "DeviceType") -> bool:
    """Whether backend `name` runs here AND finds a real device of this catalog type (e.g. a CUDA GPU for an H100)."""
    cls = backend_class(name)
    if cls is None or not cls.caps.real_hardware or device_type.kind not in cls.caps.device_kinds:
        return False
    if not probe_backend(name).ok:
        return False
    finder = getattr(cls, "has_device", None)
    return True if finder is None else bool(finder(device_type))


def resolve_backend(device: "Device") -> str:
    """The backend a profile device runs on: its own, or for `backend: auto` the first of its type's real backends
    that finds such a device here, else `simulated`. Says once per device group which one `auto` picked."""
    if device.backend != "auto":
        return device.backend
    tried = []
    chosen = "simulated"
    for name in device.type.real_backends:
        if has_device(name, device.type):
            chosen = name
            break
        avail = probe_backend(name)
        tried.append(f"{name}: {avail.reason if not avail.ok else 'no ' + device.type.kind + ' of this kind found'}")
    key = (device.group, device.type.name, chosen)
    if key not in _auto_reported:
        _auto_reported.add(key)
        if chosen == "simulated":
            log.warning("device group '%s' (%s): backend auto found no real device, using simulated%s", device.group,
                        device.type.name, f" ({'; '.join(tried)})" if tried else " (no real backend drives this type)")
        else:
            log.info("device group '%s' (%s): backend auto uses %s (%s)", device.group, device.type.name, chosen,
                     ", ".join(probe_backend(chosen).devices) or "found")
    return chosen


def reset_probes() -> None:
    """Forget cached probes and `auto` reports (tests; or after installing drivers in a running process)."""
    _entry_points.cache_clear()
    backend_class.cache_clear()
    probe_backend.cache_clear()
    _auto_reported.clear()
