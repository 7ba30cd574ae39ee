"""Checks and normal forms of the placement solver's inputs: costs, per-device vectors, slots, pin masks, maps."""

from __future__ import annotations

import numpy as np

from hetrun.errors import PlacementError


def effective_cost(cost, comm_cost, L: int) -> np.ndarray:
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim == 1:
        c = np.broadcast_to(c, (L, c.shape[0]))
    if c.ndim != 2 or c.shape[0] != L or c.shape[1] == 0:
        raise PlacementError(f"cost must have shape [devices] or [{L}, devices], got {np.shape(cost)}")
    if not np.isfinite(c).all() or (c <= 0).any():
        raise PlacementError("cost must be positive finite seconds per token on every device")
    comm = device_vector(comm_cost, c.shape[1], "comm_cost", 0.0)
    return c + comm  # [L, D]


def device_vector(v, D: int, name: str, default) -> np.ndarray:
    if v is None:
        return np.full(D, default, dtype=np.float64)
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (D,) or not np.isfinite(a).all() or (a < 0).any():
        raise PlacementError(f"{name} must be {D} finite numbers >= 0, one per device; got shape {a.shape}")
    return a


def check_slots(slots, D: int, E: int) -> np.ndarray:
    s = np.asarray(slots)
    if s.shape != (D,) or (s < 0).any() or (s != np.floor(s)).any():
        raise PlacementError(f"slots must be {D} whole numbers >= 0, one per device; got {s.tolist()}")
    s = s.astype(np.int64)
    if s.sum() < E:
        raise PlacementError(f"{s.sum()} slots for {E} experts; give at least one slot per expert")
    return s


def check_allowed(allowed, L: int, E: int, D: int, slots: np.ndarray):
    # [L, E, D] bool, or None when everything is allowed.
    if allowed is None:
        return None
    try:
        m = np.broadcast_to(np.asarray(allowed, dtype=bool), (L, E, D))
    except ValueError:
        raise PlacementError(f"allowed must broadcast to [{L}, {E}, {D}], got shape {np.shape(allowed)}") from None
    stranded = ~(m & (slots > 0)).any(-1)  # [L, E]
    if stranded.any():
        l, e = np.argwhere(stranded)[0]
        raise PlacementError(f"allowed leaves expert {e} of layer {l} no device with slots; allow it somewhere")
    return None if m.all() else m


def check_map(phy2log, device_of, L: int, E: int, D: int):
    p2l = np.asarray(phy2log, dtype=np.int64)
    dev = np.broadcast_to(np.asarray(device_of, dtype=np.int64), p2l.shape)
    if p2l.ndim != 2 or p2l.shape[0] != L or (p2l < 0).any() or (p2l >= E).any():
        raise PlacementError(f"phy2log must be [{L}, R] with experts in 0..{E - 1}")
    if (dev < 0).any() or (dev >= D).any() or (dev != dev[:1]).any():
        raise PlacementError(f"device_of must name devices 0..{D - 1}, the same slots in every layer")
    if (np.bincount(p2l.ravel() + E * np.repeat(np.arange(L), p2l.shape[1]), minlength=L * E) == 0).any():
        raise PlacementError("phy2log leaves some expert without a slot; every expert needs one")
    return p2l, dev
