"""Request-level simulation, as Vidur does: an arrival process replayed through a scheduler whose iteration times
come from the step model.

    from hetrun.sim.requests import simulate_requests
    r = simulate_requests("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", requests=10_000,
                          prefill_profile="deepseek-prefill-h800")
    r.summary["ttft_s"]["p99"], r.summary["slo_attainment"], r.summary["goodput_rps"]

Arrivals: Poisson, bursty (gamma-distributed gaps with a coefficient of variation above 1), or a JSONL trace with
one request per line (`arrival_s`, `prompt_tokens`, `output_tokens`, optionally `cached_tokens`; the names
vLLM's and Vidur's traces use -- `timestamp`/`arrived_at`, `input_length`/`num_prefill_tokens`,
`output_length`/`num_decode_tokens` -- are read too). Lengths not in a trace come from the workload.

Scheduler: continuous batching (Orca / vLLM / SGLang). A request is admitted when the batch has room
(`max_batch_per_device` per attention device, the workload's `max_concurrency`) and its whole KV -- prompt plus
output -- fits in what the devices' memory leaves beside weights and activations (reserved up front, as
TensorRT-LLM's GUARANTEED_NO_EVICT scheduler does; nothing is preempted). Then:
  aggregated     each iteration decodes every running request and prefills waiting prompts first come, first
                 served, in chunks within `max_num_tokens` per device (chunked prefill); a request's first token
                 comes at the end of the iteration that finishes its prompt;
  disaggregated  prefill instances (the prefill profile, as many as the decode side needs unless told) run
                 first-come-first-served chunks of `prefill_tokens_per_device` per device; the first token comes at
                 the end of the prefill step; the KV then crosses the inter-node link to the decode instance, which
                 batches continuously. The prefill side does not wait for decode memory (no back-pressure).
MTP adds the expected accepted tokens per step (fractional) to each running request.

Iteration times: the step model (hetrun.sim.engine) at grid points of (decode requests, their mean KV length,
prefill tokens), interpolated linearly between them; grid points are computed when first needed and cached.

Metrics per request: TTFT, TPOT (time per output token after the first), end-to-end latency; P50/P90/P99, SLO
attainment (share of requests within both the TTFT and the TPOT target) and goodput (requests per second, and
their output tokens per second, that met the SLO, over the span from first arrival to last completion).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetrun.errors import HetrunError, WorkloadError
from hetrun.profile import load_profile
from hetrun.sim.engine import StepModel, StepWork
from hetrun.sim.run import load_spec, resolve_workload
from hetrun.sim.settings import sim_settings
from hetrun.sim.workload import Workload

DEFAULT_LOAD = 0.8  # without a rate: this share of the modeled capacity
B_RATIO = 1.25  # grid spacing of decode requests per device
KV_RATIO = 2.0  # grid spacing of the mean KV length
C_RATIO = 2.0  # grid spacing of prefill tokens per device
TIMELINE_POINTS = 2000

_TRACE_KEYS = {
    "arrival": ("arrival_s", "arrival", "arrival_time", "timestamp", "arrived_at"),
    "prompt": ("prompt_tokens", "prompt_len", "input_length", "input_tokens", "num_prefill_tokens"),
    "output": ("output_tokens", "output_len", "output_length", "num_decode_tokens"),
    "cached": ("cached_tokens", "cache_hit_tokens"),
}


# ---- SLOs -------------------------------------------------------------------------------------------------

def parse_slo(text: str | None, workload: Workload | None = None) -> dict[str, float]:
    """{"ttft": s, "tpot": s[, "e2e": s]} from 'ttft=2s,tpot=50ms[,e2e=60s]'; missing targets come from the
    workload (ttft_s, 1 / per_user_tps)."""
    out: dict[str, float] = {}
    if workload is not None:
        out = {"ttft": float(workload.ttft_s), "tpot": 1.0 / float(workload.per_user_tps)}
    if not text:
        if not out:
            raise HetrunError("give an SLO such as ttft=2s,tpot=50ms")
        return out
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("ttft", "tpot", "e2e"):
            raise HetrunError(f"cannot read SLO part '{part}'; write ttft=2s,tpot=50ms (and optionally e2e=60s)")
        v = value.strip().lower()
        scale = 1e-3 if v.endswith("ms") else 1.0
        v = v[:-2] if v.endswith("ms") else v[:-1] if v.endswith("s") else v
        try:
            seconds = float(v) * scale
        except ValueError:
            raise HetrunError(f"cannot read SLO value '{value}' for {key}; give seconds or milliseconds, "
                              "e.g. 2s or 50ms") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise HetrunError(f"SLO {key} must be a positive time, got '{value}'")
        out[key] = seconds
    return out


# ---- arrivals ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrivals:
    """Requests in arrival order: arrival time [N] s, prompt, output and cached-prefix tokens [N]."""

    time: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    cached: np.ndarray
    source: str


def poisson_or_bursty(workload: Workload, n: int, rate: float, kind: str, burstiness: float = 3.0) -> Arrivals:
    """n requests of the workload's lengths arriving at `rate` per second: exponential gaps (poisson) or gamma
    gaps with coefficient of variation `burstiness` (bursty)."""
    if n < 1:
        raise HetrunError(f"simulate at least one request, got {n}")
    if not (math.isfinite(rate) and rate > 0):
        raise HetrunError(f"arrival rate must be a positive number of requests per second, got {rate}")
    rng = np.random.default_rng(workload.seed + 11)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "bursty":
        shape = 1.0 / burstiness ** 2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    else:
        raise HetrunError(f"unknown arrival process '{kind}'; use poisson, bursty or a .jsonl trace")
    smp = workload.replace(requests=n).sample
    return Arrivals(np.cumsum(gaps) - gaps[0], smp.prompt.copy(), smp.output.copy(), smp.cached.copy(),
                    f"{kind} at {rate:.3g} requests/s" + (f", burstiness {burstiness:g}" if kind == "bursty" else ""))


def read_trace(path: str | Path, workload: Workload | None = None, limit: int | None = None) -> Arrivals:
    """Requests from a JSONL trace: one JSON object per line with an arrival time and token counts (see the module
    docstring for the field names); a one-line WorkloadError on anything it cannot read."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"arrival trace '{p}' not found; give a .jsonl file with one request per line")
    rows = []
    try:
        with p.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise WorkloadError(f"arrival trace '{p}' line {lineno} is not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise WorkloadError(f"arrival trace '{p}' line {lineno}: expected an object with arrival_s, "
                                        "prompt_tokens and output_tokens")
                rows.append(_trace_row(obj, p, lineno))
                if limit is not None and len(rows) >= limit:
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read arrival trace '{p}': {e}") from None
    if not rows:
        raise WorkloadError(f"arrival trace '{p}' holds no requests")
    a = np.array(rows, dtype=np.float64)  # [N, 4]
    order = np.argsort(a[:, 0], kind="stable")
    a = a[order]
    cached = a[:, 3]
    if np.isnan(cached).any():  # no cache column: the workload's hit ratio
        ratio = workload.cache_hit_ratio if workload is not None else 0.0
        cached = np.where(np.isnan(cached), np.floor(a[:, 1] * ratio), cached)
    cached = np.minimum(cached, a[:, 1] - 1)
    return Arrivals(a[:, 0] - a[0, 0], a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
                    cached.astype(np.int64), f"trace {p.name} ({len(a)} requests)")


