"""Moves a running deployment can afford: the expert copies that lower modeled step time most per byte, in a budget.

A live deployment (hetrun.runtime.rebalancer) re-plans while it serves. Token shares are routing and change for
free; every (layer, expert, device) copy a device gains costs that expert's bytes at the device's precision. Within
a byte budget, `budgeted_moves` takes, round after round and across all layers at once, the best move of each
layer whose gain per byte is near the best of the round:
  - retarget: a slot whose expert has another replica takes a replica of an expert of the layer's busiest device
    (the tokens of its old expert go to that expert's other replica; the hot expert's split between its two
    devices is the water level of the two);
  - swap: an expert of the busiest device and an expert of another device trade places (tokens ride along).
Candidates are scored with a local model of the few devices a move touches (cheap, vectorised over layers); each
accepted move is then checked with the exact token split (hetrun.placement.shares) and undone unless the layer's
step time fell. Layers are never made slower; copies the running plan already has cost nothing.

`hetrun.placement.rebalance.rebalance_plan` searches the same retargets but scores each of up to ~400 candidates
of a move with the exact split: near the same step time for a given byte count, at about 0.2 s per move at
DeepSeek-R1 scale (1,000 moves: minutes) where this takes seconds (see `hetrun bench rebalance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrun.errors import PlacementError
from hetrun.placement.bounds import layer_bounds
from hetrun.placement.checks import effective_cost
from hetrun.placement.device_model import plan_figures, scale_load, shared_aware_cost
from hetrun.placement.loads import check_model_load, load_matrix, read_load
from hetrun.placement.pins import pin_mask, pin_rules
from hetrun.placement.plan import Plan
from hetrun.placement.rebalance import plan_cost_model
from hetrun.placement.search import finish_placement
from hetrun.placement.shares import row_sum, split_tokens

HOT = 4  # hottest slots of the busiest device a move may relieve
DONORS = 16  # coldest spare replicas a retarget may take
SMALL_BUDGET_MOVES = 32  # below this many of the largest expert copies, also search by gain alone
SHORTLIST = 4  # candidates per layer and round checked with the exact token split ...
WIDE = 32  # ... and, for a layer where none of those helps, before it counts as done
REL_TOL = 1e-9


@dataclass(frozen=True)
class Move:
    """One expert copy a device gains: `expert` of MoE layer `layer` onto device index `device`, in the slot that
    held `replaces` (-1: the slot held nothing new); `source` is a device that held the expert before (-1: none)."""

    layer: int
    expert: int
    device: int
    source: int
    replaces: int
    bytes: int

    def to_dict(self, device_ids: tuple[str, ...]) -> dict:
        return {"layer": self.layer, "expert": self.expert, "to": device_ids[self.device],
                "from": device_ids[self.source] if self.source >= 0 else None, "replaces": self.replaces,
                "bytes": self.bytes}


@dataclass(frozen=True)
class MovePlan:
    """A rebalanced plan, the copies it adds, and its modeled step time under the load it was made for."""

    plan: Plan
    moves: tuple[Move, ...]
    bytes: int
    before_s: float  # the old plan as it runs (its own token shares)
    shares_s: float  # the old placement with token shares re-split (free)
    after_s: float  # the new plan

    @property
    def gain(self) -> float:
        """Predicted relative gain of the new plan over the old one as it runs: (before - after) / before."""
        return (self.before_s - self.after_s) / self.before_s if self.before_s > 0 else 0.0


def budgeted_moves(plan: Plan, load, max_bytes: float, profile=None, *, min_gain_s_per_byte: float = 0.0,
                   max_rounds: int = 10_000, placeable: "np.ndarray | None" = None) -> MovePlan:
    """`plan` adapted to `load` [L, E]: shares re-split, then moves within `max_bytes` (see the module docstring).

    A move must save at least `min_gain_s_per_byte` seconds of modeled step time per byte it copies (0: any gain).
    Plans from `plan()` carry their cost model; others need `profile`. Pins recorded in the plan still hold, and
    `placeable` [L, E, D] (None: everywhere) says where a copy can be made at all (a bundle holds some graphs only).
    """
    if not np.isfinite(max_bytes) or max_bytes < 0:
        raise PlacementError(f"max_bytes must be a finite number of bytes >= 0, got {max_bytes!r}")
    model = plan_cost_model(plan, profile)
    spec = plan.spec
    true_w = scale_load(check_model_load(read_load(load), spec, "new load table"), spec, model.step_tokens)  # [L, E]
    w = load_matrix(true_w)
    L, E, D = plan.num_layers, spec.num_experts, len(plan.device_ids)
    rules = pin_rules(plan.predicted.get("pins"))
    allowed = pin_mask(rules, list(zip(model.device_ids, model.groups)), w)  # [L, E, D] or None
    if placeable is not None:
        placeable = np.broadcast_to(np.asarray(placeable, dtype=bool), (L, E, D))
        allowed = placeable if allowed is None else allowed & placeable
    shared_cnt = row_sum(plan.shared_device_of, 1.0, D) if plan.shared_device_of.size else np.zeros((L, D))
    c = shared_aware_cost(spec, model, w, shared_cnt)  # [L, D] seconds per routed token, traffic included
    order = np.argsort(plan.device_of, axis=1, kind="stable")  # slots device by device
    p2l = np.take_along_axis(plan.phy2log, order, 1)
    dev = np.take_along_axis(plan.device_of, order, 1)
    rows = np.arange(L)[:, None]
    before = _figures(plan, model, plan.phy2log, plan.device_of, plan.share, true_w, rules)["step_time_s"]

    layouts, block = np.unique(dev, axis=0, return_inverse=True)
    block = block.reshape(-1)
    # Greedy by gain per byte is near the best a budget buys when it holds many moves; for a few, the best by
    # gain alone can do better (a knapsack's two greedy bounds): search both then, keep the faster plan.
    few = max_bytes < SMALL_BUDGET_MOVES * float(np.max(model.expert_bytes))
    searches = []
    for per_byte in ((True, False) if few else (True,)):
        search = _Search(w, c, model.expert_bytes, allowed, max_bytes, min_gain_s_per_byte, per_byte)
        for b, layout in enumerate(layouts):
            search.add(np.flatnonzero(block == b), p2l[block == b], layout)
        search.run(max_rounds)
        searches.append(search)
    shares = finish_placement(p2l, dev, searches[0].initial_x, w, true_w, effective_cost(c, None, L), np.zeros(L))
    shares_s = _figures(plan, model, p2l, dev, shares.share, true_w, rules)["step_time_s"]
    search = min(searches, key=lambda s: sum(float(part.time.max(1).sum()) for part in s.parts))
    new_p2l, x = p2l.copy(), np.zeros(p2l.shape)
    for part in search.parts:
        new_p2l[part.layers], x[part.layers] = part.p2l, part.x
    bound = layer_bounds(w, c, np.bincount(dev[0], minlength=D))
    placed = finish_placement(new_p2l, dev, x, w, true_w, effective_cost(c, None, L), bound)
    predicted = _figures(plan, model, new_p2l, dev, placed.share, true_w, rules)
    held = np.zeros((L, E, D), dtype=bool)
    held[np.broadcast_to(rows, p2l.shape), p2l, dev] = True
    moves = []
    for l, r in zip(*np.nonzero(new_p2l != p2l)):
        e, d = int(new_p2l[l, r]), int(dev[l, r])
        if held[l, e, d]:
            continue  # a second slot of a copy the device already has, or gained twice
        held[l, e, d] = True
        src = np.flatnonzero(p2l[l] == e)
        moves.append(Move(int(l), e, d, int(dev[l, src[0]]) if len(src) else -1, int(p2l[l, r]),
                          int(model.expert_bytes[d])))
    moved = int(sum(m.bytes for m in moves))
    predicted["rebalanced"] = {"max_bytes": float(max_bytes), "bytes_moved": moved, "moves": len(moves)}
    new = Plan(spec, plan.profile_name, plan.device_ids, dict(plan.precision), new_p2l, dev, placed.share,
               plan.shared_device_of.copy(), predicted)
    return MovePlan(new, tuple(moves), moved, float(before), float(shares_s), float(predicted["step_time_s"]))


def _figures(plan: Plan, model, p2l, dev, share, w, rules) -> dict:
    p = plan.predicted
    return plan_figures(plan.spec, model, p2l, dev, share, plan.shared_device_of, w, rules, p.get("policy", "auto"),
                        p.get("shared_experts", "given"), p.get("load", "table"))


@dataclass
class _Part:
    """Layers with one slot layout: their maps, token splits and device times, searched together."""

    layers: np.ndarray  # [Lb] indices into the plan's layers
    p2l: np.ndarray  # [Lb, R]
    dev: np.ndarray  # [R] device of each slot, ascending
    x: np.ndarray  # [Lb, R] tokens per slot
    time: np.ndarray  # [Lb, D] device time
    orig: np.ndarray  # [Lb, E, D] copies the running plan has
    held: np.ndarray  # [Lb, E, D] slots of each expert on each device now
    done: np.ndarray  # [Lb] layers where no candidate helped (nothing else changes them)
    best: dict  # layer row -> (gain per byte, map [R], token split [R], device times [D], bytes) of its best move


class _Search:
    """The greedy move search over every layer (see the module docstring)."""

    def __init__(self, w, c, expert_bytes, allowed, max_bytes, min_ratio, per_byte: bool = True):
        self.w, self.c, self.eb, self.allowed = w, c, np.asarray(expert_bytes, dtype=np.float64), allowed
        self.left, self.min_ratio = float(max_bytes), float(min_ratio)
        self.per_byte = per_byte  # rank moves by gain per byte (else by gain: a budget of a few moves)
        self.parts: list[_Part] = []
        self.initial_x: np.ndarray | None = None  # [L, R] token split before any move (shares alone)

    def add(self, layers: np.ndarray, p2l: np.ndarray, dev: np.ndarray) -> None:
        E, D = self.w.shape[1], self.c.shape[1]
        Lb, R = p2l.shape
        devs = np.broadcast_to(dev, p2l.shape)
        x, time = split_tokens(p2l, devs, self.w[layers], self.c[layers])
        if self.initial_x is None:
            self.initial_x = np.zeros((len(self.w), R))
        self.initial_x[layers] = x
        held = np.zeros((Lb, E, D), dtype=np.int64)
        np.add.at(held, (np.broadcast_to(np.arange(Lb)[:, None], (Lb, R)), p2l, devs), 1)
        self.parts.append(_Part(layers, p2l.copy(), dev, x, time, held > 0, held, np.zeros(Lb, dtype=bool), {}))


    def run(self, max_rounds: int) -> None:
        for _ in range(max_rounds):
            for part in self.parts:
                self._refresh(part)
            offers = sorted(((v[0], v[4], part, r) for part in self.parts for r, v in part.best.items()),
                            key=lambda o: -o[0])
            # The best offers per byte go, one per layer, while they take at most half the budget left (at least
            # one): with plenty left every layer moves, near the end only the best.
            cap, spent, n = 0.5 * self.left, 0.0, 0
            for _, cost, part, r in offers:
                if n and spent + cost > cap:
                    break
                if cost <= self.left:
                    spent += cost
                    n += self._apply(part, r)
            if not n:
                return

    def _refresh(self, part: _Part) -> None:
        """Find the best exact move of every open layer that has none on record (or one the budget no longer pays)."""
        for r in [r for r, v in part.best.items() if v[4] > self.left]:
            del part.best[r]
        todo = np.array([r for r in np.flatnonzero(~part.done).tolist() if r not in part.best], dtype=np.int64)
        for size in (SHORTLIST, WIDE):
            if len(todo) == 0:
                return
            found = self._exact(part, todo, size)
            todo = np.setdiff1d(todo, np.fromiter(found, np.int64, len(found)))
        part.done[todo] = True

    def _exact(self, part: _Part, todo: np.ndarray, size: int) -> set[int]:
        """Check the `size` best-looking candidates of each layer in `todo` with the exact split; record each
        layer's best that helps; returns those layers."""
        rows, cand, x0, cost = self._shortlist(part, todo, size)
        found: set[int] = set()
        if len(rows) == 0:
            return found
        lay = part.layers[rows]
        x, t = split_tokens(cand, np.broadcast_to(part.dev, cand.shape), self.w[lay], self.c[lay], x0=x0)
        T = part.time[rows].max(1)
        gain = T - t.max(1)
        per_byte = gain / np.maximum(cost, 1.0)
        ok = (gain > REL_TOL * T) & ((cost == 0) | (per_byte > self.min_ratio))
        ratio = per_byte if self.per_byte else gain
        for i in np.flatnonzero(ok)[np.argsort(-ratio[ok], kind="stable")].tolist():
            r = int(rows[i])
            if r not in found:
                found.add(r)
                part.best[r] = (float(ratio[i]), cand[i], x[i], t[i], float(cost[i]))
        return found

    # ---- candidates: a shortlist per layer, by what they do to the devices they touch ----------------------
    def _shortlist(self, part: _Part, open_: np.ndarray, size: int):
        """(layer rows [C], candidate maps [C, R], warm-start token splits [C, R], bytes [C]): per open layer the
        `size` moves that relieve its busiest device most per byte on the devices they touch."""
        E = self.w.shape[1]
        dev = part.dev
        p2l, x, t = part.p2l[open_], part.x[open_], part.time[open_]
        A, R = p2l.shape
        c = self.c[part.layers[open_]]  # [A, D]
        eb, held, orig = self.eb, part.held[open_], part.orig[open_]
        ar = np.arange(A)
        rows = ar[:, None]
        b = t.argmax(1)  # [A] busiest device
        T = t[ar, b]
        cb = c[ar, b]
        onb = dev[None, :] == b[:, None]  # [A, R]
        hot = np.argsort(-np.where(onb & (x > 0), x, -1.0), 1)[:, :HOT]  # [A, H] hottest slots on b
        hot_ok = np.take_along_axis(onb & (x > 0), hot, 1)
        eh, xh = np.take_along_axis(p2l, hot, 1), np.take_along_axis(x, hot, 1)  # [A, H]
        cnt = row_sum(p2l, 1.0, E)  # [A, E] replicas

        # Retarget: spare slot s (its expert has another replica, off b) takes hot expert h; s's tokens go to the
        # replica of its expert on the least busy device, h's split between b and s's device to a common level.
        spare = (cnt[rows, p2l] >= 2) & ~onb  # [A, R]
        don = np.argsort(np.where(spare, x, np.inf), 1)[:, :DONORS]  # [A, K]
        don_ok = np.take_along_axis(spare, don, 1)
        es, xs, ds = np.take_along_axis(p2l, don, 1), np.take_along_axis(x, don, 1), dev[don]  # [A, K]
        same = (p2l[:, None, :] == es[:, :, None]) & (np.arange(R)[None, None, :] != don[:, :, None])  # [A, K, R]
        alt_slot = np.where(same, t[rows[:, :, None], dev[None, None, :]], np.inf).argmin(2)  # [A, K]
        alt = dev[alt_slot]
        cd = c[rows, ds]
        td = t[rows, ds] - np.where(alt == ds, 0.0, xs * cd)  # [A, K]
        talt = np.where((alt == ds) | (alt == b[:, None]), 0.0, t[rows, alt] + xs * c[rows, alt])
        tb = T[:, None] + np.where(alt == b[:, None], xs * cb[:, None], 0.0)
        y = np.clip((tb[:, None, :] - td[:, None, :]) / (cb[:, None, None] + cd[:, None, :]), 0.0, xh[:, :, None])
        touched = np.maximum(np.maximum(tb[:, None, :] - y * cb[:, None, None], td[:, None, :] + y * cd[:, None, :]),
                             talt[:, None, :])  # [A, H, K]
        valid = hot_ok[:, :, None] & don_ok[:, None, :] & (held[rows[:, :, None], eh[:, :, None], ds[:, None, :]] == 0)
        if self.allowed is not None:
            valid &= self.allowed[part.layers[open_][:, None, None], eh[:, :, None], ds[:, None, :]]
        cost_r = np.where(orig[rows[:, :, None], eh[:, :, None], ds[:, None, :]], 0.0, eb[ds][:, None, :])
        per = (lambda cost: np.maximum(cost, 1.0)) if self.per_byte else (lambda cost: 1.0)
        score_r = np.where(valid & (cost_r <= self.left), (T[:, None, None] - touched) / per(cost_r), -np.inf)

        # Swap: hot slot i on b trades places with slot z on another device, tokens riding along.
        dz = np.broadcast_to(dev, (A, R))
        cz = c[rows, dz]
        new_b = T[:, None, None] + (x[:, None, :] - xh[:, :, None]) * cb[:, None, None]  # [A, H, R]
        new_d = t[rows, dz][:, None, :] + (xh[:, :, None] - x[:, None, :]) * cz[:, None, :]
        valid = (hot_ok[:, :, None] & ~onb[:, None, :] & (eh[:, :, None] != p2l[:, None, :])
                 & (held[rows[:, :, None], eh[:, :, None], dz[:, None, :]] == 0)
                 & (held[rows, p2l, b[:, None]] == 0)[:, None, :])
        if self.allowed is not None:
            lay = part.layers[open_]
            valid &= (self.allowed[lay[:, None, None], eh[:, :, None], dz[:, None, :]]
                      & self.allowed[lay[:, None], p2l, b[:, None]][:, None, :])
        cost_s = (np.where(orig[rows[:, :, None], eh[:, :, None], dz[:, None, :]], 0.0, eb[dz][:, None, :])
                  + np.where(orig[rows, p2l, b[:, None]], 0.0, eb[b][:, None])[:, None, :])
        score_s = np.where(valid & (cost_s <= self.left), (T[:, None, None] - np.maximum(new_b, new_d)) / per(cost_s),
                           -np.inf)

        # The `size` best of both kinds per layer, as candidate maps with warm-start splits.
        H, K = score_r.shape[1], score_r.shape[2]
        score = np.concatenate([score_r.reshape(A, -1), score_s.reshape(A, -1)], 1)  # [A, H*K + H*R]
        cost = np.concatenate([cost_r.reshape(A, -1), cost_s.reshape(A, -1)], 1)
        top = np.argsort(-score, 1)[:, :size]  # [A, S]
        keep = np.take_along_axis(score, top, 1) > 0
        a_idx, j = np.nonzero(keep)
        flat = top[a_idx, j]
        cand = p2l[a_idx].copy()
        x0 = x[a_idx].copy()
        C = np.arange(len(a_idx))
        retarget = flat < H * K
        h, k = np.divmod(np.where(retarget, flat, 0), K)
        hs, s2 = hot[a_idx, h], don[a_idx, k]
        alt_s = alt_slot[a_idx, k]
        cand[C[retarget], s2[retarget]] = cand[C[retarget], hs[retarget]]
        x0[C[retarget], alt_s[retarget]] += x0[C[retarget], s2[retarget]]
        x0[C[retarget], s2[retarget]] = 0.0
        h2, z = np.divmod(np.where(retarget, 0, flat - H * K), R)
        i1, i2 = hot[a_idx, h2][~retarget], z[~retarget]
        cs = C[~retarget]
        cand[cs, i1], cand[cs, i2] = p2l[a_idx[~retarget], i2], p2l[a_idx[~retarget], i1]
        x0[cs, i1], x0[cs, i2] = x[a_idx[~retarget], i2], x[a_idx[~retarget], i1]
        return open_[a_idx], cand, x0, cost[a_idx, flat]

    # ---- applying a round's moves ---------------------------------------------------------------------------
    def _apply(self, part: _Part, r: int) -> int:
        """Make layer row r's best move; its next best is found in the next round."""
        _, new, x, t, cost = part.best.pop(r)
        old = part.p2l[r]
        changed = np.flatnonzero(new != old)
        self.left -= cost
        np.add.at(part.held[r], (old[changed], part.dev[changed]), -1)
        np.add.at(part.held[r], (new[changed], part.dev[changed]), 1)
        part.p2l[r], part.x[r], part.time[r] = new, x, t
        return 1
