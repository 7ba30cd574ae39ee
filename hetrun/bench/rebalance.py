"""`hetrun bench rebalance`: live rebalancing and the hot-expert cache on a load trace whose hot experts drift.

The trace: per window of `--window-steps` steps, a [layers, experts] table of routed tokens (EPLB's layout, one table
per window). Generated from a seed: K components, each a Zipf law (exponent `--zipf`) over its own shuffle of every
layer's experts; every `--period-steps` steps the traffic takes new mixture weights (Dirichlet 0.3: one or two
components dominate), and each window's counts are drawn from the mixture (multinomial, step_tokens x top_k
(token, expert) pairs per step). The default, 48 windows of 50 steps and a shift every 300, holds 8 phases: with
only a few, the first window's phase is a large part of the trace and static plans look better than they are.
`--trace FILE` replays a recorded one instead: a .npy [windows, layers, experts], or
a JSON list of [layers, experts] tables (or {"windows": [...]}).

Modeled (deterministic: hetrun.placement.device_model.predict; DeepSeek-R1 shape, 32 redundant experts, on
`--profile`, default mixed-h100-910b-xeon), per window, the modeled step time of:
  static    the plan hetrun.plan() makes from the first window, kept;
  EPLB      DeepSeek's EPLB placement from the first window (equal slots per device: the plan's slot count
            rounded up to a multiple of the device count, as placement.planner.eplb_baseline; even split), kept;
  live      what hetrun.runtime.rebalancer does: the smoothed load after each window, budgeted_moves within the
            byte budget (default 5% of the plan's expert bytes), switching once the moved copies have crossed the
            profile's links (the modeled preparation; the decision's own CPU time is measured, not modeled);
  oracle    hetrun.plan() re-made for every window from that window's own load, for free.
Reported: the mean step time of each, the share of the static-oracle gap live closes, and bytes moved per window.

Cache (modeled): DeepSeek-R1 on one H100 (FP8, 40 GB reserved: attention, KV cache) beside two Xeon sockets (INT4,
every routed expert's home, as KTransformers runs it); the H100 caches as many experts as its free memory holds.
Per step (counts drawn from the window's mixture), the modeled step time with: no cache, static pinning of the
first window's top-C experts, and the cache policies (decay, LFU, LRU) of hetrun.runtime.expert_cache, loads over
the profile's PCIe link in the background (an expert serves from the first step after its transfer ends).

`--real` adds runs on this CPU (timings are real and noisy; the modeled columns are not): the tiny DeepSeek-V3
model on the `cpu` profile (onnxruntime + OpenVINO), its inputs drifting between token bands, with live rebalancing
against the static plan; and the cache with an onnxruntime device (fast) beside an OpenVINO device (slow, modeled
4x slower), every expert at home on the slow one.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from hetrun.bench import Benchmark
from hetrun.deployment import deploy
from hetrun.errors import HetrunError, PlacementError
from hetrun.files import print_json, strict_json
from hetrun.formats import expert_bytes
from hetrun.placement.device_model import DeviceModel, predict, scale_load
from hetrun.placement.loads import MAX_LOAD_BYTES, check_model_load, read_load
from hetrun.placement.plan import Plan
from hetrun.placement.planner import eplb_best_map, eplb_slots
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import RebalanceSettings, device_catalog, load_profile
from hetrun.roofline import transfer_seconds
from hetrun.runtime.expert_cache import CachePolicy
from hetrun.runtime.rebalancer import SmoothedLoad, decide
from hetrun.spec import MoESpec
from hetrun.tiny_models import tiny_model

R1_REDUNDANT = 32


# ---- traces -----------------------------------------------------------------------------------------------------

def drifting_trace(layers: int, experts: int, windows: int, window_steps: int, period_steps: int, tokens: int,
                   seed: int = 0, zipf: float = 1.0, components: int = 4) -> np.ndarray:
    """[windows, layers, experts] routed (token, expert) pairs per window, from a mixture of Zipf laws that takes new
    weights every `period_steps` steps; `tokens` pairs per step (step tokens x top_k)."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** zipf
    laws = np.stack([[rng.permutation(base) for _ in range(layers)] for _ in range(components)])  # [K, L, E]
    laws /= laws.sum(2, keepdims=True)
    phases = -(-windows * window_steps // period_steps)
    weights = rng.dirichlet(np.full(components, 0.3), phases)  # [P, K]
    out = np.zeros((windows, layers, experts))
    for w in range(windows):
        for s0 in range(w * window_steps, (w + 1) * window_steps, period_steps):  # parts of the window by phase
            s1 = min((w + 1) * window_steps, (s0 // period_steps + 1) * period_steps)
            mix = np.einsum("k,kle->le", weights[s0 // period_steps], laws)  # [L, E]
            out[w] += rng.multinomial((s1 - s0) * tokens, mix / mix.sum(1, keepdims=True))
    return out


def read_trace(path: str, spec: MoESpec) -> np.ndarray:
    """[windows, layers, experts] from a .npy array or a JSON list of [layers, experts] tables ({"windows": [...]}
    too), each window checked against `spec`; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise HetrunError(f"trace '{path}' not found; give a .npy [windows, layers, experts] or a JSON list of tables")
    if p.stat().st_size > MAX_LOAD_BYTES * 64:
        raise HetrunError(f"trace '{path}' is {p.stat().st_size} bytes, more than a trace of 64 full-size tables")
    if p.suffix == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise HetrunError(f"trace '{path}' cannot be read as .npy ({e}); save it with numpy.save") from None
        windows = list(np.asarray(data, dtype=np.float64)) if data.ndim == 3 else None
    else:
        try:
            raw = strict_json(p.read_text())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise HetrunError(f"trace '{path}' is not valid JSON ({' '.join(str(e).split())[:120]})") from None
        windows = raw.get("windows") if isinstance(raw, dict) else raw
        windows = windows if isinstance(windows, list) else None
    if not windows:
        raise HetrunError(f"trace '{path}' must hold a list of [layers, experts] tables, one per window")
    try:
        return np.stack([check_model_load(read_load(w), spec, f"trace '{path}' window {i}")
                         for i, w in enumerate(windows)])
    except PlacementError as e:
        raise HetrunError(str(e)) from None


# ---- modeled rebalancing ----------------------------------------------------------------------------------------

def expert_copy_bytes(plan: Plan) -> float:
    """Bytes of every routed expert copy the plan holds (one per (layer, expert, device))."""
    model = DeviceModel.from_dict(plan.predicted["model"])
    L, E, D = plan.num_layers, plan.spec.num_experts, len(plan.device_ids)
    keys = np.unique((np.arange(L)[:, None] * E + plan.phy2log) * D + plan.device_of)
    return float(model.expert_bytes[keys % D].sum())


def step_time(plan: Plan, model: DeviceModel, load: np.ndarray, share=None) -> float:
    """Modeled seconds per step of `plan` (its own token shares unless `share`) under `load` [L, E]."""
    w = scale_load(load, plan.spec, model.step_tokens)
    return predict(plan.spec, model, plan.phy2log, plan.device_of, plan.share if share is None else share,
                   plan.shared_device_of, w)["step_time_s"]


def eplb_static(plan: Plan, model: DeviceModel, load: np.ndarray):
    """(phy2log, device_of, share) of EPLB on the plan's devices for `load`, as placement's eplb_baseline places it."""
    w = scale_load(load, plan.spec, model.step_tokens)
    return eplb_best_map(plan.spec, model, w, eplb_slots(plan), plan.shared_device_of)[:3]


def replay_rebalance(spec: MoESpec, profile, trace: np.ndarray, window_steps: int, budget_fraction: float,
                     ema: float, threshold: float, oracle: bool = True, redundant: int = R1_REDUNDANT) -> dict:
    """Per-window modeled step times of static, EPLB, live and (optionally) oracle placements over `trace`."""
    W = len(trace)
    prof = load_profile(profile)
    first = make_plan(spec, prof, load=trace[0], redundant_experts=redundant)
    model = DeviceModel.from_dict(first.predicted["model"])
    total = expert_copy_bytes(first)
    budget = budget_fraction * total
    e_p2l, e_dev, e_share = eplb_static(first, model, trace[0])
    rows = {"static": [], "eplb": [], "live": [], "oracle": []}
    moved, decide_s, switches = np.zeros(W), [], []
    settings = prof.model.rebalance or RebalanceSettings()
    settings = settings.model_copy(update={"ema": ema, "threshold": threshold, "max_move_gb": budget / 1e9,
                                           "window_steps": window_steps})
    smoothed = SmoothedLoad(ema)
    live, pending = first, None  # pending: (plan, global step it serves from)
    for w in range(W):
        load = trace[w]
        rows["static"].append(step_time(first, model, load))
        rows["eplb"].append(predict(spec, model, e_p2l, e_dev, e_share, first.shared_device_of,
                                    scale_load(load, spec, model.step_tokens))["step_time_s"])
        # live: the running plan, switching within the window once a pending plan is ready
        t_old = step_time(live, model, load)
        if pending is not None and pending[1] < (w + 1) * window_steps:
            k = max(0, pending[1] - w * window_steps)  # steps of this window on the old plan
            t_new = step_time(pending[0], model, load)
            rows["live"].append((k * t_old + (window_steps - k) * t_new) / window_steps)
            live, pending = pending[0], None
        else:
            rows["live"].append(t_old)
        if oracle:
            rows["oracle"].append(make_plan(spec, prof, load=load, redundant_experts=redundant)
                                  .predicted["step_time_s"])
        smoothed.add(load)
        if pending is None and w + 1 < W:
            t0 = time.perf_counter()
            mp = decide(live, smoothed.value, settings)
            decide_s.append(time.perf_counter() - t0)
            if mp is not None:
                moved[w] = mp.bytes
                prep = _prepare_seconds(prof, mp)
                steps = math.ceil(prep / max(rows["live"][-1], 1e-12))
                pending = (mp.plan, (w + 1) * window_steps + steps)
                switches.append({"after_window": w, "moves": len(mp.moves), "bytes": mp.bytes, "gain": mp.gain,
                                 "prepare_s": prep, "prepare_steps": steps})
    mean = {k: float(np.mean(v)) for k, v in rows.items() if v}
    out = {"windows": W, "window_steps": window_steps, "expert_bytes": total, "budget_bytes": budget,
           "mean_step_s": mean, "per_window_s": rows, "moved_bytes": moved.tolist(),
           "moved_fraction_max": float(moved.max() / total), "moved_fraction_mean": float(moved.mean() / total),
           "decide_s_mean": float(np.mean(decide_s)) if decide_s else 0.0, "switches": switches}
    if oracle and mean["static"] > mean["oracle"]:
        out["gap_closed"] = (mean["static"] - mean["live"]) / (mean["static"] - mean["oracle"])
    return out


def _prepare_seconds(profile, mp) -> float:
    """Modeled time to copy a move plan's experts: each from a device that held it, over the profile's link between
    the two; links into one device run one after another, devices at once."""
    devs = profile.devices
    into = np.zeros(len(devs))
    for m in mp.moves:
        src = devs[m.source] if m.source >= 0 else devs[m.device]
        link = profile.link(src, devs[m.device])
        into[m.device] += transfer_seconds(m.bytes, link.bandwidth_gbs, link.efficiency, link.latency_us)
    return float(into.max()) if len(into) else 0.0


# ---- modeled cache ------------------------------------------------------------------------------------------------

def cache_profile(reserved_gb: float = 40.0) -> dict:
    """One H100 (FP8; `reserved_gb` for attention weights, activations and KV cache) beside two Xeon 8480 sockets
    (INT4, every routed expert pinned there) over PCIe 5.0 x16: the KTransformers layout."""
    return {"name": "h100-xeon-cache", "description": "benchmark profile: KTransformers-style GPU + CPU offload",
            "devices": [{"id": "h100", "type": "h100-sxm", "precision": "fp8", "reserved_gb": reserved_gb},
                        {"id": "xeon", "type": "xeon-8480", "count": 2, "precision": "int4"}],
            "dense_device": "h100", "pins": [{"device": "xeon"}],
            "links": {"intra_node": {"name": "PCIe 5.0 x16", "bandwidth_gbs": 64, "latency_us": 10,
                                     "efficiency": 0.8}}}


def cache_slots(plan: Plan, profile, device: str) -> int:
    """How many routed experts the free memory of `device` holds beside its reserve and shared experts."""
    prof = load_profile(profile)
    d = prof.group(device)[0]
    spec, prec = plan.spec, plan.precision[d.id]
    i = plan.device_ids.index(d.id)
    shared = int((plan.shared_device_of == i).sum()) * expert_bytes(prec, spec.hidden_size,
                                                                      spec.shared_intermediate_size)
    return int((d.memory_bytes - d.reserved_bytes - shared) // expert_bytes(prec, spec.hidden_size,
                                                                              spec.moe_intermediate_size))


class CachedSteps:
    """Modeled step time of a home plan with some (layer, expert) pairs cached on one device, which then takes all
    their tokens: device_model.predict's step time (routed tokens x cost per token, plus shared experts), checked
    against predict itself on the first call."""

    def __init__(self, plan: Plan, device: int):
        self.plan, self.device = plan, device
        self.model = DeviceModel.from_dict(plan.predicted["model"])
        L, E, D = plan.num_layers, plan.spec.num_experts, len(plan.device_ids)
        self.home = np.zeros((L, E, D))  # [L, E, D] share of each expert's tokens each device takes at home
        np.add.at(self.home, (np.arange(L)[:, None], plan.phy2log, plan.device_of), plan.share)
        shared = np.zeros((L, D))
        np.add.at(shared, (np.repeat(np.arange(L), plan.shared_device_of.shape[1]), plan.shared_device_of.ravel()), 1)
        self.shared_s = shared * self.model.step_tokens * self.model.shared_s  # [L, D] (every token passes them)
        self.checked = False

    def __call__(self, load: np.ndarray, cached: np.ndarray) -> float:
        w = scale_load(load, self.plan.spec, self.model.step_tokens)  # [L, E]
        tokens = np.einsum("le,led->ld", w * ~cached, self.home)  # [L, D]
        tokens[:, self.device] += (w * cached).sum(1)
        t = float((tokens * self.model.cost + self.shared_s).max(1).sum())
        if not self.checked:
            self.checked = True
            L, E = w.shape
            p2l = np.concatenate([self.plan.phy2log, np.tile(np.arange(E), (L, 1))], 1)
            dev = np.concatenate([self.plan.device_of, np.full((L, E), self.device)], 1)
            share = np.concatenate([self.plan.share * ~np.take_along_axis(cached, self.plan.phy2log, 1), cached], 1)
            want = predict(self.plan.spec, self.model, p2l, dev, share, self.plan.shared_device_of, w)["step_time_s"]
            assert abs(t - want) <= 1e-9 * want, (t, want)
        return t


def replay_cache(spec: MoESpec, trace: np.ndarray, window_steps: int, seed: int = 0, half_life: float = 32.0,
                 max_loads: int | None = None, reserved_gb: float = 40.0, slots: int | None = None) -> dict:
    """Per-step modeled replay of the cache policies against no cache and static top-C pinning (see the module
    docstring). Each step's counts are drawn from its window's mixture. `slots`: cache slots (default: what the
    H100's free memory holds)."""
    prof = load_profile(cache_profile(reserved_gb))
    home = make_plan(spec, prof, load=trace[0])
    L, E = home.num_layers, spec.num_experts
    C = min(cache_slots(home, prof, "h100") if slots is None else int(slots), L * E)
    gpu = home.device_ids.index(prof.group("h100")[0].id)
    steps_model = CachedSteps(home, gpu)
    model = steps_model.model
    nbytes = expert_bytes(home.precision[home.device_ids[gpu]], spec.hidden_size, spec.moe_intermediate_size)
    link = prof.link(prof.devices[gpu + 1], prof.devices[gpu])
    load_s = transfer_seconds(nbytes, link.bandwidth_gbs, link.efficiency, link.latency_us)
    pairs = model.step_tokens * spec.top_k
    rng = np.random.default_rng(seed)
    mixes = trace / trace.sum(2, keepdims=True)  # [W, L, E]
    step_loads = [rng.multinomial(pairs, mixes[w]) for w in range(len(trace)) for _ in range(window_steps)]
    owner = np.zeros((L, E), dtype=np.int64)  # one cache device; every expert's home is a Xeon

    def top(load):
        out = np.zeros((L, E), dtype=bool)
        out.ravel()[np.argsort(-load.ravel(), kind="stable")[:C]] = True
        return out

    statics = {"none": [np.zeros((L, E), dtype=bool)] * len(trace), "static top-C": [top(trace[0])] * len(trace),
               "static top-C, hindsight": [top(trace.sum(0))] * len(trace),
               "oracle: window's top-C, free": [top(t) for t in trace]}
    results = {}
    for name, per_window in statics.items():
        sets = [per_window[s // window_steps] for s in range(len(step_loads))]
        times = [steps_model(w, cached) for w, cached in zip(step_loads, sets)]
        hits = sum(float(w[cached].sum()) for w, cached in zip(step_loads, sets)) / (pairs * L * len(step_loads))
        results[name] = {"mean_step_s": float(np.mean(times)), "hit_rate": hits, "loads": 0, "bytes": 0.0}
    for kind in ("decay", "lfu", "lru"):
        policy = CachePolicy(kind, half_life, owner, C)
        cached = np.zeros((L, E), dtype=bool)
        loading: dict[tuple[int, int], float] = {}  # (layer, expert) -> time its transfer ends
        now = link_free = 0.0
        times, hit, loads = [], 0.0, 0
        for w in step_loads:
            for key in [k for k, t in loading.items() if t <= now]:  # loads done by now serve from this step
                cached[key] = True
                del loading[key]
            t = steps_model(w, cached)
            hit += float(w[cached].sum())
            times.append(t)
            now += t
            policy.observe(w)
            held = cached.copy()
            for key in loading:
                held[key] = True
            # the link stays busy, but no load is queued behind more than one step's worth of transfers
            room = int(max(0.0, now + t - max(link_free, now)) // load_s)
            for li, e, victim in policy.choose(held, min(room, max_loads or room)):
                if victim is not None:
                    cached[victim] = False
                link_free = max(link_free, now) + load_s
                loading[(li, e)] = link_free
                loads += 1
        results[kind] = {"mean_step_s": float(np.mean(times)), "hit_rate": hit / (pairs * L * len(step_loads)),
                         "loads": loads, "bytes": float(loads * nbytes)}
    return {"slots": C, "experts": L * E, "expert_bytes": nbytes, "load_s": load_s, "steps": len(step_loads),
            "half_life_steps": half_life, "max_loads": max_loads, "policies": results}


# ---- real runs on this CPU ----------------------------------------------------------------------------------------

def band_batches(vocab: int, steps: int, period: int, bands: int = 32, batch: int = 4, length: int = 16,
                 seed: int = 0) -> list[torch.Tensor]:
    """Token id batches [batch, length] whose ids come from one of `bands` bands of the vocabulary, the band changing
    every `period` steps: inputs whose experts drift."""
    g = torch.Generator().manual_seed(seed)
    width = vocab // bands
    return [torch.randint(0, width, (batch, length), generator=g) + (s // period) % bands * width
            for s in range(steps)]


def _run_steps(model, batches: list[torch.Tensor], pause_s: float = 0.0):
    """(logits per step, wall seconds per step, tokens per expert per step [S, L, E], plan per step)."""
    rt = model.hetrun
    logits, walls, loads, plans = [], [], [], []
    before = rt.stats.tokens_per_expert.copy()
    for ids in batches:
        plans.append(rt.plan)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits.append(model(ids).logits)
        walls.append(time.perf_counter() - t0)
        now = rt.stats.tokens_per_expert.copy()
        loads.append(now - before)
        before = now
        if pause_s:
            time.sleep(pause_s)  # the background jobs get the cores a serving loop leaves between steps
    return logits, np.array(walls), np.stack(loads), plans


def real_rebalance(steps: int, period: int, window_steps: int, budget: float = 0.25, ema: float = 0.5,
                   threshold: float = 0.05, seed: int = 0) -> dict:
    """The tiny DeepSeek-V3 model on the `cpu` profile: the static plan of the first window against live rebalancing
    (`budget` of the expert bytes per rebalance: 5% of 24 experts would be one), on inputs that drift between token
    bands; both real, FP32."""
    base = tiny_model("deepseek_v3", seed=seed)
    spec = MoESpec.from_hf_config(base.config)
    batches = band_batches(spec.vocab_size, steps, period, seed=seed)
    prof = load_profile("cpu")
    probe = deploy(copy.deepcopy(base), prof, precision="fp32")
    first = _run_steps(probe, batches[:window_steps])[2].sum(0)  # routing does not depend on the plan
    plan = make_plan(spec, prof, load=first, precision="fp32")  # no replicas: only moves can follow the load
    budget = budget * expert_copy_bytes(plan)
    live_prof = load_profile({**prof.model.model_dump(exclude_none=True),
                              "rebalance": {"window_steps": window_steps, "ema": ema, "threshold": threshold,
                                            "max_move_gb": budget / 1e9}})
    static = deploy(copy.deepcopy(base), prof, precision="fp32", plan=plan)
    live = deploy(copy.deepcopy(base), live_prof, precision="fp32", plan=plan)
    s_logits, s_wall, loads, _ = _run_steps(static, batches, pause_s=0.02)
    l_logits, l_wall, l_loads, l_plans = _run_steps(live, batches, pause_s=0.02)
    model = DeviceModel.from_dict(plan.predicted["model"])
    s_model = [step_time(plan, model, w) for w in loads]
    l_model = [step_time(p, model, w) for p, w in zip(l_plans, l_loads)]
    stats = live.hetrun.stats
    diff = max(float((a - b).abs().max()) for a, b in zip(s_logits, l_logits))
    return {"steps": steps, "period": period, "window_steps": window_steps, "budget_bytes": budget, "ema": ema,
            "threshold": threshold, "modeled_per_window_s": {
                "static": np.add.reduceat(s_model, np.arange(0, steps, window_steps)).tolist(),
                "live": np.add.reduceat(l_model, np.arange(0, steps, window_steps)).tolist()},
            "switches": len(stats.switches), "moves": len(stats.moves), "bytes_moved": stats.rebalance_bytes,
            "modeled_step_s": {"static": float(np.mean(s_model)), "live": float(np.mean(l_model))},
            "wall_step_s": {"static": float(np.median(s_wall)), "live": float(np.median(l_wall))},
            "max_logit_diff": diff, "logit_scale": float(max(a.abs().max() for a in s_logits)),
            "same_loads": bool(np.array_equal(loads, l_loads))}


def real_cache(steps: int, period: int, seed: int = 0) -> dict:
    """The tiny DeepSeek-V3 model with every expert at home on an OpenVINO device (modeled 4x slower than this CPU)
    and a cache of a quarter of the experts on an onnxruntime device: no cache against the cache, both real."""
    base = tiny_model("deepseek_v3", seed=seed)
    spec = MoESpec.from_hf_config(base.config)
    host = device_catalog()["host-cpu"].model_dump()
    slow = {**host, "name": "slow-cpu", "tflops": {k: v / 4 for k, v in host["tflops"].items()},
            "memory_bw_gbs": host["memory_bw_gbs"] / 4, "description": "this CPU, modeled 4x slower"}
    slots = spec.num_moe_layers * spec.num_experts // 4
    prof = {"name": "cpu-cache", "device_types": {"slow-cpu": slow},
            "devices": [{"id": "fast", "type": "host-cpu", "backend": "onnxruntime"},
                        {"id": "slow", "type": "slow-cpu", "backend": "openvino"}],
            "dense_device": "fast", "pins": [{"device": "slow"}],
            "links": {"intra_node": {"name": "shared memory", "bandwidth_gbs": 10, "latency_us": 20}}}
    batches = band_batches(spec.vocab_size, steps, period, seed=seed)
    plain = deploy(copy.deepcopy(base), prof, precision="fp32")
    cached = deploy(copy.deepcopy(base), {**prof, "cache": {"device": "fast", "slots": slots}}, precision="fp32")
    p_logits, p_wall, _, _ = _run_steps(plain, batches, pause_s=0.02)
    c_logits, c_wall, _, _ = _run_steps(cached, batches, pause_s=0.02)
    rt = cached.hetrun
    out = rt.stats.to_dict(rt.plan.device_ids)["cache"]
    return {"steps": steps, "slots": slots, "experts": spec.num_moe_layers * spec.num_experts, **out,
            "wall_step_s": {"none": float(np.median(p_wall)), "cache": float(np.median(c_wall))},
            "max_logit_diff": max(float((a - b).abs().max()) for a, b in zip(p_logits, c_logits))}


# ---- the command --------------------------------------------------------------------------------------------------

def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--trace", default=None, help="a recorded trace: .npy [windows, layers, experts] or a JSON list "
                    "of [layers, experts] tables, one per window (default: generate one)")
    ap.add_argument("--model", default="deepseek-r1", help="model preset of the modeled runs (default deepseek-r1)")
    ap.add_argument("--profile", default="mixed-h100-910b-xeon", help="profile of the modeled rebalancing")
    ap.add_argument("--windows", type=int, default=48, help="windows of the generated trace (default 48: with the "
                    "default window and period, 2400 steps and 8 mixture phases)")
    ap.add_argument("--window-steps", type=int, default=50, help="steps per window (and per rebalancing decision)")
    ap.add_argument("--period-steps", type=int, default=300, help="steps between mixture shifts of the generated trace")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of each mixture component")
    ap.add_argument("--budget", type=float, default=0.05, help="bytes moved per rebalance, as a share of the expert "
                    "bytes the plan holds (default 0.05)")
    ap.add_argument("--ema", type=float, default=0.8, help="weight of the newest window in the smoothed load")
    ap.add_argument("--threshold", type=float, default=0.02, help="re-plan when the predicted step time falls by this")
    ap.add_argument("--half-life", type=float, default=32.0, help="cache decay policy's half-life in steps")
    ap.add_argument("--no-oracle", action="store_true", help="skip the per-window re-plans (2 s each at R1 scale)")
    ap.add_argument("--no-cache", action="store_true", help="skip the modeled cache replay")
    ap.add_argument("--real", action="store_true", help="also run the tiny model for real on this CPU (about a minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")


def _check(args) -> None:
    if min(args.windows, args.window_steps, args.period_steps) < 1 or args.windows > 10_000:
        raise HetrunError("--windows (1..10000), --window-steps and --period-steps must be whole numbers >= 1")
    for name, v, lo, hi in (("--budget", args.budget, 0.0, 1.0), ("--ema", args.ema, 1e-9, 1.0),
                            ("--threshold", args.threshold, 0.0, 1.0), ("--zipf", args.zipf, 0.0, 10.0),
                            ("--half-life", args.half_life, 1e-9, 1e7)):
        if not (math.isfinite(v) and lo <= v <= hi):
            raise HetrunError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")


def _main(args: argparse.Namespace) -> int:
    _check(args)
    spec = MoESpec.from_preset(args.model)
    tokens = 4096 * spec.top_k
    trace = read_trace(args.trace, spec) if args.trace else drifting_trace(
        spec.num_moe_layers, spec.num_experts, args.windows, args.window_steps, args.period_steps, tokens,
        args.seed, args.zipf)
    out = {"model": spec.name, "profile": str(args.profile), "trace": args.trace or "generated",
           "windows": len(trace), "window_steps": args.window_steps,
           "settings": {"ema": args.ema, "threshold": args.threshold, "budget": args.budget,
                        "half_life": args.half_life},
           "rebalance": replay_rebalance(spec, args.profile, trace, args.window_steps, args.budget, args.ema,
                                         args.threshold, oracle=not args.no_oracle)}
    if not args.no_cache:
        out["cache"] = replay_cache(spec, trace, args.window_steps, args.seed, args.half_life)
    if args.real:
        out["real"] = {"rebalance": real_rebalance(96, 24, 8, seed=args.seed), "cache": real_cache(96, 24, args.seed)}
    if args.json:
        print_json(out)
        return 0
    _print(out)
    return 0


def _print(out: dict) -> None:
    rb = out["rebalance"]
    m = rb["mean_step_s"]
    print(f"trace: {out['trace']}, {out['windows']} windows of {out['window_steps']} steps; {out['model']} on "
          f"{out['profile']}; settings {out['settings']}")
    print("MODELED (deterministic) mean MoE step time, 4096 tokens per step:")
    print(f"{'placement':>34} {'step ms':>9} {'vs static':>10}")
    names = {"static": "static plan from the first window", "eplb": "EPLB static, same slots (rounded)",
             "live": "live rebalancing", "oracle": "oracle: re-plan every window, free"}
    for k, label in names.items():
        if k in m:
            print(f"{label:>34} {m[k] * 1e3:9.2f} {100 * (m[k] / m['static'] - 1):+9.1f}%")
    if "gap_closed" in rb:
        print(f"live closes {100 * rb['gap_closed']:.1f}% of the static-oracle gap (goal >= 70%)")
    print(f"bytes moved per window: max {100 * rb['moved_fraction_max']:.2f}%, mean "
          f"{100 * rb['moved_fraction_mean']:.2f}% of {rb['expert_bytes'] / 1e9:.4g} GB of expert copies (goal <= 5%); "
          f"{len(rb['switches'])} switches; a decision took {rb['decide_s_mean']:.1f} s of this host's CPU (measured)")
    if "cache" in out:
        c = out["cache"]
        pol = c["policies"]
        print(f"MODELED cache: {out['model']}, {c['slots']} slots on one H100 (FP8) of {c['experts']} experts at "
              f"home on 2 Xeon (INT4); a load is {c['expert_bytes'] / 1e6:.3g} MB, {c['load_s'] * 1e3:.3g} ms over "
              f"PCIe; {c['steps']} steps" + ("; every expert fits: the cache is moot" if c["slots"] >= c["experts"]
                                             else ""))
        print(f"{'cache':>26} {'step ms':>9} {'hit rate':>9} {'vs static top-C':>16} {'loads':>7} {'GB loaded':>10}")
        for k, v in pol.items():
            print(f"{k:>26} {v['mean_step_s'] * 1e3:9.1f} {100 * v['hit_rate']:8.1f}% "
                  f"{100 * (v['mean_step_s'] / pol['static top-C']['mean_step_s'] - 1):+15.1f}% {v['loads']:7d} "
                  f"{v['bytes'] / 1e9:10.1f}")
        print("goal: decay >= 15% lower than static top-C pinning")
    if "real" in out:
        r, c = out["real"]["rebalance"], out["real"]["cache"]
        print("REAL on this CPU (wall times are noisy; modeled columns are the device model's):")
        print(f"  live rebalancing, tiny DeepSeek-V3 on `cpu`: {r['switches']} switches, {r['moves']} moves, "
              f"{r['bytes_moved'] / 1e3:.0f} kB; modeled step {r['modeled_step_s']['static'] * 1e6:.1f} -> "
              f"{r['modeled_step_s']['live'] * 1e6:.1f} us; median wall step {r['wall_step_s']['static'] * 1e3:.1f} "
              f"-> {r['wall_step_s']['live'] * 1e3:.1f} ms; max |logit diff| {r['max_logit_diff']:.2e} (onnxruntime "
              f"and OpenVINO differ in the last bits; identical backends give 0)")
        print(f"  cache, onnxruntime (fast) + OpenVINO (slow): hit rate {100 * c['hit_rate']:.1f}% with "
              f"{c['slots']}/{c['experts']} slots, {c['loads']} loads, {c['bytes_loaded'] / 1e3:.0f} kB; modeled "
              f"expert time saved {c['modeled_saved_s'] * 1e3:.2f} ms in all; median wall step {c['wall_step_s']['none'] * 1e3:.1f} -> "
              f"{c['wall_step_s']['cache'] * 1e3:.1f} ms; max |logit diff| {c['max_logit_diff']:.2e}")


BENCHMARKS = {
    "rebalance": Benchmark(
        "live rebalancing and the hot-expert cache on a drifting load trace (modeled at DeepSeek-R1 scale, and real)",
        _arguments, _main,
        "  hetrun bench rebalance\n"
        "  hetrun bench rebalance --real --json > rebalance.json\n"
        "  hetrun bench rebalance --trace eplb_windows.npy --no-cache\n"
        "  hetrun bench rebalance --windows 8 --no-oracle --no-cache   # a quick look"),
}
