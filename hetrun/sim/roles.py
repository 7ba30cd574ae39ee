"""Who does what in a simulated deployment: attention devices, expert devices, precisions, and the expert Plan.

The Plan always comes from the one planner, `hetrun.placement.planner.plan`. On one device type, with every
device holding experts and no explicit slots, it plans with its own cost model, told only the memory the
simulation keeps on each device. Otherwise -- several device types, roles that differ between devices, explicit
slots, or a layout the planner's own model cannot place -- it plans with the simulation's figures
(`DeviceOverrides`): each device's per-token expert cost, its remaining time budget, the slots its memory may give
experts (or the profile's `extra.sim.slots_per_device`), and the first attention device as the dense device.
Should the planner fail unexpectedly (a bug, not a layout that cannot be placed), it places with EPLB instead
where the slots are equal.

The time budget: a decode step at the workload's per-user target gives every layer T seconds; an attention
device first spends A_d of them on its share of the requests -- as many as it serves in the time the fastest
attention device takes for its own (`equal_time_requests`) -- so its experts must finish in T - A_d. The
planner's per-token cost of device d is scaled by T / (T - A_d) (`expert_budget`), so slots and tokens go by
speed over what is left of the step, not by raw speed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hetrun.errors import HetrunError, PlacementError, PrecisionError, ProfileError
from hetrun.formats import DTYPE_BYTES, activation_bytes, expert_bytes
from hetrun.once import warn_once
from hetrun.placement.device_model import DeviceOverrides
from hetrun.placement.plan import Plan
from hetrun.placement.planner import plan
from hetrun.placement.precisions import device_precision
from hetrun.profile import Device, Profile
from hetrun.roofline import expert_seconds
from hetrun.sim.operators import (
    attention_block_bytes,
    attention_decode_ops,
    attention_layer_bytes,
    layer_misc_ops,
    shared_expert_bytes,
    stage_seconds,
)
from hetrun.sim.settings import SimSettings, attention_eff, gemm_eff
from hetrun.spec import MoESpec

log = logging.getLogger("hetrun")

# Share of a device's memory left over after weights that expert slots may take when slots are chosen by
# memory (the rest stays for the KV cache of attention devices).
EXPERT_SHARE_OF_FREE_MEMORY = 0.7
# Where that share cannot hold every expert, the least share of an attention device's memory kept for the KV cache:
# a model that fits only so still runs (gpt-oss-120b's 61 GB of 4-bit experts on one 80 GB GPU, as published), with
# the KV cache, hence the batch, that is left.
MIN_KV_SHARE_OF_MEMORY = 0.05
# Nominal decode point at which devices' attention speeds are compared: requests on the fastest attention device
# and KV length per request (large enough that per-request work shows, small enough to fit anywhere).
NOMINAL_REQUESTS = 64.0
NOMINAL_KV = 4096.0
# Least share of the step an expert device keeps for its experts, whatever its attention takes.
MIN_EXPERT_BUDGET = 0.1
# Who placed the experts, as reports name it (names kept from before placement was one package): the planner with
# its own cost model, the planner with the simulation's figures, or EPLB after the planner failed unexpectedly.
PLANNER_OWN_MODEL = "hetrun.planner.plan"
PLANNER_SIM_FIGURES = "hetrun.placement.solver.solve_placement"
EPLB_FALLBACK = "hetrun.placement.eplb.rebalance_experts"


@dataclass(frozen=True)
class Layout:
    profile: Profile
    settings: SimSettings
    devices: tuple[Device, ...]
    precision: tuple[str, ...]  # [D] expert and dense matmul precision of each device
    attention_precision: tuple[str, ...]  # [D]
    is_attention: np.ndarray  # [D] bool
    is_expert: np.ndarray  # [D] bool
    node: np.ndarray  # [D] node index 0..N-1
    plan: Plan
    popularity: np.ndarray  # [L, E] routing probability of each expert
    planner: str  # which placement produced the plan

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def attention_ids(self) -> np.ndarray:
        return np.nonzero(self.is_attention)[0]

    @property
    def expert_ids(self) -> np.ndarray:
        return np.nonzero(self.is_expert)[0]


def _role_mask(profile: Profile, groups: list[str] | None) -> np.ndarray:
    if groups is None:
        return np.ones(len(profile.devices), dtype=bool)
    return np.array([d.group in groups for d in profile.devices])


def expert_seconds_per_token(spec: MoESpec, device: Device, precision: str, settings: SimSettings,
                             rows: float = 256.0) -> float:
    """Seconds per routed token for one expert on `device` at a typical batch of `rows` tokens."""
    d, i = spec.hidden_size, spec.moe_intermediate_size
    return expert_seconds(device.type, precision, rows, d, i, expert_bytes(precision, d, i),
                          activation_bytes(precision), gemm_eff(settings, device.type)) / rows


def attention_line(spec: MoESpec, devices, att_prec, settings: SimSettings, is_att, kv: float = NOMINAL_KV
                   ) -> tuple[np.ndarray, np.ndarray]:
    """([D] fixed, [D] per-request) seconds of one MoE layer's decode attention stage on each attention device
    (attention, norms and router, for requests of `kv` context tokens; 0 off the attention devices). The fixed
    part is mostly the attention weights, re-read every step whatever the batch. With tensor-parallel attention a
    device's requests are its 1/tp share of its group's; with MTP each request verifies 1 + draft tokens."""
    a0 = np.zeros(len(devices))
    a1 = np.zeros(len(devices))
    kv_elem = DTYPE_BYTES[settings.kv_cache_dtype]
    tp = settings.attention_tp
    q = 1.0 + (settings.mtp.draft_tokens if settings.mtp else 0)
    cache: dict = {}
    for i, d in enumerate(devices):
        if not is_att[i]:
            continue
        key = (d.type.name, att_prec[i])
        if key not in cache:
            eff = {"gemm": gemm_eff(settings, d.type), "attention": attention_eff(settings, d.type),
                   "elementwise": gemm_eff(settings, d.type)}
            t = [stage_seconds(attention_decode_ops(spec, att_prec[i], n * tp, n * tp * kv, kv_elem, tp, q)
                               + layer_misc_ops(spec, att_prec[i], n * tp * q, True,
                                                settings.elementwise_kernels_per_layer, tp=tp),
                               d.type, eff) for n in (1.0, NOMINAL_REQUESTS)]
            per = max((t[1] - t[0]) / (NOMINAL_REQUESTS - 1.0), 1e-300)
            cache[key] = (max(t[0] - per, 0.0), per)
        a0[i], a1[i] = cache[key]
    return a0, a1


def attention_speed(spec: MoESpec, devices, att_prec, settings: SimSettings, is_att) -> np.ndarray:
    """[D] requests per second of attention each attention device sustains at the nominal decode point (0 off
    the attention devices)."""
    a0, a1 = attention_line(spec, devices, att_prec, settings, is_att)
    t = a0 + a1 * NOMINAL_REQUESTS
    return np.where(is_att, NOMINAL_REQUESTS / np.where(t > 0, t, 1.0), 0.0)


def equal_time_requests(a0: np.ndarray, a1: np.ndarray, is_att, ref: int, b: float,
                        cap: np.ndarray | None = None) -> np.ndarray:
    """[D] decode requests per attention device when the attention stage lasts as long as device `ref` takes for
    `b` requests: every attention device gets as many as it serves in that time (`attention_line`), at most `cap`
    [D] (its memory; `ref` included). A device whose fixed attention cost alone exceeds that time gets none: it
    runs its layers on an empty batch (an idle data-parallel rank, as SGLang runs them) and only its experts work,
    rather than one request that would stretch every device's attention stage."""
    T = a0[ref] + a1[ref] * b
    n = np.floor((T - a0) / np.where(is_att, a1, 1.0) + 1e-6)
    n[ref] = b
    if cap is not None:
        n = np.minimum(n, cap)
    return np.where(is_att, np.maximum(n, 0.0), 0.0)


