"""Live rebalancing: the placement follows the measured load while the model serves, and no step waits for a move.

Configured by the profile's `rebalance:` section (hetrun.profile.RebalanceSettings). Per deployment:
  1. load: routed tokens per (MoE layer, expert), as the dispatcher counts them (one process) or as every rank sees
     them in the step headers (torchrun: the global load, the same on every rank);
  2. every `window_steps` steps (a step: one forward pass, every MoE layer once) the window's load, each layer's row
     normalised, enters an exponential moving average with weight `ema`;
  3. a background job re-plans on the smoothed load (hetrun.placement.moves.budgeted_moves): token shares re-split
     for free, then the expert copies that gain most modeled step time per byte, within `max_move_gb`. If the
     predicted step time falls by at least `threshold`, the same job compiles the copies the devices of this
     process gain, their weights read again from the experts' sources;
  4. at the next step boundary (one process), or at the same step on every rank once every rank reports the same
     candidate ready (torchrun), every layer switches to the new plan at once; copies the new plan no longer uses
     are dropped, which frees their memory;
  5. every move is logged and recorded in DispatchStats.moves: step, layer, expert, from, to, bytes, predicted gain.
One job runs at a time; windows that end meanwhile only update the average.

Under torchrun the ranks agree through three fields of every step header (hetrun.distributed.moe): the plan version
a rank runs, its job state (idle, busy, failed, or the version it has ready) and a digest of the candidate plan.
Every rank computes the candidate itself from the same smoothed load, so no plan travels; the digest proves they
agree, and a mismatch (or a failure anywhere) drops the candidate on every rank. A moved expert's weights are read
again from the rank's own source (a checkpoint directory, or a module kept in memory), not sent over the collective.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hetrun.errors import HetrunError
from hetrun.placement.moves import MovePlan, budgeted_moves
from hetrun.placement.plan import Plan
from hetrun.profile import RebalanceSettings

log = logging.getLogger("hetrun")

IDLE, BUSY, FAILED = 0, -1, -2  # job states a rank reports; a positive state is the candidate version it has ready


@dataclass(frozen=True)
class Candidate:
    """A plan the background job prepared: its moves, and the copies compiled for the devices of this process."""

    version: int
    moves: MovePlan
    sessions: dict  # (layer, expert, device) -> ExpertSession
    digest: int
    seconds: float  # wall time of the job (decision and compiles)

    @property
    def plan(self) -> Plan:
        return self.moves.plan


class SmoothedLoad:
    """An exponential moving average of per-window load tables [L, E], each layer's row normalised to sum 1."""

    def __init__(self, weight: float):
        self.weight = float(weight)
        self.value: np.ndarray | None = None  # [L, E]

    def add(self, window: np.ndarray) -> None:
        """Fold one window's token counts [L, E] in (layers without tokens keep their average)."""
        w = np.asarray(window, dtype=np.float64)
        total = w.sum(1, keepdims=True)
        rows = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        if self.value is None:
            self.value = np.where(total > 0, rows, 1.0 / w.shape[1])
            return
        self.value = np.where(total > 0, (1 - self.weight) * self.value + self.weight * rows, self.value)


def decide(plan: Plan, load: np.ndarray, settings: RebalanceSettings, profile=None,
           placeable: "np.ndarray | None" = None) -> MovePlan | None:
    """The move plan for `load` within the settings' byte budget, or None when its predicted gain over `plan` as it
    runs is below the threshold (or nothing changes). `placeable` [L, E, D]: where copies can be made (None: all)."""
    mp = budgeted_moves(plan, load, settings.max_move_gb * 1e9, profile if "model" not in plan.predicted else None,
                        placeable=placeable)
    if mp.gain < max(settings.threshold, 1e-9):
        return None
    return mp


def plan_digest(plan: Plan) -> int:
    """A 62-bit digest of a plan's placement (slots, devices, token shares), equal on ranks that agree."""
    h = hashlib.sha256()
    for a in (plan.phy2log, plan.device_of, np.round(plan.share, 12)):
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 2


