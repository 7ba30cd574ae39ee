"""What placement costs on each device of a profile: seconds per token, all-to-all traffic, memory, dollars.

Cost model (the planner minimises the slowest device's modeled time per MoE layer):
- Compute: a routed token through one expert on device d takes `compute_s[d]` seconds, the roofline time
  (hetrun.roofline.expert_seconds) of one call of `rows` tokens divided by `rows`, at the device's precision, with
  weights stored as hetrun.formats.expert_bytes counts them (scales included). `rows` is the average number of
  tokens an expert sees per step: step_tokens x top_k / num_experts, at least 1. A step is `step_tokens` tokens
  (default 4096; the profile's `extra.planner.step_tokens` or plan(step_tokens=...) changes it); each layer's load
  table row is scaled to step_tokens x top_k routed tokens, so predicted times are seconds per step.
- All-to-all: tokens start evenly on every device of the profile (data-parallel attention, as DeepSeek serves V3),
  and each routed token crosses to its expert's device and back: hidden x (1 byte at an FP8/INT8 precision, else
  2) in, hidden x 2 (BF16) out, over `Profile.link(origin, device)` at its bandwidth x efficiency. `comm_s[d]` is
  the mean over origins (zero from itself): the device's share of the traffic. Latencies are per message, not
  per token, and are left out. Identical devices in equal nodes get identical costs, so there the objective is
  plain load balance, as EPLB's.
- Shared experts: every token passes each of them; `shared_s[d]` is their roofline time per token. A device that
  runs them gets a higher routed cost (`shared_aware_cost`), so balancing routed tokens leaves it room for them.
- Memory: one copy of each (layer, expert) a device holds at its precision, shared experts included, plus the
  device group's `reserved_gb` (activations, KV cache, dense weights), against the catalog's `memory_gb`.
- Price: the device's `price_per_hour` / 3600, for tie-breaking.

A caller that knows more about the devices than the profile says passes `DeviceOverrides`: the simulator, which
runs attention beside the experts, brings its own per-token cost, the share of each step attention leaves to the
experts (`time_budget`: every per-token figure of a device is divided by it), the memory it keeps for KV caches,
and the slots each device may hold.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from hetrun.errors import PlacementError
from hetrun.formats import activation_bytes, expert_bytes
from hetrun.placement.bounds import lower_bound
from hetrun.placement.checks import device_vector
from hetrun.placement.precisions import resident_expert_bytes
from hetrun.placement.shares import row_sum
from hetrun.profile import Profile
from hetrun.roofline import expert_seconds
from hetrun.spec import MoESpec

DEFAULT_STEP_TOKENS = 4096
COMBINE_BYTES = 2.0  # BF16 results on the way back


@dataclass(frozen=True)
class DeviceModel:
    """Per-device planning figures of one profile for one model, arrays indexed like `device_ids`."""

    device_ids: tuple[str, ...]
    groups: tuple[str, ...]
    precision: tuple[str, ...]
    node: np.ndarray  # [D] node number from the profile
    compute_s: np.ndarray  # [D] seconds per routed token through one expert
    comm_s: np.ndarray  # [D] seconds of all-to-all traffic per routed token the device serves
    shared_s: np.ndarray  # [D] seconds per token through one shared expert
    expert_bytes: np.ndarray  # [D] one routed expert's resident bytes at the device's precision (as its backend holds it)
    shared_bytes: np.ndarray  # [D] one shared expert's resident bytes at the device's precision
    memory_bytes: np.ndarray  # [D]
    reserved_bytes: np.ndarray  # [D]
    price_s: np.ndarray  # [D] dollars per second
    step_tokens: int

    @property
    def cost(self) -> np.ndarray:
        """[D] seconds per routed token, compute and traffic together."""
        return self.compute_s + self.comm_s

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceModel":
        try:
            kw = {}
            for f in fields(cls):
                v = d[f.name]
                if f.name in ("device_ids", "groups", "precision"):
                    kw[f.name] = tuple(str(x) for x in v)
                elif f.name == "step_tokens":
                    kw[f.name] = int(v)
                else:
                    kw[f.name] = np.asarray(v, dtype=np.int64 if f.name == "node" else np.float64)
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise PlacementError(f"plan's device model is malformed ({type(e).__name__}: {e}); re-plan") from None


@dataclass(frozen=True)
class DeviceOverrides:
    """What a caller knows about each device beyond the profile: [D] arrays in profile order; None keeps plan()'s
    own figure."""

    cost: np.ndarray | None = None  # seconds per routed token, replacing the roofline, traffic and shared-expert figures
    time_budget: np.ndarray | None = None  # share (0, 1] of each layer's time left for experts; cost is divided by it
    reserved_bytes: np.ndarray | None = None  # memory kept for all but experts, replacing the profile's reserved_gb
    max_slots: np.ndarray | None = None  # most routed-expert slots per layer (0: none), replacing what memory allows
    slots: np.ndarray | None = None  # routed-expert slots per layer, fixed: they add up to E + redundant experts
    dense_device: int | None = None  # index of the device with the dense parts (and "dense" shared experts)

    def checked(self, num_devices: int) -> "DeviceOverrides":
        """The same overrides as numpy arrays, or a PlacementError naming the first bad one."""
        D = num_devices
        out = {}
        for name, test, what in (("cost", lambda a: a > 0, "positive seconds per token"),
                                 ("time_budget", lambda a: (a > 0) & (a <= 1), "shares in (0, 1]"),
                                 ("reserved_bytes", lambda a: a >= 0, "byte counts >= 0"),
                                 ("max_slots", lambda a: a == np.floor(a), "whole numbers >= 0"),
                                 ("slots", lambda a: a == np.floor(a), "whole numbers >= 0")):
            v = getattr(self, name)
            if v is None:
                continue
            a = device_vector(v, D, f"overrides.{name}", None)
            if not test(a).all():
                raise PlacementError(f"overrides.{name} must be {what}, one per device; got {a.tolist()}")
            out[name] = a.astype(np.int64) if name.endswith("slots") else a
        dense = self.dense_device
        if dense is not None and not (isinstance(dense, (int, np.integer)) and 0 <= dense < D):
            raise PlacementError(f"overrides.dense_device must be a device index in 0..{D - 1}, got {dense!r}")
        return DeviceOverrides(**out, dense_device=None if dense is None else int(dense))


def planner_settings(profile: Profile) -> dict:
    """The profile's `extra.planner` mapping (step_tokens, shared_experts), empty when absent."""
    settings = profile.model.extra.get("planner") or {}
    if not isinstance(settings, dict):
        raise PlacementError(f"profile '{profile.name}': extra.planner must be a mapping such as "
                             "{step_tokens: 4096, shared_experts: dense}")
    return settings