def _trace_row(obj: dict, p: Path, lineno: int) -> list[float]:
    out = []
    for what in ("arrival", "prompt", "output", "cached"):
        key = next((k for k in _TRACE_KEYS[what] if k in obj), None)
        if key is None:
            if what == "cached":
                out.append(math.nan)
                continue
            raise WorkloadError(f"arrival trace '{p}' line {lineno} has no {what} field; use one of "
                                f"{', '.join(_TRACE_KEYS[what])}")
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise WorkloadError(f"arrival trace '{p}' line {lineno}: {key} must be a number >= 0, got {v!r}")
        if what in ("prompt", "output") and v < 1:
            raise WorkloadError(f"arrival trace '{p}' line {lineno}: {key} must be at least 1 token, got {v!r}")
        out.append(float(v))
    return out


# ---- iteration times ------------------------------------------------------------------------------------

class StepTimes:
    """Iteration seconds of one deployment for (running decode requests in all, their mean KV length, prefill
    tokens in all), interpolated between step-model evaluations on a grid (computed when first needed)."""

    def __init__(self, sm: StepModel):
        self.sm = sm
        wl = sm.workload
        self.n_att = int(sm.att.sum())
        _, _, mean_kv = sm._decode_kv()
        self.counts, self.b_full, self.cap = sm._decode_counts(mean_kv)
        ps = sm._prompt_stats()
        s = sm.settings
        self.budget = float(s.max_num_tokens or s.prefill_tokens_per_device) \
            if s.serving == "aggregated" else float(s.prefill_tokens_per_device)
        self.ctx_per_new = sm._ctx_per_new(ps["new"], ps["cached"], self.budget)
        self.pairs_per_new = ps["pairs"]
        self.rel = np.where(sm.att, sm.att_share / sm.att_share.max(), 0.0)  # [D] prefill share
        grid = sorted({int(round(B_RATIO ** k)) for k in range(0, 200) if B_RATIO ** k <= self.b_full * B_RATIO})
        self.b_grid = np.array([0] + [b for b in grid if b <= self.b_full] + ([self.b_full] if grid[-1] < self.b_full
                                                                              else []), dtype=np.float64)
        self.totals = np.array([0.0] + [float(self.counts(b).sum()) for b in self.b_grid[1:]])
        self.max_running = float(self.totals[-1])
        self._cache: dict[tuple[float, float, float], float] = {}
        self.evaluations = 0
        self.mean_kv = mean_kv
        self._wl = wl

    def _eval(self, b: float, kv: float, c: float) -> float:
        key = (b, kv, c)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        sm = self.sm
        n = self.counts(b) if b > 0 else np.zeros(len(sm.att))
        pre = self.rel * (c / max(self.rel.sum(), 1e-300))  # [D] prefill tokens by attention speed
        if not (n.sum() > 0 or pre.sum() > 0):
            self._cache[key] = 0.0
            return 0.0
        q = sm.queries
        work = StepWork(n, n * kv, pre, pre * self.ctx_per_new, pre * self.pairs_per_new,
                        n * q + pre / max(float(self._wl.sample.new.mean()), 1.0), q)
        st = sm.step(work)
        seconds = st.seconds + (sm.draft_seconds(n, n * kv) if sm.mtp is not None and n.sum() > 0 else 0.0)
        self._cache[key] = seconds
        self.evaluations += 1
        return seconds

    @staticmethod
    def _bracket(x: float, lo_grid: float, ratio: float) -> tuple[float, float, float]:
        """(a, b, weight of b) of the geometric grid lo_grid * ratio^k around x (0 is a grid point)."""
        if x <= 0:
            return 0.0, 0.0, 0.0
        if x < lo_grid:
            return 0.0, lo_grid, x / lo_grid
        k = math.floor(math.log(x / lo_grid, ratio) + 1e-12)
        a = lo_grid * ratio ** k
        b = a * ratio
        return a, b, (x - a) / (b - a)

    def seconds(self, running: float, mean_kv: float, prefill: float) -> float:
        """Iteration seconds with `running` decode requests (all devices), of `mean_kv` mean KV length, and
        `prefill` prompt tokens (all devices)."""
        # decode requests -> the grid's reference count (requests on the fastest device)
        r = min(running, self.max_running)
        j = int(np.searchsorted(self.totals, r, side="left"))
        if j == 0:
            bs = [(0.0, 1.0)]
        else:
            t0, t1 = self.totals[j - 1], self.totals[min(j, len(self.totals) - 1)]
            w = 0.0 if t1 <= t0 else (r - t0) / (t1 - t0)
            bs = [(self.b_grid[j - 1], 1 - w), (self.b_grid[min(j, len(self.b_grid) - 1)], w)]
        ka, kb, kw = self._bracket(max(mean_kv, 1.0), 128.0, KV_RATIO) if running > 0 else (0.0, 0.0, 0.0)
        ca, cb, cw = self._bracket(prefill, 64.0, C_RATIO)
        out = 0.0
        for b, wb in bs:
            if wb == 0:
                continue
            for kv, wk in ((ka, 1 - kw), (kb, kw)):
                if wk == 0:
                    continue
                for c, wc in ((ca, 1 - cw), (cb, cw)):
                    if wc == 0:
                        continue
                    out += wb * wk * wc * self._eval(b, kv if b > 0 else 0.0, c)
        return out


