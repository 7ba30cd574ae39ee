"""The dispatcher: route tokens, permute them per expert slot, run each device's experts, combine, keep statistics.

One MoE layer call, hidden [T, D] -> [T, D]:

    route          router logits -> top-k expert ids and weights                  [T, K]
    slots          each (token, k) pair -> a physical slot (replicas split by the plan's shares)   [T*K]
    permute        token rows grouped by slot                                   RoutedRows [T*K, D]
    exchange       rows -> the devices holding their slots -> expert outputs     [T*K, D] + shared [T, D]
                   (communication lives here: LocalExchange in one process, every device on its own
                   worker thread at once; hetrun.distributed's CollectiveExchange across ranks)
    compute        MoELayer.run_call: one expert on one device, its output checked (rows, finite);
                   a fault fails over to a replica or the fallback device and quarantines the device;
                   a routed call whose expert the cache holds runs on the cached copy (MoELayer.placed)
    combine        weighted sum of each token's K rows in k order, plus its shared experts   [T, D]

Rows stay torch tensors throughout; they move to a session's device only when it is not theirs (counted in
DispatchStats.transfers). Compute never knows where rows came from; communication never knows what an expert does.

Between steps (ExpertRuntime.step_begin, before the first layer routes) live rebalancing may switch every layer to
a new plan at once (hetrun.runtime.rebalancer) and the hot-expert cache installs and starts loads
(hetrun.runtime.expert_cache); both prepare in the background and never make a step wait. The combine sums each
token's rows in the router's k order, never in slot order, so a plan switch changes no output bit when the devices
involved compute alike.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from hetrun.backends.base import ExpertSession
from hetrun.backends.registry import require_backend, resolve_backend
from hetrun.errors import HetrunError, PlacementError
from hetrun.placement.plan import Plan
from hetrun.profile import Device, Profile
from hetrun.runtime.expert_cache import ExpertCache
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.memory import ResidentMemory
from hetrun.runtime.rebalancer import LiveRebalancer
from hetrun.runtime.routing import gate_dtype, route, router_logits
from hetrun.runtime.weights import MoELayerWeights

log = logging.getLogger("hetrun")


@dataclass
class DispatchStats:
    """Counters a run accumulates; `tokens_per_expert` feeds the planner as a load table."""

    tokens_per_expert: np.ndarray  # [L, E]
    tokens_per_device: np.ndarray  # [D] routed rows each device computed
    modeled_s_per_device: np.ndarray  # [D] modeled device time (simulated devices)
    wall_s_per_device: np.ndarray  # [D] measured wall time inside expert graphs
    layer_s: float = 0.0  # whole MoE layers
    expert_s: float = 0.0  # inside expert graphs; the rest of layer_s is routing, permute, combine and copies
    dense_s: float = 0.0  # inside the dense part's calls on the dense device (hetrun.runtime.dense, .attention)
    graph_s: float = 0.0  # inside whole-model graph calls (hetrun.runtime.model_graph)
    calls: int = 0
    transfers: int = 0  # copies of rows between host and a device (0 when rows and sessions share a device)
    faults: list = field(default_factory=list)
    call_log: list | None = None  # (rows, seconds) of every expert call while a list is set (calibration)
    # live rebalancing (hetrun.runtime.rebalancer)
    moves: list = field(default_factory=list)  # every expert copy a rebalance made (dicts: step, layer, expert, ...)
    switches: list = field(default_factory=list)  # every plan switch (dicts: version, step, moves, bytes, gain)
    rebalance_failures: int = 0  # background jobs that failed (the plan stayed)
    # the hot-expert cache (hetrun.runtime.expert_cache)
    cache_hits: int = 0  # routed rows a cached copy served
    cache_misses: int = 0  # routed rows of cacheable experts that ran at home
    cache_loads: int = 0  # copies loaded into cache slots
    cache_bytes: int = 0  # bytes those loads copied
    cache_evictions: int = 0
    cache_saved_s: float = 0.0  # modeled seconds the hits saved against their home devices
    cache_load_s: float = 0.0  # modeled link seconds of the loads (in the background)

    @classmethod
    def empty(cls, layers: int, experts: int, devices: int) -> "DispatchStats":
        return cls(np.zeros((layers, experts), np.int64), np.zeros(devices, np.int64), np.zeros(devices),
                   np.zeros(devices))

    @property
    def rebalance_bytes(self) -> int:
        """Expert bytes the plan switches copied."""
        return int(sum(s["bytes"] for s in self.switches))

    def reset(self) -> None:
        """Zero every counter."""
        fresh = self.empty(*self.tokens_per_expert.shape, len(self.tokens_per_device))
        self.__dict__.update(fresh.__dict__)

    def to_dict(self, device_ids: tuple[str, ...]) -> dict:
        """JSON-ready counters; `rebalance` and `cache` hold the live rebalancing and expert-cache counters (zero
        when those are off)."""
        looked = self.cache_hits + self.cache_misses
        return {"tokens_per_expert": self.tokens_per_expert.tolist(),
                "devices": {d: {"tokens": int(self.tokens_per_device[i]),
                                "modeled_s": float(self.modeled_s_per_device[i]),
                                "wall_s": float(self.wall_s_per_device[i])} for i, d in enumerate(device_ids)},
                "layer_s": self.layer_s, "expert_s": self.expert_s, "dense_s": self.dense_s, "graph_s": self.graph_s,
                "calls": self.calls,
                "transfers": self.transfers,
                "faults": list(self.faults),
                "rebalance": {"switches": len(self.switches), "moves": len(self.moves), "bytes": self.rebalance_bytes,
                              "failures": self.rebalance_failures, "switch_log": list(self.switches),
                              "log": list(self.moves)},
                "cache": {"hits": self.cache_hits, "misses": self.cache_misses,
                          "hit_rate": self.cache_hits / looked if looked else 0.0, "loads": self.cache_loads,
                          "bytes_loaded": self.cache_bytes, "evictions": self.cache_evictions,
                          "modeled_saved_s": self.cache_saved_s, "modeled_load_s": self.cache_load_s}}


class ExpertRuntime:
    """Every expert graph of a plan compiled on its device's backend, ready to dispatch to.

    `profile` is the resolved Profile (hetrun.deploy resolves it once). `local_devices`: the device indices this
    process runs (None: all). `exchange` moves each layer's rows to the devices of their slots and back;
    default: LocalExchange, every device in this process. The profile's `rebalance:` section turns on live
    rebalancing (`rebalancer`, hetrun.runtime.rebalancer), its `cache:` section a hot-expert cache (`cache`,
    hetrun.runtime.expert_cache); both work between steps (`step_begin`) and in the background (`background`).
    """

    collective = False  # whether ranks agree on plan switches through step headers (hetrun.distributed)
    tracer = None  # a hetrun.distributed.trace.Tracer where spans are recorded
    dense = None  # hetrun.runtime.dense.DenseLinears when the dense part's linear layers run on the dense device
    graph = None  # hetrun.runtime.model_graph.ModelGraph when the whole model runs as one graph (no layers then)

    def __init__(self, plan: Plan, profile: Profile, weights: list[MoELayerWeights] | None, threads: int | None = None,
                 progress: bool = False, local_devices: "set[int] | None" = None, exchange: "Exchange | None" = None):
        self.plan = plan
        self.profile = profile
        self.exchange = exchange or LocalExchange()
        self.timeout_s = profile.model.expert_timeout_s
        self.workers: dict[int, DeviceWorker] = {}
        self.devices: tuple[Device, ...] = tuple(self._device(i) for i in plan.device_ids)
        self.stats = DispatchStats.empty(plan.num_layers, plan.spec.num_experts, len(self.devices))
        self.health = DeviceHealth(len(self.devices))
        self.memory = ResidentMemory(len(self.devices))  # resident bytes each device's compiled experts added
        # Device indices whose experts this process compiles and runs; None: all of them (one process).
        self.local_devices = None if local_devices is None else frozenset(local_devices)
        self.backends = [require_backend(resolve_backend(d))(d, plan.precision[d.id], threads) if self.is_local(i) else None
                         for i, d in enumerate(self.devices)]
        if profile.model.cache is not None:
            profile.group(profile.model.cache.device)  # a cache device the profile lacks: one line, before compiling
        self.steps = 0  # forward passes begun (steps_begin calls)
        self._background: dict[str, DeviceWorker] = {}
        self.layers: list[MoELayer] = []
        self.placeable_mask = self.rebalancer = self.cache = None
        if weights is not None:
            self.compile_layers(weights, progress)

    def compile_layers(self, weights: list[MoELayerWeights], progress: bool = False) -> None:
        """Compile every MoE layer's experts on their devices, then start live rebalancing and the cache where the
        profile asks for them. The constructor does it when given the weights; deploy() passes None and calls this
        once the dense part's linear layers are on their device, so their conversion meets a smaller resident set."""
        self.layers = [MoELayer(self, li, w) for li, w in enumerate(_iter(weights, progress, "compiling experts"))]
        self.placeable_mask = self.placeable()  # [L, E, D] or None; fixed for the deployment's life
        profile = self.profile
        live, cached = profile.model.rebalance, profile.model.cache
        self.rebalancer = LiveRebalancer(self, live, self.routed_load, self.collective) \
            if live is not None and live.enabled else None
        self.cache = ExpertCache(self, cached) if cached is not None and cached.enabled else None

    def routed_load(self) -> np.ndarray:
        """Routed tokens per (MoE layer, expert) so far [L, E], as live rebalancing counts them (one process: the
        dispatcher's own counts)."""
        return self.stats.tokens_per_expert

    def step_begin(self) -> None:
        """Between two steps, once per step, on the thread that runs the model (MoELayer calls it before its first
        layer routes; hetrun.distributed on ranks that only serve the step): live rebalancing may switch the plan,
        the cache installs loads and starts new ones. Nothing here waits."""
        self.steps += 1
        if self.rebalancer is not None:
            self.rebalancer.new_step()
        if self.cache is not None:
            self.cache.step()

    def background(self, job, lane: str = "rebalance") -> Future:
        """Run `job()` on this runtime's background worker for `lane` (one daemon thread each, jobs in order)."""
        if lane not in self._background:
            self._background[lane] = background_worker(f"hetrun-{lane}")
        return self._background[lane].submit(job)

    def switch_plan(self, plan: Plan, sessions: dict) -> None:
        """Make `plan` the running plan, in every layer at once (call between steps, on the thread that runs the
        model). `sessions` [(layer, expert, device) -> ExpertSession] holds the copies it adds on this process's
        devices; copies it no longer uses are dropped."""
        if plan.num_slots != self.plan.num_slots or plan.device_ids != self.plan.device_ids:
            raise PlacementError("a live plan switch must keep the devices and the number of slots per layer")
        for layer in self.layers:
            layer.switch(plan, {(e, d): s for (li, e, d), s in sessions.items() if li == layer.index})
        self.plan = plan
        self.exchange.plan_changed(self)
        if self.cache is not None:
            self.cache.plan_changed()

    def trace_event(self, name: str, **args) -> None:
        """An instant in the trace (torchrun with --trace), e.g. a plan switch and its moves."""
        if self.tracer is not None:
            now = self.tracer.now_us()
            self.tracer.add(name, "moe", now, now, **args)

    def placeable(self) -> "np.ndarray | None":
        """[L, E, D] whether a copy of each routed expert can be built on each device later (live rebalancing, the
        cache); None: everywhere (the runtime holds every expert's weights or source)."""
        return None

    def is_local(self, device: int) -> bool:
        """Whether this process runs the experts of device index `device`."""
        return self.local_devices is None or device in self.local_devices

    def _device(self, device_id: str) -> Device:
        found = [d for d in self.profile.devices if d.id == device_id]
        if not found:
            raise PlacementError(f"plan names device '{device_id}', which profile '{self.profile.name}' lacks; "
                                 "re-plan with `hetrun plan` for this profile")
        return found[0]

    def submit(self, device: int, job) -> Future:
        """Run `job()` on device `device`'s worker thread (one per device: its calls run in order, devices at once)."""
        if device not in self.workers:
            self.workers[device] = DeviceWorker(f"hetrun-{self.devices[device].id}")
        return self.workers[device].submit(job)

    def wait(self, device: int, future: Future, deadline: float):
        """The job's result, or DeviceFault when the device has not answered by `deadline` (time.monotonic()); the
        hung worker is abandoned, and the device's next job gets a new one."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.workers.pop(device, None)
            raise DeviceFault(device, f"did not answer within expert_timeout_s={self.timeout_s:g} s") from None

    def compile(self, device: int, expert, name: str, measure: bool = True) -> ExpertSession:
        """One expert graph built at its device's precision and loaded on that device's backend (the expert may be
        an ExpertSource: read now, dropped after); the resident memory it adds counts towards the device unless
        `measure` is False (background compiles: other threads' memory would count too)."""
        backend = self.backends[device]
        with self.memory.measure(device) if measure else contextlib.nullcontext():
            in_process = backend.caps.loads_in_process
            graph = build_expert_graph(expert, backend.precision, target=backend.graph_target(), in_process=in_process)
            data, meta = graph if in_process else graph.serialize(), graph.meta
            del graph  # the bytes (or the graph itself, to a backend that reads it in this process) alone
            session = backend.load(data, name, meta)
            del data  # before the measurement ends
        return session


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite, from sums: a NaN or an infinity makes any sum NaN or infinite, so a
    finite float32 sum (3-4x cheaper than a float64 one on a [1, 32000] row of logits here, 20x cheaper than
    isfinite().all()) proves every value finite. Only when it is not (a NaN, an infinity, or finite values too large
    for float32 to add) does a float64 sum, which cannot overflow on float32 or narrower values, decide."""
    return math.isfinite(t.sum(dtype=torch.float32).item()) or math.isfinite(t.sum(dtype=torch.float64).item())


def _iter(items, progress: bool, desc: str):
    if not progress:
        return items
    return tqdm(items, desc=desc, unit="layer")


class MoELayer:
    """One MoE layer's dispatch: hidden [T, D] -> output [T, D]."""

    def __init__(self, runtime: ExpertRuntime, index: int, weights: MoELayerWeights):
        plan, spec = runtime.plan, runtime.plan.spec
        self.runtime, self.index, self.weights = runtime, index, weights
        self.router = spec.router
        copies: dict[tuple[int, int], ExpertSession | None] = {}  # replicas on one device share one session
        for e, d in zip(plan.phy2log[index].tolist(), plan.device_of[index].tolist()):
            if (e, d) not in copies:  # another process's device: no session here
                copies[(e, d)] = runtime.compile(d, weights.experts[e], f"L{weights.layer}.E{e}") \
                    if runtime.is_local(d) else None
        self._place(plan, copies)
        self._fallback_sessions: dict[tuple[int, int], ExpertSession] = {}
        self._router_cache: dict[tuple[torch.dtype, torch.device], tuple] = {}
        self.shared_devices = plan.shared_device_of[index].tolist()
        self.shared_sessions = [runtime.compile(d, w, f"L{weights.layer}.S{s}") if runtime.is_local(d) else None
                                for s, (w, d) in enumerate(zip(weights.shared, self.shared_devices))]

    def _place(self, plan: Plan, copies: dict) -> None:
        """Take the layer's slots from `plan`, with `copies` [(expert, device) -> session] for every pair it uses."""
        self.phy2log = plan.phy2log[self.index]  # [R]
        self.expert_list = self.phy2log.tolist()  # [R] the same, for lookups in Python
        self.device_of = plan.device_of[self.index]  # [R]
        self.device_list = self.device_of.tolist()  # [R] the same, for lookups in Python
        self.share = plan.share[self.index]  # [R]
        self.num_slots = len(self.phy2log)
        self.copies = copies
        self.sessions: list[ExpertSession | None] = [copies[(e, d)] for e, d in
                                                     zip(self.phy2log.tolist(), self.device_of.tolist())]
        self._build_slot_tables()

    def switch(self, plan: Plan, added: dict) -> None:
        """Run from now on as `plan` says, with `added` [(expert, device) -> session] the copies it adds on this
        process's devices; copies the plan no longer uses are dropped (their memory freed once no call holds them).
        Between steps only (ExpertRuntime.switch_plan)."""
        pairs = set(zip(plan.phy2log[self.index].tolist(), plan.device_of[self.index].tolist()))
        copies = {}
        for e, d in pairs:
            if (e, d) in self.copies:
                copies[(e, d)] = self.copies[(e, d)]
            elif (e, d) in added or not self.runtime.is_local(d):
                copies[(e, d)] = added.get((e, d))
            else:
                raise PlacementError(f"the new plan puts expert {e} of MoE layer {self.index} on device "
                                     f"'{self.runtime.devices[d].id}', but no copy was prepared there")
        self._place(plan, copies)

    def _build_slot_tables(self) -> None:
        e = self.runtime.plan.spec.num_experts
        counts = np.bincount(self.phy2log, minlength=e)  # [E]
        self.replicated = bool((counts > 1).any())
        slot_table = np.zeros((e, counts.max()), np.int64)  # [E, maxcnt] slots of each expert (log2phy)
        cum_table = np.full((e, counts.max()), 2.0)  # [E, maxcnt] cumulative share, padded above 1
        fill = np.zeros(e, np.int64)
        for r, ex in enumerate(self.phy2log.tolist()):
            slot_table[ex, fill[ex]] = r
            cum_table[ex, fill[ex]] = self.share[r] + (cum_table[ex, fill[ex] - 1] if fill[ex] else 0.0)
            fill[ex] += 1
        self.slot_table = torch.from_numpy(slot_table)
        self.cum_table = torch.from_numpy(cum_table)
        self.replica_count = torch.from_numpy(counts)
        self.slot_of = slot_table[:, 0].tolist()  # [E] each expert's slot, when none is replicated

    def slots_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Physical slot per routed (token, k) pair [T*K]; tokens of a replicated expert split by the plan's shares."""
        flat = ids.reshape(-1)  # [T*K]
        if not self.replicated:
            return self.slot_table[flat, 0]
        n_e = torch.bincount(flat, minlength=len(self.replica_count))  # [E]
        order = torch.argsort(flat, stable=True)
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(len(flat)) - (torch.cumsum(n_e, 0) - n_e)[flat[order]]  # occurrence within expert
        frac = (rank.double() + 0.5) / n_e[flat].double()  # [T*K] position in (0, 1) among the expert's tokens
        j = torch.searchsorted(self.cum_table[flat], frac[:, None]).squeeze(1)  # [T*K] replica whose interval holds it
        j = torch.minimum(j, self.replica_count[flat] - 1)
        return self.slot_table[flat, j]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.index == 0:  # a new step: live rebalancing and the cache act here, between steps
            self.runtime.step_begin()
        stats, exchange = self.runtime.stats, self.runtime.exchange
        exchange.begin(self)
        t0 = time.perf_counter()
        hidden = hidden.detach()
        x = hidden.float().contiguous()  # [T, D]
        if not all_finite(x):
            raise HetrunError(f"the input of MoE layer {self.weights.layer} holds NaN or inf before any expert ran: "
                              "the model's dense part (attention, norms) or its inputs produced it, not a device")
        k = self.router.top_k
        gate, bias, shared_gate, gate_bias = self._router_as(hidden.dtype, hidden.device)
        logits = router_logits(hidden, gate, self.router, gate_bias)  # [T, E]
        ids, weights = route(logits, self.router, bias)  # [T, K], [T, K]
        # Row bookkeeping on the host: a few integers per token (copied off an accelerator, where the hidden states
        # live on one), in numpy, where each torch op would cost more than its work; a decode token's K pairs in
        # Python, where even numpy's would. The rows stay where x is.
        one_each = None  # a decode token's slots in ascending order, a row each
        if x.shape[0] == 1 and not self.replicated:
            slots = [self.slot_of[e] for e in ids.view(-1).tolist()]  # [K]
            order = sorted(range(k), key=slots.__getitem__)  # [K] pairs by slot (stable, as argsort)
            one_each = [slots[i] for i in order]  # [K]
            rows = x.expand(k, -1).contiguous()  # [K, D] every pair is the token's row
            picked = torch.tensor(order, device=weights.device) if self.router.scales_input else None
        else:
            slots = self.slots_for(ids.cpu()).numpy()  # [T*K]
            order = np.argsort(slots, kind="stable")  # [T*K] permutation grouping pairs by slot
            rows = x.index_select(0, torch.from_numpy(order // k).to(x.device))  # [T*K, D]
            picked = torch.from_numpy(order).to(weights.device) if self.router.scales_input else None
        if picked is not None:  # Llama 4: each pair's score scales the expert's input; the outputs then just add
            rows = rows * weights.reshape(-1).index_select(0, picked).to(rows.device, rows.dtype).unsqueeze(1)
            weights = torch.ones_like(weights)
        counts = np.bincount(slots, minlength=self.num_slots)  # [R]
        routed = RoutedRows(x, rows, torch.from_numpy(counts), one_each)
        out_rows, shared_out = exchange(self, routed)  # [T*K, D], S x [T, D]
        out = self._combine(out_rows, order, weights)  # [T, D]
        for ys in shared_out:  # [T, D] each
            if self.weights.shared_gate is not None:
                ys = torch.sigmoid(torch.nn.functional.linear(x, shared_gate)) * ys
            out += ys
        if one_each is not None:  # a row per slot, no replicas: its expert's count goes up by one
            routed_tokens = stats.tokens_per_expert[self.index]  # [E]
            for slot in one_each:
                routed_tokens[self.expert_list[slot]] += 1
        else:
            np.add.at(stats.tokens_per_expert[self.index], self.phy2log, counts)  # slots' rows summed per expert
        stats.calls += 1
        dt = time.perf_counter() - t0
        stats.layer_s += dt
        exchange.end(self, x.shape[0], dt)
        return out.to(hidden.dtype)

    def _combine(self, out_rows: torch.Tensor, order, weights: torch.Tensor) -> torch.Tensor:
        # Each token's K rows of out_rows [T*K, D] (grouped by slot: pair order[i] is row i) weighted by weights
        # [T, K] and summed in k order, whatever slots the plan gives them: the same sum, bit for bit, before and
        # after a live rebalance.
        k = weights.shape[1]
        if isinstance(order, list):  # a decode token's K pairs (see __call__): the same steps on a Python list
            back = [0] * k
            for row, pair in enumerate(order):
                back[pair] = row  # [K] row of each k in out_rows
            if back != sorted(back):
                out_rows = out_rows.index_select(0, torch.tensor(back, device=out_rows.device))
        else:
            back = np.empty(len(order), np.int64)
            back[order] = np.arange(len(order))  # [T*K] row of each (token, k) pair in out_rows
            if (back[1:] < back[:-1]).any():  # not already in (token, k) order
                out_rows = out_rows.index_select(0, torch.from_numpy(back).to(out_rows.device))
        pairs = (out_rows * weights.reshape(-1, 1).float()).view(-1, k, out_rows.shape[1])  # [T, K, D]
        out = pairs[:, 0] + pairs[:, 1] if k > 1 else pairs[:, 0].clone()  # [T, D]
        for j in range(2, k):
            out += pairs[:, j]
        return out

    def _router_as(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """The router's weight [E, D] and own bias [E] in the dtype it computes in for hidden states of `dtype`
        (routing.gate_dtype), its correction bias [E] and the shared experts' gate [1, D] (each but the weight or
        None), on `device`, where the hidden states are: converted once per dtype and device, not per call."""
        key = (dtype, device)
        if key not in self._router_cache:
            w, gd = self.weights, gate_dtype(self.router, dtype)
            self._router_cache[key] = (w.gate.to(device=device, dtype=gd), *(
                None if t is None else t.to(device) for t in (w.correction_bias, w.shared_gate)),
                None if w.gate_bias is None else w.gate_bias.to(device=device, dtype=gd))
        return self._router_cache[key]

    # ---- compute: one expert call, checked, with failover -------------------------------------------
    def calls(self, routed: RoutedRows) -> list[ExpertCall]:
        """The expert calls a layer call needs: one per slot that received rows (only those), one per shared expert."""
        if routed.one_each is not None:  # a decode token: row i goes to slot one_each[i]
            device_of = self.device_list
            out = [ExpertCall("routed", r, device_of[r], i, i + 1) for i, r in enumerate(routed.one_each)]
        else:
            counts = routed.counts.numpy()  # [R]
            used = np.flatnonzero(counts)  # slots that received rows
            ends = np.cumsum(counts)[used]
            out = [ExpertCall("routed", r, d, end - n, end) for r, d, n, end in
                   zip(used.tolist(), self.device_of[used].tolist(), counts[used].tolist(), ends.tolist())]
        if self.runtime.cache is not None:
            out = [self.placed(c) for c in out]
        t = routed.x.shape[0]
        out += [ExpertCall("shared", s, d, 0, t) for s, d in enumerate(self.shared_devices)]
        return out

    def placed(self, call: ExpertCall) -> ExpertCall:
        """A routed call as it runs: moved to the cache device when its expert is cached there (ExpertCache)."""
        cache = self.runtime.cache
        if cache is None or call.kind != "routed":
            return call
        target = cache.redirect(self, call)
        return call if target is None else dataclasses.replace(call, device=target, cached=True)

    def session_of(self, call: ExpertCall) -> ExpertSession:
        """The session a call runs on: its slot's at the planned device, or the cached copy."""
        if call.cached:
            return self.runtime.cache.session(self.index, int(self.phy2log[call.index]))
        return self.sessions[call.index] if call.kind == "routed" else self.shared_sessions[call.index]

    def run_call(self, call: ExpertCall, rows: torch.Tensor, session: ExpertSession | None = None) -> CallResult:
        """Rows [N, D] through one expert on the call's device, timed and checked (row count, finite values).

        Safe on a device's worker thread: it changes no shared state (the caller records the result). A failure
        of any kind -- an exception, a wrong shape, NaN or inf -- raises DeviceFault naming the device.
        """
        session = session or self.session_of(call)
        transfers = 0
        dev_rows = rows
        on_host = session.device == "cpu" and rows.device.type == "cpu"  # the common case, without building a device
        if not on_host and rows.device != torch.device(session.device):
            dev_rows, transfers = rows.to(session.device), 1
        t0 = time.perf_counter()
        try:
            y = session.forward(dev_rows)
        except Exception as e:  # noqa: BLE001 -- any backend failure is the device's fault here
            raise DeviceFault(call.device, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        dt = time.perf_counter() - t0
        if getattr(y, "shape", None) != rows.shape:
            raise DeviceFault(call.device, f"returned shape {list(getattr(y, 'shape', ()))} for input "
                                           f"{list(rows.shape)}")
        if not all_finite(y):
            raise DeviceFault(call.device, f"returned NaN or inf for {rows.shape[0]} finite input rows")
        if y.device != rows.device:
            y, transfers = y.to(rows.device), transfers + 1
        return CallResult(y, call.device, call.kind == "routed", rows.shape[0], dt,
                          session.modeled_seconds(rows.shape[0]), transfers)

    def run_guarded(self, call: ExpertCall, rows: torch.Tensor, session: ExpertSession | None = None) -> CallResult:
        """run_call on the device's worker, waiting at most the profile's expert_timeout_s (DeviceFault after)."""
        rt = self.runtime
        future = rt.submit(call.device, lambda: self.run_call(call, rows, session))
        return rt.wait(call.device, future, time.monotonic() + rt.timeout_s)

    def record(self, result: CallResult) -> torch.Tensor:
        """Count a finished call in the runtime's statistics; returns its output."""
        stats = self.runtime.stats
        stats.wall_s_per_device[result.device] += result.seconds
        stats.expert_s += result.seconds
        stats.modeled_s_per_device[result.device] += result.modeled_s
        stats.tokens_per_device[result.device] += result.rows if result.routed else 0
        stats.transfers += result.transfers
        if stats.call_log is not None:
            stats.call_log.append((result.rows, result.seconds))
        return result.y

    def run_slot(self, slot: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows [N, D] through slot `slot`'s expert, failing over when its device fails (sequential callers)."""
        return self.run_checked(self.placed(ExpertCall("routed", slot, int(self.device_of[slot]), 0, rows.shape[0])),
                                rows)

    def run_shared(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows [N, D] through shared expert `index`, failing over when its device fails (sequential callers)."""
        return self.run_checked(ExpertCall("shared", index, self.shared_devices[index], 0, rows.shape[0]), rows)

    def run_checked(self, call: ExpertCall, rows: torch.Tensor) -> torch.Tensor:
        """run_call on the planned device unless it is quarantined; a fault fails over (see `failover`)."""
        health = self.runtime.health
        if not health.usable(call.device):
            return self.failover(call, rows, None)
        try:
            result = self.run_guarded(call, rows)
        except DeviceFault as fault:
            return self.failover(call, rows, fault)
        health.ok(call.device)
        return self.record(result)

    def failover(self, call: ExpertCall, rows: torch.Tensor, fault: DeviceFault | None) -> torch.Tensor:
        """Run a failed (or quarantined) call's rows on a replica on another healthy device, else on the profile's
        fallback device; a fault there too, or nowhere to go, is a one-line HetrunError naming the devices."""
        rt = self.runtime
        bad = call.device
        expert = int(self.phy2log[call.index]) if call.kind == "routed" else call.index
        what = f"{'expert' if call.kind == 'routed' else 'shared expert'} {expert} of layer {self.weights.layer}"
        where = f"device '{rt.devices[bad].id}'"
        reason = f"failed on {what} ({fault.reason})" if fault else f"is quarantined after a fault (retry in " \
                 f"{rt.health.retry_in(bad):.1f} s)"
        if fault is not None:
            rt.health.fault(bad)
            rt.stats.faults.append({"layer": self.weights.layer, "expert": expert, "kind": call.kind,
                                    "device": rt.devices[bad].id, "error": fault.reason})
        for target, session in self._failover_targets(call, bad):
            tcall = ExpertCall(call.kind, call.index, target, call.start, call.end)
            try:
                result = self.run_guarded(tcall, rows, session)
            except DeviceFault as second:
                rt.health.fault(target)
                rt.stats.faults.append({"layer": self.weights.layer, "expert": expert, "kind": call.kind,
                                        "device": rt.devices[target].id, "error": second.reason})
                raise HetrunError(f"{where} {reason}, and the failover device '{rt.devices[target].id}' failed too "
                                  f"({second.reason}); fix or remove the devices, or add replicas on other devices") \
                    from None
            rt.health.ok(target)
            if fault is not None:
                log.error("%s %s; its %d rows go to '%s'", where, reason, rows.shape[0], rt.devices[target].id)
            return self.record(result)
        raise HetrunError(f"{where} {reason} and it has no replica on another device and the profile no "
                          "fallback_device; add replicas or a fallback_device")

    def _failover_targets(self, call: ExpertCall, bad: int):
        # (device, session) candidates in order: replicas of the same expert on other usable devices, then the
        # profile's fallback device (its session compiled on first use).
        rt = self.runtime
        if call.kind == "routed":
            expert = int(self.phy2log[call.index])
            for r in self.slot_table[expert].tolist()[:int(self.replica_count[expert])]:
                d = int(self.device_of[r])
                if d != bad and self.sessions[r] is not None and rt.health.usable(d):
                    yield d, self.sessions[r]
        fallback = rt.profile.fallback_device
        if fallback is None or fallback.id not in rt.plan.device_ids:
            return
        target = rt.plan.device_ids.index(fallback.id)
        if target == bad or not rt.is_local(target) or not rt.health.usable(target):
            return
        key = (call.kind, call.index if call.kind == "shared" else int(self.phy2log[call.index]), target)
        if key not in self._fallback_sessions:
            w = self.weights.experts[key[1]] if call.kind == "routed" else self.weights.shared[call.index]
            tag = "E" if call.kind == "routed" else "S"
            self._fallback_sessions[key] = rt.compile(target, w, f"L{self.weights.layer}.{tag}{key[1]}@fallback")
        yield target, self._fallback_sessions[key]


class DeviceFault(Exception):
    """A device failed one expert call: it raised, returned the wrong shape, or returned NaN or inf."""

    def __init__(self, device: int, reason: str):
        super().__init__(reason)
        self.device, self.reason = device, reason


@dataclass(frozen=True)
class CallResult:
    """What one expert call returned and cost."""

    y: torch.Tensor  # [N, D] on the caller's device
    device: int
    routed: bool  # a routed expert (counted in tokens_per_device) or a shared one
    rows: int
    seconds: float  # measured wall time of the device's call
    modeled_s: float  # modeled device time (simulated devices; 0 for real ones)
    transfers: int  # host<->device copies the call needed


@dataclass(frozen=True, eq=False)
class ExpertCall:
    """One expert call of a layer call: rows start:end of the permuted rows through a slot or a shared expert.
    Known by identity (a dict key per layer call: hashing its fields would cost more than the lookup)."""

    kind: str  # "routed" (index: slot) or "shared" (index: shared expert)
    index: int
    device: int  # device index it runs on: the plan's, or the cache device
    start: int
    end: int
    cached: bool = False  # runs on the cached copy of the slot's expert (hetrun.runtime.expert_cache)


class DeviceHealth:
    """Which devices are quarantined after a fault, and when each may be tried again.

    A fault quarantines a device for `backoff` seconds (1 s, doubling per further fault up to 60 s); while
    quarantined its calls go straight to failover, so a dead device costs one fault, not one per call. The first
    call after the back-off probes it: success clears the record.
    """

    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0

    def __init__(self, devices: int):
        self.until = np.zeros(devices)  # [D] monotonic time before which a device is not tried
        self.backoff = np.zeros(devices)  # [D] current back-off, 0 when healthy

    def usable(self, device: int) -> bool:
        """Whether calls may go to `device` now (healthy, or its back-off has passed: a probe)."""
        return time.monotonic() >= self.until[device]

    def retry_in(self, device: int) -> float:
        """Seconds until `device` is probed again."""
        return max(0.0, self.until[device] - time.monotonic())

    def fault(self, device: int) -> None:
        """Record a fault: quarantine `device` for its next back-off."""
        self.backoff[device] = min(self.MAX_BACKOFF_S, max(self.FIRST_BACKOFF_S, 2 * self.backoff[device]))
        self.until[device] = time.monotonic() + self.backoff[device]

    def ok(self, device: int) -> None:
        """Record a success: the device is healthy again."""
        if self.backoff[device]:
            self.backoff[device] = 0.0
            self.until[device] = 0.0

    def quarantined(self) -> list[int]:
        """Devices now in quarantine."""
        now = time.monotonic()
        return [d for d in range(len(self.until)) if self.until[d] > now]


@dataclass(frozen=True)
class RoutedRows:
    """One layer call's token rows, grouped by the physical slot they go to."""

    x: torch.Tensor  # [T, D] the layer's input (shared experts take every token)
    rows: torch.Tensor  # [T*K, D] one row per (token, k) pair, grouped by slot in ascending slot order
    counts: torch.Tensor  # [R] rows per slot
    one_each: "list[int] | None" = None  # a decode token's slots, ascending, a row each (what counts says)


class Exchange:
    """How a layer's rows reach the devices that hold their slots, and their outputs come back."""

    def __call__(self, layer: MoELayer, routed: RoutedRows) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(outputs [T*K, D] in the order of routed.rows, one [T, D] per shared expert)."""
        raise NotImplementedError

    def begin(self, layer: MoELayer) -> None:
        """Called as a layer call starts, before routing."""

    def end(self, layer: MoELayer, tokens: int, seconds: float) -> None:
        """Called as a layer call of `tokens` tokens ends, `seconds` after it began."""

    def plan_changed(self, runtime: ExpertRuntime) -> None:
        """Called after a live plan switch (ExpertRuntime.switch_plan), between steps."""


class LocalExchange(Exchange):
    """Every device in this process. Each device's calls of a step go to that device's worker thread in one
    submission, so devices run at the same time and a step costs the slowest device, not the sum. A device that
    raises, returns a wrong shape or NaN, or does not answer within the profile's `expert_timeout_s`, fails over
    (MoELayer.failover) after the others have finished; a hung worker is abandoned and replaced."""

    def __call__(self, layer: MoELayer, routed: RoutedRows) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rt = layer.runtime
        by_device: dict[int, list[ExpertCall]] = {}
        failed: list[tuple[ExpertCall, DeviceFault | None]] = []
        calls = layer.calls(routed)  # routed ones in slot order, then the shared ones in order
        for call in calls:
            if rt.health.usable(call.device):
                by_device.setdefault(call.device, []).append(call)
            else:
                failed.append((call, None))
        pending = [(d, rt.submit(d, _DeviceJob(layer, routed, calls))) for d, calls in by_device.items()]
        deadline = time.monotonic() + rt.timeout_s
        results: dict[ExpertCall, torch.Tensor] = {}
        for d, future in pending:
            try:
                done, fault, rest = rt.wait(d, future, deadline)
            except DeviceFault as hung:
                done, fault, rest = {}, hung, by_device[d]
            results.update({c: layer.record(r) for c, r in done.items()})
            if fault is not None:  # the first call's failover records the fault and quarantines the device
                failed += [(c, fault if i == 0 else None) for i, c in enumerate(rest)]
            else:
                rt.health.ok(d)
        for call, fault in failed:  # after the healthy devices finished: failover reuses their sessions safely
            results[call] = layer.failover(call, _rows(routed, call), fault)
        # the routed calls cover routed.rows in slot order, one after the other: their outputs joined in that order
        ys = [results[c] for c in calls if c.kind == "routed"]
        out = ys[0] if len(ys) == 1 else torch.cat(ys) if ys else torch.empty_like(routed.rows)  # [T*K, D]
        shared = [results[c] for c in calls if c.kind == "shared"]
        return out, shared


def _rows(routed: RoutedRows, call: ExpertCall) -> torch.Tensor:
    return routed.rows[call.start:call.end] if call.kind == "routed" else routed.x


@dataclass
class _DeviceJob:
    """One device's expert calls of one layer call, run in turn on its worker."""

    layer: MoELayer
    routed: RoutedRows
    calls: list[ExpertCall]

    def __call__(self) -> tuple[dict, DeviceFault | None, list[ExpertCall]]:
        # (results so far, the fault that stopped the device or None, the calls it did not finish)
        done = {}
        for i, call in enumerate(self.calls):
            try:
                done[call] = self.layer.run_call(call, _rows(self.routed, call))
            except DeviceFault as fault:
                return done, fault, self.calls[i:]
        return done, None, []


class DeviceWorker:
    """A daemon thread that runs one device's jobs in order (a hung call cannot hold up the interpreter's exit)."""

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, job) -> Future:
        """Run `job()` on this worker; its result or exception arrives in the returned Future."""
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def close(self, timeout: float) -> bool:
        """Let the job running now finish and cancel the queued ones; whether the thread ended within `timeout`
        seconds."""
        self.closing = True
        self.jobs.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _loop(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:  # close()
                return
            job, future = item
            if self.closing:
                future.cancel()
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # noqa: BLE001 -- handed to the caller, which raises it
                future.set_exception(e)


BACKGROUND_EXIT_WAIT_S = 60.0  # how long the interpreter's exit waits, at most, for background compiles in flight
_background_workers: "weakref.WeakSet[DeviceWorker]" = weakref.WeakSet()


def background_worker(name: str) -> DeviceWorker:
    """A DeviceWorker for background work (live rebalancing, cache loads) that the interpreter's exit lets finish
    the job it is running (at most BACKGROUND_EXIT_WAIT_S) and whose queued jobs it cancels."""
    worker = DeviceWorker(name)
    _background_workers.add(worker)
    return worker


@atexit.register
def _finish_background_work() -> None:
    # A daemon thread still compiling inside onnxruntime or OpenVINO while the interpreter tears down aborts the
    # process ("terminate called without an active exception", exit 134): a script that ended with cache loads in
    # flight did about one exit in three (`hetrun serve` ends the same way).
    end = time.monotonic() + BACKGROUND_EXIT_WAIT_S
    for worker in list(_background_workers):
        if not worker.close(max(0.0, end - time.monotonic())):
            log.warning("exiting while background work on '%s' is still running", worker.thread.name)


# Families whose MoE block returns (hidden states, router scores), which their decoder layer unpacks.
BLOCK_RETURNS_SCORES = ("gpt_oss", "llama4_text")


class HetrunMoEBlock(torch.nn.Module):
    """Stands where a transformers MoE block stood: hidden [B, S, D] -> [B, S, D] through hetrun's dispatcher (and
    no router scores beside it, where the block returned them)."""

    def __init__(self, layer: MoELayer, returns_scores: bool = False):
        super().__init__()
        self.layer = layer
        self.returns_scores = returns_scores

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        out = self.layer(hidden_states.reshape(-1, shape[-1])).reshape(shape)
        return (out, None) if self.returns_scores else out


def swap_moe_blocks(model: torch.nn.Module, paths: list[str], layers: list[MoELayer]) -> None:
    """Put a HetrunMoEBlock of each layer where the MoE block at that module path stood."""
    returns_scores = getattr(model.config, "model_type", None) in BLOCK_RETURNS_SCORES
    for path, layer in zip(paths, layers):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, HetrunMoEBlock(layer, returns_scores))
