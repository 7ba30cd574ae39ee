"""Find backends by name, lazily: nothing heavy is imported until a backend is asked for."""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from hetrun.errors import BackendUnavailable, HetrunError

from hetrun.backends.base import Availability, Backend

BUILTIN = {
    "onnxruntime": "hetrun.backends.ort:OnnxRuntimeBackend",
    "openvino": "hetrun.backends.ov:OpenVinoBackend",
    "simulated": "hetrun.backends.simulated:SimulatedBackend",
    "nvidia": "hetrun.backends.nvidia:NvidiaBackend",
    "ascend": "hetrun.backends.ascend:AscendBackend",
}


def backend_names() -> list[str]:
    """Every backend known: built-in ones and those other packages register under `hetrun.backends`."""
    names = dict(BUILTIN)
    for ep in entry_points(group="hetrun.backends"):
        names.setdefault(ep.name, ep.value)
    return list(names)


def _target(name: str) -> str:
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group="hetrun.backends"):
        if ep.name == name:
            return ep.value
    raise HetrunError(f"unknown backend '{name}'; known backends: {', '.join(backend_names())}")


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
