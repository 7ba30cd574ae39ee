"""Expert parallelism across processes: each rank runs its own devices' experts; tokens move with all_to_all_single.

The layer is hetrun.runtime.dispatch's MoELayer; only its exchange differs (CollectiveExchange instead of
LocalExchange). One MoE step on every rank, in lockstep:
  1. count exchange: all_gather of [status, deployment, layer, plan version, rebalance state, candidate digest,
     tokens per expert slot, tokens per shared expert]; ranks with no tokens of their own (finished, or
     expert-only) take part with zero counts. With live rebalancing (the profile's `rebalance:` section) the three
     plan fields let every rank switch to a new plan at the same step (hetrun.runtime.rebalancer), and the counts
     are the global load every rank smooths alike;
  2. dispatch: all_to_all_single with uneven splits sends each (token, expert) row to the rank owning its slot;
  3. each rank runs its slots' rows (from every source rank) through its expert graphs;
  4. combine: all_to_all_single sends the outputs back; the owner of the tokens weights and sums them exactly as
     the one-process MoELayer does, so logits are bit-identical to a one-process run of the same plan.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from hetrun.distributed.ranks import RankLayout, resolve_layout
from hetrun.distributed.stats import RankStats
from hetrun.distributed.trace import Tracer
from hetrun.distributed.world import RankFailure, World, join_world
from hetrun.errors import HetrunError, PlacementError
from hetrun.placement.plan import Plan
from hetrun.profile import Profile
from hetrun.runtime.dispatch import Exchange, ExpertRuntime, MoELayer, RoutedRows
from hetrun.runtime.weights import MoELayerWeights

log = logging.getLogger("hetrun")

IDLE, ACTIVE = 0, 1
HEADER_FIXED = 6  # status, deployment number, MoE layer, plan version, rebalance state, candidate digest
_TRACING = False


def set_tracing(enabled: bool) -> None:
    """Record Chrome-trace spans in distributed runtimes created from now on (hetrun.launch --trace sets it)."""
    global _TRACING
    _TRACING = bool(enabled)


@dataclass(frozen=True)
class LayerRanks:
    """Which rank owns what in one MoE layer."""

    slot_rank: np.ndarray  # [R] rank owning each slot
    shared_rank: np.ndarray  # [S] rank owning each shared expert
    my_slots: np.ndarray  # [Q_r] this rank's slots, ascending
    my_shared: np.ndarray  # [Q_s] this rank's shared experts
    shared_on: list[list[int]]  # per rank, its shared experts


class CollectiveExchange(Exchange):
    """Rows move between ranks with all_to_all_single; each rank computes its own slots (MoELayer.run_slot)."""

    def __init__(self, runtime: "DistributedRuntime"):
        self.runtime = runtime
        self._ranks: dict[int, LayerRanks] = {}
        self._start_us = 0.0

    def ranks(self, layer: MoELayer) -> LayerRanks:
        """The rank map of `layer`, computed once."""
        if layer.index not in self._ranks:
            rt, me = self.runtime, self.runtime.world.rank
            slot_rank = rt.rank_of_device[layer.device_of]  # [R]
            shared_rank = rt.rank_of_device[np.asarray(layer.shared_devices, dtype=np.int64)]  # [S]
            self._ranks[layer.index] = LayerRanks(
                slot_rank, shared_rank, np.nonzero(slot_rank == me)[0], np.nonzero(shared_rank == me)[0],
                [np.nonzero(shared_rank == j)[0].tolist() for j in range(rt.world.size)])
        return self._ranks[layer.index]

    # ---- the rank with tokens --------------------------------------------------------------------
    def begin(self, layer: MoELayer) -> None:
        self.runtime.check_callable()
        self._start_us = self.runtime.tracer.now_us()

    def __call__(self, layer: MoELayer, routed: RoutedRows) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rt = self.runtime
        ranks = self.ranks(layer)
        counts = routed.counts.numpy()  # [R]
        header = np.concatenate([[ACTIVE, rt.seq, layer.index, *rt.plan_fields()], counts,
                                 np.full(len(ranks.shared_rank), routed.x.shape[0])])
        table = rt.exchange_header(header.astype(np.int64))  # [W, H]
        sorted_slots = np.repeat(np.arange(len(counts)), counts)  # [T*K] slot of each permuted row
        out_rows, shared = self._exchange(layer, table, routed.x.numpy(), routed.rows.numpy(), sorted_slots)
        return torch.from_numpy(out_rows), [torch.from_numpy(s) for s in shared]

    def plan_changed(self, runtime: ExpertRuntime) -> None:
        self._ranks.clear()  # slots may have changed devices, and so ranks

    def end(self, layer: MoELayer, tokens: int, seconds: float) -> None:
        rt = self.runtime
        rt.rank_stats.step_s += seconds
        rt.rank_stats.active_steps += 1
        rt.tracer.add(f"MoE layer {layer.index}", "moe", self._start_us, rt.tracer.now_us(), tokens=tokens)

    # ---- every rank --------------------------------------------------------------------------------
    def serve(self, layer: MoELayer, table: np.ndarray) -> None:
        """Take part in a step of `layer` without tokens of its own: receive, compute, send back."""
        empty = np.empty((0, layer.weights.gate.shape[1]), np.float32)
        self._exchange(layer, table, empty, empty, np.empty(0, np.int64))

    def _exchange(self, layer: MoELayer, table: np.ndarray, x_np: np.ndarray, permuted: np.ndarray,
                  sorted_slots: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Dispatch rows to the slots' ranks, run this rank's slots, combine; returns rows in `permuted` order.

        A failure here leaves the ranks mid-step: this rank can no longer take part, so it says so and tells the
        others (who name it when its connections drop) instead of trying to finish.
        """
        try:
            return self._move_and_compute(layer, table, x_np, permuted, sorted_slots)
        except RankFailure:
            raise
        except BaseException as e:
            self.runtime.failed = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.runtime.world.post_failure(self.runtime.failed)
            raise

    def _move_and_compute(self, layer: MoELayer, table: np.ndarray, x_np: np.ndarray, permuted: np.ndarray,
                          sorted_slots: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        rt, rs, ranks = self.runtime, self.runtime.rank_stats, self.ranks(layer)
        w, me, t, d = rt.world.size, rt.world.rank, x_np.shape[0], layer.weights.gate.shape[1]
        # Sender: rows grouped by destination rank, in slot order within each; shared experts take every token.
        dest = ranks.slot_rank[sorted_slots]  # [T*K]
        send_perm = np.argsort(dest, kind="stable")  # [T*K]
        routed = np.bincount(dest, minlength=w)  # [W]
        routed_off = np.concatenate([[0], np.cumsum(routed)])
        parts = []
        for j in range(w):
            parts.append(permuted[send_perm[routed_off[j]:routed_off[j + 1]]])
            parts.extend([x_np] * len(ranks.shared_on[j]))
        send = np.concatenate(parts) if parts else np.empty((0, d), np.float32)  # [sum(send_sizes), D]
        send_sizes = routed + np.array([len(s) * t for s in ranks.shared_on], dtype=np.int64)  # [W]
        # Receiver: rows from each source rank, per local routed slot then per local shared expert.
        counts = np.concatenate([table[:, HEADER_FIXED + ranks.my_slots],
                                 table[:, HEADER_FIXED + layer.num_slots + ranks.my_shared]], axis=1)  # [W, Q]
        recv_sizes = counts.sum(axis=1)  # [W]

        recv = self._all_to_all(layer, "dispatch", send, recv_sizes, send_sizes)  # [sum(recv_sizes), D]
        done = self._compute(layer, recv, counts)  # [sum(recv_sizes), D]
        back = self._all_to_all(layer, "combine", done, send_sizes, recv_sizes)  # [sum(send_sizes), D]

        out_rows = np.empty_like(permuted)  # [T*K, D]
        shared_out: list[np.ndarray] = [np.empty(0)] * len(ranks.shared_rank)
        pos = 0
        for j in range(w):
            n = int(routed[j])
            out_rows[send_perm[routed_off[j]:routed_off[j + 1]]] = back[pos:pos + n]
            pos += n
            for s in ranks.shared_on[j]:
                shared_out[s] = back[pos:pos + t]
                pos += t
        others = np.arange(w) != me
        rs.tokens_routed += int(send_sizes.sum())
        rs.tokens_sent += int(send_sizes[others].sum())
        rs.tokens_received += int(recv_sizes[others].sum())
        rs.tokens_computed += int(recv_sizes.sum())
        row = d * 4
        rs.bytes_sent += int(send_sizes[others].sum() + recv_sizes[others].sum()) * row
        rs.bytes_received += int(recv_sizes[others].sum() + send_sizes[others].sum()) * row
        return out_rows, shared_out

    def _all_to_all(self, layer: MoELayer, what: str, rows: np.ndarray, out_sizes: np.ndarray,
                    in_sizes: np.ndarray) -> np.ndarray:
        rt = self.runtime
        dev = rt.world.device
        src = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        if dev.type != "cpu":
            src = src.to(dev)
        dst = torch.empty((int(out_sizes.sum()), rows.shape[1]), dtype=torch.float32, device=dev)
        t0, s_us = time.perf_counter(), rt.tracer.now_us()
        rt.world.run(f"{what} of MoE layer {layer.index}", dist.all_to_all_single, dst, src,
                     out_sizes.tolist(), in_sizes.tolist(), group=rt.world.data_group)
        rt.rank_stats.a2a_s += time.perf_counter() - t0
        rt.tracer.add(f"{what} L{layer.index}", "comm", s_us, rt.tracer.now_us(),
                      rows_out=int(in_sizes.sum()), rows_in=int(out_sizes.sum()))
        return dst.cpu().numpy() if dev.type != "cpu" else dst.numpy()

    def _compute(self, layer: MoELayer, recv: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Run every local slot on its rows from all source ranks; rows are laid out source-major."""
        rt, rs, ranks = self.runtime, self.runtime.rank_stats, self.ranks(layer)
        w, q = counts.shape
        chunk = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])[:-1]  # [W] where each source's rows start
        start = chunk[:, None] + np.cumsum(counts, axis=1) - counts  # [W, Q]
        out = np.empty_like(recv)
        n_routed = len(ranks.my_slots)
        for c in range(q):
            idx = np.concatenate([np.arange(start[i, c], start[i, c] + counts[i, c]) for i in range(w)])
            if len(idx) == 0:
                rs.empty_slots += int(c < n_routed)
                continue
            s_us = rt.tracer.now_us()
            t0 = time.perf_counter()
            if c < n_routed:
                r = int(ranks.my_slots[c])
                out[idx] = layer.run_slot(r, torch.from_numpy(recv[idx])).numpy()  # fails over inside this rank
                name, dev = f"L{layer.index}.E{int(layer.phy2log[r])} slot {r}", int(layer.device_of[r])
            else:
                s = int(ranks.my_shared[c - n_routed])
                out[idx] = layer.run_shared(s, torch.from_numpy(recv[idx])).numpy()
                name, dev = f"L{layer.index}.S{s}", int(layer.shared_devices[s])
            rs.expert_s += time.perf_counter() - t0
            rt.tracer.add(name, "experts", s_us, rt.tracer.now_us(), rows=len(idx), device=rt.devices[dev].id)
        return out


class DistributedRuntime(ExpertRuntime):
    """This rank's share of a plan: its devices' expert graphs, the world it steps with, and its statistics."""

    collective = True  # plan switches are agreed through the step headers

    def __init__(self, plan: Plan, profile: Profile, weights: list[MoELayerWeights], world: World,
                 layout: RankLayout, threads: int | None = None, progress: bool = False):
        self.world, self.layout = world, layout
        self.holds_dense = layout.holds_dense(world.rank)
        missing = [i for i in plan.device_ids if not any(i in ids for ids in layout.ranks)]
        if missing:
            raise PlacementError(f"plan places experts on {', '.join(missing[:3])}, which profile "
                                 f"'{layout.profile_name}' puts on no rank; re-plan for this profile")
        self.rank_of_device = np.array([layout.rank_of(i) for i in plan.device_ids], dtype=np.int64)  # [D]
        if world.active is not None and not world.active.closed:
            log.warning("a new deployment starts while the previous one has not finished; finishing it first")
            world.active.finish()
        world.runtimes += 1
        self.seq = world.runtimes
        self.closed = False
        self.failed: str | None = None  # why this rank broke off mid-step
        self.report: list | None = None
        self.tracer = Tracer(_TRACING)
        self.rank_stats = RankStats(world.rank, world.host, layout.ranks[world.rank], self.holds_dense)
        self.global_tokens = np.zeros((plan.num_layers, plan.spec.num_experts))  # [L, E] every rank's routed tokens
        world.start_heartbeat()
        world.phase = "compiling experts"
        local = {i for i, r in enumerate(self.rank_of_device.tolist()) if r == world.rank}
        super().__init__(plan, profile, weights, threads=threads, progress=progress, local_devices=local,
                         exchange=CollectiveExchange(self))
        self.header_len = HEADER_FIXED + plan.num_slots + plan.shared_device_of.shape[1]

        digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]
        peers = world.handshake({"rank": world.rank, "host": world.host, "plan": digest, "deployment": self.seq,
                                 "devices": list(layout.ranks[world.rank])})
        differ = [p["rank"] for p in peers if p["plan"] != digest or p["deployment"] != self.seq]
        if differ:
            raise PlacementError(f"ranks {differ} run a different plan or deployment than rank {world.rank}; make "
                                 "the same plan on every rank (pass one Plan, or the same --plan file)")
        self.peers = peers
        walls = torch.zeros(world.size, dtype=torch.float64)
        world.run("clock alignment", dist.all_gather_single, walls,
                  torch.tensor([self.tracer.now_us()], dtype=torch.float64), group=world.control_group)
        if peers[0]["host"] != world.host:  # same host: one clock; across hosts: align at this collective
            self.tracer.offset_us = float(walls[world.rank] - walls[0])
        world.active = self
        if self.holds_dense:
            atexit.register(self._finish_at_exit)

    # ---- steps -----------------------------------------------------------------------------------
    def routed_load(self) -> np.ndarray:
        return self.global_tokens

    def plan_fields(self) -> tuple[int, int, int]:
        """(plan version, rebalance state, candidate digest) for this rank's next step header."""
        return self.rebalancer.header_fields() if self.rebalancer is not None else (0, 0, 0)

    def check_callable(self) -> None:
        """Raise unless this rank may run the model now."""
        if not self.holds_dense:
            raise HetrunError(f"rank {self.world.rank} holds experts only (profile '{self.layout.profile_name}' sets "
                              "distributed.dense: rank0); run the model on rank 0 only, e.g. "
                              "`if model.hetrun.holds_dense: model.generate(...)`")
        if self.failed is not None:
            raise HetrunError(f"rank {self.world.rank} broke off a step ({self.failed}); the ranks cannot go on "
                              "together: restart them")
        if self.closed:
            raise HetrunError("this deployment has finished (model.hetrun.finish() was called); deploy again to run "
                              "more")

    def exchange_header(self, header: np.ndarray) -> np.ndarray:
        """All ranks' step headers [W, H]; raises when ranks are out of step."""
        rs = self.rank_stats
        table = torch.empty(self.world.size * self.header_len, dtype=torch.int64)
        t0, s_us = time.perf_counter(), self.tracer.now_us()
        self.world.run("the token-count exchange", dist.all_gather_single, table, torch.from_numpy(header),
                       group=self.world.control_group)
        rs.header_s += time.perf_counter() - t0
        rs.header_bytes += table.numel() * 8
        rs.steps += 1
        self.tracer.add("token counts", "comm", s_us, self.tracer.now_us())
        table = table.numpy().reshape(self.world.size, self.header_len)  # [W, H]
        wrong = np.nonzero(table[:, 1] != self.seq)[0]
        if len(wrong):
            raise HetrunError(f"rank {int(wrong[0])} steps deployment #{int(table[wrong[0], 1])}, rank "
                              f"{self.world.rank} deployment #{self.seq}; deploy the same models in the same order "
                              "on every rank")
        active = table[:, 0] == ACTIVE
        layers = set(table[active, 2].tolist())
        if len(layers) > 1:
            raise HetrunError(f"ranks are out of step (MoE layers {sorted(layers)} at once); every rank must run "
                              "its forward passes through the same layers")
        layer = layers.pop() if layers else None
        if layer == 0 and not active[self.world.rank]:
            self.step_begin()  # a step begins that this rank only serves (ranks with tokens began it before routing)
        if layer is not None and self.rebalancer is not None:  # every rank sees this table: all switch, count alike
            self.rebalancer.on_table(layer, active, table[:, 3:HEADER_FIXED])
            slot_counts = table[active, HEADER_FIXED:HEADER_FIXED + self.plan.num_slots].sum(0)  # [R]
            self.global_tokens[layer] += np.bincount(self.layers[layer].phy2log, weights=slot_counts,
                                                     minlength=self.plan.spec.num_experts)
        return table

    def finish(self, payload=None) -> list[dict] | None:
        """Serve other ranks until every rank has finished, then gather statistics (and `payload`, plain JSON data:
        ranks exchange JSON, never pickles) to rank 0.

        Returns, on rank 0, one dict per rank with `stats`, `trace` and `payload`; None on other ranks.
        Calling it again returns the same.
        """
        if self.closed:
            return self.report or None
        if self.failed is not None:
            self.check_callable()
        self.closed = True
        idle = np.zeros(self.header_len, np.int64)
        idle[1], idle[2] = self.seq, -1
        self.world.phase = "serving"
        while True:
            t0 = time.perf_counter()
            idle[3:HEADER_FIXED] = self.plan_fields()
            table = self.exchange_header(idle)
            active = table[:, 0] == ACTIVE
            if not active.any():
                break
            layer = int(table[active][0, 2])
            s_us = self.tracer.now_us()
            self.exchange.serve(self.layers[layer], table)
            self.rank_stats.step_s += time.perf_counter() - t0
            self.tracer.add(f"serve MoE layer {layer}", "moe", s_us, self.tracer.now_us())
        rs = self.rank_stats
        rs.faults = len(self.stats.faults)
        rs.switches = [[s["version"], s["step"], s["moves"]] for s in self.stats.switches]
        rs.tokens_per_device = {self.devices[i].id: int(self.stats.tokens_per_device[i])
                                for i in sorted(self.local_devices or ())}
        mine = {"stats": rs.to_dict(), "trace": self.tracer.export(), "payload": payload}
        gathered = self.world.gather_json("gathering statistics", mine, dst=0)  # JSON, never pickle
        # No collective runs between deployments: stop beating, and let no rank leave while another still beats.
        self.world.stop_heartbeat()
        self.world.run("the closing barrier", dist.barrier, group=self.world.control_group)
        self.report = gathered or []
        if self.world.active is self:
            self.world.active = None
        if self.holds_dense:
            atexit.unregister(self._finish_at_exit)
        return gathered

    def _finish_at_exit(self) -> None:
        if not self.closed and self.world.broken is None and self.failed is None:
            try:
                self.finish()
            except HetrunError as e:
                log.error("finishing the deployment at exit failed: %s", e)


def distributed_runtime(plan: Plan, profile: Profile, weights: list[MoELayerWeights],
                        threads: int | None = None, progress: bool = False) -> DistributedRuntime | None:
    """This rank's runtime when the process is a rank of a torchrun launch and the profile lays out ranks; else None.

    On ranks that hold no dense parts (`distributed.dense: rank0`), this serves expert requests until rank 0
    finishes (`model.hetrun.finish()`, or at its exit) before it returns.
    """
    layout = resolve_layout(profile)
    if layout is None:
        return None
    world = join_world(profile, layout)
    if world is None:
        return None
    if threads is None:  # ranks on one host share its cores: don't let every rank's sessions take all of them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local) if local > 1 else None
    runtime = DistributedRuntime(plan, profile, weights, world, layout, threads=threads, progress=progress)
    if not runtime.holds_dense:
        runtime.finish()
    return runtime
