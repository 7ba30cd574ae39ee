"""The Plan: for every MoE layer, which physical expert slots exist, where each lives, and each device's precision.

`plan()` makes one from a model shape, a hardware profile and, optionally, a measured load table:
1. precision per device: hetrun.placement.precisions.plan_precisions (an explicit request a device cannot run is an error; a
   device whose backend cannot run its preferred precision falls back with one warning);
2. cost per routed token on each device, compute at its precision plus its share of all-to-all traffic, and the
   memory each expert takes there (hetrun.placement.device_model);
3. pins (hetrun.placement.pins) turn into a mask of where each expert may go;
4. slots per device and layer: as many as speed warrants, capped by memory (`choose_slots`), more where pins need
   them; layers pinned to a subset of devices are planned apart from the others;
5. the heterogeneous solver (hetrun.placement.search) places experts and replicas on the slots and splits each
   replicated expert's tokens between its replicas (`share`), minimising the busiest device's modeled time, then
   dollars, then replicas. On identical devices it is never worse than EPLB, whose placements it also tries.
   `policy="eplb"` places with DeepSeek's EPLB instead (equal slots per device, even token split);
6. shared experts (every token passes them; the dispatcher runs each whole on one device) go to the profile's
   dense device ("dense", the default: beside attention, as DeepSeek runs them), and that device's routed load
   shrinks by the time they take (see `_solve`); or, after routed placement and layer by layer, to the device that
   finishes them soonest with memory to spare ("balanced"). Predicted times include them;
7. `predicted` holds per-device tokens, time and memory, per-layer step times and their lower bound, and what
   hetrun.placement.rebalance needs to move experts later without the profile.

`overrides` (hetrun.placement.device_model.DeviceOverrides) let a caller that knows more than the profile -- the
simulator, which runs attention beside the experts -- set each device's cost, time budget, reserved memory and
slot limits, fix the slots, and name the dense device; everything else above holds as it is.
"""

from __future__ import annotations

import numpy as np

from hetrun.errors import PlacementError
from hetrun.placement.device_model import (
    DeviceModel,
    DeviceOverrides,
    check_fits,
    device_model,
    plan_figures,
    planner_settings,
    predict,
    scale_load,
    shared_aware_cost,
    slot_capacity,
    step_tokens_of,
)
from hetrun.placement.eplb import eplb_policy
from hetrun.placement.loads import check_model_load, model_load, read_load
from hetrun.placement.pins import pin_mask, pin_rules
from hetrun.placement.plan import Plan
from hetrun.placement.precisions import plan_precisions
from hetrun.placement.search import choose_slots, solve_placement
from hetrun.profile import Profile, load_profile
from hetrun.spec import MoESpec

POLICIES = ("auto", "eplb")
SHARED_POLICIES = ("dense", "balanced")


def simple_plan(spec: MoESpec, profile: Profile | str, precision: str | None = None) -> Plan:
    """Round-robin placement, one slot per expert: expert e of MoE layer l goes to device (e + l) mod D."""
    profile = load_profile(profile)
    n_dev = len(profile.devices)
    L, E, S = spec.num_moe_layers, spec.num_experts, spec.num_shared_experts
    phy2log = np.tile(np.arange(E), (L, 1))  # [L, E]
    device_of = (phy2log + np.arange(L)[:, None]) % n_dev  # [L, E]
    shared = (np.arange(S)[None, :] + np.arange(L)[:, None]) % n_dev  # [L, S]
    return Plan(spec, profile.name, tuple(d.id for d in profile.devices), plan_precisions(profile, precision),
                phy2log, device_of, np.ones((L, E)), shared.reshape(L, S))


