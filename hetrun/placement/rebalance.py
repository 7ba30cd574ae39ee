"""Moving experts when the load changes: the slot-change search on a Placement, and its application to a Plan.

Token shares are routing, not weights, so they are re-split for free; moving an expert costs its bytes. Both
functions take one slot change at a time, the one that lowers a layer's modeled step time most, and never raise
it. `rebalance` works on the solver's Placement (costs given), `rebalance_plan` on a Plan with its own cost model.
"""

from __future__ import annotations

import numpy as np

from hetrun.errors import PlacementError
from hetrun.placement.bounds import layer_bounds
from hetrun.placement.checks import check_allowed, check_map, effective_cost
from hetrun.placement.device_model import (
    DeviceModel,
    device_model,
    plan_figures,
    scale_load,
    shared_aware_cost,
    step_tokens_of,
)
from hetrun.placement.loads import check_model_load, load_matrix, read_load
from hetrun.placement.pins import pin_mask, pin_rules
from hetrun.placement.plan import Plan
from hetrun.placement.search import Placement, best_moves, evaluate_placement, finish_placement
from hetrun.placement.shares import split_tokens
from hetrun.profile import Profile, load_profile


def rebalance(placement: Placement, new_load, cost, *, max_moves: int, comm_cost=None,
              allowed=None) -> tuple[Placement, np.ndarray]:
    """Adapt ``placement`` to ``new_load`` by changing the expert of at most ``max_moves`` slots.

    Token shares are re-optimised for free (they are routing, not weights). Then, one move at a
    time and across all layers, the slot change that lowers a layer's step time most is taken:
    a slot whose expert has another replica takes a replica of an expert of that layer's busiest
    device. Stops early when no move helps, so step time never rises.

    Returns the new ``Placement`` and the moved slots as [M, 2] (layer, slot) pairs, M <= max_moves.
    """
    w = load_matrix(new_load)  # [L, E]
    L, E = w.shape
    c = effective_cost(cost, comm_cost, L)  # [L, D]
    D = c.shape[1]
    p2l, dev = check_map(placement.phy2log, placement.device_of, L, E, D)
    slots = np.bincount(dev[0], minlength=D)
    mask = check_allowed(allowed, L, E, D, slots)
    if max_moves < 0:
        raise PlacementError("max_moves must be >= 0")
    p2l = p2l.copy()
    x, time = split_tokens(p2l, dev, w, c)
    moved = np.zeros(p2l.shape, dtype=bool)  # [L, R]
    gain = move = None
    for _ in range(max_moves):
        if gain is None:
            gain, move = best_moves(p2l, dev, w, c, mask, moved, x, time, np.arange(L))  # [L], [L, 2]
        l = int(gain.argmax())
        if gain[l] <= 1e-6 * time[l].max():
            break
        s, e = move[l]
        p2l[l, s], moved[l, s] = e, True
        x_l, time_l = split_tokens(p2l[l:l + 1], dev[l:l + 1], w[l:l + 1], c[l:l + 1])
        x[l], time[l] = x_l[0], time_l[0]
        g, m = best_moves(p2l, dev, w, c, mask, moved, x, time, np.array([l]))
        gain[l], move[l] = g[0], m[0]
    out = finish_placement(p2l, dev, x, w, load_matrix(new_load, uniform_zero_rows=False), c, layer_bounds(w, c, slots))
    return out, np.argwhere(moved)