def step_tokens_of(profile: Profile, step_tokens: int | None) -> int:
    """The step size: the argument, else the profile's `extra.planner.step_tokens`, else DEFAULT_STEP_TOKENS."""
    if step_tokens is None:
        step_tokens = planner_settings(profile).get("step_tokens", DEFAULT_STEP_TOKENS)
    if isinstance(step_tokens, bool) or not isinstance(step_tokens, (int, np.integer)) or step_tokens < 1:
        raise PlacementError(f"step_tokens must be a whole number of tokens >= 1, got {step_tokens!r}")
    return int(step_tokens)


def device_model(spec: MoESpec, profile: Profile, precision: dict[str, str], step_tokens: int,
                 overrides: DeviceOverrides | None = None) -> DeviceModel:
    """The planning figures of every device of `profile` running `spec` at `precision` (device id -> precision),
    with the cost, time budget and reserved memory of `overrides` (checked) where it gives them."""
    devs = profile.devices
    over = overrides or DeviceOverrides()
    h, i, i_s = spec.hidden_size, spec.moe_intermediate_size, spec.shared_intermediate_size
    rows = max(1.0, step_tokens * spec.top_k / spec.num_experts)
    prec = tuple(precision[d.id] for d in devs)
    eb = np.array([expert_bytes(p, h, i) for p in prec], dtype=np.float64)  # [D] bytes a call reads
    sb = np.array([expert_bytes(p, h, i_s) if spec.num_shared_experts else 0 for p in prec], dtype=np.float64)
    # [D] bytes a loaded expert keeps resident (a CPU runtime may hold a format expanded to FP32)
    held = np.array([resident_expert_bytes(d, p, h, i) for d, p in zip(devs, prec)], dtype=np.float64)
    held_shared = np.array([resident_expert_bytes(d, p, h, i_s) if spec.num_shared_experts else 0
                            for d, p in zip(devs, prec)], dtype=np.float64)
    act = np.array([activation_bytes(p) for p in prec])
    if over.cost is None:
        compute = np.array([expert_seconds(d.type, p, rows, h, i, b, a) / rows
                            for d, p, b, a in zip(devs, prec, eb, act)])
        shared = np.array([expert_seconds(d.type, p, step_tokens, h, i_s, b, a) / step_tokens
                           if spec.num_shared_experts else 0.0 for d, p, b, a in zip(devs, prec, sb, act)])
        comm = _comm_seconds(profile, h * (act + COMBINE_BYTES))
    else:  # the caller's cost model covers all a routed token costs
        compute, shared, comm = over.cost, np.zeros(len(devs)), np.zeros(len(devs))
    budget = 1.0 if over.time_budget is None else over.time_budget
    reserved = over.reserved_bytes if over.reserved_bytes is not None else [d.reserved_bytes for d in devs]
    return DeviceModel(
        device_ids=tuple(d.id for d in devs), groups=tuple(d.group for d in devs), precision=prec,
        node=np.array([d.node for d in devs], dtype=np.int64), compute_s=compute / budget,
        comm_s=comm / budget, shared_s=shared / budget, expert_bytes=held, shared_bytes=held_shared,
        memory_bytes=np.array([d.memory_bytes for d in devs]), reserved_bytes=np.array(reserved),
        price_s=np.array([d.price_per_hour / 3600.0 for d in devs]), step_tokens=step_tokens)