# ---- the scheduler --------------------------------------------------------------------------------------

@dataclass
class RequestSimResult:
    """Per-request times, their summary, and the deployment's batch and queue over time."""

    model: str
    profile: str
    prefill_profile: str | None
    serving: str
    arrivals: Arrivals
    first_token: np.ndarray  # [N] s
    finish: np.ndarray  # [N] s
    slo: dict[str, float]
    timeline: dict[str, np.ndarray]  # t, running, waiting
    settings: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrivals.time

    @property
    def tpot(self) -> np.ndarray:
        out = self.arrivals.output.astype(np.float64)
        return np.where(out > 1, (self.finish - self.first_token) / np.maximum(out - 1, 1), 0.0)

    @property
    def e2e(self) -> np.ndarray:
        return self.finish - self.arrivals.time

    def per_request(self) -> list[dict]:
        a = self.arrivals
        return [{"arrival_s": float(a.time[i]), "prompt_tokens": int(a.prompt[i]), "output_tokens": int(a.output[i]),
                 "cached_tokens": int(a.cached[i]), "ttft_s": float(self.ttft[i]), "tpot_s": float(self.tpot[i]),
                 "e2e_s": float(self.e2e[i])} for i in range(len(a.time))]


def _percentiles(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def summarize(r: RequestSimResult) -> dict:
    """P50/P90/P99 of TTFT, TPOT and E2E, SLO attainment, goodput and throughput."""
    a = r.arrivals
    ttft, tpot, e2e = r.ttft, r.tpot, r.e2e
    ok = (ttft <= r.slo["ttft"] * (1 + 1e-9)) & (tpot <= r.slo["tpot"] * (1 + 1e-9))
    if "e2e" in r.slo:
        ok &= e2e <= r.slo["e2e"] * (1 + 1e-9)
    span = float(r.finish.max() - a.time.min()) or 1e-9
    out_tokens = a.output.astype(np.float64)
    return {
        "requests": int(len(a.time)), "arrivals": a.source, "serving": r.serving, "span_s": span,
        "offered_rps": float(len(a.time) / max(a.time.max() - a.time.min(), 1e-9)) if len(a.time) > 1 else None,
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot[a.output > 1] if (a.output > 1).any() else tpot),
        "e2e_s": _percentiles(e2e), "slo": dict(r.slo),
        "slo_attainment": float(ok.mean()), "ttft_attainment": float((ttft <= r.slo["ttft"] * (1 + 1e-9)).mean()),
        "tpot_attainment": float((tpot <= r.slo["tpot"] * (1 + 1e-9)).mean()),
        "goodput_rps": float(ok.sum() / span), "goodput_output_tokens_per_s": float(out_tokens[ok].sum() / span),
        "throughput_rps": float(len(a.time) / span), "output_tokens_per_s": float(out_tokens.sum() / span),
        "input_tokens_per_s": float(a.prompt.sum() / span),
        "mean_running": float(np.mean(r.timeline["running"])) if len(r.timeline["running"]) else 0.0,
        "max_waiting": int(np.max(r.timeline["waiting"])) if len(r.timeline["waiting"]) else 0,
        "settings": r.settings, "simulation_wall_s": r.wall_s,
    }


