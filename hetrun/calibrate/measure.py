"""Time this machine: expert calls inside the real dispatcher, the dispatcher's own work, memory copies.

What is measured (and nothing else is assumed):
  * expert calls on onnxruntime and OpenVINO per precision, for a ladder of expert shapes (launch-bound to
    compute-bound) and row counts 1 to 2048, timed inside the real dispatcher: a calibration MoE layer of each
    shape (8 experts, top-2) runs several batches in turn and logs every call's rows and wall time. A call is
    thus timed where it runs in a deployment: between the router's and the combine's torch work, with the
    layer's weights rotating through the cache, and with row counts that change from call to call;
  * memory copy bandwidth (numpy, 256 MB);
  * the dispatcher's own time (routing, permute, combine, copies) on four calibration MoE layers, none shaped
    like the validation layers, recorded with the features of `hetrun.calibrate.dispatcher_terms`.
An expert call's time is the mean of many calls inside a layer (a layer's time is the sum of its
calls), every other timing the median of many. The whole ladder is swept four times (points with long layer
calls twice), minutes apart, with every layer built anew; per point the fastest sweep counts (a slow spell of a
shared two-core machine, seconds to minutes long, then spoils one sweep's points, not the result).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch  # the dispatcher this module times runs on torch (hetrun.runtime imports it as well)

from hetrun.backends.registry import probe_backend
from hetrun.calibrate.dispatcher_terms import dispatch_features
from hetrun.formats import FORMATS, activation_bytes, get_format
from hetrun.placement.planner import simple_plan
from hetrun.profile import load_profile
from hetrun.roofline import swiglu_flops_bytes
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.weights import random_layer_weights
from hetrun.spec import MoESpec, RouterSpec

log = logging.getLogger("hetrun")

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_TOKENS = (1, 16, 256)
# the expert precisions calibration measures unless told otherwise (each a hetrun.formats format: checked here)
DEFAULT_PRECISIONS = tuple(get_format(p).name for p in ("fp32", "bf16", "int8", "int4"))
# (hidden, intermediate), launch-bound to compute-bound: a geometric ladder of expert sizes (about 4x in
# hidden x intermediate per step), so that any expert in the range lies between two measured neighbours
SHAPES = ((32, 64), (64, 128), (128, 384), (256, 512), (512, 1024), (1536, 2048))
BACKENDS = ("onnxruntime", "openvino")

CALL_EXPERTS, CALL_TOP_K = 8, 2  # calibration layers: 8 experts, top-2, so a call gets about tokens / 4 rows
MAX_LAYER_FLOPS = 80e9  # largest calibration layer call; bigger token counts are extrapolated linearly
BATCHES = 4  # different inputs per token count, timed in turn (calibration and validation alike)
SWEEPS = 4  # sweeps over everything timed, minutes apart, runtimes built anew; per point the fastest counts
LONG_LAYER_S = 0.15  # layer calls this long average over the machine's swings: their points are swept twice
DISPATCH_ROUNDS = 2  # the dispatcher's own time: token counts in turn, this many times


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
        return float(self._flops_bytes()[0])

    @property
    def bytes_moved(self) -> float:
        return float(self._flops_bytes()[1])

    def _flops_bytes(self):
        return swiglu_flops_bytes(self.tokens, self.hidden, self.intermediate, self.weight_bytes,
                                  activation_bytes("fp32"))  # the graphs take and return FP32 activations


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


def sweeps_for(layer_seconds: float, sweeps: int = SWEEPS) -> int:
    """How many sweeps a point gets: all for short layer calls, whose time swings 20-50% with the memory
    traffic of a shared host over seconds, two for long ones (`LONG_LAYER_S`), which average over that."""
    return min(sweeps, 2) if layer_seconds >= LONG_LAYER_S else sweeps


def measure_experts(backends=BACKENDS, precisions=DEFAULT_PRECISIONS, tokens=TOKENS, shapes=SHAPES,
                    rounds: int = SWEEPS, threads: int | None = None, progress=None) -> list[Sample]:
    """Mean seconds of one expert call per (backend, precision, shape, rows per call), timed inside the real
    dispatcher: a calibration MoE layer of that expert shape (8 experts, top-2) runs batches of about 4x the
    rows, and every call's rows and wall time are logged. Calls are timed where they run in a deployment:
    between the router's and combine's torch work, with the layer's weights rotating through the cache.

    The whole ladder is swept up to `rounds` times, minutes apart, with the layers built anew each sweep (points
    with long layer calls only twice: `sweeps_for`); per point the fastest sweep counts. A shared machine's slow
    spells last seconds to minutes, so one spoils a sweep's points, not the result. `progress(sweep, sample)`
    hears every measurement."""
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
            pairs, lambda u: [n for n in tokens if _layer_flops(n, u[2], u[3]) <= MAX_LAYER_FLOPS],
            lambda u, todo: _measure_shape(*u, todo, threads), lambda s: s.seconds,
            lambda s: s.seconds * CALL_EXPERTS, rounds, progress)
    return list(best.values())


def _layer_flops(rows: int, hidden: int, intermediate: int) -> float:
    """FLOPs of one calibration layer call whose expert calls get about `rows` rows each."""
    return float(swiglu_flops_bytes(rows * CALL_EXPERTS, hidden, intermediate, 0.0, 0.0)[0])


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
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_shape(backend: str, precision: str, d: int, i: int, counts, threads) -> dict[int, Sample]:
    """One calibration layer of this expert shape, built anew: per token count, its mean expert call."""
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
            xs = [torch.randn(n * CALL_EXPERTS // CALL_TOP_K, d, generator=g) for _ in range(BATCHES)]  # [T, D] each
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


def memory_gb() -> float:
    """This machine's physical memory in GB (16 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def measure_copy_bandwidth(nbytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """GB/s of a large memory copy (bytes read plus bytes written, per second)."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    sec = typical_time(lambda: np.copyto(b, a), reps, budget_s=5.0, max_reps=reps, statistic=np.min)
    return 2.0 * a.nbytes / sec / 1e9


def _dispatch_layers():
    """Calibration MoE layers, shaped unlike the validation layers (tiny, mixtral-bench): router kinds, expert
    counts, top-k and shared experts vary so that each term of the dispatcher model can be told apart."""
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
    prof = load_profile({"name": "host-dispatch", "devices": [{"id": "host", "type": "host-cpu", "backend": backend,
                                                                  "precision": "fp32"}]})
    out = []
    with torch_threads(threads):
        _dispatch_cases(out, torch.Generator().manual_seed(0), prof, threads, tokens, reps)
    return out


def _dispatch_cases(out, g, prof, threads, tokens, reps) -> None:
    for spec in _dispatch_layers():
        rt = ExpertRuntime(simple_plan(spec, prof, "fp32"), prof,
                           [random_layer_weights(spec, spec.moe_layer_ids[0])], threads=threads)
        layer = rt.layers[0]
        with torch.no_grad():
            xs = {n: torch.randn(n, spec.hidden_size, generator=g) for n in tokens}  # [T, D] per token count
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