def rebalance_plan(plan: Plan, new_load, max_moves: int, profile: "Profile | str | None" = None) -> tuple[Plan, int]:
    """A plan for `new_load` [L, E] that changes the expert of at most `max_moves` slots, and the bytes to move.

    Token shares are re-split for free (they are routing, not weights); then, one at a time, the slot change
    that lowers a layer's modeled step time most (shared experts' time counted as in `plan()`) is made (a
    spare replica becomes a replica of a busy expert), never raising a layer's modeled time. Bytes count each
    (layer, expert, device) copy a device gains, at its precision. Pins recorded in the plan still hold
    (percentile rules judged on the new load). Plans from `plan()` carry their cost model; others need
    `profile` (or a built-in profile of their name). Layers with different slot layouts share the budget in
    proportion to their number.
    """

    if isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0:
        raise PlacementError(f"max_moves must be a whole number >= 0, got {max_moves!r}")
    model = plan_cost_model(plan, profile)
    w = scale_load(check_model_load(read_load(new_load), plan.spec, "new load table"), plan.spec, model.step_tokens)
    L, E, D = plan.num_layers, plan.spec.num_experts, len(plan.device_ids)
    order = np.argsort(plan.device_of, axis=1, kind="stable")  # slots device by device, as the solver keeps them
    p2l = np.take_along_axis(plan.phy2log, order, 1)
    dev = np.take_along_axis(plan.device_of, order, 1)
    rules = pin_rules(plan.predicted.get("pins"))
    allowed = pin_mask(rules, list(zip(model.device_ids, model.groups)), w)
    shared_cnt = np.zeros((L, D))
    S = plan.shared_device_of.shape[1]
    np.add.at(shared_cnt, (np.repeat(np.arange(L), S), plan.shared_device_of.ravel()), 1)
    compute = shared_aware_cost(plan.spec, model, w, shared_cnt) - model.comm_s  # [L, D] as the planner saw it
    new_p2l, new_share = p2l.copy(), np.zeros_like(plan.share)
    layouts, block = np.unique(dev, axis=0, return_inverse=True)
    block = block.reshape(-1)
    budget = np.bincount(block, minlength=len(layouts)) * int(max_moves) // L  # [B] moves per layout
    budget[np.argmax(np.bincount(block))] += int(max_moves) - budget.sum()
    held = set(((np.arange(L)[:, None] * E + p2l) * D + dev).ravel().tolist())
    gained: set[int] = set()
    for b, layout in enumerate(layouts):
        idx = np.flatnonzero(block == b)
        base = evaluate_placement(p2l[idx], layout, w[idx], compute[idx], comm_cost=model.comm_s)
        new, moved = rebalance(base, w[idx], compute[idx], max_moves=int(budget[b]), comm_cost=model.comm_s,
                               allowed=None if allowed is None else allowed[idx])
        new_p2l[idx], new_share[idx] = new.phy2log, new.share
        for li, s in moved.tolist():
            key = (int(idx[li]) * E + int(new.phy2log[li, s])) * D + int(layout[s])
            if key not in held:
                gained.add(key)
    moved_bytes = int(sum(model.expert_bytes[k % D] for k in gained))
    shared = plan.shared_device_of
    predicted = plan_figures(plan.spec, model, new_p2l, dev, new_share, shared, w, rules,
                           plan.predicted.get("policy", "auto"), plan.predicted.get("shared_experts", "given"),
                           plan.predicted.get("load", "table"))
    predicted["rebalanced"] = {"max_moves": int(max_moves), "bytes_moved": moved_bytes}
    return Plan(plan.spec, plan.profile_name, plan.device_ids, dict(plan.precision), new_p2l, dev, new_share,
                shared.copy(), predicted), moved_bytes


def plan_cost_model(plan: Plan, profile) -> DeviceModel:
    """The cost model a plan carries (plans from plan()), else the one of `profile` (or the plan's built-in profile)."""
    if "model" in plan.predicted and profile is None:
        model = DeviceModel.from_dict(plan.predicted["model"])
        if model.device_ids != plan.device_ids:
            raise PlacementError("plan's device model names other devices than the plan; re-plan")
        return model
    prof = load_profile(profile if profile is not None else plan.profile_name)
    if tuple(d.id for d in prof.devices) != plan.device_ids:
        ids = ", ".join(plan.device_ids[:3]) + (", ..." if len(plan.device_ids) > 3 else "")
        raise PlacementError(f"profile '{prof.name}' has other devices than the plan ({ids}); pass the profile "
                             "the plan was made for")
    return device_model(plan.spec, prof, plan.precision, step_tokens_of(prof, None))
