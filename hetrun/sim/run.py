"""Simulate one profile or compare several: the numbers a person buying hardware looks at.

`simulate` returns a `SimResult` (prefill and decode phases, cost, energy, memory, the plan); `compare` runs
several profiles on one workload and states the difference Mélange-style (cost at the same latency target)
and HexGen-style (throughput at the same budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetrun.errors import HetrunError
from hetrun.profile import Profile, load_profile
from hetrun.sim.economics import (
    DEEPSEEK_R1_PRICE,
    ApiPrice,
    kg_co2_per_million,
    profile_price_per_hour,
    usd_per_million,
)
from hetrun.sim.engine import PhaseResult, StepModel
from hetrun.sim.settings import sim_settings
from hetrun.sim.workload import Workload, load_workload
from hetrun.spec import MoESpec

PHASES = ("prefill", "decode", "aggregated")


@dataclass
class SimResult:
    spec: MoESpec
    profile: Profile
    workload: Workload
    model: StepModel
    phases: dict[str, PhaseResult]
    usd_per_hour: float
    api_price: ApiPrice = DEEPSEEK_R1_PRICE
    row: dict = field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return len(self.profile.devices)

    @property
    def num_nodes(self) -> int:
        return self.profile.num_nodes


def load_spec(model: "str | MoESpec") -> MoESpec:
    """`model` itself, or the spec of a preset name, a transformers model directory or its config.json."""
    if isinstance(model, MoESpec):
        return model
    from hetrun.checkpoint.config import model_spec  # imports transformers: only for a model given by name or path

    return model_spec(str(model))


def default_phases(profile: Profile) -> tuple[str, ...]:
    """The phases a profile serves: aggregated, or prefill and decode on separate deployments."""
    return ("aggregated",) if sim_settings(profile).serving == "aggregated" else ("prefill", "decode")


def resolve_workload(workload: "str | Workload | dict | None", profile: "str | Profile | None" = None) -> Workload:
    """The workload: as given, else the profile's own `extra.workload` (a workload mapping, as the published
    profiles carry their benchmark's setup), else the `chat` preset."""
    if workload is not None:
        return load_workload(workload)
    if profile is not None:
        prof = load_profile(profile)
        own = prof.model.extra.get("workload")
        if isinstance(own, str):
            return load_workload(own)
        if own is not None:
            if not isinstance(own, dict):
                raise HetrunError(f"profile '{prof.name}': extra.workload must be a preset name or a workload "
                                  "mapping (prompt, output, ...)")
            return load_workload(dict(own, name=own.get("name", prof.name)))
    return load_workload("chat")


def simulate(model: "str | MoESpec", profile: "str | Profile", workload: "str | Workload | None" = None,
             phases: tuple[str, ...] | None = None, trace: bool = False, expert_load=None) -> SimResult:
    """Simulate prefill and/or decode (or aggregated serving) of `model` on `profile` under `workload`; no weights
    are loaded. `phases` None: what the profile's `extra.sim.serving` says. `expert_load`: a [layers, experts]
    load trace (path or array) that replaces the workload's expert popularity."""
    spec = load_spec(model)
    prof = load_profile(profile)
    wl = resolve_workload(workload, prof)
    if expert_load is not None:
        wl = wl.replace(expert_load=expert_load)
    phases = default_phases(prof) if phases is None else tuple(phases)
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise HetrunError(f"unknown phase {bad[0] if bad else '(none)'!r}; use prefill, decode or aggregated")
    price = profile_price_per_hour(prof)
    sm = StepModel(spec, prof, wl)
    results = {p: getattr(sm, p)(trace=trace) for p in phases}
    res = SimResult(spec, prof, wl, sm, results, price)
    res.row = summary_row(res)
    return res