def _comm_seconds(profile: Profile, bytes_per_token: np.ndarray) -> np.ndarray:
    # [D] mean over origin devices of bytes / link speed into each device; tokens start evenly everywhere.
    devs = profile.devices
    D = len(devs)
    node = np.array([d.node for d in devs])
    intra = profile.model.links.get("intra_node")
    # Inside a node the origin's scale-up link carries it (or the profile's intra_node link).
    inv_intra = np.array([1.0 / _speed(intra or d.type.scale_up) for d in devs])  # [D] by origin
    out = np.zeros(D)
    for n in np.unique(node):
        here = node == n
        others = int((~here).sum())
        inv_inter = 0.0
        if others:
            a, b = devs[int(np.flatnonzero(here)[0])], devs[int(np.flatnonzero(~here)[0])]
            inv_inter = 1.0 / _speed(profile.link(b, a))  # raises when the profile has no inter_node link
        same = inv_intra[here].sum() - inv_intra[here]  # [n] other origins in the node
        out[here] = bytes_per_token[here] * (same + others * inv_inter) / D
    return out


def _speed(link) -> float:
    return link.bandwidth_gbs * 1e9 * link.efficiency


def shared_aware_cost(spec: MoESpec, model: DeviceModel, w: np.ndarray, shared_cnt: np.ndarray):
    """[L, D] seconds per routed token, raised on devices that also run shared experts (shared_cnt [L, D] of them).

    Device d spends B_ld on shared experts in layer l. At the fluid balance all devices end at
    T_l = (W_l + sum_d B_ld / c_d) / sum_d 1 / c_d, d taking (T_l - B_ld) / c_d routed tokens; its cost is raised by
    T_l / (T_l - B_ld) (at most 1e6), so that a solver balancing routed tokens alone leaves it that much less.
    """
    cost = np.tile(model.cost, (w.shape[0], 1))  # [L, D] compute and traffic
    busy = shared_cnt * (w.sum(1, keepdims=True) / spec.top_k) * model.shared_s  # [L, D] B_ld
    if not busy.any():
        return cost
    fluid = (w.sum(1) + (busy / model.cost).sum(1)) / (1.0 / model.cost).sum()  # [L] T_l
    raise_by = fluid[:, None] / np.maximum(fluid[:, None] - busy, 1e-12 * fluid[:, None])
    return cost * np.minimum(np.where(busy > 0, raise_by, 1.0), 1e6)


# ---- memory -------------------------------------------------------------------------------------------------