def plan(spec: MoESpec, profile: Profile | str, load=None, redundant_experts: int = 0, pins=None,
         precision: str | None = None, *, policy: str = "auto", shared_experts: str | None = None,
         step_tokens: int | None = None, overrides: DeviceOverrides | None = None) -> Plan:
    """Place every expert of `spec` on the devices of `profile` (see the module docstring for the rules).

    Args:
        load: [L, E] routed tokens per expert (array, torch tensor, DispatchStats, or a .npy / .json path);
            None places for a uniform load.
        redundant_experts: extra slots per MoE layer for replicas of hot experts (R = E + redundant_experts).
        pins: extra pin rules (PinRule, dicts of its fields, or `device=xeon,below=50` strings), before the
            profile's own.
        precision: one precision for every device (an error where a device lacks it); None: each device's best.
        policy: "auto" (the heterogeneous solver) or "eplb" (DeepSeek's EPLB: equal slots per device).
        shared_experts: "dense" or "balanced"; default the profile's `extra.planner.shared_experts`, else "dense".
        step_tokens: tokens per step for the predicted times; default the profile's `extra.planner.step_tokens`.
        overrides: per-device figures and limits that replace plan()'s own (see DeviceOverrides).
    """
    profile = load_profile(profile)
    settings = planner_settings(profile)
    if policy not in POLICIES:
        raise PlacementError(f"unknown placement policy '{policy}'; use one of {', '.join(POLICIES)}")
    shared_policy = shared_experts or settings.get("shared_experts", "dense")
    if shared_policy not in SHARED_POLICIES:
        raise PlacementError(f"unknown shared_experts policy '{shared_policy}'; "
                             f"use one of {', '.join(SHARED_POLICIES)}")
    table = model_load(load, spec)  # [L, E] or None
    R = _num_slots(spec, redundant_experts)
    over = (overrides or DeviceOverrides()).checked(len(profile.devices))
    if over.slots is not None and over.slots.sum() != R:
        raise PlacementError(f"the fixed slots add up to {over.slots.sum()} per MoE layer, but {spec.num_experts} "
                             f"experts + {R - spec.num_experts} redundant need {R}; fix one of them")
    precisions = plan_precisions(profile, precision)
    model = device_model(spec, profile, precisions, step_tokens_of(profile, step_tokens), over)
    w = scale_load(table, spec, model.step_tokens)  # [L, E] routed tokens per step
    rules = pin_rules(pins) + list(profile.model.pins)
    allowed = pin_mask(rules, list(zip(model.device_ids, model.groups)), w)  # [L, E, D] or None
    L, S, D = spec.num_moe_layers, spec.num_shared_experts, len(model.device_ids)

    dense = model.device_ids.index(profile.dense_device.id) if over.dense_device is None else over.dense_device
    shared_counts = np.zeros(D)
    if shared_policy == "dense":
        shared_counts[dense] = L * S
    if over.max_slots is None:
        free = model.memory_bytes - model.reserved_bytes - shared_counts * model.shared_bytes  # [D]
        slot_capacity(spec, model, shared_counts)  # a device that cannot hold its reserved and shared memory says so
    else:
        free = over.max_slots * (L * model.expert_bytes)  # [D] bytes of exactly max_slots slots in every layer

    if policy == "eplb":
        if rules:
            raise PlacementError("policy 'eplb' cannot honour pins (EPLB assumes interchangeable devices); "
                                 "use policy 'auto' with pins")
        capacity = np.floor(free / (L * model.expert_bytes)).astype(np.int64)
        check_fits(spec, model, capacity, R)
        p2l, dev, share, how = _eplb(spec, model, w, R, capacity, over.slots)
    else:
        shared_on = dense if shared_policy == "dense" and S else None
        p2l, dev, share = _solve(spec, model, w, R, allowed, free, shared_on, over.slots)
        how = "hetrun.placement.solver"  # the solver: search, shares and bounds
    if shared_policy == "dense":
        shared_of = np.full((L, S), dense, dtype=np.int64)
    else:
        shared_of = _balanced_shared(spec, model, p2l, dev, share, w, free)
    predicted = plan_figures(spec, model, p2l, dev, share, shared_of, w, rules, policy, shared_policy,
                           "uniform" if table is None else "table")
    predicted["placed_by"] = how
    return Plan(spec, profile.name, model.device_ids, precisions, p2l, dev, share, shared_of, predicted)


