"""Lower bounds on a layer's step time for given slots: no placement on them can do better."""

from __future__ import annotations

import numpy as np

from hetrun.placement.checks import check_slots, effective_cost
from hetrun.placement.loads import load_matrix


def lower_bound(load, cost, slots, comm_cost=None) -> np.ndarray:
    """[L] time no placement on these slots can beat, pins aside.

    Take the k hottest experts of a layer (load W_k) and the set A of devices holding any of
    their slots. Every other expert needs a slot of its own, so they have at most k + R - E
    slots: |A| = a <= min(k + R - E, D'), D' the devices with slots. The other experts that fit
    outside A number at most R - K_A (K_A: slots in A), so at least n = E - k - R + K_A of them
    sit wholly in A, carrying at least the load C_n of the n coldest experts. All that load runs
    on A, whose speed sum(1/c) (c = cost + comm_cost) is at most that of the a fastest devices,
    while K_A is at least the a smallest slot counts. So T >= min over feasible a of
    (W_k + C_n) / speed_a, and this trapped-load bound is the max over k. k = E gives the fluid
    bound (all load over all speed); k = 1 the hottest expert spread over R - E + 1 devices.

    Replica-count bound: within time T a replica on device d carries at most T / c_d tokens, so
    expert e needs at least r_e(T) replicas, the fewest devices whose summed speed reaches
    w_e / T (fastest first); all of them must fit in R slots, so T >= min {T : sum_e r_e(T) <= R},
    found by bisection. The result is the larger of the two bounds.
    """
    w = load_matrix(load, uniform_zero_rows=False)  # [L, E]
    L, E = w.shape
    c = effective_cost(cost, comm_cost, L)  # [L, D]
    slots = check_slots(slots, c.shape[1], E)
    return layer_bounds(w, c, slots)


def layer_bounds(w: np.ndarray, c: np.ndarray, slots: np.ndarray) -> np.ndarray:
    # [L] the larger of the trapped-load and replica-count bounds (see ``lower_bound``).
    speed = np.cumsum(-np.sort(-np.where(slots > 0, 1.0 / c, 0.0), 1), 1)[:, :(slots > 0).sum()]  # [L, a]
    t = _trapped_bound(w, speed, slots)
    return np.maximum(t, _replica_bound(w, speed, int(slots.sum()), t))


def _trapped_bound(w: np.ndarray, speed: np.ndarray, slots: np.ndarray) -> np.ndarray:
    L, E = w.shape
    R = int(slots.sum())
    used = slots[slots > 0]
    few = np.cumsum(np.sort(used))  # [a] fewest slots a devices can have
    many = np.cumsum(-np.sort(-used))  # [a] most slots a devices can have
    hot = np.cumsum(-np.sort(-w, 1), 1)  # [L, k] load of the k hottest experts
    cold = np.concatenate([np.zeros((L, 1)), np.cumsum(np.sort(w, 1), 1)], 1)  # [L, n + 1] n coldest
    k = np.arange(1, E + 1)[:, None]  # [k, 1]
    a = np.arange(1, len(used) + 1)[None, :]  # [1, a]
    trapped = np.clip(E - k - R + few[None, :], 0, E - k)  # [k, a]
    possible = (a <= k + R - E) & (many[None, :] >= k)  # [k, a]
    t = (hot[:, :, None] + cold[:, trapped]) / speed[:, None, :]  # [L, k, a]
    return np.where(possible, t, np.inf).min(2).max(1)


def _replica_bound(w: np.ndarray, speed: np.ndarray, R: int, lo: np.ndarray) -> np.ndarray:
    L, A = speed.shape
    top = speed[:, -1:]  # [L, 1] all devices together
    shift = np.arange(L)[:, None] * 2.0 * top.max()  # [L, 1] rows apart: one searchsorted serves all
    flat = (speed + shift).ravel()
    hi = w.max(1) / speed[:, 0]  # one replica each on the fastest device: always fits
    lo = np.minimum(lo, hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        need = np.minimum(w / np.maximum(mid, 1e-300)[:, None], 1.5 * top)  # [L, E] speed each expert needs
        at = np.searchsorted(flat, (need * (1 - 1e-12) + shift).ravel()).reshape(L, -1)
        r = at - np.arange(L)[:, None] * A + 1  # [L, E] fewest devices reaching that speed
        fits = (r.sum(1) <= R) & (r <= A).all(1)
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    return lo