class _Timeline:
    def __init__(self):
        self.t: list[float] = []
        self.running: list[int] = []
        self.waiting: list[int] = []

    def add(self, t: float, running: int, waiting: int) -> None:
        self.t.append(t)
        self.running.append(running)
        self.waiting.append(waiting)

    def arrays(self) -> dict[str, np.ndarray]:
        t, r, w = (np.array(x, dtype=np.float64) for x in (self.t, self.running, self.waiting))
        if len(t) > TIMELINE_POINTS:
            idx = np.linspace(0, len(t) - 1, TIMELINE_POINTS).astype(np.int64)
            t, r, w = t[idx], r[idx], w[idx]
        return {"t": t, "running": r, "waiting": w}


def _batch_server(times: StepTimes, ready: np.ndarray, a: Arrivals, kv_cap: float, max_batch: float,
                  budget_per_step: float, prefill_here: bool, first_token: np.ndarray, finish: np.ndarray,
                  tl: _Timeline) -> None:
    """Continuous batching on one deployment. Requests become eligible at `ready` [N] s. With `prefill_here`
    (aggregated) their prompts are chunked into the iterations within `budget_per_step` tokens beside the decode
    batch; otherwise (a decode instance of a disaggregated deployment) they arrive prefilled, first token made."""
    sm = times.sm
    q, E = sm.queries, sm.tokens_per_step
    N = len(ready)
    order = np.argsort(ready, kind="stable")
    prompt = a.prompt.astype(np.float64)
    output = a.output.astype(np.float64)
    new = (a.prompt - a.cached).astype(np.float64)
    reserve = prompt + output  # KV reserved per request
    gen = np.zeros(N)
    waiting: list[int] = []
    w_head = 0  # next waiting request to admit (FCFS)
    nxt = 0  # next request in ready order
    prefilling: list[list] = []  # [id, new tokens left]
    running = np.zeros(0, dtype=np.int64)
    kv_used = 0.0
    t = 0.0
    done = 0
    while done < N:
        while nxt < N and ready[order[nxt]] <= t:
            waiting.append(int(order[nxt]))
            nxt += 1
        # admit first come, first served while the batch and the KV reservation allow
        in_flight = len(running) + len(prefilling)
        while w_head < len(waiting) and in_flight < max_batch:
            i = waiting[w_head]
            if kv_used + reserve[i] > kv_cap and in_flight > 0:
                break
            kv_used += reserve[i]
            w_head += 1
            in_flight += 1
            if prefill_here:
                prefilling.append([i, new[i]])
            else:
                gen[i] = 1.0
                running = np.append(running, i)
        if len(running) == 0 and not prefilling:
            if nxt >= N:
                raise HetrunError("request simulation stalled with requests left")  # a bug: nothing can run
            t = max(t, float(ready[order[nxt]]))
            continue
        # this iteration's prefill chunk, first come first served
        room = budget_per_step - len(running) * q if prefill_here else 0.0
        chunk = 0.0
        completed: list[int] = []
        if room > 0:
            for item in prefilling:
                take = min(item[1], room - chunk)
                if take <= 0:
                    break
                item[1] -= take
                chunk += take
                if item[1] <= 1e-9:
                    completed.append(item[0])
        mean_kv = float((prompt[running] + gen[running]).mean()) if len(running) else 0.0
        dt = times.seconds(len(running), mean_kv, chunk)
        if not dt > 0:
            raise HetrunError("the step model returned a zero-length iteration")  # a bug, not a user error
        t += dt
        if len(running):
            gen[running] += E
            fin = running[gen[running] >= output[running] - 1e-9]
            if len(fin):
                finish[fin] = t
                kv_used -= reserve[fin].sum()
                done += len(fin)
                running = running[gen[running] < output[running] - 1e-9]
        if completed:
            prefilling = [x for x in prefilling if x[1] > 1e-9]
            ids = np.array(completed, dtype=np.int64)
            first_token[ids] = t
            gen[ids] = 1.0
            one = ids[output[ids] <= 1]
            if len(one):
                finish[one] = t
                kv_used -= reserve[one].sum()
                done += len(one)
            running = np.concatenate([running, ids[output[ids] > 1]])
        tl.add(t, len(running), len(waiting) - w_head + len(prefilling))


