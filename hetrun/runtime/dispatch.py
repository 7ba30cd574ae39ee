"""The dispatcher: route tokens, permute them per expert slot, run each device's experts, combine, keep statistics.

One MoE layer call, hidden [T, D] -> [T, D]:

    route          router logits -> top-k expert ids and weights                  [T, K]
    slots          each (token, k) pair -> a physical slot (replicas split by the plan's shares)   [T*K]
    permute        token rows grouped by slot                                   RoutedRows [T*K, D]
    exchange       rows -> the devices holding their slots -> expert outputs     [T*K, D] + shared [T, D]
                   (communication lives here: LocalExchange in one process, hetrun.distributed's
                   CollectiveExchange across ranks; compute is always MoELayer.run_slot / run_shared)
    combine        weighted sum of each token's K rows, plus its shared experts   [T, D]

Compute never knows where rows came from; communication never knows what an expert does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from hetrun.backends.base import ExpertSession
from hetrun.backends.registry import require_backend, resolve_backend
from hetrun.errors import HetrunError, PlacementError
from hetrun.placement.plan import Plan
from hetrun.profile import Device, Profile
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.routing import route, router_logits
from hetrun.runtime.weights import MoELayerWeights

log = logging.getLogger("hetrun")


@dataclass
class DispatchStats:
    """Counters a run accumulates; `tokens_per_expert` feeds the planner as a load table."""

    tokens_per_expert: np.ndarray  # [L, E]
    tokens_per_device: np.ndarray  # [D]
    modeled_s_per_device: np.ndarray  # [D] modeled device time (simulated devices)
    wall_s_per_device: np.ndarray  # [D] measured wall time inside expert graphs
    layer_s: float = 0.0  # whole MoE layers
    expert_s: float = 0.0  # inside expert graphs; the rest of layer_s is routing, permute, combine and copies
    calls: int = 0
    faults: list = field(default_factory=list)
    call_log: list | None = None  # (rows, seconds) of every expert call while a list is set (calibration)

    @classmethod
    def empty(cls, layers: int, experts: int, devices: int) -> "DispatchStats":
        return cls(np.zeros((layers, experts), np.int64), np.zeros(devices, np.int64), np.zeros(devices),
                   np.zeros(devices))

    def reset(self) -> None:
        """Zero every counter."""
        fresh = self.empty(*self.tokens_per_expert.shape, len(self.tokens_per_device))
        self.__dict__.update(fresh.__dict__)

    def to_dict(self, device_ids: tuple[str, ...]) -> dict:
        return {"tokens_per_expert": self.tokens_per_expert.tolist(),
                "devices": {d: {"tokens": int(self.tokens_per_device[i]),
                                "modeled_s": float(self.modeled_s_per_device[i]),
                                "wall_s": float(self.wall_s_per_device[i])} for i, d in enumerate(device_ids)},
                "layer_s": self.layer_s, "expert_s": self.expert_s, "calls": self.calls}


class ExpertRuntime:
    """Every expert graph of a plan compiled on its device's backend, ready to dispatch to.

    `profile` is the resolved Profile (hetrun.deploy resolves it once). `local_devices`: the device indices this
    process runs (None: all). `exchange` moves each layer's rows to the devices of their slots and back;
    default: LocalExchange, every device in this process.
    """

    def __init__(self, plan: Plan, profile: Profile, weights: list[MoELayerWeights], threads: int | None = None,
                 progress: bool = False, local_devices: "set[int] | None" = None, exchange: "Exchange | None" = None):
        self.plan = plan
        self.profile = profile
        self.exchange = exchange or LocalExchange()
        self.devices: tuple[Device, ...] = tuple(self._device(i) for i in plan.device_ids)
        self.stats = DispatchStats.empty(plan.num_layers, plan.spec.num_experts, len(self.devices))
        # Device indices whose experts this process compiles and runs; None: all of them (one process).
        self.local_devices = None if local_devices is None else frozenset(local_devices)
        self.backends = [require_backend(resolve_backend(d))(d, plan.precision[d.id], threads) if self.is_local(i) else None
                         for i, d in enumerate(self.devices)]
        self.layers = [MoELayer(self, li, w) for li, w in enumerate(_iter(weights, progress, "compiling experts"))]

    def is_local(self, device: int) -> bool:
        """Whether this process runs the experts of device index `device`."""
        return self.local_devices is None or device in self.local_devices

    def _device(self, device_id: str) -> Device:
        found = [d for d in self.profile.devices if d.id == device_id]
        if not found:
            raise PlacementError(f"plan names device '{device_id}', which profile '{self.profile.name}' lacks; "
                                 "re-plan with `hetrun plan` for this profile")
        return found[0]

    def compile(self, device: int, expert, name: str) -> ExpertSession:
        """One expert graph built at its device's precision and loaded on that device's backend."""
        backend = self.backends[device]
        graph = build_expert_graph(expert, backend.precision, target=backend.graph_target())
        return backend.load(graph.serialize(), name, graph.meta)


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
        self.phy2log = plan.phy2log[index]  # [R]
        self.device_of = plan.device_of[index]  # [R]
        self.share = plan.share[index]  # [R]
        self.num_slots = len(self.phy2log)
        cache: dict[tuple[int, int], ExpertSession] = {}  # replicas on one device share one session
        self.sessions: list[ExpertSession] = []
        for r, (e, d) in enumerate(zip(self.phy2log.tolist(), self.device_of.tolist())):
            if (e, d) not in cache:  # another process's device: no session here
                cache[(e, d)] = runtime.compile(d, weights.experts[e], f"L{weights.layer}.E{e}") \
                    if runtime.is_local(d) else None
            self.sessions.append(cache[(e, d)])
        self._fallback_sessions: dict[tuple[int, int], ExpertSession] = {}
        self.shared_devices = plan.shared_device_of[index].tolist()
        self.shared_sessions = [runtime.compile(d, w, f"L{weights.layer}.S{s}") if runtime.is_local(d) else None
                                for s, (w, d) in enumerate(zip(weights.shared, self.shared_devices))]
        self._build_slot_tables()

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
        stats, exchange = self.runtime.stats, self.runtime.exchange
        exchange.begin(self)
        t0 = time.perf_counter()
        x = hidden.detach().float().contiguous()  # [T, D]
        k = self.router.top_k
        logits = router_logits(x.to(hidden.dtype), self.weights.gate.to(hidden.dtype), self.router)  # [T, E]
        ids, weights = route(logits, self.router, self.weights.correction_bias)  # [T, K], [T, K]
        slots = self.slots_for(ids)  # [T*K]
        order = torch.argsort(slots, stable=True)  # [T*K] permutation grouping pairs by slot
        token_of = order // k  # [T*K] source token of each permuted row
        x_np = x.numpy()
        routed = RoutedRows(x_np, x_np[token_of.numpy()], slots[order].numpy(),
                            torch.bincount(slots, minlength=self.num_slots).numpy())
        out_rows, shared_out = exchange(self, routed)  # [T*K, D], S x [T, D]

        y = torch.from_numpy(out_rows) * weights.reshape(-1)[order, None].float()  # [T*K, D]
        out = torch.zeros_like(x).index_add_(0, token_of, y)  # [T, D]
        for ys_np in shared_out:
            ys = torch.from_numpy(ys_np)  # [T, D]
            if self.weights.shared_gate is not None:
                ys = torch.sigmoid(torch.nn.functional.linear(x, self.weights.shared_gate)) * ys
            out += ys
        stats.tokens_per_expert[self.index] += torch.bincount(ids.reshape(-1), minlength=len(self.replica_count)).numpy()
        stats.calls += 1
        dt = time.perf_counter() - t0
        stats.layer_s += dt
        exchange.end(self, x.shape[0], dt)
        return out.to(hidden.dtype)

    def run_slot(self, slot: int, rows: np.ndarray) -> np.ndarray:
        """Rows [N, D] through slot `slot`'s expert on its device; a failing device hands them on (_failover)."""
        d = int(self.device_of[slot])
        try:
            y = self._run(self.sessions[slot], d, rows)
        except Exception as fault:  # noqa: BLE001 -- any backend failure: fail over, don't drop tokens
            d, y = self._failover(slot, rows, fault)
        self.runtime.stats.tokens_per_device[d] += len(rows)
        return y

    def run_shared(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Rows [N, D] through shared expert `index` on its device."""
        return self._run(self.shared_sessions[index], self.shared_devices[index], rows)

    def _failover(self, slot: int, rows: np.ndarray, fault: Exception) -> tuple[int, np.ndarray]:
        """Run a failed slot's tokens on a replica of the same expert on another device, else the fallback device."""
        rt = self.runtime
        expert, bad = int(self.phy2log[slot]), int(self.device_of[slot])
        where = f"device '{rt.devices[bad].id}' failed on expert {expert} of layer {self.weights.layer}"
        rt.stats.faults.append({"layer": self.weights.layer, "expert": expert, "device": rt.devices[bad].id,
                                "error": f"{type(fault).__name__}: {fault}"})
        candidates = [r for r in self.slot_table[expert].tolist()[:int(self.replica_count[expert])]
                      if int(self.device_of[r]) != bad and self.sessions[r] is not None]
        fallback = rt.profile.fallback_device
        if candidates:
            target, session = int(self.device_of[candidates[0]]), self.sessions[candidates[0]]
        elif fallback is not None and fallback.id in rt.plan.device_ids and fallback.id != rt.devices[bad].id \
                and rt.is_local(rt.plan.device_ids.index(fallback.id)):
            target = rt.plan.device_ids.index(fallback.id)
            key = (expert, target)
            if key not in self._fallback_sessions:
                self._fallback_sessions[key] = rt.compile(target, self.weights.experts[expert],
                                                          f"L{self.weights.layer}.E{expert}@fallback")
            session = self._fallback_sessions[key]
        else:
            raise HetrunError(f"{where} ({type(fault).__name__}: {fault}) and it has no replica on another device "
                              "and the profile no fallback_device; add replicas or a fallback_device") from fault
        log.error("%s (%s: %s); its %d tokens go to '%s'", where, type(fault).__name__, fault, len(rows),
                  rt.devices[target].id)
        return target, self._run(session, target, rows)

    def _run(self, session: ExpertSession, device: int, rows: np.ndarray) -> np.ndarray:
        stats = self.runtime.stats
        t0 = time.perf_counter()
        y = session.run(rows)
        dt = time.perf_counter() - t0
        stats.wall_s_per_device[device] += dt
        stats.expert_s += dt
        if stats.call_log is not None:
            stats.call_log.append((rows.shape[0], dt))
        stats.modeled_s_per_device[device] += session.modeled_seconds(rows.shape[0])
        return y


@dataclass(frozen=True)
class RoutedRows:
    """One layer call's token rows, grouped by the physical slot they go to."""

    x: np.ndarray  # [T, D] the layer's input (shared experts take every token)
    rows: np.ndarray  # [T*K, D] one row per (token, k) pair, grouped by slot in ascending slot order
    slot_of_row: np.ndarray  # [T*K] slot of each row, ascending
    counts: np.ndarray  # [R] rows per slot


class Exchange:
    """How a layer's rows reach the devices that hold their slots, and their outputs come back."""

    def __call__(self, layer: MoELayer, routed: RoutedRows) -> tuple[np.ndarray, list[np.ndarray]]:
        """(outputs [T*K, D] in the order of routed.rows, one [T, D] per shared expert)."""
        raise NotImplementedError

    def begin(self, layer: MoELayer) -> None:
        """Called as a layer call starts, before routing."""

    def end(self, layer: MoELayer, tokens: int, seconds: float) -> None:
        """Called as a layer call of `tokens` tokens ends, `seconds` after it began."""


class LocalExchange(Exchange):
    """Every device in this process: no communication, devices in turn."""

    def __call__(self, layer: MoELayer, routed: RoutedRows) -> tuple[np.ndarray, list[np.ndarray]]:
        out = np.empty_like(routed.rows)  # [T*K, D]
        offsets = np.concatenate([[0], np.cumsum(routed.counts)])
        for r in np.argsort(layer.device_of, kind="stable").tolist():  # device by device
            if routed.counts[r]:
                out[offsets[r]:offsets[r + 1]] = layer.run_slot(r, routed.rows[offsets[r]:offsets[r + 1]])
        return out, [layer.run_shared(s, routed.x) for s in range(len(layer.shared_sessions))]


class HetrunMoEBlock(torch.nn.Module):
    """Stands where a transformers MoE block stood: hidden [B, S, D] -> [B, S, D] through hetrun's dispatcher."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        return self.layer(hidden_states.reshape(-1, shape[-1])).reshape(shape)


def swap_moe_blocks(model: torch.nn.Module, paths: list[str], layers: list[MoELayer]) -> None:
    """Put a HetrunMoEBlock of each layer where the MoE block at that module path stood."""
    for path, layer in zip(paths, layers):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, HetrunMoEBlock(layer))
