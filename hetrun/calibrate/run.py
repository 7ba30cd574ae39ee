"""Calibrate this machine: measure the real CPU backends and write a host device profile with fitted efficiencies.

What is measured (and nothing else is assumed):
  * expert calls on onnxruntime and OpenVINO per precision, for a ladder of expert shapes (launch-bound to
    compute-bound) and row counts 1 to 2048, timed inside the real dispatcher: a calibration MoE layer of each
    shape (8 experts, top-2) runs several batches in turn and logs every call's rows and wall time. A call is
    thus timed where it runs in a deployment: between the router's and the combine's torch work, with the
    layer's weights rotating through the cache, and with row counts that change from call to call;
  * memory copy bandwidth (numpy, 256 MB);
  * the dispatcher's own time (routing, permute, combine, copies) on four calibration MoE layers, none shaped
    like the validation layers, fitted as fixed + per call + per MB routed + per MB through shared experts +
    per router score.
An expert call's time is the mean of many calls inside a layer (a layer's time is the sum of its
calls), every other timing the median of many. The whole ladder is swept four times (points with long layer
calls twice), minutes apart, with every layer built anew; per point the fastest sweep counts (a slow spell of a
shared two-core machine, seconds to minutes long, then spoils one sweep's points, not the result).
Per (backend, precision) the roofline t = launch + max(FLOPs / (peak x ce), bytes / (bandwidth x me)) is
fitted in log space; `peak` is the best FLOP rate measured for that pair, `bandwidth` the copy bandwidth.
The result is a deployment profile with one device type per (backend, precision) (`host-<backend>-<precision>`)
and the measured calls and the dispatcher model under `extra.calibration`.

`predict_moe_layer_seconds` then predicts a real MoE layer from a profile written here: the dispatcher's time
plus, per expert that receives tokens, one call of its shape and row count, interpolated from the measured
calls (log-log, between the two measured shapes around it), or the fitted roofline outside the measured shapes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import itertools
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrun.errors import HetrunError, ProfileError
from hetrun.roofline import swiglu_flops_bytes

log = logging.getLogger("hetrun")

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_TOKENS = (1, 16, 256)
PRECISIONS = ("fp32", "bf16", "int8", "int4")
# (hidden, intermediate), launch-bound to compute-bound: a geometric ladder of expert sizes (about 4x in
# hidden x intermediate per step), so that any expert in the range lies between two measured neighbours
SHAPES = ((32, 64), (64, 128), (128, 384), (256, 512), (512, 1024), (1536, 2048))
BACKENDS = ("onnxruntime", "openvino")
WARM_MEMORY_MAX = 10.0  # weights in cache read at most this many times faster than the DRAM copy bandwidth


@dataclass(frozen=True)
class Sample:
    backend: str
    precision: str
    hidden: int
    intermediate: int
    tokens: int
    seconds: float
    weight_bytes: float

    @property
    def flops(self) -> float:
        return 6.0 * self.tokens * self.hidden * self.intermediate


def typical_time(fn, reps: int, budget_s: float, max_reps: int = 400, statistic=np.median,
                 self_timed: bool = False) -> float:
    """Median seconds of timed calls after one warm-up: at least `reps` calls, more (up to `max_reps`) while
    `budget_s` lasts. Calibration and validation both use it: a median of many calls is stable from run to run
    on a machine with two cores, where the shortest call of a few is not (thread wake-ups vary).
    `self_timed`: `fn` returns the seconds to count (part of its own wall time)."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t = time.perf_counter()
        own = fn()
        times.append(own if self_timed else time.perf_counter() - t)
        if len(times) >= reps and time.perf_counter() - start > budget_s:
            break
    return float(statistic(times))


CALL_EXPERTS, CALL_TOP_K = 8, 2  # calibration layers: 8 experts, top-2, so a call gets about tokens / 4 rows
MAX_LAYER_FLOPS = 80e9  # largest calibration layer call; bigger token counts are extrapolated linearly
BATCHES = 4  # different inputs per token count, timed in turn (calibration and validation alike)
SWEEPS = 4  # sweeps over everything timed, minutes apart, runtimes built anew; per point the fastest counts
LONG_LAYER_S = 0.15  # layer calls this long average over the machine's swings: their points are swept twice
DISPATCH_ROUNDS = 2  # the dispatcher's own time: token counts in turn, this many times