def expert_budget(spec: MoESpec, devices, att_prec, settings: SimSettings, is_att, step_s: float | None
                  ) -> np.ndarray:
    """[D] share of each layer's time a device has left for experts when a decode step takes `step_s` and the
    fastest attention device holds the nominal request count, the others as many as take the same time
    (`equal_time_requests`). None or no attention device: every device has the whole step."""
    D = len(devices)
    if step_s is None or not is_att.any():
        return np.ones(D)
    a0, a1 = attention_line(spec, devices, att_prec, settings, is_att)
    ref = int(np.argmax(attention_speed(spec, devices, att_prec, settings, is_att)))
    n = equal_time_requests(a0, a1, is_att, ref, NOMINAL_REQUESTS)
    a = np.where(is_att & (n > 0), a0 + a1 * n, 0.0)  # [D] per layer
    return np.clip(1.0 - a / (step_s / spec.num_layers), MIN_EXPERT_BUDGET, 1.0)


def build_layout(spec: MoESpec, profile: Profile, settings: SimSettings, popularity: np.ndarray,
                 step_s: float | None = None) -> Layout:
    """Roles, precisions and the expert Plan of a profile for a model; raises when the experts don't fit.
    `step_s`: the decode step the workload's per-user target allows; heterogeneous placements leave each
    device the attention time of its share of requests within it (see the module docstring)."""
    devs = profile.devices
    is_att = _role_mask(profile, settings.attention_devices)
    is_exp = _role_mask(profile, settings.expert_devices)
    prec = tuple(device_precision(d) for d in devs)
    att_prec = tuple(device_precision(d, settings.attention_precision.get(d.group)) for d in devs)
    nodes = np.unique([d.node for d in devs], return_inverse=True)[1]
    budget = expert_budget(spec, devs, att_prec, settings, is_att, step_s)
    placed, planner = _plan(spec, profile, settings, popularity, is_att, is_exp, prec, budget)
    prec = tuple(placed.precision.get(d.id, p) for d, p in zip(devs, prec))  # the plan's word is final
    return Layout(profile, settings, devs, prec, att_prec, is_att, is_exp, nodes, placed, popularity, planner)