def _num(x) -> float | None:
    """A finite float, or None (reports show '-' and JSON null, never NaN or inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summary_row(r: SimResult) -> dict:
    """The flat row a table, CSV or JSON shows for one simulated profile."""
    prof, wl, sm = r.profile, r.workload, r.model
    n_dev, n_node = r.num_devices, r.num_nodes
    grid = prof.model.grid_kg_co2_per_kwh
    types = sorted({d.type.name for d in prof.devices})
    row: dict = {"profile": prof.name, "devices": n_dev, "nodes": n_node, "device_types": ", ".join(types),
                 "usd_per_hour": r.usd_per_hour, "workload": wl.name, "model": r.spec.name,
                 "planner": sm.layout.planner, "api_price": r.api_price.__dict__, "serving": sm.settings.serving}
    pre, dec, agg = r.phases.get("prefill"), r.phases.get("decode"), r.phases.get("aggregated")
    if agg is not None:
        row.update(_aggregated_row(r, agg))
    if pre is not None and agg is None:
        ok = pre.feasible
        row.update({
            "prefill_ok": ok, "prefill_note": pre.reason,
            "prefill_tokens_per_s": _num(pre.tokens_per_s) if ok else None,
            "prefill_tokens_per_s_per_device": _num(pre.tokens_per_s / n_dev) if ok else None,
            "prefill_tokens_per_s_per_node": _num(pre.tokens_per_s / n_node) if ok else None,
            "prefill_computed_tokens_per_s": _num(pre.computed_tokens_per_s) if ok else None,
            "prefill_capacity_tokens_per_s": _num(pre.capacity_tokens_per_s) if ok else None,
            "prefill_utilization": _num(pre.utilization) if ok else None,
            "prefill_chunk_tokens": _num(pre.batch_per_device),
            "ttft_s": _num(pre.ttft_s) if ok else None,
            "prefill_j_per_token": _num(pre.joules_per_token) if ok else None,
        })
        hit_rate = _hit_capacity(sm)
        row["usd_per_m_input_miss"] = usd_per_million(r.usd_per_hour, pre.computed_tokens_per_s) if ok else None
        row["usd_per_m_input_hit"] = usd_per_million(r.usd_per_hour, hit_rate)
        row["usd_per_m_input"] = usd_per_million(r.usd_per_hour, pre.tokens_per_s) if ok else None
        row["kg_co2_per_m_input"] = _num(kg_co2_per_million(pre.joules_per_token, grid)) if ok else None
    if dec is not None and agg is None:
        ok = dec.feasible
        row.update({
            "decode_ok": ok, "decode_note": dec.reason,
            # shown even when the target is missed (at one request per device), priced only when met
            "decode_tokens_per_s": _num(dec.tokens_per_s),
            "decode_tokens_per_s_per_device": _num(dec.tokens_per_s / n_dev),
            "decode_tokens_per_s_per_node": _num(dec.tokens_per_s / n_node),
            "tpot_s": _num(dec.tpot_s),
            "per_user_tps": _num(dec.per_user_tps),
            "decode_batch_per_device": _num(dec.batch_per_device),
            "decode_limit": dec.limit,
            "tokens_per_step": _num(dec.tokens_per_step),
            "decode_j_per_token": _num(dec.joules_per_token),
            "usd_per_m_output": usd_per_million(r.usd_per_hour, dec.tokens_per_s) if ok else None,
            "kg_co2_per_m_output": _num(kg_co2_per_million(dec.joules_per_token, grid)) if ok else None,
            "busy_fraction": _num(dec.busy_fraction),
        })
        row["memory"] = _clean(dec.memory)
    elif pre is not None and agg is None:
        row["memory"] = _clean(pre.memory)
    if agg is not None:
        pass  # priced whole in _aggregated_row
    elif pre is not None and dec is not None and row.get("usd_per_m_input") and row.get("usd_per_m_output"):
        s = wl.sample
        row["usd_per_1k_requests"] = (float(s.prompt.mean()) * row["usd_per_m_input"]
                                      + float(s.output.mean()) * row["usd_per_m_output"]) / 1e3
    else:
        row["usd_per_1k_requests"] = None
    return row


def _aggregated_row(r: SimResult, agg: PhaseResult) -> dict:
    """Row fields of aggregated serving: its output tokens under the decode names, its input under prefill's; the
    whole deployment's cost goes to requests ($ per 1k requests, and per million output tokens all-in)."""
    n_dev, n_node, ok = r.num_devices, r.num_nodes, agg.feasible
    grid = r.profile.model.grid_kg_co2_per_kwh
    smp = r.workload.sample
    req_per_s = agg.tokens_per_s / float(smp.output.mean())
    return {
        "serving": "aggregated", "aggregated_ok": ok, "aggregated_note": agg.reason,
        "decode_ok": ok, "decode_note": agg.reason, "prefill_ok": ok, "prefill_note": agg.reason,
        "decode_tokens_per_s": _num(agg.tokens_per_s), "decode_tokens_per_s_per_device": _num(agg.tokens_per_s / n_dev),
        "decode_tokens_per_s_per_node": _num(agg.tokens_per_s / n_node),
        "prefill_tokens_per_s": _num(agg.input_tokens_per_s),
        "prefill_tokens_per_s_per_device": _num(agg.input_tokens_per_s / n_dev),
        "prefill_tokens_per_s_per_node": _num(agg.input_tokens_per_s / n_node),
        "prefill_computed_tokens_per_s": _num(agg.computed_tokens_per_s),
        "requests_per_s": _num(req_per_s), "ttft_s": _num(agg.ttft_s), "tpot_s": _num(agg.tpot_s),
        "per_user_tps": _num(agg.per_user_tps), "decode_batch_per_device": _num(agg.batch_per_device),
        "decode_limit": agg.limit, "tokens_per_step": _num(agg.tokens_per_step),
        "decode_j_per_token": _num(agg.joules_per_token), "busy_fraction": _num(agg.busy_fraction),
        "usd_per_m_output": usd_per_million(r.usd_per_hour, agg.tokens_per_s) if ok else None,
        "usd_per_1k_requests": (r.usd_per_hour / 3.6 / req_per_s) if ok and req_per_s > 0 else None,
        "kg_co2_per_m_output": _num(kg_co2_per_million(agg.joules_per_token, grid)) if ok else None,
        "memory": _clean(agg.memory),
    }


