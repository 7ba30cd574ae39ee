"""How a replicated expert's tokens split over its replicas: water-filling to a common finish time per layer."""

from __future__ import annotations

import numpy as np


def split_tokens(p2l: np.ndarray, dev: np.ndarray, w: np.ndarray, c: np.ndarray, x0=None, sweeps: int = 200):
    # Tokens per slot x [L, R] and device time [L, D] for a fixed expert-to-slot map.
    # Starts from x0 [L, R] or else the even split over replicas (EPLB's), then block coordinate
    # descent: each replicated expert in turn pours its tokens over its devices like water, to a
    # common finish time above the others' load (replicas of one expert on one device count as
    # one). Each such step exactly minimises sum_d Psi(t_d) / c_d over that expert for every
    # strictly convex Psi, so the fixed point minimises all of them, the max included, and no
    # step raises the max. A layer stops once a sweep lowers its max by less than a millionth
    # and moves no device's time by more than 1e-4 of it.
    L, R = p2l.shape
    E, D = w.shape[1], c.shape[1]
    rows = np.arange(L)[:, None]
    cnt = row_sum(p2l, 1.0, E)  # [L, E] replicas
    even = w[rows, p2l] / cnt[rows, p2l] if x0 is None else x0  # [L, R]
    # One carrier slot per (expert, device) pair takes the tokens of its duplicates.
    key = p2l * D + dev  # [L, R]
    order = np.argsort(key, axis=1, kind="stable")  # [L, R]
    ks = key[rows, order]
    carrier = np.ones((L, R), dtype=bool)
    carrier[:, 1:] = ks[:, 1:] != ks[:, :-1]
    pair = np.cumsum(carrier, 1) - 1  # [L, R] (expert, device) pair of each sorted slot
    pair_x = row_sum(pair, even[rows, order], R)  # [L, R] tokens per (expert, device) pair
    x = np.zeros((L, R + 1))  # last column: a dummy slot for padding
    x[rows, order] = np.where(carrier, pair_x[rows, pair], 0.0)
    time = row_sum(dev, even * c[rows, dev], D + 1)  # [L, D + 1] last column: a dummy device

    e_sorted = ks // D  # [L, R]
    ndev = row_sum(e_sorted, carrier, E).astype(np.int64)  # [L, E] devices per expert
    table = _replica_table(order, carrier, e_sorted, ndev)  # [L, J, M] slot ids, R = padding
    if table.shape[1] == 0:
        return x[:, :R], time[:, :D]
    tdev = np.concatenate([dev, np.full((L, 1), D)], 1)[rows[:, :, None], table]  # [L, J, M]
    tc = np.concatenate([c, np.ones((L, 1))], 1)[rows[:, :, None], tdev]  # [L, J, M]
    valid = table < R
    texp = np.concatenate([p2l, np.zeros((L, 1), np.int64)], 1)[rows, table[:, :, 0]]  # [L, J]
    tw = np.where(valid[:, :, 0], w[rows, texp], 0.0)  # [L, J]

    active = np.arange(L)
    best = time.max(1)  # [L]
    for _ in range(sweeps):
        ra = active[:, None]
        before = time[active]
        for j in range(table.shape[1]):
            s, d, cj, v = table[active, j], tdev[active, j], tc[active, j], valid[active, j]  # [A, M]
            base = time[ra, d] - cj * x[ra, s]
            level = _water_level(base, cj, v, tw[active, j])  # [A]
            new = np.where(v, np.maximum(0.0, (level[:, None] - base) / cj), 0.0)
            x[ra, s] = new
            time[ra, d] = np.where(v, base + cj * new, time[ra, d])
        now = time[active].max(1)
        moving = np.abs(time[active] - before).max(1) > 1e-4 * now  # load still flowing along chains
        keep = (now < best[active] * (1 - 1e-6)) | moving
        best[active] = now
        active = active[keep]
        if len(active) == 0:
            break
    return x[:, :R], time[:, :D]


def _replica_table(order, carrier, e_sorted, ndev) -> np.ndarray:
    # [L, J, M] carrier slots of each layer's replicated experts (J of them, M devices at
    # most), padded with the dummy slot R.
    L, R = order.shape
    rep = ndev >= 2  # [L, E]
    J = int(rep.sum(1).max())
    M = int(ndev.max())
    table = np.full((L, J, M), R, dtype=np.int64)
    if J == 0:
        return table
    j_of = np.cumsum(rep, 1) - 1  # [L, E] index among replicated experts
    cf = np.cumsum(carrier, 1)  # [L, R]
    # rank of a carrier among its expert's carriers: carriers before it minus carriers before the expert
    first_of_e = np.ones((L, R), dtype=bool)
    first_of_e[:, 1:] = e_sorted[:, 1:] != e_sorted[:, :-1]
    before = np.maximum.accumulate(np.where(first_of_e, cf - 1, 0), 1)  # [L, R]
    rank = cf - 1 - before
    l_idx, pos = np.nonzero(carrier & np.take_along_axis(rep, e_sorted, 1))
    e = e_sorted[l_idx, pos]
    table[l_idx, j_of[l_idx, e], rank[l_idx, pos]] = order[l_idx, pos]
    return table


def _water_level(base: np.ndarray, c: np.ndarray, valid: np.ndarray, w: np.ndarray) -> np.ndarray:
    # [L] level t with sum over valid i of max(0, (t - base_i) / c_i) = w.
    # The prefix of the lowest k bases gives t_k = (w + sum b/c) / sum 1/c; the true level is the
    # smallest t_k (too few devices or too many both overshoot).
    b = np.where(valid, base, np.inf)  # [L, M]
    order = np.argsort(b, 1)
    rows = np.arange(len(b))[:, None]
    b = b[rows, order]
    inv = np.where(valid, 1.0 / c, 0.0)[rows, order]
    v = valid[rows, order]
    a = np.cumsum(inv, 1)
    s = np.cumsum(np.where(v, b, 0.0) * inv, 1)
    t = np.where(v, (w[:, None] + s) / np.where(v, a, 1.0), np.inf)
    return t.min(1)


def row_sum(idx: np.ndarray, values, width: int) -> np.ndarray:
    # [L, width] sums of values [L, n] (or a scalar) into columns idx [L, n], row by row.
    L = idx.shape[0]
    flat = (idx + width * np.arange(L)[:, None]).ravel()
    v = np.broadcast_to(np.asarray(values, dtype=np.float64), idx.shape).ravel()
    return np.bincount(flat, weights=v, minlength=L * width).reshape(L, width)
