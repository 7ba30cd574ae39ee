"""The cheapest fleet of instances that serves a workload within a latency SLO, as Mélange does.

    from hetrun.sim.fleet import search_fleet
    f = search_fleet("deepseek-r1", "chat", "ttft=2s,tpot=50ms", ["h800", "ascend-910b2", "xeon-8480"], rate=20)
    f.best["usd_per_hour"], f.best["devices"], f.single_type["usd_per_hour"], f.pareto

Candidates: for each device type, instances of the smallest node count that holds the model and two and four times
that (nodes of 8 accelerators or 2 CPU sockets; the link between nodes by vendor, see NODES); for each pair of
types, one node of each (an accelerator with CPU sockets in the same node: attention on the accelerator, cold
experts on the CPUs, as KTransformers runs them; two accelerator types: expert parallelism across both). Each
instance runs as a prefill instance, a decode instance (prefill/decode disaggregated) or an aggregated one.

Cost oracle: the step model (hetrun.sim.engine) gives each candidate's requests/s within the SLO -- prefill at the
TTFT target (with queueing), decode at the TPOT target, aggregated at both -- for each bucket of the workload
(requests split by prompt length, as Mélange splits by request size). The placement inside every instance is
hetrun.placement.planner.plan's, through the simulator (hetrun.sim.roles).

Integer program (scipy.optimize.milp): x_c instances of candidate c (integer), y_cb requests/s of bucket b that c
serves (prefill candidates for the prompt, decode candidates for the output, aggregated ones for both):
    minimise  sum_c price_c x_c
    subject to  sum_{c prefills} y_cb = sum_{c decodes} y_cb = rate x share_b   for every bucket b
                sum_b y_cb / capacity_cb <= x_c                                 for every candidate c
                sum_c price_c x_c <= budget                                     (with a budget)
With a budget and no rate it maximises the rate instead. The same program restricted to one device type gives the
best single-type fleet, shown beside the mix; solved again at tighter and looser SLOs it gives the Pareto front of
cost against latency.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from hetrun.errors import HetrunError
from hetrun.formats import expert_bytes
from hetrun.profile import device_catalog, load_profile
from hetrun.sim.engine import StepModel
from hetrun.sim.operators import attention_block_bytes, shared_expert_bytes
from hetrun.sim.requests import parse_slo
from hetrun.sim.roles import EXPERT_SHARE_OF_FREE_MEMORY
from hetrun.sim.run import load_spec, resolve_workload
from hetrun.sim.workload import LengthDist, Workload

ROLES = ("prefill", "decode", "aggregated")
SIZES = (1, 2, 4)  # instance sizes tried, in multiples of the smallest node count that holds the model
PARETO_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # SLO multipliers of the Pareto front
MAX_NUM_TOKENS = 8192  # aggregated instances' token budget per step and device (TensorRT-LLM's default max_num_tokens)
# Devices per node and the link between nodes by vendor and kind (one NIC per device). NVIDIA: one 400 Gb/s CX7
# InfiniBand NIC per GPU, of which DeepEP measures 39-58 GB/s (github.com/deepseek-ai/DeepEP README); Huawei: one
# 200 GbE RoCE port per Ascend 910B NPU; CPUs: one 100 GbE NIC per socket. Efficiencies, latencies and the CPU and
# default rows are assumptions; write a profile by hand for any other layout.
NODES = {
    ("nvidia", "gpu"): (8, {"name": "InfiniBand 400 Gb/s per GPU", "bandwidth_gbs": 50, "latency_us": 8,
                            "efficiency": 0.8}),
    ("huawei", "npu"): (8, {"name": "RoCE 200 Gb/s per NPU", "bandwidth_gbs": 25, "latency_us": 10,
                            "efficiency": 0.8}),
    ("intel", "cpu"): (2, {"name": "100 GbE per socket", "bandwidth_gbs": 12.5, "latency_us": 15,
                           "efficiency": 0.8}),
}
DEFAULT_NODE = (8, {"name": "200 Gb/s per device", "bandwidth_gbs": 25, "latency_us": 10, "efficiency": 0.8})
PCIE = {"name": "PCIe 5.0 x16", "bandwidth_gbs": 64, "latency_us": 10, "efficiency": 0.8}
# Kernel efficiencies measured on Hopper (the same figures deepseek-*-h800 profiles use): DeepGEMM's FP8 GEMM table
# fitted by tests/test_sim_deepseek.py, FlashMLA's README for attention.
HOPPER = {"gemm": {"compute": 0.546, "memory": 0.877, "launch_us": 3.03}, "attention": {"compute": 0.667,
                                                                                       "memory": 0.896}}
HOPPER_TYPES = ("h800", "h100-sxm", "h200", "h20")
SERVING_PRECISIONS = ("fp8", "int8", "bf16", "fp16", "int4", "fp32")  # what an instance runs: the first it has


@dataclass
class Candidate:
    """One kind of instance: its devices, its role and its capacity (requests/s per bucket at each SLO scale)."""

    name: str
    role: str
    parts: tuple[tuple[str, int], ...]  # (device type, count)
    profile: dict
    usd_per_hour: float
    capacity: dict = field(default_factory=dict)  # scale -> [B] requests/s (0: cannot meet the SLO)
    note: str = ""
    model: StepModel | None = None

    @property
    def types(self) -> set[str]:
        return {t for t, _ in self.parts}


@dataclass
class FleetResult:
    model: str
    workload: str
    slo: dict
    rate: float | None
    budget: float | None
    buckets: list[dict]
    candidates: list[Candidate]
    best: dict | None
    single_type: dict | None
    per_type: dict
    comparison: str
    pareto: list[dict]

    def to_dict(self) -> dict:
        return {"model": self.model, "workload": self.workload, "slo": self.slo, "rate_rps": self.rate,
                "budget_usd_per_hour": self.budget, "buckets": self.buckets, "best": self.best,
                "best_single_type": self.single_type, "per_type": self.per_type, "comparison": self.comparison,
                "pareto": self.pareto,
                "candidates": [{"name": c.name, "role": c.role, "devices": dict(c.parts), "usd_per_hour": c.usd_per_hour,
                                "capacity_rps": [float(v) for v in c.capacity.get(1.0, [])], "note": c.note}
                               for c in self.candidates]}


# ---- candidates ----------------------------------------------------------------------------------------

def _node(dt) -> tuple[int, dict]:
    return NODES.get((dt.vendor, dt.kind), DEFAULT_NODE)


def _precision(dt) -> str:
    return next((p for p in SERVING_PRECISIONS if p in dt.precisions), dt.precisions[0])


def _dispatch(precisions: list[str]) -> str:
    if all(p == "fp8" for p in precisions):
        return "fp8"
    if all(p in ("fp8", "int8") for p in precisions):
        return "int8"
    return "bf16"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def instance_profile(name: str, parts, role: str) -> dict:
    """A deployment profile for one instance of `parts` [(device type, count)] in `role` (see the module
    docstring)."""
    cat = device_catalog()
    devices, node, links = [], 0, {}
    accel = [t for t, _ in parts if cat[t].kind != "cpu"]
    slowest = None
    for t, n in parts:
        dt = cat[t]
        per_node, link = _node(dt)
        same_node = dt.kind == "cpu" and accel  # CPU sockets sit in the accelerator's node
        devices.append({"id": _safe(t), "type": t, "count": n, "per_node": max(1, min(per_node, n)),
                        "node": 0 if same_node else node, "precision": _precision(dt)})
        if same_node:
            links["intra_node"] = PCIE
        else:
            node += -(-n // per_node)
        if slowest is None or link["bandwidth_gbs"] < slowest["bandwidth_gbs"]:
            slowest = link
    if node > 1:
        links["inter_node"] = slowest
    sim: dict = {"dispatch_dtype": _dispatch([d["precision"] for d in devices]), "combine_dtype": "bf16",
                 "micro_batches": 2, "step_overhead_us": 1500.0, "max_num_tokens": MAX_NUM_TOKENS,
                 "redundant_experts": 32 if sum(n for _, n in parts) >= 32 else 0,
                 "sources": {"instance": "generated by hetrun fleet (hetrun/sim/fleet.py): nodes and links from its "
                                         "NODES table, efficiencies from the Hopper kernel figures where known"}}
    if accel and len(accel) < len(parts):
        sim["attention_devices"] = [_safe(t) for t in accel]
    hopper = [_safe(t) for t, _ in parts if t in HOPPER_TYPES]
    if hopper:
        sim["gemm_efficiency"] = {t: HOPPER["gemm"] for t, _ in parts if t in HOPPER_TYPES}
        sim["attention_efficiency"] = {t: HOPPER["attention"] for t, _ in parts if t in HOPPER_TYPES}
    if role == "aggregated":
        sim["serving"] = "aggregated"
    return {"name": name, "description": f"hetrun fleet candidate: {role} on " +
            " + ".join(f"{n} {t}" for t, n in parts), "devices": devices, "links": links, "extra": {"sim": sim}}


def _expert_room(spec, dt, precision: str, attention: bool = True) -> float:
    """Bytes of routed experts one device holds beside its attention weights, shared experts and workspace, leaving
    the share of free memory the simulator keeps for the KV cache (as hetrun.sim.roles.expert_room)."""
    keep = (attention_block_bytes(spec, precision) + shared_expert_bytes(spec, precision) if attention else 0) + 2e9
    free = dt.memory_gb * 1e9 - keep
    return max(free, 0.0) * (EXPERT_SHARE_OF_FREE_MEMORY if attention else 1.0)


def _experts_bytes(spec, precision: str) -> float:
    return spec.num_moe_layers * spec.num_experts * expert_bytes(precision, spec.hidden_size,
                                                                 spec.moe_intermediate_size)


def _min_count(spec, dt, precision: str) -> int:
    """Devices of a type, whole nodes, that hold the routed experts (0: a device cannot even hold its attention)."""
    per_node, _ = _node(dt)
    free = _expert_room(spec, dt, precision)
    if free <= 0:
        return 0
    n = max(1, math.ceil(_experts_bytes(spec, precision) / free))
    return per_node * -(-n // per_node)


def _pair(spec, a, b) -> tuple[tuple[str, int], ...] | None:
    """Two device types in one instance, as few as hold the experts: accelerator + CPU sockets (one accelerator
    node, CPUs holding the rest), or equal numbers of nodes of two accelerator types."""
    cat = device_catalog()
    da, db = cat[a], cat[b]
    if da.kind == "cpu" and db.kind == "cpu":
        return None
    if da.kind == "cpu":
        a, b, da, db = b, a, db, da
    pa, pb = _node(da)[0], _node(db)[0]
    need = _experts_bytes(spec, _precision(da))
    ra = _expert_room(spec, da, _precision(da))
    if db.kind == "cpu":
        rb = _expert_room(spec, db, _precision(db), attention=False)
        if rb <= 0:
            return None
        m = max(pb, pb * math.ceil(max(need - pa * ra, 0.0) / (pb * rb)))
        return ((a, pa), (b, m))
    rb = _expert_room(spec, db, _precision(db))
    if ra + rb <= 0:
        return None
    k = max(1, math.ceil(need / (pa * ra + pb * rb)))
    return ((a, pa * k), (b, pb * k))


def candidates(spec, types: list[str], sizes=SIZES) -> list[Candidate]:
    """Every candidate instance of the device types (see the module docstring), before evaluation."""
    cat = device_catalog()
    unknown = [t for t in types if t not in cat]
    if unknown:
        raise HetrunError(f"unknown device type '{unknown[0]}'; known types: {', '.join(sorted(cat))}")
    if not types:
        raise HetrunError("give at least one device type, e.g. --devices h800,ascend-910b2")
    out: list[Candidate] = []
    shapes: list[tuple[tuple[str, int], ...]] = []
    for t in types:
        base = _min_count(spec, cat[t], _precision(cat[t]))
        if base:
            shapes += [((t, base * k),) for k in sizes]
    for i, a in enumerate(types):
        for b in types[i + 1:]:
            pair = _pair(spec, a, b)
            if pair is not None:
                shapes.append(pair)
    for parts in shapes:
        for role in ROLES:
            name = "+".join(f"{n}x{t}" for t, n in parts) + f":{role}"
            prof = instance_profile(_safe(name), parts, role)
            price = sum(n * cat[t].price_per_hour for t, n in parts)
            out.append(Candidate(name, role, parts, prof, price))
    return out


# ---- buckets and capacities ------------------------------------------------------------------------------

def buckets_of(wl: Workload, k: int) -> tuple[list[Workload], np.ndarray]:
    """The workload split into k buckets by prompt length (equal request counts), and each bucket's share."""
    if k < 1:
        raise HetrunError(f"--buckets must be at least 1, got {k}")
    if k == 1:
        return [wl], np.ones(1)
    s = wl.sample
    edges = np.quantile(s.prompt, np.linspace(0, 1, k + 1))
    idx = np.clip(np.searchsorted(edges, s.prompt, side="right") - 1, 0, k - 1)
    out, share = [], []
    for b in range(k):
        m = idx == b
        if not m.any():
            continue
        p, o = s.prompt[m].astype(float), s.output[m].astype(float)
        dist = lambda x: LengthDist(float(x.mean()), float(x.std() / x.mean()) if x.mean() else 0.0,  # noqa: E731
                                    int(x.min()), int(x.max()))
        out.append(wl.replace(name=f"{wl.name}[{b}]", prompt=dist(p), output=dist(o), target_avg_kv=None,
                              requests=max(64, int(m.sum()))))
        share.append(m.mean())
    return out, np.array(share) / np.sum(share)