def slot_capacity(spec: MoESpec, model: DeviceModel, shared_counts: np.ndarray) -> np.ndarray:
    """[D] routed-expert slots per MoE layer each device's memory holds next to `shared_counts` [D] shared experts
    (counted over all layers) and its reserved memory; a device that cannot even hold those is an error."""
    L = spec.num_moe_layers
    free = model.memory_bytes - model.reserved_bytes - shared_counts * model.shared_bytes  # [D]
    short = np.flatnonzero(free < 0)
    if len(short):
        d = int(short[0])
        what = f"{model.reserved_bytes[d] / 1e9:.1f} GB reserved"
        if shared_counts[d]:
            gb = shared_counts[d] * model.shared_bytes[d] / 1e9
            what += f" and {int(shared_counts[d])} shared experts ({gb:.1f} GB)"
        raise PlacementError(f"device '{model.device_ids[d]}' ({model.memory_bytes[d] / 1e9:.0f} GB) cannot hold "
                             f"{what}: "
                             f"{-free[d] / 1e9:.1f} GB short; lower its reserved_gb, use a lower precision, or put "
                             "the shared experts elsewhere (shared_experts='balanced')")
    return np.floor(free / (L * model.expert_bytes)).astype(np.int64)


def check_fits(spec: MoESpec, model: DeviceModel, capacity: np.ndarray, num_slots: int, where: str = "") -> None:
    """A PlacementError saying how far off and which devices hold what, unless `capacity` [D] covers `num_slots`
    (`where` says which layers, when only some are concerned)."""
    if capacity.sum() >= num_slots:
        return
    L, E = spec.num_moe_layers, spec.num_experts
    redundant = num_slots - E
    per_group = {}
    for d, g in enumerate(model.groups):
        per_group.setdefault(g, []).append(d)
    parts = []
    for g, idx in per_group.items():
        if where and not capacity[idx].any():
            continue  # devices the pins keep out of these layers
        d = idx[0]
        fit = capacity[idx]
        each = f"{fit.min()}" if fit.min() == fit.max() else f"{fit.min()}-{fit.max()}"
        parts.append(f"'{g}' x{len(idx)} fits {each} each at {model.precision[d]} (a slot is {L} layers x "
                     f"{model.expert_bytes[d] / 1e6:.0f} MB = {L * model.expert_bytes[d] / 1e9:.2f} GB; "
                     f"{(model.memory_bytes[d] - model.reserved_bytes[d]) / 1e9:.0f} GB free of "
                     f"{model.memory_bytes[d] / 1e9:.0f} GB)")
    missing = num_slots - int(capacity.sum())
    need_gb = missing * L * float(model.expert_bytes.min()) / 1e9
    helps = ["add devices or memory", "use a lower precision (e.g. int8 or int4)"]
    if redundant > 0:
        helps.append(f"use fewer than {redundant} redundant experts")
    raise PlacementError(f"model '{spec.name}' does not fit: it needs {num_slots} expert slots per MoE layer "
                         f"({E} experts + {redundant} redundant){where} but the devices hold {int(capacity.sum())}: "
                         f"{'; '.join(parts)}; {missing} slots (about {need_gb:,.1f} GB) short; {', or '.join(helps)}")


# ---- predictions --------------------------------------------------------------------------------------------

def scale_load(load: np.ndarray | None, spec: MoESpec, step_tokens: int) -> np.ndarray:
    """[L, E] routed tokens per step: each row scaled to step_tokens x top_k (rows with no load become uniform)."""
    L, E = spec.num_moe_layers, spec.num_experts
    w = np.ones((L, E)) if load is None else np.array(load, dtype=np.float64)
    w[~w.any(1)] = 1.0
    return w * (step_tokens * spec.top_k / w.sum(1, keepdims=True))