def _hit_capacity(sm: StepModel) -> float:
    """Prefix-cache-hit tokens/s the deployment can load (KV read bandwidth of its attention devices)."""
    s = sm.settings
    if s.kv_load_gbs:
        bw = s.kv_load_gbs
    elif sm.links.inter is not None:
        bw = sm.links.inter.bandwidth_gbs * sm.links.inter.efficiency
    else:
        bw = min(x.bandwidth_gbs * x.efficiency for x in sm.links.intra)
    return float(sm.att.sum()) * bw * 1e9 / sm.kv_per_token


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _num(obj) if isinstance(obj, np.floating) else int(obj)
    if isinstance(obj, float):
        return _num(obj)
    return obj


@dataclass
class Comparison:
    results: list[SimResult]
    melange: dict  # cost at the same latency target
    hexgen: dict  # throughput at the same budget
    statements: list[str]

    @property
    def rows(self) -> list[dict]:
        return [r.row for r in self.results]


def is_homogeneous(profile: Profile) -> bool:
    return len({d.type.name for d in profile.devices}) == 1


def compare(model: "str | MoESpec", profiles: list, workload: "str | Workload | None" = None,
            trace: bool = False) -> Comparison:
    """Simulate every profile on one workload and state the cost difference two ways."""
    if not profiles:
        raise HetrunError("compare needs at least one profile")
    wl = resolve_workload(workload, profiles[0])
    results = [simulate(model, p, wl, trace=trace) for p in profiles]
    cost = {r.profile.name: r.row.get("usd_per_1k_requests") for r in results}
    homo = [r for r in results if is_homogeneous(r.profile) and cost[r.profile.name]]
    mixed = [r for r in results if not is_homogeneous(r.profile) and cost[r.profile.name]]
    melange: dict = {"metric": "$ per 1k requests of the workload at its latency targets "
                               f"({results[0].workload.per_user_tps:g} tokens/s per user, TTFT <= "
                               f"{results[0].workload.ttft_s:g} s)", "usd_per_1k_requests": cost}
    hexgen: dict = {"metric": "requests/s each profile serves for the same $ per hour", "requests_per_s": {}}
    statements = []
    budget = results[0].usd_per_hour
    hexgen["budget_usd_per_hour"] = budget
    for r in results:
        c = cost[r.profile.name]
        hexgen["requests_per_s"][r.profile.name] = (budget / 3600.0) / (c / 1e3) if c else None
    if homo:
        best = min(homo, key=lambda r: cost[r.profile.name])
        bc = cost[best.profile.name]
        melange["best_homogeneous"] = best.profile.name
        melange["relative_cost_pct"] = {n: (c / bc - 1) * 100 if c else None for n, c in cost.items()}
        hexgen["best_homogeneous"] = best.profile.name
        hexgen["relative_throughput_pct"] = {n: (bc / c - 1) * 100 if c else None for n, c in cost.items()}
        for r in mixed or [x for x in results if x is not best]:
            c = cost[r.profile.name]
            d = (1 - c / bc) * 100
            statements.append(
                f"Mélange-style: '{r.profile.name}' costs {abs(d):.1f}% {'less' if d >= 0 else 'more'} than the best "
                f"single-type profile '{best.profile.name}' at the same latency target "
                f"(${c:.3f} vs ${bc:.3f} per 1k requests).")
            g = (bc / c - 1) * 100
            statements.append(
                f"HexGen-style: for the same budget, '{r.profile.name}' serves {abs(g):.1f}% "
                f"{'more' if g >= 0 else 'less'} throughput than '{best.profile.name}'.")
    infeasible = [r.profile.name for r in results if not cost[r.profile.name]]
    for n in infeasible:
        r = next(x for x in results if x.profile.name == n)
        why = "; ".join(p.reason for p in r.phases.values() if not p.feasible) or "no cost could be computed"
        statements.append(f"'{n}' cannot serve this workload at its targets: {why}.")
    return Comparison(results, melange, hexgen, statements)