def fixed_bytes(spec: MoESpec, device: Device, precision: str, att_precision: str, attention: bool,
                settings: SimSettings) -> float:
    """Weights other than routed experts, plus the workspace, held on a device."""
    out = settings.workspace_gb * 1e9 + device.reserved_bytes
    tp = settings.attention_tp
    if attention:
        out += attention_block_bytes(spec, att_precision, tp)
        if settings.shared_experts == "local":
            out += shared_expert_bytes(spec, precision, tp)
        if settings.mtp and settings.mtp.draft_layers:  # the MTP module's attention and shared experts
            shared = shared_expert_bytes(spec, precision, tp) / max(spec.num_moe_layers, 1)
            out += settings.mtp.draft_layers * (attention_layer_bytes(spec, att_precision, tp) + shared)
    return out


def expert_room(spec: MoESpec, device: Device, precision: str, attention: bool, settings: SimSettings,
                tight: bool = False) -> float:
    """Bytes of a device's memory routed experts may take: what its fixed bytes leave, less the share an attention
    device keeps for the KV cache, or with `tight` only MIN_KV_SHARE_OF_MEMORY of its memory (negative when the
    fixed bytes alone do not fit)."""
    free = device.memory_bytes - fixed_bytes(spec, device, precision, precision, attention, settings)
    if not attention:
        return free
    return free - MIN_KV_SHARE_OF_MEMORY * device.memory_bytes if tight else free * EXPERT_SHARE_OF_FREE_MEMORY