def _prefill_instances(times: StepTimes, a: Arrivals, instances: int, first_token: np.ndarray) -> None:
    """First-come-first-served chunked prefill on `instances` identical prefill deployments; each request goes to
    the instance that frees up first (least work queued). Sets first_token [N]."""
    N = len(a.time)
    new = (a.prompt - a.cached).astype(np.float64)
    budget = times.budget * times.n_att  # tokens per prefill step on one instance
    # each request joins the instance with the fewest prompt tokens assigned so far; each instance then works
    # through its own first-come-first-served queue in steps of up to `budget` tokens
    queues: list[list[int]] = [[] for _ in range(instances)]
    backlog = [0.0] * instances
    for i in range(N):
        k = min(range(instances), key=lambda j: backlog[j])
        queues[k].append(i)
        backlog[k] += new[i]
    for k in range(instances):
        ids = queues[k]
        t = 0.0
        pos = 0  # next request not yet fully prefilled
        left = new[ids].copy() if ids else np.zeros(0)
        arr = a.time[ids] if ids else np.zeros(0)
        while pos < len(ids):
            t = max(t, float(arr[pos]))
            chunk, j, done_ids = 0.0, pos, []
            while j < len(ids) and arr[j] <= t and chunk < budget:
                take = min(left[j], budget - chunk)
                left[j] -= take
                chunk += take
                if left[j] <= 1e-9:
                    done_ids.append(j)
                    j += 1
                else:
                    break
            t += times.seconds(0, 0.0, chunk)
            for j2 in done_ids:
                first_token[ids[j2]] = t
            pos = done_ids[-1] + 1 if done_ids else pos