def sweeps_for(layer_seconds: float, sweeps: int = SWEEPS) -> int:
    """How many sweeps a point gets: all for short layer calls, whose time swings 20-50% with the memory
    traffic of a shared host over seconds, two for long ones (`LONG_LAYER_S`), which average over that."""
    return min(sweeps, 2) if layer_seconds >= LONG_LAYER_S else sweeps


def measure_experts(backends=BACKENDS, precisions=PRECISIONS, tokens=TOKENS, shapes=SHAPES, rounds: int = SWEEPS,
                    threads: int | None = None, progress=None) -> list[Sample]:
    """Mean seconds of one expert call per (backend, precision, shape, rows per call), timed inside the real
    dispatcher: a calibration MoE layer of that expert shape (8 experts, top-2) runs batches of about 4x the
    rows, and every call's rows and wall time are logged. Calls are timed where they run in a deployment:
    between the router's and combine's torch work, with the layer's weights rotating through the cache.

    The whole ladder is swept up to `rounds` times, minutes apart, with the layers built anew each sweep (points
    with long layer calls only twice: `sweeps_for`); per point the fastest sweep counts. A shared machine's slow
    spells last seconds to minutes, so one spoils a sweep's points, not the result. `progress(sweep, sample)`
    hears every measurement."""
    from hetrun.backends.registry import probe_backend
    from hetrun.formats import FORMATS

    pairs = []
    for b in backends:
        if not probe_backend(b).ok:
            log.warning("calibrate: backend %s is not available here (%s); skipped", b, probe_backend(b).reason)
            continue
        for p in precisions:
            if p not in FORMATS:
                log.warning("calibrate: no expert graph for %s here; skipped", p)
                continue
            pairs += [(b, p, d, i) for d, i in shapes]
    with torch_threads(threads):
        best = fastest_of_sweeps(
            pairs, lambda u: [n for n in tokens if 6.0 * n * CALL_EXPERTS * u[2] * u[3] <= MAX_LAYER_FLOPS],
            lambda u, todo: _measure_shape(*u, todo, threads), lambda s: s.seconds,
            lambda s: s.seconds * CALL_EXPERTS, rounds, progress)
    return list(best.values())