def predict(spec: MoESpec, model: DeviceModel, phy2log, device_of, share, shared_device_of, load) -> dict:
    """Per-device and per-layer modeled figures of a placement under `load` [L, E] tokens per step (see scale_load).

    Returns a JSON-ready dict: step_time_s (sum over MoE layers of the busiest device, shared experts included),
    lower_bound_s (no placement on these slots does better; see _bound), routed_step_time_s (routed experts
    alone), per layer figures
    and per device: slots per layer, experts (distinct (layer, expert) pairs held), replica_slots (slots of experts
    that have several), shared_experts, tokens per step, time_s per step, memory used / free bytes.
    """
    p2l, dev = np.asarray(phy2log, dtype=np.int64), np.asarray(device_of, dtype=np.int64)
    share = np.asarray(share, dtype=np.float64)
    shared_of = np.asarray(shared_device_of, dtype=np.int64).reshape(p2l.shape[0], -1)
    w = np.asarray(load, dtype=np.float64)
    L, R = p2l.shape
    E, D = spec.num_experts, len(model.device_ids)
    rows = np.arange(L)[:, None]
    tokens = row_sum(dev, w[rows, p2l] * share, D)  # [L, D] routed tokens per device
    routed = tokens * model.cost  # [L, D]
    shared_tokens = w.sum(1) / spec.top_k  # [L] every token passes every shared expert
    shared_cnt = row_sum(shared_of, 1.0, D) if shared_of.size else np.zeros((L, D))  # [L, D]
    time = routed + shared_cnt * shared_tokens[:, None] * model.shared_s  # [L, D]

    copies = np.bincount(np.unique((rows * E + p2l) * D + dev) % D, minlength=D)  # [D] (layer, expert) copies
    shared_total = shared_cnt.sum(0)  # [D]
    weights = copies * model.expert_bytes + shared_total * model.shared_bytes
    used = weights + model.reserved_bytes
    cnt = row_sum(p2l, 1.0, E)  # [L, E] replicas per expert
    replica_slots = row_sum(dev, (cnt[rows, p2l] > 1).astype(np.float64), D).sum(0)  # [D]
    slots = row_sum(dev, 1.0, D)  # [L, D]

    bound = _bound(w, slots, shared_cnt, shared_tokens, model)  # [L]
    step = time.max(1)
    routed_step = routed.max(1)
    devices = {}
    for d, dev_id in enumerate(model.device_ids):
        devices[dev_id] = {
            "group": model.groups[d], "precision": model.precision[d], "node": int(model.node[d]),
            "slots_per_layer": float(slots[:, d].mean()), "experts": int(copies[d]),
            "replica_slots": int(replica_slots[d]), "shared_experts": int(shared_total[d]),
            "tokens": float(tokens[:, d].sum()), "time_s": float(time[:, d].sum()),
            "busy": float(time[:, d].sum() / step.sum()) if step.sum() > 0 else 0.0,
            "memory_used_bytes": float(used[d]), "memory_free_bytes": float(model.memory_bytes[d] - used[d]),
            "weight_bytes": float(weights[d])}
    return {"step_tokens": model.step_tokens, "step_time_s": float(step.sum()),
            "routed_step_time_s": float(routed_step.sum()), "lower_bound_s": float(bound.sum()),
            "layers": {"step_time_s": step.tolist(), "routed_step_time_s": routed_step.tolist(),
                       "lower_bound_s": bound.tolist()},
            "devices": devices}


def _bound(w, slots, shared_cnt, shared_tokens, model: DeviceModel) -> np.ndarray:
    # [L] lower bound on each layer's step time, shared experts included: they join as experts with the load
    # that takes their time on the device where that is least, on the slots they occupy (see bounds.lower_bound).
    L, E = w.shape
    S = int(shared_cnt[0].sum())
    if S and (model.shared_s > 0).any():
        ratio = float((model.shared_s / model.cost).min())
        w = np.concatenate([w, np.repeat((shared_tokens * ratio)[:, None], S, 1)], 1)  # [L, E + S]
        slots = slots + shared_cnt
    bound = np.zeros(L)
    for sig in np.unique(slots, axis=0):  # layers with one slot layout share one bound call
        same = (slots == sig).all(1)
        bound[same] = lower_bound(w[same], model.compute_s, sig.astype(np.int64), comm_cost=model.comm_s)
    return bound


def plan_figures(spec, model, p2l, dev, share, shared_of, w, rules, policy, shared_policy, load_kind) -> dict:
    """`predict` plus what a Plan records of how it was made (policy, load kind, pins, the device model itself)."""
    out = predict(spec, model, p2l, dev, share, shared_of, w)
    out.update({"policy": policy, "shared_experts": shared_policy, "load": load_kind,
                "pins": [r.model_dump(exclude_none=True) for r in rules], "model": model.to_dict()})
    return out
