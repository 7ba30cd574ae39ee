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
from hetrun.placement.eplb import check_load, eplb_policy

_REL = 1e-9  # relative tolerance when comparing step times


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
    w = check_load(load)  # [L, E]
    L, E = w.shape
    c = _effective_cost(cost, comm_cost, L)  # [L, D]
    D = c.shape[1]
    if (slots is None) == (max_slots is None or num_replicas is None):
        raise PlacementError("give either slots per device, or max_slots and num_replicas to choose them")
    if slots is None:
        slots = choose_slots(c, max_slots, num_replicas, w)
    slots = _check_slots(slots, D, E)
    price = _vector(price, D, "price", 0.0)
    node_of = _vector(node_of, D, "node_of", 0).astype(np.int64)
    mask = _check_allowed(allowed, L, E, D, slots)
    dev = np.repeat(np.arange(D), slots)  # [R]

    bound = _bound(w, c, slots)  # [L]
    useful = _useful_slots(slots, w, c, bound)  # [D]
    counts = _replica_counts(w, int(useful.sum()), mask, slots)  # [L, E]
    p2l = _assign(w, counts, c, slots, useful, mask, price)  # [L, R]
    devs = np.broadcast_to(dev, (L, len(dev)))
    hier, glob = (None if p is None else (p, *_split(p, devs, w, c))
                  for p in _eplb_candidates(w, slots, node_of, num_groups, mask))
    best = _improve(p2l, dev, w, c, slots, mask, bound)
    if hier is not None:  # first in line, so that group locality wins full ties
        best = _better(hier, best, price)
    if glob is not None:
        best = _better(best, glob, price)
    return _finish(best[0], dev, best[1], w, check_load(load, uniform_zero_rows=False), c, bound)


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
    w = check_load(load, uniform_zero_rows=False)  # [L, E]
    L, E = w.shape
    c = _effective_cost(cost, comm_cost, L)  # [L, D]
    slots = _check_slots(slots, c.shape[1], E)
    return _bound(w, c, slots)


def evaluate_placement(phy2log, device_of, load, cost, comm_cost=None) -> Placement:
    """The ``Placement`` of a given expert-to-slot map, with each expert's tokens split
    optimally across its replicas (device_of [L, R] or [R])."""
    w = check_load(load, uniform_zero_rows=False)  # [L, E]
    L, E = w.shape
    c = _effective_cost(cost, comm_cost, L)  # [L, D]
    p2l, dev = _check_map(phy2log, device_of, L, E, c.shape[1])
    slots = np.bincount(dev[0], minlength=c.shape[1])
    w_plan = check_load(w)
    x, _ = _split(p2l, dev, w_plan, c)
    return _finish(p2l, dev, x, w_plan, w, c, _bound(w_plan, c, slots))


def rebalance(placement: Placement, new_load, cost, *, max_moves: int, comm_cost=None,
              allowed=None) -> tuple[Placement, np.ndarray]:
    """Adapt ``placement`` to ``new_load`` by changing the expert of at most ``max_moves`` slots.

    Token shares are re-optimised for free (they are routing, not weights). Then, one move at a
    time and across all layers, the slot change that lowers a layer's step time most is taken:
    a slot whose expert has another replica takes a replica of an expert of that layer's busiest
    device. Stops early when no move helps, so step time never rises.

    Returns the new ``Placement`` and the moved slots as [M, 2] (layer, slot) pairs, M <= max_moves.
    """
    w = check_load(new_load)  # [L, E]
    L, E = w.shape
    c = _effective_cost(cost, comm_cost, L)  # [L, D]
    D = c.shape[1]
    p2l, dev = _check_map(placement.phy2log, placement.device_of, L, E, D)
    slots = np.bincount(dev[0], minlength=D)
    mask = _check_allowed(allowed, L, E, D, slots)
    if max_moves < 0:
        raise PlacementError("max_moves must be >= 0")
    p2l = p2l.copy()
    x, time = _split(p2l, dev, w, c)
    moved = np.zeros(p2l.shape, dtype=bool)  # [L, R]
    gain = move = None
    for _ in range(max_moves):
        if gain is None:
            gain, move = _best_moves(p2l, dev, w, c, mask, moved, x, time, np.arange(L))  # [L], [L, 2]
        l = int(gain.argmax())
        if gain[l] <= 1e-6 * time[l].max():
            break
        s, e = move[l]
        p2l[l, s], moved[l, s] = e, True
        x_l, time_l = _split(p2l[l:l + 1], dev[l:l + 1], w[l:l + 1], c[l:l + 1])
        x[l], time[l] = x_l[0], time_l[0]
        g, m = _best_moves(p2l, dev, w, c, mask, moved, x, time, np.array([l]))
        gain[l], move[l] = g[0], m[0]
    out = _finish(p2l, dev, x, w, check_load(new_load, uniform_zero_rows=False), c, _bound(w, c, slots))
    return out, np.argwhere(moved)