def eplb_baseline(plan: Plan, load=None) -> dict:
    """What DeepSeek's EPLB would do on the same devices, under this plan's cost model and `load` [L, E].

    EPLB needs equal slots per device, so it gets the plan's slot count rounded up to a multiple of the device
    count (never fewer than the plan has); tokens split evenly over replicas, as EPLB routes them; shared experts
    stay where the plan puts them. Memory is not checked (EPLB ignores it). Of EPLB's hierarchical (where the
    nodes allow it) and global policies, the one with the shorter modeled step counts. Returns the predicted
    figures plus `slots` and `policy`.
    """
    if "model" not in plan.predicted:
        raise PlacementError("this plan carries no cost model; make it with hetrun.plan() to compare it with EPLB")
    model = DeviceModel.from_dict(plan.predicted["model"])
    spec = plan.spec
    table = None if load is None else check_model_load(read_load(load), spec)
    w = scale_load(table, spec, model.step_tokens)
    R = eplb_slots(plan)
    *_, policy, out = eplb_best_map(spec, model, w, R, plan.shared_device_of)
    return {**out, "slots": int(R), "policy": policy}


def eplb_slots(plan: Plan) -> int:
    """EPLB's slot count on a plan's devices: the plan's, rounded up to a multiple of the device count."""
    D = len(plan.device_ids)
    return -(-plan.num_slots // D) * D


def eplb_best_map(spec: MoESpec, model, w: np.ndarray, R: int, shared_device_of: np.ndarray):
    """(phy2log, device_of, share, policy, predicted figures) of EPLB with R slots under load `w`: of its
    hierarchical (where the nodes allow it) and global policies, the one with the shorter modeled step."""
    best = None
    for force_global in (False, True):
        p2l, dev, share, policy = _eplb_map(spec, model, w, R, force_global)
        out = predict(spec, model, p2l, dev, share, shared_device_of, w)
        if best is None or out["step_time_s"] < best[4]["step_time_s"]:
            best = (p2l, dev, share, policy, out)
        if policy == "global":
            break
    return best


# ---- steps of plan() ------------------------------------------------------------------------------------------

def _num_slots(spec: MoESpec, redundant_experts) -> int:
    E = spec.num_experts
    if isinstance(redundant_experts, bool) or not isinstance(redundant_experts, (int, np.integer)):
        raise PlacementError(f"redundant_experts must be a whole number >= 0, got {redundant_experts!r}")
    if redundant_experts < 0:
        raise PlacementError(f"{redundant_experts} redundant experts would leave {E + redundant_experts} slots for "
                             f"{E} experts; every expert needs a slot, so use redundant_experts >= 0")
    return E + int(redundant_experts)


def _solve(spec: MoESpec, model, w: np.ndarray, R: int, allowed, free: np.ndarray, shared_on: int | None,
           fixed: np.ndarray | None = None):
    """(phy2log, device_of, share) [L, R] from the solver; layers pinned to fewer devices are planned apart.
    `fixed` [D]: the slots per layer of every device, instead of choosing them.

    With `shared_on` (a device index), that device also runs every layer's shared experts, a fixed B_l seconds.
    The solver balances routed tokens at linear costs, so that device's cost in layer l is raised by T_l / (T_l -
    B_l), T_l the layer's fluid step time (all work spread over all devices by speed): at that balance it then
    ends with everyone else, its shared experts included.
    """
    L, E = w.shape
    D = len(model.device_ids)
    shared_cnt = np.zeros((L, D))
    if shared_on is not None:
        shared_cnt[:, shared_on] = spec.num_shared_experts
    cost = shared_aware_cost(spec, model, w, shared_cnt)  # [L, D]
    usable = np.ones((L, D), dtype=bool) if allowed is None else allowed.any(1)  # [L, D] may hold some expert
    layouts, block = np.unique(usable, axis=0, return_inverse=True)
    block = block.reshape(-1)
    p2l = np.zeros((L, R), dtype=np.int64)
    dev = np.zeros((L, R), dtype=np.int64)
    share = np.zeros((L, R))
    left = free.copy()  # [D] bytes not yet given to routed experts
    for b in np.argsort(layouts.sum(1), kind="stable"):  # layers with the fewest usable devices first
        idx = np.flatnonzero(block == b)
        cap = np.where(layouts[b], np.floor(left / (len(idx) * model.expert_bytes)), 0).astype(np.int64)  # [D]
        note = _layers_note(idx, L, layouts[b], model)
        check_fits(spec, model, cap, R, note)
        mask = None if allowed is None else allowed[idx]
        if fixed is None:
            slots = _cover_pins(choose_slots(cost[idx], cap, R), cap, mask, model, idx)
        else:
            slots = _check_fixed(fixed, cap, model, note)
        left -= len(idx) * slots * model.expert_bytes
        pl = solve_placement(w[idx], cost[idx] - model.comm_s, slots, node_of=model.node,
                             num_groups=spec.router.n_group, comm_cost=model.comm_s, price=model.price_s, allowed=mask)
        p2l[idx], dev[idx], share[idx] = pl.phy2log, pl.device_of, pl.share
    return p2l, dev, share


def _check_fixed(slots: np.ndarray, cap: np.ndarray, model, where: str) -> np.ndarray:
    over = np.flatnonzero(slots > cap)
    if len(over):
        d = int(over[0])
        raise PlacementError(f"device '{model.device_ids[d]}' gets {slots[d]} fixed expert slots per layer but holds "
                             f"{cap[d]}{where}; give it fewer slots, more memory or a lower precision")
    return slots


def _layers_note(idx: np.ndarray, L: int, usable: np.ndarray, model) -> str:
    if len(idx) == L and usable.all():
        return ""
    groups = sorted({model.groups[d] for d in np.flatnonzero(usable)})
    return f" in MoE layers {_ranges(idx)} (pins leave them {', '.join(groups)})"


def _ranges(idx) -> str:
    out, start, prev = [], None, None
    for i in list(idx) + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(out)


def _cover_pins(slots: np.ndarray, cap: np.ndarray, mask, model, layers: np.ndarray) -> np.ndarray:
    """Move slots so that every set of devices that pinned experts are confined to has a slot for each of them."""
    if mask is None:
        return slots
    slots = slots.copy()
    speed = 1.0 / model.cost
    rows = mask.reshape(-1, mask.shape[2])
    sets = np.unique(rows[~rows.all(1)], axis=0)
    need = {}
    for g in sets:
        inside = ~(mask & ~g).any(2)  # [Lb, E] experts that must sit on devices of g
        need[g.tobytes()] = (g, int(inside.sum(1).max()), int(inside.sum(1).argmax()))
    for g, n, li in sorted(need.values(), key=lambda t: -t[1]):
        if cap[g].sum() < n:
            groups = sorted({model.groups[d] for d in np.flatnonzero(g)})
            raise PlacementError(f"pins confine {n} experts of MoE layer {int(layers[li])} to {', '.join(groups)} "
                                 f"({int(g.sum())} devices), whose memory holds {int(cap[g].sum())} slots per layer; "
                                 "pin fewer experts there, give those devices more memory, or use a lower precision")
        while slots[g].sum() < n:
            recv = np.where(g & (slots < cap), speed / (slots + 1), -np.inf).argmax()
            floor = np.zeros_like(slots)  # what other pin sets still need of each donor
            for g2, n2, _ in need.values():
                if not np.array_equal(g2, g) and slots[g2].sum() <= n2:
                    floor[g2] = slots[g2]
            donor = np.where(~g & (slots > floor), slots * model.cost, -np.inf)
            if not np.isfinite(donor.max()):
                names = ", ".join(sorted({model.groups[d] for d in np.flatnonzero(g)}))
                raise PlacementError(f"pins need {n} slots on {names} and the other pins the rest; add redundant "
                                     "experts or pin fewer experts")
            slots[donor.argmax()] -= 1
            slots[recv] += 1
    return slots


def _eplb(spec: MoESpec, model, w: np.ndarray, R: int, capacity: np.ndarray, fixed: np.ndarray | None = None):
    """DeepSeek's EPLB over every device: equal slots, tokens split evenly over replicas."""
    D, E = len(model.device_ids), spec.num_experts
    if R % D:
        fits = [n for n in ((R // D) * D - E, -(-R // D) * D - E) if n >= 0]
        raise PlacementError(f"policy 'eplb' puts the same number of slots on every device, but {R} slots ({E} experts "
                             f"+ {R - E} redundant) do not split over {D} devices; use redundant_experts="
                             f"{' or '.join(map(str, fits))} (slots a multiple of {D}), or policy 'auto'")
    per = R // D
    if fixed is not None and (fixed != per).any():
        raise PlacementError(f"policy 'eplb' puts {per} expert slots per layer on every device, but the fixed slots "
                             f"differ ({', '.join(map(str, sorted(set(fixed.tolist()))))}); use policy 'auto'")
    short = np.flatnonzero(capacity < per)
    if len(short):
        d = int(short[0])
        raise PlacementError(f"policy 'eplb' puts {per} expert slots per layer on every device, but device "
                             f"'{model.device_ids[d]}' holds {int(capacity[d])} at {model.precision[d]}; use policy "
                             "'auto' (slots by memory and speed), fewer redundant experts, or a lower precision")
    p2l, dev, share, how = _eplb_map(spec, model, w, R)
    return p2l, dev, share, f"hetrun.placement.eplb ({how})"


def _eplb_map(spec: MoESpec, model, w: np.ndarray, R: int, force_global: bool = False):
    """(phy2log, device_of, share, policy) of EPLB with R slots (a multiple of the device count) over every device:
    hierarchical where the nodes are equal, numbered in device order and the groups split over them, else global."""
    D = len(model.device_ids)
    nodes, first, count = np.unique(model.node, return_index=True, return_counts=True)
    in_order = (count == count[0]).all() and (model.node == np.repeat(model.node[np.sort(first)], count[0])).all()
    groups = spec.router.n_group
    hierarchical = not force_global and len(nodes) > 1 and in_order and groups % len(nodes) == 0
    policy = "hierarchical" if hierarchical else "global"
    p2l, _, cnt = eplb_policy(w, R, groups if hierarchical else 1, len(nodes) if hierarchical else 1, D, policy=policy)
    dev = np.broadcast_to(np.arange(R) // (R // D), p2l.shape).copy()
    return p2l, dev, 1.0 / np.take_along_axis(cnt, p2l, 1), policy


def _balanced_shared(spec: MoESpec, model, p2l, dev, share, w, free) -> np.ndarray:
    """[L, S] shared experts, layer by layer, on the device that would finish soonest with memory to spare."""
    L, S, D = spec.num_moe_layers, spec.num_shared_experts, len(model.device_ids)
    E = spec.num_experts
    rows = np.arange(L)[:, None]
    time = np.zeros((L, D))
    np.add.at(time, (np.broadcast_to(rows, dev.shape), dev), w[rows, p2l] * share * model.cost[dev])
    copies = np.bincount(np.unique((rows * E + p2l) * D + dev) % D, minlength=D)
    room = free - copies * model.expert_bytes  # [D] bytes left
    tokens = w.sum(1) / spec.top_k  # [L]
    out = np.zeros((L, S), dtype=np.int64)
    for li in range(L):
        for s in range(S):
            finish = np.where(room >= model.shared_bytes, time[li] + tokens[li] * model.shared_s, np.inf)
            if not np.isfinite(finish.min()):
                raise PlacementError(f"no device has memory left for shared expert {s} of MoE layer {li}; use "
                                     "shared_experts='dense', fewer redundant experts, or a lower precision")
            d = int(finish.argmin())
            out[li, s] = d
            time[li, d] = finish[d]
            room[d] -= model.shared_bytes[d]
    return out