def _capacity(c: Candidate, spec, wl: Workload, bucket_wls: list[Workload], slo: dict, scale: float,
              models: dict) -> np.ndarray:
    """[B] requests/s one instance of `c` serves of each bucket within the SLO scaled by `scale` (0: it cannot).
    `models`: step models by device parts, shared by a shape's three roles (one placement each)."""
    if c.parts not in models:
        models[c.parts] = StepModel(spec, load_profile(c.profile), wl)
    c.model = sm = models[c.parts]
    out = np.zeros(len(bucket_wls))
    for b, bw in enumerate(bucket_wls):
        sm.workload = bw.replace(per_user_tps=1.0 / (slo["tpot"] * scale), ttft_s=slo["ttft"] * scale)
        smp = sm.workload.sample
        if c.role == "prefill":
            ph = sm.prefill()
            out[b] = ph.computed_tokens_per_s / float(smp.new.mean()) if ph.feasible else 0.0
        elif c.role == "decode":
            ph = sm.decode()
            out[b] = ph.tokens_per_s / float(smp.output.mean()) if ph.feasible else 0.0
        else:
            ph = sm.aggregated()
            out[b] = ph.tokens_per_s / float(smp.output.mean()) if ph.feasible else 0.0
        if not ph.feasible and scale == 1.0 and not c.note:
            c.note = f"{c.role}: {ph.reason or ph.limit}"
    sm.workload = wl
    return out