def _rate_for_capacity(sm: StepModel, pre_sm: StepModel | None, instances: int | None, load: float) -> float:
    """Requests per second at `load` x what the deployment sustains at the workload's targets (step model)."""
    smp = sm.workload.sample
    if sm.settings.serving == "aggregated":
        ph = sm.aggregated()
        return load * ph.tokens_per_s / float(smp.output.mean()) if ph.tokens_per_s > 0 else 1.0
    dec = sm.decode().tokens_per_s / float(smp.output.mean())
    if pre_sm is None:
        return load * dec
    pre = pre_sm.prefill()
    per_instance = (pre.capacity_tokens_per_s / float(smp.prompt.mean())) * 0.9
    return load * min(dec, per_instance * (instances or 1))


def simulate_requests(model, profile, workload=None, requests: int | None = None, rate: float | None = None,
                      arrival: str | None = None, burstiness: float | None = None, slo: str | dict | None = None,
                      prefill_profile=None, prefill_instances: int | None = None, serving: str | None = None,
                      expert_load=None) -> RequestSimResult:
    """Replay requests through `profile` (see the module docstring). `requests`: how many (default the workload's,
    or the whole trace); `rate` requests/s (default the workload's arrival_rate, else 80% of the modeled capacity);
    `arrival`: poisson, bursty or a .jsonl trace path (default the workload's); `slo`: 'ttft=2s,tpot=50ms' or a
    dict (default the workload's targets); `serving`: aggregated or disaggregated (default the profile's);
    disaggregated: `prefill_profile` (default the same profile) and `prefill_instances` (default: as many as the
    decode side's capacity needs)."""
    t_start = time.perf_counter()
    spec = load_spec(model)
    prof = load_profile(profile)
    wl = resolve_workload(workload, prof)
    if expert_load is not None:
        wl = wl.replace(expert_load=expert_load)
    settings = sim_settings(prof)
    if serving is not None:
        if serving not in ("aggregated", "disaggregated"):
            raise HetrunError(f"unknown serving mode '{serving}'; use aggregated or disaggregated")
        settings = settings.model_copy(update={"serving": serving})
    slo_d = dict(slo) if isinstance(slo, dict) else parse_slo(slo, wl)
    sm = StepModel(spec, prof, wl, settings)
    aggregated = settings.serving == "aggregated"
    pre_sm = None
    if not aggregated:
        pprof = load_profile(prefill_profile) if prefill_profile is not None else prof
        pre_sm = StepModel(spec, pprof, wl) if prefill_profile is not None else StepModel(spec, prof, wl, settings)
    if not aggregated:
        if prefill_instances is None:
            dec_rps = sm.decode().tokens_per_s / float(wl.sample.output.mean())
            pre_rps = pre_sm.prefill().capacity_tokens_per_s / float(wl.sample.prompt.mean())
            prefill_instances = max(1, math.ceil(dec_rps / max(pre_rps, 1e-9)))
        if isinstance(prefill_instances, bool) or int(prefill_instances) != prefill_instances or prefill_instances < 1:
            raise HetrunError(f"prefill instances must be a whole number >= 1, got {prefill_instances}")
    kind = arrival or wl.arrival
    if str(kind).endswith(".jsonl"):
        arr = read_trace(kind, wl, requests)
    else:
        n = int(requests if requests is not None else wl.requests)
        r = rate if rate is not None else wl.arrival_rate
        if r is None:
            r = _rate_for_capacity(sm, pre_sm, prefill_instances, DEFAULT_LOAD)
        arr = poisson_or_bursty(wl, n, float(r), str(kind), burstiness if burstiness is not None else wl.burstiness)
    N = len(arr.time)
    first_token = np.full(N, np.nan)
    finish = np.full(N, np.nan)
    tl = _Timeline()
    times = StepTimes(sm)
    kv_cap = float(sm.kv_capacity_tokens(times.budget if aggregated else sm.queries * times.cap.max()).sum())
    max_batch = min(times.max_running, float(wl.max_concurrency or math.inf))
    info = {"kv_capacity_tokens": kv_cap, "max_batch": max_batch, "tokens_per_step": sm.tokens_per_step}
    if aggregated:
        budget = times.budget * times.n_att
        _batch_server(times, arr.time, arr, kv_cap, max_batch, budget, True, first_token, finish, tl)
        info["max_num_tokens_per_step"] = budget
    else:
        pre_times = StepTimes(pre_sm)
        _prefill_instances(pre_times, arr, int(prefill_instances), first_token)
        link = sm.links.inter or min(sm.links.intra, key=lambda x: x.bandwidth_gbs)
        transfer = arr.prompt * sm.kv_per_token / (link.bandwidth_gbs * 1e9 * link.efficiency)  # [N] KV to decode
        ready = first_token + transfer
        _batch_server(times, ready, arr, kv_cap, max_batch, 0.0, False, first_token.copy(), finish, tl)
        info.update({"prefill_instances": int(prefill_instances), "prefill_step_evaluations": pre_times.evaluations,
                     "kv_transfer_mean_s": float(transfer.mean())})
    info["step_evaluations"] = times.evaluations
    res = RequestSimResult(spec.name, prof.name, None if aggregated else (pre_sm.profile.name), settings.serving, arr,
                           first_token, finish, slo_d, tl.arrays(), info)
    res.wall_s = time.perf_counter() - t_start
    res.summary = summarize(res)
    return res