# -- validation ---------------------------------------------------------------------------------

def _effective_cost(cost, comm_cost, L: int) -> np.ndarray:
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim == 1:
        c = np.broadcast_to(c, (L, c.shape[0]))
    if c.ndim != 2 or c.shape[0] != L or c.shape[1] == 0:
        raise PlacementError(f"cost must have shape [devices] or [{L}, devices], got {np.shape(cost)}")
    if not np.isfinite(c).all() or (c <= 0).any():
        raise PlacementError("cost must be positive finite seconds per token on every device")
    comm = _vector(comm_cost, c.shape[1], "comm_cost", 0.0)
    return c + comm  # [L, D]


def _vector(v, D: int, name: str, default) -> np.ndarray:
    if v is None:
        return np.full(D, default, dtype=np.float64)
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (D,) or not np.isfinite(a).all() or (a < 0).any():
        raise PlacementError(f"{name} must be {D} finite numbers >= 0, one per device; got shape {a.shape}")
    return a


def _check_slots(slots, D: int, E: int) -> np.ndarray:
    s = np.asarray(slots)
    if s.shape != (D,) or (s < 0).any() or (s != np.floor(s)).any():
        raise PlacementError(f"slots must be {D} whole numbers >= 0, one per device; got {s.tolist()}")
    s = s.astype(np.int64)
    if s.sum() < E:
        raise PlacementError(f"{s.sum()} slots for {E} experts; give at least one slot per expert")
    return s


def _check_allowed(allowed, L: int, E: int, D: int, slots: np.ndarray):
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


def _check_map(phy2log, device_of, L: int, E: int, D: int):
    p2l = np.asarray(phy2log, dtype=np.int64)
    dev = np.broadcast_to(np.asarray(device_of, dtype=np.int64), p2l.shape)
    if p2l.ndim != 2 or p2l.shape[0] != L or (p2l < 0).any() or (p2l >= E).any():
        raise PlacementError(f"phy2log must be [{L}, R] with experts in 0..{E - 1}")
    if (dev < 0).any() or (dev >= D).any() or (dev != dev[:1]).any():
        raise PlacementError(f"device_of must name devices 0..{D - 1}, the same slots in every layer")
    if (np.bincount(p2l.ravel() + E * np.repeat(np.arange(L), p2l.shape[1]), minlength=L * E) == 0).any():
        raise PlacementError("phy2log leaves some expert without a slot; every expert needs one")
    return p2l, dev


# -- construction -------------------------------------------------------------------------------

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
    tie = 1.0 + _REL * 1e-3 * np.argsort(np.argsort(price, kind="stable"))  # [D] cheaper wins ties
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


# -- token split --------------------------------------------------------------------------------

def _split(p2l: np.ndarray, dev: np.ndarray, w: np.ndarray, c: np.ndarray, x0=None, sweeps: int = 200):
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
    cnt = _row_sum(p2l, 1.0, E)  # [L, E] replicas
    even = w[rows, p2l] / cnt[rows, p2l] if x0 is None else x0  # [L, R]
    # One carrier slot per (expert, device) pair takes the tokens of its duplicates.
    key = p2l * D + dev  # [L, R]
    order = np.argsort(key, axis=1, kind="stable")  # [L, R]
    ks = key[rows, order]
    carrier = np.ones((L, R), dtype=bool)
    carrier[:, 1:] = ks[:, 1:] != ks[:, :-1]
    pair = np.cumsum(carrier, 1) - 1  # [L, R] (expert, device) pair of each sorted slot
    pair_x = _row_sum(pair, even[rows, order], R)  # [L, R] tokens per (expert, device) pair
    x = np.zeros((L, R + 1))  # last column: a dummy slot for padding
    x[rows, order] = np.where(carrier, pair_x[rows, pair], 0.0)
    time = _row_sum(dev, even * c[rows, dev], D + 1)  # [L, D + 1] last column: a dummy device

    e_sorted = ks // D  # [L, R]
    ndev = _row_sum(e_sorted, carrier, E).astype(np.int64)  # [L, E] devices per expert
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