def fastest_of_sweeps(units, counts, measure, seconds, layer_seconds, sweeps: int = SWEEPS, progress=None) -> dict:
    """{(unit, count): fastest result} over up to `sweeps` sweeps through all `units` in turn, minutes apart.

    `counts(unit)` lists a unit's counts; `measure(unit, todo)` builds the unit anew, measures those counts and
    returns {count: result}; `seconds(result)` ranks results; `layer_seconds(result)` tells `sweeps_for` how many
    sweeps the point gets. Calibration and the accuracy bench both measure this way."""
    best: dict[tuple, object] = {}
    for sweep in range(sweeps):
        for u in units:
            todo = [n for n in counts(u)
                    if (u, n) not in best or sweep < sweeps_for(layer_seconds(best[(u, n)]), sweeps)]
            if not todo:
                continue
            for n, r in measure(u, todo).items():
                if (u, n) not in best or seconds(r) < seconds(best[(u, n)]):
                    best[(u, n)] = r
                if progress:
                    progress(sweep, r)
            gc.collect()  # the unit's sessions and threads go before the next are timed
    return best


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch runs the dispatcher's routing and combine: give it `threads` (when set) inside, as before outside."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_shape(backend: str, precision: str, d: int, i: int, counts, threads) -> dict[int, Sample]:
    """One calibration layer of this expert shape, built anew: per token count, its mean expert call."""
    import torch

    from hetrun.placement.planner import simple_plan
    from hetrun.profile import load_profile
    from hetrun.runtime.dispatch import ExpertRuntime
    from hetrun.runtime.weights import random_layer_weights
    from hetrun.spec import MoESpec, RouterSpec

    spec = MoESpec(f"calibrate-{d}x{i}", "mixtral", 1, d, i, CALL_EXPERTS, RouterSpec("softmax_topk", CALL_TOP_K, True))
    prof = load_profile({"name": "calibration", "devices": [{"id": "host", "type": "host-cpu", "backend": backend,
                                                                "precision": precision}]})
    weights = random_layer_weights(spec, 0, seed=d * 7 + i)
    rt = ExpertRuntime(simple_plan(spec, prof, precision), prof, [weights], threads=threads)
    wb = graph_weight_bytes(weights.experts[0], precision, backend)
    layer = rt.layers[0]
    out = {}
    with torch.no_grad():
        for n in counts:
            # several batches per count, timed in turn: each call meets other experts with other row counts, as
            # in a deployment (a runtime that sees one row count over and over caches its shape-dependent work);
            # the same batches in every sweep
            g = torch.Generator().manual_seed(d + i + n)
            xs = [torch.randn(n * CALL_EXPERTS // CALL_TOP_K, d, generator=g) for _ in range(BATCHES)]
            rows, sec = _call_time(rt, layer, xs, n)
            out[n] = Sample(backend, precision, d, i, int(round(rows)), sec, wb)
    return out


def in_turn(fn, inputs):
    """A call that runs `fn` on the next of `inputs` each time, round and round."""
    it = itertools.cycle(inputs)
    return lambda: fn(next(it))


def _call_time(rt, layer, xs, n: int) -> tuple[float, float]:
    """(rows, seconds): the mean expert call with about `n` rows while the layer runs the batches `xs` in turn.

    The mean, not the median: a layer's time is the sum of its calls, and call times are skewed to the slow side,
    so the medians of a layer's calls summed fell 5-15% short of its median time here; their means matched it
    within 2%."""
    call = in_turn(layer, xs)
    warm = time.perf_counter()  # a runtime's first calls at new row counts set up those shapes
    for k in range(40):
        call()
        if k >= len(xs) - 1 and time.perf_counter() - warm > 0.02:
            break
    rt.stats.call_log = []
    typical_time(call, len(xs), budget_s=0.06, max_reps=100)  # each layer call logs its expert calls
    rows, secs = np.array(rt.stats.call_log).T  # [calls], [calls]
    rt.stats.call_log = None
    near = np.abs(rows - n) <= n // 4  # calls whose row count is close to n
    rows, secs = (rows[near], secs[near]) if near.any() else (rows, secs)
    return float(np.median(rows)), float(np.mean(secs))


def graph_weight_bytes(w, precision: str, backend: str) -> float:
    """Stored weight bytes of one expert's graph at `precision` as `backend` loads it (scales included)."""
    from hetrun.runtime.graphs import build_expert_graph

    return float(build_expert_graph(w, precision, target="openvino" if backend == "openvino" else backend).weight_bytes)


def cache_bytes() -> float:
    """Size of the CPU's last-level cache in bytes (32 MB when the system does not say)."""
    for key in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(key)
            if v and v > 0:
                return float(v)
        except (ValueError, OSError, AttributeError):
            pass
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return float(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}.get(text[-1], 1)
    except (OSError, ValueError):
        return 32.0 * 2 ** 20


def measure_copy_bandwidth(nbytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """GB/s of a large memory copy (bytes read plus bytes written, per second)."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    sec = typical_time(lambda: np.copyto(b, a), reps, budget_s=5.0, max_reps=reps, statistic=np.min)
    return 2.0 * a.nbytes / sec / 1e9


def _dispatch_layers():
    """Calibration MoE layers, shaped unlike the validation layers (tiny, mixtral-bench): router kinds, expert
    counts, top-k and shared experts vary so that each term of the dispatcher model can be told apart."""
    from hetrun.spec import MoESpec, RouterSpec

    soft = MoESpec("dispatch-softmax", "mixtral", 1, 256, 640, 6, RouterSpec("softmax_topk", 2, True))
    wide = MoESpec("dispatch-softmax-wide", "qwen2_moe", 1, 48, 32, 40, RouterSpec("softmax_topk", 6, True))
    shared = MoESpec("dispatch-softmax-shared", "qwen2_moe", 1, 128, 32, 8, RouterSpec("softmax_topk", 1, True),
                     num_shared_experts=3, shared_intermediate_size=32)
    grouped = MoESpec("dispatch-grouped", "deepseek_v3", 2, 96, 64, 16, RouterSpec("sigmoid_grouped", 4, True, 4, 2, 2.0),
                      num_shared_experts=1, shared_intermediate_size=64, first_dense_layers=1, dense_intermediate_size=96)
    return soft, wide, shared, grouped


def measure_dispatch(backend: str = "onnxruntime", tokens=(1, 16, 256, 1024), reps: int = 5,
                     threads: int | None = None) -> list[dict]:
    """The real dispatcher's own time (routing, permute, per-call loop, combine; expert graphs excluded) on the
    calibration layers: one row of `dispatch_features` plus the median seconds per (layer, token count)."""
    import torch

    from hetrun.profile import load_profile

    prof = load_profile({"name": "host-dispatch", "devices": [{"id": "host", "type": "host-cpu", "backend": backend,
                                                                  "precision": "fp32"}]})
    out = []
    with torch_threads(threads):
        _dispatch_cases(out, torch.Generator().manual_seed(0), prof, threads, tokens, reps)
    return out


def _dispatch_cases(out, g, prof, threads, tokens, reps) -> None:
    import torch

    from hetrun.placement.planner import simple_plan
    from hetrun.runtime.dispatch import ExpertRuntime
    from hetrun.runtime.weights import random_layer_weights

    for spec in _dispatch_layers():
        rt = ExpertRuntime(simple_plan(spec, prof, "fp32"), prof,
                           [random_layer_weights(spec, spec.first_dense_layers)], threads=threads)
        layer = rt.layers[0]
        with torch.no_grad():
            xs = {n: torch.randn(n, spec.hidden_size, generator=g) for n in tokens}
            for x in xs.values():
                for _ in range(5):  # first calls pay for lazy initialization in torch and the runtimes
                    layer(x)
            best: dict[int, float] = {}
            for _ in range(DISPATCH_ROUNDS):  # the counts in turn; the fastest round's median counts
                for n, x in xs.items():
                    def own_time(x=x):  # the layer's wall time less its expert calls
                        rt.stats.reset()
                        layer(x)
                        return rt.stats.layer_s - rt.stats.expert_s

                    sec = typical_time(own_time, max(reps, 5), budget_s=0.15, max_reps=200, self_timed=True)
                    best[n] = min(best.get(n, math.inf), sec)
            for n, x in xs.items():
                rt.stats.reset()
                layer(x)
                calls = int((rt.stats.tokens_per_expert[0] > 0).sum()) + spec.num_shared_experts
                out.append(dict(dispatch_features(spec.router.kind, n, calls, spec.top_k, spec.hidden_size,
                                                  spec.num_experts, spec.num_shared_experts), seconds=best[n]))


def dispatch_features(router: str, tokens: int, calls: int, top_k: int, hidden: int, experts: int,
                      shared: int) -> dict:
    """What the dispatcher's time depends on: expert calls, bytes it permutes and combines for routed and for
    shared experts, and router work (tokens x experts)."""
    return {"router": router, "tokens": tokens, "calls": calls, "bytes": dispatch_bytes(tokens, top_k, hidden),
            "shared_bytes": 2.0 * tokens * hidden * 4.0 * shared, "router_work": float(tokens * experts)}


def dispatch_bytes(tokens: int, top_k: int, hidden: int) -> float:
    """Bytes the dispatcher moves for one call: permuted rows in, expert rows out, weighted combine (FP32)."""
    return 3.0 * tokens * top_k * hidden * 4.0


# ---- fitting --------------------------------------------------------------------------------------

def fit_roofline(flops, bytes_, seconds, peak_flops: float, bandwidth: float,
                 max_memory_efficiency: float = 1.0, launch_us: float | None = None) -> tuple[float, float, float, float]:
    """(compute_efficiency, memory_efficiency, launch_us, rms log error) of t = launch + max(F/(P ce), B/(BW me)).

    The launch overhead cannot exceed the shortest time measured; give `launch_us` to hold it fixed.
    `max_memory_efficiency` above 1 lets weights that stay in cache read faster than the DRAM `bandwidth`."""
    from scipy.optimize import least_squares

    f, b, t = (np.asarray(v, dtype=np.float64) for v in (flops, bytes_, seconds))
    if len(t) < 3 or (t <= 0).any() or not np.isfinite(t).all():
        raise HetrunError("need at least 3 positive timings to fit a roofline")

    def model(x):
        ce, me, lat = x
        return lat * 1e-6 + np.maximum(f / (peak_flops * ce), b / (bandwidth * me))

    best = None
    tmin = float(t.min() * 1e6)
    mes = (0.3, 0.6, 0.9) + ((2.0, 5.0) if max_memory_efficiency > 1 else ())
    starts = [(ce, me, lat) for ce in (0.3, 0.6, 0.9) for me in mes for lat in (0.0, tmin / 4, tmin * 0.8)]
    for x0 in starts:
        if launch_us is None:
            r = least_squares(lambda x: np.log(model(x) / t), x0,
                              bounds=([1e-4, 1e-4, 0.0], [1.0, max_memory_efficiency, tmin]))
        else:
            r = least_squares(lambda x: np.log(model((x[0], x[1], launch_us)) / t), x0[:2],
                              bounds=([1e-4, 1e-4], [1.0, max_memory_efficiency]))
            r.x = np.array([r.x[0], r.x[1], launch_us])
        if best is None or r.cost < best.cost:
            best = r
    ce, me, lat = best.x
    return float(ce), float(me), float(lat), float(np.sqrt(np.mean(best.fun ** 2)))


DISPATCH_TERMS = (("calls", "per_call_us", 1.0), ("bytes", "us_per_mb", 1e-6), ("shared_bytes", "us_per_shared_mb", 1e-6),
                  ("router_work", "us_per_k_router", 1e-3))


def fit_dispatch(rows: list[dict]) -> dict:
    """Dispatcher time = fixed[router kind] + per_call x expert calls + per MB routed + per MB through shared
    experts + per 1000 token x expert router scores: non-negative least squares on relative error."""
    from scipy.optimize import nnls

    kinds = sorted({r["router"] for r in rows})
    A = np.array([[1.0 if r["router"] == k else 0.0 for k in kinds] + [r.get(f, 0.0) * u for f, _, u in DISPATCH_TERMS]
                  for r in rows])
    t = np.array([r["seconds"] for r in rows]) * 1e6  # microseconds
    x, _ = nnls(A / t[:, None], np.ones(len(t)))
    out = {"fixed_us": {k: float(v) for k, v in zip(kinds, x[:len(kinds)])}}
    out.update({name: float(v) for (_, name, _), v in zip(DISPATCH_TERMS, x[len(kinds):])})
    return out


def dispatch_seconds(fit: dict, features: dict) -> float:
    """Seconds of the dispatcher's own work for one layer call, from a `fit_dispatch` result."""
    fixed = fit["fixed_us"].get(features["router"]) if isinstance(fit["fixed_us"], dict) else fit["fixed_us"]
    if fixed is None:
        raise ProfileError(f"the calibration has no dispatcher fit for {features['router']} routers; recalibrate")
    return (fixed + sum(fit.get(name, 0.0) * features.get(f, 0.0) * u for f, name, u in DISPATCH_TERMS)) * 1e-6


def type_name(backend: str, precision: str) -> str:
    return f"host-{backend}-{precision}"


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def _act_bytes(s: Sample) -> float:
    return s.weight_bytes + 4.0 * s.tokens * (2 * s.hidden + 3 * s.intermediate)


def host_expert_seconds(flops, bytes_, peak_flops: float, bandwidth: float, ce: float, me: float, launch_us: float,
                        overlap: float):
    """Seconds of one expert call on a CPU runtime: launch + the longer of compute and memory time + the part of
    the shorter one that does not overlap with it (a CPU GEMM streams weights and computes only partly at once)."""
    c = np.asarray(flops, dtype=np.float64) / (peak_flops * ce)
    m = np.asarray(bytes_, dtype=np.float64) / (bandwidth * me)
    return launch_us * 1e-6 + np.maximum(c, m) + (1.0 - overlap) * np.minimum(c, m)


def fit_pair(samples: list[Sample], copy_gbs: float) -> list[dict]:
    """Fits of one (backend, precision) on its calibration shapes, jointly: one launch overhead and one
    compute/memory overlap for the runtime, a compute and a memory efficiency per shape (GEMM efficiency and
    the cache level the weights live in depend on the shape). Least squares on log time."""
    from scipy.optimize import least_squares

    rate = max(x.flops / x.seconds for x in samples)
    bw = copy_gbs * 1e9
    shapes = sorted({(x.hidden, x.intermediate) for x in samples}, key=lambda s_: s_[0] * s_[1])
    k = np.array([shapes.index((x.hidden, x.intermediate)) for x in samples])
    f = np.array([x.flops for x in samples])
    b = np.array([_act_bytes(x) for x in samples])
    t = np.array([x.seconds for x in samples])
    tmin = float(t.min() * 1e6)
    n = len(shapes)

    def model(v):
        lat, ov = v[0], v[1]
        ce, me = v[2:2 + n][k], v[2 + n:2 + 2 * n][k]
        return host_expert_seconds(f, b, rate, bw, ce, me, lat, ov)

    lo = [0.0, 0.0] + [1e-3] * n + [1e-3] * n
    hi = [tmin, 1.0] + [1.0] * n + [WARM_MEMORY_MAX] * n
    best = None
    for lat0 in (0.0, tmin * 0.3, tmin * 0.8):
        for ov0 in (0.0, 0.5, 1.0):
            for me0 in (0.3, 1.0, 3.0):
                x0 = [lat0, ov0] + [0.7] * n + [me0] * n
                r = least_squares(lambda v: np.log(model(v) / t), x0, bounds=(lo, hi))
                if best is None or r.cost < best.cost:
                    best = r
    v = best.x
    out = []
    for j, (d, i) in enumerate(shapes):
        res = best.fun[k == j]
        fit = {"hidden": d, "intermediate": i, "peak_gflops": rate / 1e9, "compute_efficiency": float(v[2 + j]),
               "memory_efficiency": float(v[2 + n + j]), "launch_us": float(v[0]), "overlap": float(v[1]),
               "rms_log_error": float(np.sqrt(np.mean(res ** 2))) if len(res) else 0.0, "samples": int((k == j).sum())}
        out.append(fit)
    return out


def build_host_profile(samples: list[Sample], copy_gbs: float, dispatch: dict, note: str = "") -> dict:
    """A deployment profile (plain dict) with one fitted device type per measured (backend, precision).

    The device type holds the fit of the largest calibration shape, whose layer streams its weights from DRAM (what a
    big model sees); `extra.calibration.fits` holds every shape's fit, for `predict_moe_layer_seconds`'s fallback.
    """
    if not samples:
        raise HetrunError("no expert timings to fit; is any CPU backend available? (hetrun devices)")
    if not (copy_gbs > 0 and math.isfinite(copy_gbs)):
        raise HetrunError(f"measured copy bandwidth {copy_gbs} GB/s is not usable")
    types, fits = {}, []
    for b in sorted({s.backend for s in samples}):
        for p in sorted({s.precision for s in samples if s.backend == b}):
            ss = [s for s in samples if s.backend == b and s.precision == p]
            shape_fits = fit_pair(ss, copy_gbs)
            big = shape_fits[-1]
            name = type_name(b, p)
            types[name] = {
                "name": name, "vendor": "intel", "kind": "cpu",
                "description": f"this machine's CPU through {b} at {p}, fitted by hetrun calibrate",
                "tflops": {p: big["peak_gflops"] / 1e3}, "precisions": [p], "memory_gb": round(_memory_gb(), 1),
                "memory_bw_gbs": round(copy_gbs, 3),
                "scale_up": {"name": "shared memory", "bandwidth_gbs": round(copy_gbs / 2, 3), "latency_us": 1.0},
                "tdp_w": 65.0, "idle_w": 10.0, "price_per_hour": 0.1, "real_backends": [b],
                "sources": [f"hetrun calibrate {_dt.date.today().isoformat()}: peak = best measured FLOP rate, "
                            "memory_bw = numpy copy bandwidth; efficiencies and launch fitted to "
                            f"{len(ss)} expert calls timed in calibration MoE layers (largest shape)",
                            "tdp_w, idle_w and price_per_hour are editable assumptions"],
                "compute_efficiency": round(big["compute_efficiency"], 4),
                "memory_efficiency": round(min(1.0, big["memory_efficiency"]), 4),
                "launch_overhead_us": round(big["launch_us"], 2)}
            fits += [dict(f, backend=b, precision=p) for f in shape_fits]
    devices = []
    for b in sorted({s.backend for s in samples}):
        ps = sorted({s.precision for s in samples if s.backend == b})
        best = "bf16" if "bf16" in ps else ps[0]
        devices.append({"id": "ort" if b == "onnxruntime" else "ov" if b == "openvino" else b,
                        "type": type_name(b, best), "count": 1, "node": 0, "backend": b, "precision": best})
    return {
        "name": "host",
        "description": f"This machine ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) as "
                       f"measured by hetrun calibrate on {_dt.datetime.now().isoformat(timespec='seconds')}. "
                       + note,
        "devices": devices,
        "device_types": types,
        "dense_device": devices[0]["id"],
        "links": {"intra_node": {"name": "shared memory", "bandwidth_gbs": round(copy_gbs / 2, 3), "latency_us": 1.0,
                                 "efficiency": 1.0}},
        "extra": {"calibration": {
            "copy_bandwidth_gbs": copy_gbs, "cache_bytes": cache_bytes(), "dispatch": dispatch, "fits": fits,
            "samples": [s.__dict__ for s in samples],
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()}}},
    }


def write_profile(path: str | Path, profile: dict) -> Path:
    """Validate the profile, then write it as YAML atomically."""
    import yaml

    from hetrun.files import write_atomic
    from hetrun.profile import load_profile

    load_profile(profile)  # refuse to write something hetrun cannot read back
    path = Path(path)
    write_atomic(path, yaml.safe_dump(profile, sort_keys=False, width=120))
    return path


def calibrate(out: str | Path, quick: bool = False, backends=BACKENDS, precisions=PRECISIONS,
              threads: int | None = None, progress=None, tokens=None, shapes=None) -> tuple[Path, dict]:
    """Measure, fit, write the host profile to `out`; returns (path, profile dict)."""
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    shapes = shapes or (SHAPES if not quick else SHAPES[1:3])
    samples = measure_experts(backends, precisions, tokens, shapes, rounds=1 if quick else SWEEPS, threads=threads,
                              progress=progress)
    copy = measure_copy_bandwidth(64 * 2 ** 20 if quick else 256 * 2 ** 20)
    disp_rows = measure_dispatch(backends[0] if backends else "onnxruntime",
                                 tokens=(1, 64, 512) if quick else (1, 4, 16, 64, 256, 1024, 2048), reps=3 if quick else 15,
                                 threads=threads)
    dispatch = fit_dispatch(disp_rows)
    dispatch["samples"] = disp_rows
    note = "Quick calibration (fewer token counts and repetitions)." if quick else ""
    prof = build_host_profile(samples, copy, dispatch, note)
    return write_profile(out, prof), prof


# ---- prediction -----------------------------------------------------------------------------------

def _params_for(cal: dict, backend: str, precision: str, hidden: int, intermediate: int) -> dict:
    """Roofline parameters for one expert shape: the calibration shapes' fits interpolated in log(hidden x
    intermediate) (clamped to the measured range)."""
    fs = sorted((f for f in cal["fits"] if f["backend"] == backend and f["precision"] == precision),
                key=lambda f: f["hidden"] * f["intermediate"])
    if not fs:
        raise ProfileError(f"the calibration has no fit for {backend} at {precision}; calibrate that pair")
    x = math.log(hidden * intermediate)
    xs = [math.log(f["hidden"] * f["intermediate"]) for f in fs]
    j = int(np.searchsorted(xs, x))
    lo, hi = fs[max(0, min(j - 1, len(fs) - 1))], fs[min(j, len(fs) - 1)]
    a = 0.0 if hi is lo else min(1.0, max(0.0, (x - xs[fs.index(lo)]) / (xs[fs.index(hi)] - xs[fs.index(lo)])))
    mix = lambda k: math.exp((1 - a) * math.log(max(lo[k], 1e-9)) + a * math.log(max(hi[k], 1e-9)))  # noqa: E731
    return {"compute_efficiency": mix("compute_efficiency"), "memory_efficiency": mix("memory_efficiency"),
            "launch_us": mix("launch_us"),
            "peak_flops": fs[-1]["peak_gflops"] * 1e9, "overlap": mix("overlap") if "overlap" in lo else 1.0}


def _log_interp(x: float, xs, ys) -> float:
    """Piecewise-linear interpolation of log y in log x through the points (xs ascending); linear in x
    beyond the last point (time grows in proportion to work there), the first value below the first."""
    lx, ly = np.log(np.asarray(xs, dtype=np.float64)), np.log(np.asarray(ys, dtype=np.float64))
    if x >= xs[-1] and len(xs) > 1:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + max(slope, 0.0) * (x - xs[-1]))
    return float(np.exp(np.interp(math.log(x), lx, ly)))


def measured_call_seconds(cal: dict, backend: str, precision: str, hidden: int, intermediate: int,
                          tokens: int) -> float | None:
    """Seconds of one expert call interpolated from the calibration's own timings: in log token count along
    each measured shape, then in log(hidden x intermediate) between the two shapes around this one. None when
    the shape is outside the measured range (the fitted roofline answers then)."""
    from scipy.optimize import isotonic_regression

    rows = [s for s in cal.get("samples", ()) if s["backend"] == backend and s["precision"] == precision
            and not s.get("cold")]  # earlier calibrations also timed calls after flushing the cache
    areas = sorted({s["hidden"] * s["intermediate"] for s in rows})
    a = hidden * intermediate
    if len(areas) < 2 or not areas[0] <= a <= areas[-1]:
        return None
    j = min(int(np.searchsorted(areas, a)), len(areas) - 1)
    lo, hi = areas[max(j - 1, 0)], areas[j]

    def along_tokens(area: int) -> float:
        pts = sorted((s["tokens"], s["seconds"]) for s in rows if s["hidden"] * s["intermediate"] == area)
        ns = [p[0] for p in pts]
        ts = np.exp(isotonic_regression(np.log([p[1] for p in pts])).x)  # more rows never take less time
        return _log_interp(tokens, ns, ts.tolist())

    return _log_interp(a, [lo, hi], [along_tokens(lo), along_tokens(hi)]) if hi != lo else along_tokens(lo)


def predict_moe_layer_seconds(profile, backend: str, precision: str, hidden: int, intermediate: int,
                              tokens_per_expert, top_k: int, shared: int = 0, shared_intermediate: int = 0,
                              weight_bytes: float | None = None, shared_weight_bytes: float | None = None,
                              router: str = "softmax_topk", num_experts: int | None = None) -> float:
    """Predicted seconds of one real MoE layer call on this host: the dispatcher's time plus, for each expert
    that receives tokens (and each shared expert), the time of one call of that shape and token count: the
    calibration's measured calls interpolated where the shape lies among the measured ones, else the fitted
    roofline of the (backend, precision) type."""
    from hetrun.formats import expert_bytes
    from hetrun.profile import load_profile

    prof = load_profile(profile)
    cal = prof.model.extra.get("calibration")
    if not cal or "dispatch" not in cal or "fits" not in cal:
        raise ProfileError(f"profile '{prof.name}' has no calibration; write one with `hetrun calibrate`")
    name = type_name(backend, precision)
    dt = prof.model.device_types.get(name)
    if dt is None:
        raise ProfileError(f"profile '{prof.name}' has no calibrated type {name}; calibrate {backend} at {precision}")
    counts = np.asarray(tokens_per_expert, dtype=np.int64)
    wb = weight_bytes if weight_bytes is not None else expert_bytes(precision, hidden, intermediate)
    swb = shared_weight_bytes if shared_weight_bytes is not None else expert_bytes(precision, hidden,
                                                                                   shared_intermediate or 1)
    total_tokens = int(counts.sum()) // max(top_k, 1)

    def call_seconds(n: int, d: int, i: int, w: float) -> float:
        measured = measured_call_seconds(cal, backend, precision, d, i, n)
        if measured is not None:
            return measured
        q = _params_for(cal, backend, precision, d, i)
        f, b = swiglu_flops_bytes(n, d, i, w, 4.0)  # the graphs take and return FP32 activations
        return float(host_expert_seconds(f, b, q["peak_flops"], cal["copy_bandwidth_gbs"] * 1e9,
                                         q["compute_efficiency"], q["memory_efficiency"], q["launch_us"],
                                         q["overlap"]))

    t = sum(call_seconds(int(n), hidden, intermediate, wb) for n in counts if n > 0)
    if shared:
        t += shared * call_seconds(total_tokens, hidden, shared_intermediate, swb)
    calls = int((counts > 0).sum()) + shared
    feats = dispatch_features(router, total_tokens, calls, top_k, hidden, num_experts or len(counts), shared)
    return float(t + dispatch_seconds(cal["dispatch"], feats))