# ---- the integer program -----------------------------------------------------------------------------------

def solve(cands: list[Candidate], scale: float, share: np.ndarray, rate: float | None, budget: float | None
          ) -> dict | None:
    """The cheapest integer mix of candidates serving `rate` requests/s (or the most requests/s within `budget`
    when rate is None); None when no mix can."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # heavy: only when a fleet is searched

    C, B = len(cands), len(share)
    cap = np.array([c.capacity.get(scale, np.zeros(B)) for c in cands])  # [C, B]
    if not C or not (cap > 0).any():
        return None
    nx, ny = C, C * B
    n = nx + ny + 1  # x, y, r
    price = np.array([c.usd_per_hour for c in cands])
    A, lo, hi = [], [], []

    def yi(c, b):
        return nx + c * B + b

    for b in range(B):
        for roles in (("prefill", "aggregated"), ("decode", "aggregated")):
            row = np.zeros(n)
            for c in range(C):
                if cands[c].role in roles:
                    row[yi(c, b)] = 1.0
            row[-1] = -share[b]
            A.append(row)
            lo.append(0.0)
            hi.append(0.0)
    for c in range(C):
        row = np.zeros(n)
        row[c] = -1.0
        for b in range(B):
            if cap[c, b] > 0:
                row[yi(c, b)] = 1.0 / cap[c, b]
        A.append(row)
        lo.append(-np.inf)
        hi.append(0.0)
    if budget is not None:
        row = np.zeros(n)
        row[:nx] = price
        A.append(row)
        lo.append(-np.inf)
        hi.append(budget)
    ub_y = np.where(cap.reshape(-1) > 0, np.inf, 0.0)
    lb = np.concatenate([np.zeros(nx), np.zeros(ny), [rate if rate is not None else 0.0]])
    ub = np.concatenate([np.full(nx, np.inf), ub_y, [rate if rate is not None else np.inf]])
    if rate is not None:
        obj = np.concatenate([price + 1e-6, np.zeros(ny), [0.0]])
    else:
        obj = np.concatenate([1e-6 * price, np.zeros(ny), [-1.0]])
    integrality = np.concatenate([np.ones(nx), np.zeros(ny + 1)])
    res = milp(obj, constraints=LinearConstraint(np.array(A), lo, hi), integrality=integrality,
               bounds=Bounds(lb, ub), options={"time_limit": 60})
    if res.x is None or not res.success:
        return None
    x = np.rint(res.x[:nx]).astype(int)
    y = res.x[nx:nx + ny].reshape(C, B)
    served = float(res.x[-1])
    if served <= 0:
        return None
    chosen = []
    devices: dict[str, int] = {}
    for c in np.nonzero(x)[0]:
        cd = cands[c]
        chosen.append({"candidate": cd.name, "role": cd.role, "instances": int(x[c]), "devices": dict(cd.parts),
                       "usd_per_hour": float(x[c] * cd.usd_per_hour),
                       "requests_per_s": float(y[c].sum()), "utilization": float((y[c] / np.where(cap[c] > 0, cap[c], 1)
                                                                                  ).sum() / x[c])})
        for t, k in cd.parts:
            devices[t] = devices.get(t, 0) + int(x[c]) * k
    return {"usd_per_hour": float(x @ price), "rate_rps": served, "devices": devices, "instances": chosen,
            "usd_per_1k_requests": float(x @ price) / 3.6 / served}


# ---- the search -----------------------------------------------------------------------------------------

def search_fleet(model, workload, slo, devices: list[str], rate: float | None = None, budget: float | None = None,
                 buckets: int = 1, expert_load=None, pareto: bool = True, progress=None) -> FleetResult:
    """The cheapest mix of instances that serves `rate` requests/s (default the workload's arrival_rate) of
    `workload` within `slo` ('ttft=2s,tpot=50ms'), or the most requests/s within `budget` $/h; with the best
    single-type fleet, the EP layout and placement of the mix, and the Pareto front (see the module docstring)."""
    spec = load_spec(model)
    wl = resolve_workload(workload)
    if expert_load is not None:
        wl = wl.replace(expert_load=expert_load)
    slo_d = dict(slo) if isinstance(slo, dict) else parse_slo(slo, wl)
    if rate is None:
        rate = wl.arrival_rate
    if rate is None and budget is None:
        raise HetrunError("give the load to serve (--rate requests/s, or arrival_rate in the workload) or a "
                          "--budget in $ per hour to serve the most within")
    for name, v in (("rate", rate), ("budget", budget)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise HetrunError(f"{name} must be a positive number, got {v!r}")
    bucket_wls, share = buckets_of(wl, int(buckets))
    cands = candidates(spec, list(devices))
    scales = PARETO_SCALES if pareto else (1.0,)
    kept, models = [], {}
    for i, c in enumerate(cands):
        if progress:
            progress(f"[{i + 1}/{len(cands)}] {c.name}")
        try:
            for s in sorted(scales):  # a looser SLO serves at least what a tighter one does
                c.capacity[s] = _capacity(c, spec, wl, bucket_wls, slo_d, s, models)
                if len(c.capacity) > 1:
                    c.capacity[s] = np.maximum(c.capacity[s], c.capacity[max(x for x in c.capacity if x < s)])
        except HetrunError as e:  # does not fit, or no valid layout: drop it, say why
            c.note = str(e)
            c.capacity = {s: np.zeros(len(bucket_wls)) for s in scales}
        kept.append(c)
    best = solve(kept, 1.0, share, rate, budget)
    per_type = {}
    for t in devices:
        only = [c for c in kept if c.types == {t}]
        per_type[t] = solve(only, 1.0, share, rate, budget)
    singles = [(t, r) for t, r in per_type.items() if r is not None]
    single = None
    if singles:
        key = (lambda tr: tr[1]["usd_per_hour"]) if rate is not None else (lambda tr: -tr[1]["rate_rps"])
        t, single = min(singles, key=key)
        single = dict(single, device_type=t)
    if best is not None:
        _describe(best, kept)
    comparison = _compare(best, single, rate is not None)
    front = []
    for s in scales if pareto else ():
        r = solve(kept, s, share, rate, budget)
        front.append({"slo_scale": s, "ttft_s": slo_d["ttft"] * s, "tpot_s": slo_d["tpot"] * s,
                      "usd_per_hour": None if r is None else r["usd_per_hour"],
                      "rate_rps": None if r is None else r["rate_rps"],
                      "devices": None if r is None else r["devices"]})
    front = _pareto(front, rate is not None)
    bk = [{"share": float(sh), "mean_prompt": float(b.sample.prompt.mean()), "mean_output": float(b.sample.output.mean())}
          for b, sh in zip(bucket_wls, share)]
    return FleetResult(spec.name, wl.name, slo_d, rate, budget, bk, kept, best, single, per_type, comparison, front)


def _pareto(points: list[dict], by_cost: bool) -> list[dict]:
    """The points no other beats on both latency (tpot) and cost (or served rate), marked `pareto`."""
    for p in points:
        p["pareto"] = False
        if p["usd_per_hour"] is None:
            continue
        better = lambda q: (q["usd_per_hour"] <= p["usd_per_hour"] if by_cost  # noqa: E731
                            else q["rate_rps"] >= p["rate_rps"])
        p["pareto"] = not any(q is not p and q["usd_per_hour"] is not None and q["tpot_s"] <= p["tpot_s"] and better(q)
                              and (q["tpot_s"] < p["tpot_s"] or q["usd_per_hour"] != p["usd_per_hour"])
                              for q in points)
    return points


def _compare(best: dict | None, single: dict | None, by_cost: bool) -> str:
    if best is None:
        return "no mix of these devices meets the SLO at this load; relax the SLO, lower the rate or add device types"
    if single is None:
        return "no single device type meets the SLO alone; only the mix does"
    if set(best["devices"]) == {single["device_type"]}:
        return (f"the best mix is a single-type fleet ({single['device_type']}): ${best['usd_per_hour']:,.2f}/h for "
                f"{best['rate_rps']:,.2f} requests/s; mixing device types does not pay here")
    if by_cost:
        d = (1 - best["usd_per_hour"] / single["usd_per_hour"]) * 100
        return (f"the mix costs ${best['usd_per_hour']:,.2f}/h, {abs(d):.1f}% {'less' if d > 0 else 'more'} than the "
                f"best single-type fleet ({single['device_type']}, ${single['usd_per_hour']:,.2f}/h)")
    g = (best["rate_rps"] / single["rate_rps"] - 1) * 100
    return (f"within the budget the mix serves {best['rate_rps']:,.2f} requests/s, {abs(g):.1f}% "
            f"{'more' if g >= 0 else 'less'} than the best single-type fleet ({single['device_type']}, "
            f"{single['rate_rps']:,.2f} requests/s)")


def _describe(best: dict, cands: list[Candidate]) -> None:
    """Add each chosen instance's EP layout and placement (the planner's Plan, summarised) to `best`."""
    by_name = {c.name: c for c in cands}
    for inst in best["instances"]:
        c = by_name[inst["candidate"]]
        sm = c.model
        if sm is None:
            continue
        lay = sm.layout
        plan = lay.plan
        slots = np.bincount(plan.device_of.ravel(), minlength=lay.num_devices) / plan.num_layers
        groups = {}
        for i, d in enumerate(lay.devices):
            g = groups.setdefault(d.group, {"device_type": d.type.name, "devices": 0, "precision": lay.precision[i],
                                            "attention": bool(lay.is_attention[i]),
                                            "experts": bool(lay.is_expert[i]), "slots_per_layer": []})
            g["devices"] += 1
            g["slots_per_layer"].append(float(slots[i]))
        for g in groups.values():
            s = g.pop("slots_per_layer")
            g["slots_per_layer"] = {"min": min(s), "max": max(s), "mean": float(np.mean(s))}
        inst["ep_layout"] = {"expert_parallel": int(lay.is_expert.sum()), "slots": int(plan.num_slots),
                             "redundant_experts": int(plan.num_slots - sm.spec.num_experts),
                             "attention_tp": sm.settings.attention_tp, "dispatch_dtype": sm.settings.dispatch_dtype,
                             "groups": groups}
        inst["placement"] = {"placed_by": lay.planner, "num_slots": int(plan.num_slots),
                             "predicted_step_s": plan.predicted.get("step_time_s"),
                             "lower_bound_s": plan.predicted.get("lower_bound_s")}
        inst["profile"] = c.profile


def plans_of(result: FleetResult) -> dict[str, str]:
    """{candidate name: Plan JSON} of every instance the best mix uses (hetrun.placement's Plan.to_json)."""
    if result.best is None:
        return {}
    by_name = {c.name: c for c in result.candidates}
    return {i["candidate"]: by_name[i["candidate"]].model.layout.plan.to_json() for i in result.best["instances"]
            if by_name[i["candidate"]].model is not None}