def _slot_limits(spec: MoESpec, profile: Profile, settings: SimSettings, is_att, is_exp, prec) -> dict:
    """{"slots": [D]} from `extra.sim.slots_per_device`, else {"max_slots": [D]}: the routed-expert slots per MoE
    layer each device's memory gives experts (0 off the expert devices)."""
    devs = profile.devices
    E, L = spec.num_experts, spec.num_moe_layers
    R = E + settings.redundant_experts
    ids = np.nonzero(is_exp)[0]
    if not len(ids):
        raise ProfileError(f"profile '{profile.name}': extra.sim.expert_devices leaves no device for the experts")
    out = np.zeros(len(devs), dtype=np.int64)
    explicit = settings.slots_per_device
    if explicit:
        missing = sorted({devs[i].group for i in ids} - set(explicit))
        if missing:
            raise ProfileError(f"profile '{profile.name}': extra.sim.slots_per_device has no entry for expert "
                               f"group '{missing[0]}'; give every expert group a slot count")
        out[ids] = [explicit[devs[i].group] for i in ids]
        if out.sum() != R:
            raise ProfileError(f"profile '{profile.name}': slots_per_device add up to {out.sum()} slots per layer, "
                               f"but {E} experts + {settings.redundant_experts} redundant need {R}; fix one of them")
        return {"slots": out}
    for tight in (False, True):  # the KV cache's share first; where that cannot hold every expert, its least
        for i in ids:
            per_slot = L * expert_bytes(prec[i], spec.hidden_size, spec.moe_intermediate_size)
            out[i] = max(0, int(expert_room(spec, devs[i], prec[i], bool(is_att[i]), settings, tight) // per_slot))
        if out.sum() >= R:
            if tight:
                log.warning("model '%s' fits profile '%s' only with its experts taking the memory its attention "
                            "devices would keep for the KV cache: the batch is what is left", spec.name, profile.name)
            break
    if out.sum() < R:
        need = R * L * expert_bytes(prec[ids[0]], spec.hidden_size, spec.moe_intermediate_size) / 1e9
        raise PlacementError(f"model '{spec.name}' does not fit profile '{profile.name}': its expert devices hold at "
                             f"most {out.sum()} expert slots per layer but {R} are needed (about {need:,.0f} GB of "
                             "experts); add devices or memory, or use a lower precision")
    return {"max_slots": out}


def _plan(spec, profile, settings, popularity, is_att, is_exp, prec, budget) -> tuple[Plan, str]:
    devs = profile.devices
    limits = _slot_limits(spec, profile, settings, is_att, is_exp, prec)
    load = popularity * 1e6  # [L, E] tokens in proportion to popularity
    # The planner's own cost model sees neither attention work nor the weights re-read each step, so it plans with it
    # only where every device is alike; mixed device types get the simulation's figures and remaining time budgets.
    uniform = len({d.type.name for d in devs}) == 1 and (is_att.all() or not is_att.any())
    if is_exp.all() and not settings.slots_per_device and uniform:
        p = _planner_plan(spec, profile, settings, load, is_att, prec)
        if p is not None:
            return p, PLANNER_OWN_MODEL

    att = np.nonzero(is_att)[0]
    dense = int(att[0]) if len(att) else int(np.nonzero(is_exp)[0][0])
    cost = np.array([expert_seconds_per_token(spec, d, p, settings) for d, p in zip(devs, prec)])  # [D]
    overrides = DeviceOverrides(cost=cost, time_budget=budget, dense_device=dense, **limits)
    args = {"load": load, "redundant_experts": settings.redundant_experts, "shared_experts": "dense",
            "overrides": overrides}
    try:
        return plan(spec, profile, **args), PLANNER_SIM_FIGURES
    except HetrunError:
        raise
    except Exception as e:  # noqa: BLE001 -- a solver bug must not take the simulation down where EPLB can place
        failure = f"{type(e).__name__}: {e}"
    try:
        p = plan(spec, profile, policy="eplb", **args)
    except PlacementError:  # EPLB needs equal slots on every device
        raise HetrunError(f"placement solver failed for profile '{profile.name}': {failure}") from None
    log.warning("placement solver failed (%s); placing with EPLB instead", failure)
    return p, EPLB_FALLBACK


def _planner_plan(spec, profile, settings, load, is_att, prec) -> Plan | None:
    """The planner's Plan for this profile with its own cost model, the memory the simulation keeps on each device
    (attention weights, shared experts, workspace and KV headroom) reserved; None when it cannot place it."""
    keep = np.array([d.memory_bytes - expert_room(spec, d, p, bool(a), settings)
                     for d, p, a in zip(profile.devices, prec, is_att)])  # [D]
    try:
        return plan(spec, profile, load=load, redundant_experts=settings.redundant_experts,
                    overrides=DeviceOverrides(reserved_bytes=keep))
    except (PlacementError, PrecisionError) as e:
        msg = f"planner.plan cannot place profile '{profile.name}' ({e}); using the placement solver directly"
    except Exception as e:  # noqa: BLE001 -- another module's bug must not stop the simulation
        msg = f"planner.plan failed on profile '{profile.name}' ({type(e).__name__}: {e}); using the placement solver"
    warn_once(("planner fallback", profile.name), "%s", msg)
    return None