class LiveRebalancer:
    """Load windows, the background job, and the switch of one runtime (see the module docstring).

    `runtime` is the ExpertRuntime (its plan, layers, compile, background worker, stats and switch_plan);
    `load` returns the cumulative tokens per (layer, expert) [L, E] so far. `collective`: the ranks of a
    torchrun launch agree through step headers (`header_fields`, `on_table`); else this process decides alone.
    """

    def __init__(self, runtime, settings: RebalanceSettings, load: Callable[[], np.ndarray], collective: bool = False):
        self.runtime, self.settings, self.load, self.collective = runtime, settings, load, collective
        self.smoothed = SmoothedLoad(settings.ema)
        self.version = 0  # plan switches so far (torchrun: the same on every rank)
        self.mark = np.array(load(), dtype=np.float64)  # cumulative load at the last window end
        self.job: Future | None = None
        self.ready: Candidate | None = None  # prepared, waiting for the switch (torchrun: for every rank to agree)
        self.scheduled: Candidate | None = None  # agreed: switches at the next step start
        self.failed: str | None = None  # why the last job failed
        self.job_failed = False  # torchrun: the last job failed, reported as FAILED until every rank drops it
        self.checks = 0  # decisions made
        self.last_gain = 0.0  # predicted gain of the last decision

    # ---- step boundaries ---------------------------------------------------------------------------------
    def new_step(self) -> None:
        """Called once per step on the thread that runs the model, before the step routes its first token (torchrun:
        on every rank, also those that only serve): switch to a plan that is due, count the step, and (one process)
        end a window."""
        if self.scheduled is not None:
            cand, self.scheduled = self.scheduled, None
            self._switch(cand)
        if self.collective:
            return
        self._collect()
        if self.ready is not None:
            cand, self.ready = self.ready, None
            self._switch(cand)
        if self._window_due():
            self._window_end(start=self.job is None)

    def _window_due(self) -> bool:
        # a window ended with the step before this one (runtime.steps counts steps begun, this one included)
        steps = self.runtime.steps
        return steps > 1 and (steps - 1) % self.settings.window_steps == 0

    def _window_end(self, start: bool) -> None:
        now = np.array(self.load(), dtype=np.float64)
        window = now - self.mark
        if (window < 0).any():  # the counts were reset (DispatchStats.reset) during the window
            window = now
        self.mark = now
        if not window.any():  # no traffic: nothing new to follow
            return
        self.smoothed.add(window)
        if start:
            self.job = self.runtime.background(self._make_job(self.runtime.plan, self.smoothed.value.copy(),
                                                              self.version + 1))

    def _collect(self) -> None:
        """Take a finished job's result: a candidate (`ready`), nothing, or a failure (`failed`)."""
        if self.job is None or not self.job.done():
            return
        job, self.job = self.job, None
        try:
            self.ready = job.result()
        except HetrunError as e:
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 -- a failed job must not stop serving: it is reported, not raised
            self._fail(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")

    def _fail(self, reason: str) -> None:
        if self.failed != reason:
            log.error("live rebalancing: preparing a new plan failed (%s); the current plan stays", reason)
        self.failed, self.job_failed = reason, True
        self.runtime.stats.rebalance_failures += 1

    # ---- the background job -------------------------------------------------------------------------------
    def _make_job(self, plan: Plan, load: np.ndarray, version: int):
        rt, settings = self.runtime, self.settings

        def job() -> Candidate | None:
            t0 = time.perf_counter()
            mp = decide(plan, load, settings, rt.profile, rt.placeable_mask)
            self.checks += 1
            self.last_gain = 0.0 if mp is None else mp.gain
            if mp is None:
                return None
            sessions = {}
            for m in mp.moves:
                if rt.is_local(m.device):
                    layer = rt.layers[m.layer]
                    sessions[(m.layer, m.expert, m.device)] = rt.compile(
                        m.device, layer.weights.experts[m.expert], f"L{layer.weights.layer}.E{m.expert}", measure=False)
            return Candidate(version, mp, sessions, plan_digest(mp.plan), time.perf_counter() - t0)
        return job

    # ---- the switch ------------------------------------------------------------------------------------------
    def _switch(self, cand: Candidate) -> None:
        rt = self.runtime
        ids = rt.plan.device_ids
        step = rt.steps
        rt.switch_plan(cand.plan, cand.sessions)
        self.version = cand.version
        self.failed = None
        stats = rt.stats
        stats.switches.append({"version": cand.version, "step": step, "moves": len(cand.moves.moves),
                               "bytes": cand.moves.bytes, "predicted_gain": cand.moves.gain,
                               "predicted_before_s": cand.moves.before_s, "predicted_after_s": cand.moves.after_s,
                               "prepare_s": cand.seconds})
        for m in cand.moves.moves:
            record = {**m.to_dict(ids), "step": step, "predicted_gain": cand.moves.gain, "version": cand.version}
            stats.moves.append(record)
            log.info("rebalance v%d at step %d: layer %d expert %d %s -> %s (%.1f MB, replaces expert %d), predicted "
                     "gain %.1f%%", cand.version, step, m.layer, m.expert, record["from"], record["to"],
                     m.bytes / 1e6, m.replaces, 100 * cand.moves.gain)
        log.info("rebalance v%d at step %d: %d moves, %.2f GB, predicted step time %.4g s -> %.4g s (%.1f%%), "
                 "prepared in %.2f s", cand.version, step, len(cand.moves.moves), cand.moves.bytes / 1e9,
                 cand.moves.before_s, cand.moves.after_s, 100 * cand.moves.gain, cand.seconds)
        # The trace (torchrun --trace) gets the switch with every move on it; each rank records the same switch.
        rt.trace_event(f"rebalance v{cand.version}", step=step, count=len(cand.moves.moves), bytes=cand.moves.bytes,
                       predicted_gain=cand.moves.gain, prepare_s=cand.seconds,
                       moves=[{k: r[k] for k in ("layer", "expert", "from", "to", "bytes")}
                              for r in stats.moves[len(stats.moves) - len(cand.moves.moves):]])

    # ---- torchrun: agreement through the step headers ---------------------------------------------------------
    def header_fields(self) -> tuple[int, int, int]:
        """(plan version, job state, candidate digest) this rank reports in its next step header."""
        if self.scheduled is not None:
            return self.version, self.scheduled.version, self.scheduled.digest
        self._collect()
        if self.job_failed:
            return self.version, FAILED, 0
        if self.job is not None:
            return self.version, BUSY, 0
        if self.ready is not None:
            return self.version, self.ready.version, self.ready.digest
        return self.version, IDLE, 0

    def on_table(self, layer: int, active_rows: np.ndarray, fields: np.ndarray) -> None:
        """Every rank's (version, state, digest) [W, 3] from a step header of MoE layer `layer`; `active_rows` [W]:
        the ranks with tokens. Every rank sees the same table, so every rank decides the same here. Call it after
        this rank's `new_step` of the step."""
        if not active_rows.any():
            return
        # A rank that only serves reports the version it ran before the step's first header: it switches on reading it.
        versions = fields[active_rows if layer == 0 else slice(None), 0]
        if (versions != self.version).any():
            raise HetrunError(f"ranks run plan versions {sorted(set(versions.tolist()))} at once (this rank: "
                              f"{self.version}); live rebalancing lost step: restart the ranks")
        states = np.where((fields[:, 1] > 0) & (fields[:, 1] <= self.version), IDLE, fields[:, 1])  # [W]
        self._agree(states, fields[:, 2])
        if layer == 0 and self._window_due():
            self._window_end(start=bool((states == IDLE).all()) and self.scheduled is None and self.job is None)

    def _agree(self, states: np.ndarray, digests: np.ndarray) -> None:
        if self.scheduled is not None or (states == IDLE).all():
            return
        want = self.version + 1
        if (states == want).all() and (digests == digests[0]).all():
            if self.ready is not None and self.ready.version == want:
                self.scheduled, self.ready = self.ready, None  # every rank has it: switch at the next step
            return
        if (states == BUSY).any():
            return
        if not (states == FAILED).any():
            why = "ranks computed different plans from the same load" if (states == want).all() else \
                "ranks disagree whether to move"
            log.warning("live rebalancing: candidate plan v%d dropped on every rank: %s", want, why)
        self.ready, self.job_failed = None, False
