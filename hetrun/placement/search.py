"""Expert placement across devices of different speeds.

Cost model, per MoE layer: slot ``s`` holds logical expert ``e(s)`` on device ``d(s)`` and takes
``share[s]`` of that expert's tokens; device ``d`` spends ``cost[d] + comm_cost[d]`` seconds per
token it computes (compute at its precision, plus all-to-all traffic to receive the token). The
layer's step time is the busiest device's time; the solver minimises it, then the dollars
``sum_d price[d] * device_time[d]``, then the number of replicas that carry tokens.

Slots are laid out device by device: device 0 owns the first ``slots[0]`` slots, and so on. With
equal slots per device this is EPLB's convention (slot r on device r // (R // D)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrun.errors import PlacementError
from hetrun.placement.bounds import layer_bounds
from hetrun.placement.checks import check_allowed, check_map, check_slots, device_vector, effective_cost
from hetrun.placement.eplb import eplb_policy
from hetrun.placement.loads import load_matrix
from hetrun.placement.shares import row_sum, split_tokens

REL_TOL = 1e-9  # relative tolerance when comparing step times


@dataclass(frozen=True)
class Placement:
    """Experts on slots, per layer. Arrays are read-only."""

    phy2log: np.ndarray  # [L, R] logical expert held by each slot
    device_of: np.ndarray  # [L, R] device of each slot
    share: np.ndarray  # [L, R] fraction of its expert's tokens each slot takes; sums to 1 per expert
    device_time: np.ndarray  # [L, D] seconds per layer step on each device
    step_time: np.ndarray  # [L] busiest device's time
    lower_bound: np.ndarray  # [L] no placement with these slots does better (see lower_bound())

    def __post_init__(self):
        for name in ("phy2log", "device_of", "share", "device_time", "step_time", "lower_bound"):
            getattr(self, name).setflags(write=False)


def solve_placement(load, cost, slots=None, *, max_slots=None, num_replicas=None, node_of=None,
                    num_groups: int = 1, comm_cost=None, price=None, allowed=None) -> Placement:
    """Place each layer's experts on slots of devices of different speeds.

    Args:
        load: [L, E] tokens per logical expert (>= 0, not zero everywhere; a zero row is placed
            as if uniform).
        cost: [D] or [L, D] seconds per token for one expert on each device, at its precision.
        slots: [D] expert slots per layer on each device, sum R >= E. Or leave it out and give
            ``max_slots`` [D] (memory bound) and ``num_replicas`` R: see ``choose_slots``.
        node_of: [D] node of each device and ``num_groups`` the expert groups (E / num_groups
            consecutive experts): where they fit EPLB's hierarchical policy (equal nodes in
            device order, groups a multiple of nodes), its group-per-node placement is one of
            the candidates and wins ties on step time.
        comm_cost: [D] seconds per token of all-to-all traffic the device receives.
        price: [D] dollars per second, for tie-breaking.
        allowed: [L, E, D] (or broadcastable) bool mask of where each expert may go.

    Returns a ``Placement``. Method, vectorised over layers: slots on devices too slow to use
    them all hold spare replicas; replica counts go by most load per replica; replicas go,
    longest first, to the device that would finish them earliest; each expert's tokens are
    split optimally over its replicas; then rounds of swaps off the busiest devices and slot
    changes (a spare replica becomes a replica of a busy expert) run until the layer is within
    1e-4 of its lower bound or nothing helps. Where the slots are equal per device and nothing
    is pinned, EPLB's hierarchical and global placements (token split re-optimised, which never
    hurts) are candidates too and each layer keeps the best, so on identical devices the result
    is never worse than EPLB's.
    """
    w = load_matrix(load)  # [L, E]
    L, E = w.shape
    c = effective_cost(cost, comm_cost, L)  # [L, D]
    D = c.shape[1]
    if (slots is None) == (max_slots is None or num_replicas is None):
        raise PlacementError("give either slots per device, or max_slots and num_replicas to choose them")
    if slots is None:
        slots = choose_slots(c, max_slots, num_replicas, w)
    slots = check_slots(slots, D, E)
    price = device_vector(price, D, "price", 0.0)
    node_of = device_vector(node_of, D, "node_of", 0).astype(np.int64)
    mask = check_allowed(allowed, L, E, D, slots)
    dev = np.repeat(np.arange(D), slots)  # [R]

    bound = layer_bounds(w, c, slots)  # [L]
    useful = _useful_slots(slots, w, c, bound)  # [D]
    counts = _replica_counts(w, int(useful.sum()), mask, slots)  # [L, E]
    p2l = _assign(w, counts, c, slots, useful, mask, price)  # [L, R]
    devs = np.broadcast_to(dev, (L, len(dev)))
    hier, glob = (None if p is None else (p, *split_tokens(p, devs, w, c))
                  for p in _eplb_candidates(w, slots, node_of, num_groups, mask))
    best = _improve(p2l, dev, w, c, slots, mask, bound)
    if hier is not None:  # first in line, so that group locality wins full ties
        best = _better(hier, best, price)
    if glob is not None:
        best = _better(best, glob, price)
    return finish_placement(best[0], dev, best[1], w, load_matrix(load, uniform_zero_rows=False), c, bound)


def choose_slots(cost, max_slots, num_replicas: int, load=None) -> np.ndarray:
    """Split ``num_replicas`` slots per layer over devices, proportionally to speed.

    Device d gets about R * (1/cost_d) / sum(1/cost) slots, capped at ``max_slots[d]`` (what
    fits in its memory) with the excess going to the others in proportion again; largest
    remainders round to integers. ``cost`` may be [D] or [L, D] (averaged over layers).
    ``load`` [L, E], when given, only checks that R covers its experts.
    """
    c = np.asarray(cost, dtype=np.float64)
    c = c.mean(0) if c.ndim == 2 else c  # [D]
    if c.ndim != 1 or not np.isfinite(c).all() or (c <= 0).any():
        raise PlacementError("cost must be positive finite seconds per token, shape [devices] or [layers, devices]")
    cap = np.asarray(max_slots)
    if cap.shape != c.shape or (cap < 0).any() or (cap != np.floor(cap)).any():
        raise PlacementError(f"max_slots must be {c.shape[0]} whole numbers >= 0, one per device")
    cap = cap.astype(np.int64)
    R = int(num_replicas)
    if load is not None and R < np.shape(load)[-1]:
        raise PlacementError(f"{R} slots for {np.shape(load)[-1]} experts; give at least one slot per expert")
    if cap.sum() < R:
        raise PlacementError(f"devices hold at most {cap.sum()} experts per layer, fewer than the {R} slots asked for; "
                             f"add devices or memory, or lower num_replicas")
    speed = 1.0 / c  # [D]
    ideal = np.zeros_like(speed)
    free = cap > 0
    while True:  # proportional split; devices at their cap drop out and the rest share again
        left = R - ideal[~free].sum()
        ideal[free] = left * speed[free] / speed[free].sum()
        over = free & (ideal > cap)
        if not over.any():
            break
        ideal[over] = cap[over]
        free &= ~over
    out = np.floor(ideal + 1e-9).astype(np.int64)  # [D]
    room = np.where(out < cap, ideal - out, -np.inf)
    out[np.argsort(-room, kind="stable")[: R - out.sum()]] += 1
    return out


def evaluate_placement(phy2log, device_of, load, cost, comm_cost=None) -> Placement:
    """The ``Placement`` of a given expert-to-slot map, with each expert's tokens split
    optimally across its replicas (device_of [L, R] or [R])."""
    w = load_matrix(load, uniform_zero_rows=False)  # [L, E]
    L, E = w.shape
    c = effective_cost(cost, comm_cost, L)  # [L, D]
    p2l, dev = check_map(phy2log, device_of, L, E, c.shape[1])
    slots = np.bincount(dev[0], minlength=c.shape[1])
    w_plan = load_matrix(w)
    x, _ = split_tokens(p2l, dev, w_plan, c)
    return finish_placement(p2l, dev, x, w_plan, w, c, layer_bounds(w_plan, c, slots))


# -- construction ---------------------------------------------------------------------------------

def _useful_slots(slots: np.ndarray, w: np.ndarray, c: np.ndarray, bound: np.ndarray) -> np.ndarray:
    # [D] slots that should carry experts of their own; the rest hold spare replicas.
    # A device with more slots than its speed-proportional share keeps only that share, or more if
    # the coldest experts left (slowest device first) still fit in its time at the lower bound:
    # too many cold experts stuck on slow devices would set the step time. Everything is useful
    # again if the useful slots could not hold every expert.
    E = w.shape[1]
    speed = 1.0 / c.mean(0)  # [D]
    fair = np.rint(slots.sum() * speed / speed[slots > 0].sum()).astype(np.int64)  # [D]
    cold = np.cumsum(np.sort(w, 1).mean(0))  # [E] load of the k + 1 coldest experts, a typical layer
    useful = slots.copy()
    pos = 0  # coldest experts spoken for
    for d in np.argsort(-c.mean(0), kind="stable"):  # slowest first
        if slots[d] <= fair[d]:
            continue
        base = cold[pos - 1] if pos else 0.0
        fits = np.searchsorted(cold, base + bound.mean() * speed[d], side="right") - pos
        useful[d] = min(slots[d], max(fair[d], fits))
        pos = min(E, pos + useful[d])
    return useful if useful.sum() >= E else slots


def _replica_counts(w: np.ndarray, R: int, mask, slots: np.ndarray) -> np.ndarray:
    # [L, E] replicas per expert: extra ones go, one at a time, to the most load per replica.
    # An expert gets at most as many replicas as it has devices to go to, while others can take them.
    L, E = w.shape
    rows = np.arange(L)
    usable = slots > 0  # [D]
    limit = (mask & usable).sum(-1) if mask is not None else np.full((L, E), usable.sum())  # [L, E]
    cnt = np.ones((L, E), dtype=np.int64)
    for _ in range(R - E):
        per = w / cnt  # [L, E]
        e = np.where(cnt < limit, per, -1.0 / cnt).argmax(1)  # [L]
        cnt[rows, e] += 1
    return cnt


def _assign(w, counts, c, slots, useful, mask, price) -> np.ndarray:
    # [L, R] phy2log: replicas longest first, each to the device that finishes it earliest.
    # Candidates are devices with a free slot, allowed for the expert and not holding it yet
    # (holding it is accepted only when nothing else is left). Devices past their ``useful`` [D]
    # slots are used only when nothing else is left either. Ties go to the cheaper device.
    # Slots still free at the end take one more replica of the expert with the most load per
    # replica that the device may take; the token split decides how much they get.
    L, E = w.shape
    D = c.shape[1]
    rows = np.arange(L)
    n_items = int(counts[0].sum())
    item_e = np.repeat(np.tile(np.arange(E), L), counts.ravel()).reshape(L, n_items)  # [L, N]
    item_w = np.take_along_axis(w / counts, item_e, 1)  # [L, N]
    pinned = (~mask).any(-1) if mask is not None else np.zeros((L, E), dtype=bool)  # [L, E]
    # Pinned experts' first replicas go first so that their few devices still have room.
    first = np.ones((L, n_items), dtype=bool)
    first[:, 1:] = item_e[:, 1:] != item_e[:, :-1]
    pin_first = first & np.take_along_axis(pinned, item_e, 1)
    order = np.lexsort((-item_w, ~pin_first), axis=1)  # [L, N]
    item_e = np.take_along_axis(item_e, order, 1)
    item_w = np.take_along_axis(item_w, order, 1)

    start = np.concatenate([[0], np.cumsum(slots)[:-1]])  # [D]
    tie = 1.0 + REL_TOL * 1e-3 * np.argsort(np.argsort(price, kind="stable"))  # [D] cheaper wins ties
    free = np.tile(slots, (L, 1))  # [L, D]
    spare = free - useful  # [L, D] slots beyond the useful ones
    time = np.zeros((L, D))
    held = np.zeros((L, E, D), dtype=bool)
    p2l = np.empty((L, int(slots.sum())), dtype=np.int64)

    def put(d, e):
        p2l[rows, start[d] + slots[d] - free[rows, d]] = e
        free[rows, d] -= 1
        held[rows, e, d] = True

    for k in range(n_items):
        e, x = item_e[:, k], item_w[:, k]  # [L]
        finish = time + x[:, None] * c  # [L, D]
        ok = free > 0
        if mask is not None:
            ok &= mask[rows, e]
        if not ok.any(1).all():
            l = int(np.flatnonzero(~ok.any(1))[0])
            raise PlacementError(f"pinned experts of layer {l} need more slots than their allowed devices have; "
                                 f"allow more devices or add slots")
        for better in (free > spare, ~held[rows, e]):
            ok = np.where((ok & better).any(1)[:, None], ok & better, ok)
        score = np.where(ok, finish * tie, np.inf)  # [L, D]
        d = score.argmin(1)
        time[rows, d] = finish[rows, d]
        put(d, e)

    cnt = counts.astype(np.float64)
    for _ in range(p2l.shape[1] - n_items):
        d = free.argmax(1)  # [L]
        ok = mask[rows, :, d] if mask is not None else np.ones((L, E), dtype=bool)  # [L, E]
        if not ok.any(1).all():
            l = int(np.flatnonzero(~ok.any(1))[0])
            raise PlacementError(f"no expert of layer {l} may go on device {d[l]}, yet all its slots must hold one; "
                                 f"give it fewer slots or allow experts there")
        ok = np.where((ok & ~held[rows, :, d]).any(1)[:, None], ok & ~held[rows, :, d], ok)
        e = np.where(ok, w / cnt, -1.0).argmax(1)
        cnt[rows, e] += 1
        put(d, e)
    return p2l


def _eplb_candidates(w, slots, node_of, num_groups: int, mask):
    # phy2log [L, R] of EPLB's (hierarchical, global) policies, None where their constraints
    # fail: equal slots per device, nothing pinned; hierarchical also needs several equal nodes
    # numbered in device order and groups that split over them.
    D, E = len(slots), w.shape[1]
    R = int(slots.sum())
    if mask is not None or (slots != slots[0]).any() or slots[0] == 0:
        return None, None
    glob = eplb_policy(w, R, 1, 1, D, policy="global")[0]
    nodes, first, per = np.unique(node_of, return_index=True, return_counts=True)
    in_order = (per == per[0]).all() and (node_of == np.repeat(node_of[np.sort(first)], per[0])).all()
    if len(nodes) < 2 or not in_order or num_groups % len(nodes) or E % num_groups:
        return None, glob
    return eplb_policy(w, R, num_groups, len(nodes), D, policy="hierarchical")[0], glob


# -- improvement --------------------------------------------------------------------------------

def _improve(p2l, dev, w, c, slots, mask, bound, rounds: int = 4):
    # (phy2log, x, device time) after rounds of swap search, token re-split and slot changes,
    # until none helps or the layer meets its lower bound.
    p2l = p2l.copy()
    devs = np.broadcast_to(dev, p2l.shape)
    x, time = split_tokens(p2l, devs, w, c)
    floor = bound * (1 + 1e-4)  # [L] close enough: stop there
    todo = time.max(1) > floor  # [L]
    for _ in range(rounds):
        if _swap_search(p2l, x, time, dev, c, slots, mask, np.where(todo, floor, np.inf)):
            x, time = split_tokens(p2l, devs, w, c, x0=x)
        layers = np.flatnonzero(time.max(1) > floor)
        if len(layers) == 0:
            break
        gain, move = best_moves(p2l, devs, w, c, mask, np.zeros(p2l.shape, dtype=bool), x, time, layers)
        layers, move = layers[gain > REL_TOL * time[layers].max(1)], move[gain > REL_TOL * time[layers].max(1)]
        if len(layers) == 0:
            break
        p2l[layers, move[:, 0]] = move[:, 1]
        x[layers], time[layers] = split_tokens(p2l[layers], devs[layers], w[layers], c[layers])
        todo = np.zeros_like(todo)
        todo[layers] = True
    return p2l, x, time


def _swap_search(p2l, x, time, dev, c, slots, mask, floor, max_iter: int = 2000) -> bool:
    # Swap slots between a busiest device and any other, tokens riding along, while a swap
    # brings both below that device's time. Devices within 1e-4 of the layer's max count as
    # busiest, tried in turn. Layers at their ``floor`` [L] are left alone. Edits p2l, x, time in
    # place; True if any swap.
    L, R = p2l.shape
    E, D = int(p2l.max()) + 1, c.shape[1]
    kmax = int(slots.max())
    start = np.concatenate([[0], np.cumsum(slots)[:-1]])
    dev_slots = np.minimum(start[:, None] + np.arange(kmax), R - 1)  # [D, K]
    dev_valid = np.arange(kmax) < slots[:, None]  # [D, K]
    held = np.zeros((L, E, D), dtype=np.int64)
    np.add.at(held, (np.broadcast_to(np.arange(L)[:, None], (L, R)), p2l, dev), 1)
    active = np.flatnonzero(time.max(1) > floor)
    stuck = np.zeros((L, D), dtype=bool)  # busiest devices no swap helps, since the last swap
    swapped = False
    for _ in range(max_iter):
        t = time[active]  # [A, D]
        t = np.where(stuck[active] | (t < t.max(1, keepdims=True) * (1 - 1e-4)), -np.inf, t)
        active = active[np.isfinite(t.max(1))]
        if len(active) == 0:
            break
        a = active
        ar = np.arange(len(a))
        t = time[a]
        b = np.where(stuck[a], -np.inf, t).argmax(1)
        tb = t[ar, b]
        s = dev_slots[b]  # [A, K]
        es = p2l[a[:, None], s]
        xs = x[a[:, None], s]
        et, xt = p2l[a], x[a]  # [A, R]
        ca = c[a]
        cb = ca[ar, b]
        new_b = tb[:, None, None] + (xt[:, None, :] - xs[:, :, None]) * cb[:, None, None]  # [A, K, R]
        new_d = t[:, dev][:, None, :] + (xs[:, :, None] - xt[:, None, :]) * ca[:, dev][:, None, :]  # [A, K, R]
        # s's expert must not be on t's device yet, nor t's expert on b.
        ok = (held[a[:, None], es] == 0)[:, :, dev]  # [A, K, R]
        ok &= (dev_valid[b][:, :, None] & (held[a[:, None], et, b[:, None]] == 0)[:, None, :]
               & (dev[None, :] != b[:, None])[:, None, :])
        if mask is not None:
            ok &= mask[a[:, None], es][:, :, dev] & mask[a[:, None], et, b[:, None]][:, None, :]
        val = np.where(ok, np.maximum(new_b, new_d), np.inf).reshape(len(a), -1)
        best = val.argmin(1)
        good = val[ar, best] < tb * (1 - REL_TOL)
        stuck[a[~good], b[~good]] = True
        stuck[a[good]] = False
        if not good.any():
            continue
        swapped = True
        g = ar[good]
        l, k, r = a[good], best[good] // R, best[good] % R
        sl, bd, td = s[g, k], b[good], dev[r]
        e1, e2 = p2l[l, sl], p2l[l, r]
        x1, x2 = x[l, sl], x[l, r]
        time[l, bd] = new_b[g, k, r]
        time[l, td] = new_d[g, k, r]
        p2l[l, sl], p2l[l, r] = e2, e1
        x[l, sl], x[l, r] = x2, x1
        np.add.at(held, (l, e1, bd), -1)
        np.add.at(held, (l, e1, td), 1)
        np.add.at(held, (l, e2, td), -1)
        np.add.at(held, (l, e2, bd), 1)
    return swapped


def best_moves(p2l, dev, w, c, mask, moved, x, time, layers, donors: int = 16):
    # Best single slot change per layer in ``layers``: (gain [n], (slot, expert) [n, 2]).
    # Candidates: one of the ``donors`` slots carrying the fewest tokens x [L, R], not yet
    # ``moved``, whose expert has another replica, takes an expert held on the layer's busiest
    # device (device time [L, D]). All candidates are scored together by their re-split step
    # time.
    E, D = w.shape[1], c.shape[1]
    step = time.max(1)  # [L]
    cand_l, cand_s, cand_e = [], [], []
    for i, l in enumerate(layers):
        row, drow = p2l[l], dev[l]
        hot = np.unique(row[drow == time[l].argmax()])
        spare = np.flatnonzero((np.bincount(row, minlength=E)[row] >= 2) & ~moved[l])
        spare = spare[np.argsort(x[l, spare], kind="stable")[:donors]]
        s_, e_ = np.repeat(spare, len(hot)), np.tile(hot, len(spare))
        keep = ~np.isin(e_ * D + drow[s_], row * D + drow)  # not where that expert already is
        if mask is not None:
            keep &= mask[l, e_, drow[s_]]
        cand_l.append(np.full(keep.sum(), i))
        cand_s.append(s_[keep])
        cand_e.append(e_[keep])
    i_, s_, e_ = (np.concatenate(v).astype(np.int64) for v in (cand_l, cand_s, cand_e))
    gains = np.full(len(layers), -np.inf)
    moves = np.zeros((len(layers), 2), dtype=np.int64)
    if len(i_) == 0:
        return gains, moves
    rows, C = layers[i_], np.arange(len(i_))
    cand = p2l[rows].copy()  # [C, R]
    # Warm start: the moved slot's tokens go to another replica of its old expert.
    x0 = x[rows].copy()  # [C, R]
    other = ((cand == cand[C, s_][:, None]) & (np.arange(cand.shape[1]) != s_[:, None])).argmax(1)  # [C]
    x0[C, other] += x0[C, s_]
    x0[C, s_] = 0.0
    cand[C, s_] = e_
    after = split_tokens(cand, dev[rows], w[rows], c[rows], x0=x0)[1].max(1)  # [C]
    best = np.full(len(layers), np.inf)
    np.minimum.at(best, i_, after)
    pick = np.flatnonzero(after == best[i_])
    pick = pick[np.unique(i_[pick], return_index=True)[1]]  # first best candidate per layer
    gains[i_[pick]] = step[rows[pick]] - after[pick]
    moves[i_[pick]] = np.stack([s_[pick], e_[pick]], 1)
    return gains, moves


# -- results ------------------------------------------------------------------------------------

def _better(a, b, price):
    # Per layer, the better of two (phy2log, x, device time): step time, then dollars, then
    # fewer replicas carrying tokens.
    (pa, xa, ta), (pb, xb, tb) = a, b
    sa, sb = ta.max(1), tb.max(1)
    da, db = ta @ price, tb @ price
    ra, rb = (xa > 0).sum(1), (xb > 0).sum(1)
    tie = np.abs(sa - sb) <= REL_TOL * np.maximum(sa, sb)
    dtie = np.abs(da - db) <= REL_TOL * np.maximum(da, db)
    take_b = np.where(tie, np.where(dtie, rb < ra, db < da), sb < sa)[:, None]
    return np.where(take_b, pb, pa), np.where(take_b, xb, xa), np.where(take_b, tb, ta)


def finish_placement(p2l, dev, x, w_plan, w, c, bound) -> Placement:
    # Placement from tokens per slot x planned on w_plan, reported on the true load w (layers
    # with no load at all get a zero bound).
    L, R = p2l.shape
    rows = np.arange(L)[:, None]
    devs = np.broadcast_to(dev, (L, R))
    total = row_sum(p2l, x, w.shape[1])  # [L, E]
    cnt = row_sum(p2l, 1.0, w.shape[1])  # [L, E]
    share = np.where(total[rows, p2l] > 0, x / np.where(total[rows, p2l] > 0, total[rows, p2l], 1.0),
                     1.0 / cnt[rows, p2l])  # [L, R]
    time = row_sum(devs, w[rows, p2l] * share * c[rows, devs], c.shape[1])  # [L, D]
    return Placement(phy2log=p2l.copy(), device_of=devs.copy(), share=share, device_time=time,
                     step_time=time.max(1), lower_bound=np.where(w.any(1), bound, 0.0))