# -- improvement --------------------------------------------------------------------------------

def _improve(p2l, dev, w, c, slots, mask, bound, rounds: int = 4):
    # (phy2log, x, device time) after rounds of swap search, token re-split and slot changes,
    # until none helps or the layer meets its lower bound.
    p2l = p2l.copy()
    devs = np.broadcast_to(dev, p2l.shape)
    x, time = _split(p2l, devs, w, c)
    floor = bound * (1 + 1e-4)  # [L] close enough: stop there
    todo = time.max(1) > floor  # [L]
    for _ in range(rounds):
        if _swap_search(p2l, x, time, dev, c, slots, mask, np.where(todo, floor, np.inf)):
            x, time = _split(p2l, devs, w, c, x0=x)
        layers = np.flatnonzero(time.max(1) > floor)
        if len(layers) == 0:
            break
        gain, move = _best_moves(p2l, devs, w, c, mask, np.zeros(p2l.shape, dtype=bool), x, time, layers)
        layers, move = layers[gain > _REL * time[layers].max(1)], move[gain > _REL * time[layers].max(1)]
        if len(layers) == 0:
            break
        p2l[layers, move[:, 0]] = move[:, 1]
        x[layers], time[layers] = _split(p2l[layers], devs[layers], w[layers], c[layers])
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
        good = val[ar, best] < tb * (1 - _REL)
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


def _best_moves(p2l, dev, w, c, mask, moved, x, time, layers, donors: int = 16):
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
    after = _split(cand, dev[rows], w[rows], c[rows], x0=x0)[1].max(1)  # [C]
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
    tie = np.abs(sa - sb) <= _REL * np.maximum(sa, sb)
    dtie = np.abs(da - db) <= _REL * np.maximum(da, db)
    take_b = np.where(tie, np.where(dtie, rb < ra, db < da), sb < sa)[:, None]
    return np.where(take_b, pb, pa), np.where(take_b, xb, xa), np.where(take_b, tb, ta)


def _finish(p2l, dev, x, w_plan, w, c, bound) -> Placement:
    # Placement from tokens per slot x planned on w_plan, reported on the true load w (layers
    # with no load at all get a zero bound).
    L, R = p2l.shape
    rows = np.arange(L)[:, None]
    devs = np.broadcast_to(dev, (L, R))
    total = _row_sum(p2l, x, w.shape[1])  # [L, E]
    cnt = _row_sum(p2l, 1.0, w.shape[1])  # [L, E]
    share = np.where(total[rows, p2l] > 0, x / np.where(total[rows, p2l] > 0, total[rows, p2l], 1.0),
                     1.0 / cnt[rows, p2l])  # [L, R]
    time = _row_sum(devs, w[rows, p2l] * share * c[rows, devs], c.shape[1])  # [L, D]
    return Placement(phy2log=p2l.copy(), device_of=devs.copy(), share=share, device_time=time,
                     step_time=time.max(1), lower_bound=np.where(w.any(1), bound, 0.0))


def _row_sum(idx: np.ndarray, values, width: int) -> np.ndarray:
    # [L, width] sums of values [L, n] (or a scalar) into columns idx [L, n], row by row.
    L = idx.shape[0]
    flat = (idx + width * np.arange(L)[:, None]).ravel()
    v = np.broadcast_to(np.asarray(values, dtype=np.float64), idx.shape).ravel()
    return np.bincount(flat, weights=v, minlength=L * width).reshape(L, width)


def _bound(w: np.ndarray, c: np.ndarray, slots: np.ndarray) -> np.ndarray:
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
