"""Calibrate this machine: measure the real CPU backends and write a host device profile with fitted efficiencies.

What is measured (and nothing else is assumed):
  * single SwiGLU experts on onnxruntime and OpenVINO at several token counts and precisions, for a small
    shape (launch-bound) and a large one (memory- then compute-bound), a few copies in rotation so that the
    weights are read the way a layer reads them;
  * memory copy bandwidth (numpy, 256 MB);
  * the dispatcher's own time (routing, permute, combine, copies) on a calibration MoE layer whose shape is
    neither of the validation layers.
Per (backend, precision) the roofline t = launch + max(FLOPs / (peak x ce), bytes / (bandwidth x me)) is
fitted in log space; `peak` is the best FLOP rate measured for that pair, `bandwidth` the copy bandwidth.
The result is a deployment profile with one device type per (backend, precision) (`host-<backend>-<precision>`)
and the dispatcher model under `extra.calibration`.

`predict_moe_layer_seconds` then predicts a real MoE layer from a profile written here: the dispatcher's time
plus, per expert that receives tokens, the fitted roofline of its device type.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrun.costmodel import expert_flops_bytes
from hetrun.errors import HetrunError, ProfileError

log = logging.getLogger("hetrun")

TOKENS = (1, 4, 16, 64, 256, 1024, 2048)
QUICK_TOKENS = (1, 16, 256)
PRECISIONS = ("fp32", "bf16", "int8", "int4")
SHAPES = ((32, 64), (128, 384), (512, 1024), (1536, 2048))  # (hidden, intermediate): launch-bound to compute-bound
BACKENDS = ("onnxruntime", "openvino")
ROTATE_BYTES = 96e6  # expert copies rotated per measurement: about this many bytes of weights
COLD_TOKENS = 64  # token counts up to this are also measured with the cache flushed (memory-bound)
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
    cold: bool = False  # the last-level cache was flushed before each call: weights come from DRAM

    @property
    def flops(self) -> float:
        return 6.0 * self.tokens * self.hidden * self.intermediate


def _host_device(backend: str):
    from hetrun.profile import load_profile

    prof = load_profile({"name": "calibration", "devices": [{"id": "host", "type": "host-cpu", "backend": backend}]})
    return prof.devices[0]


def _best_time(fn, reps: int, budget_s: float) -> float:
    """Shortest of `reps` timed calls after one warm-up: on a machine other jobs share, the minimum is the
    estimate of the undisturbed time (as timeit reports); calibration and validation use the same statistic."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return float(np.min(times))


def measure_experts(backends=BACKENDS, precisions=PRECISIONS, tokens=TOKENS, shapes=SHAPES, reps: int = 7,
                    threads: int | None = None, progress=None) -> list[Sample]:
    """Best seconds of one expert call per (backend, precision, shape, token count)."""
    from hetrun.backends.registry import probe_backend, require_backend
    from hetrun.graphs import FORMATS, ExpertWeights, build_expert_graph

    rng = np.random.default_rng(0)
    out: list[Sample] = []
    for b in backends:
        if not probe_backend(b).ok:
            log.warning("calibrate: backend %s is not available here (%s); skipped", b, probe_backend(b).reason)
            continue
        dev = _host_device(b)
        for p in precisions:
            if p not in FORMATS:
                log.warning("calibrate: no expert graph for %s here; skipped", p)
                continue
            backend = require_backend(b)(dev, p, threads)
            for d, i in shapes:
                w = ExpertWeights((rng.standard_normal((i, d)) * d ** -0.5).astype(np.float32),
                                  (rng.standard_normal((i, d)) * d ** -0.5).astype(np.float32),
                                  (rng.standard_normal((d, i)) * i ** -0.5).astype(np.float32))
                target = backend.graph_target() if hasattr(backend, "graph_target") else b
                g = build_expert_graph(w, p, target=target)
                copies = max(1, min(8, int(ROTATE_BYTES // max(g.weight_bytes, 1))))
                sessions = [backend.load(g.serialize(), f"cal{k}", g.meta) for k in range(copies)]
                for n in tokens:
                    x = rng.standard_normal((n, d)).astype(np.float32)
                    for sess in sessions:  # a runtime's first call at a new token count sets up that shape
                        sess.run(x)
                    k = [0]

                    def call():
                        sessions[k[0] % copies].run(x)
                        k[0] += 1

                    sec = _best_time(call, max(reps, copies), budget_s=3.0)
                    out.append(Sample(b, p, d, i, n, sec, float(g.weight_bytes)))
                    if progress:
                        progress(out[-1])
                    if (d, i) == shapes[-1] and n <= COLD_TOKENS:  # weights streamed from DRAM
                        sec = _cold_time(sessions[0], x, reps)
                        out.append(Sample(b, p, d, i, n, sec, float(g.weight_bytes), cold=True))
                        if progress:
                            progress(out[-1])
    _FLUSH.clear()
    return out


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


_FLUSH: list = []


def _cold_time(session, x, reps: int) -> float:
    """Best seconds of a call right after a copy twice the size of the last-level cache evicted it."""
    if not _FLUSH:
        n = int(2 * cache_bytes() // 8)
        _FLUSH.extend([np.ones(n), np.empty(n)])
    src, dst = _FLUSH
    times = []
    for _ in range(max(3, reps)):
        np.copyto(dst, src)
        t = time.perf_counter()
        session.run(x)
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def measure_copy_bandwidth(nbytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """GB/s of a large memory copy (bytes read plus bytes written, per second)."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    sec = _best_time(lambda: np.copyto(b, a), reps, budget_s=5.0)
    return 2.0 * a.nbytes / sec / 1e9


def _dispatch_layers():
    """Calibration MoE layers, one per router kind, shaped unlike the validation layers (tiny, mixtral-bench)."""
    from hetrun.spec import MoESpec, RouterSpec

    soft = MoESpec("dispatch-softmax", "mixtral", 1, 256, 640, 6, RouterSpec("softmax_topk", 2, True))
    grouped = MoESpec("dispatch-grouped", "deepseek_v3", 2, 96, 64, 16, RouterSpec("sigmoid_grouped", 4, True, 4, 2, 2.0),
                      num_shared_experts=1, shared_intermediate_size=64, first_dense_layers=1, dense_intermediate_size=96)
    return soft, grouped


def measure_dispatch(backend: str = "onnxruntime", tokens=(1, 16, 256, 1024), reps: int = 5,
                     threads: int | None = None) -> list[dict]:
    """The real dispatcher's own time (routing, permute, per-call loop, combine; expert graphs excluded) on two
    calibration layers: {router, tokens, calls, bytes, seconds} per case."""
    import torch

    from hetrun.profile import load_profile

    prof = load_profile({"name": "host-dispatch", "devices": [{"id": "host", "type": "host-cpu", "backend": backend,
                                                                  "precision": "fp32"}]})
    out = []
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # routing and combine run on torch: give it the same threads
    try:
        _dispatch_cases(out, g, prof, threads, tokens, reps)
    finally:
        torch.set_num_threads(before)
    return out


def _dispatch_cases(out, g, prof, threads, tokens, reps) -> None:
    import torch

    from hetrun.dispatch import ExpertRuntime
    from hetrun.moe_weights import random_layer_weights
    from hetrun.planner import simple_plan

    for spec in _dispatch_layers():
        rt = ExpertRuntime(simple_plan(spec, prof, "fp32"), prof,
                           [random_layer_weights(spec, spec.first_dense_layers)], threads=threads)
        layer = rt.layers[0]
        with torch.no_grad():
            for n in tokens:
                x = torch.randn(n, spec.hidden_size, generator=g)
                for _ in range(5):  # first calls pay for lazy initialization in torch and the runtimes
                    layer(x)
                over, calls = [], 0
                for _ in range(reps):
                    rt.stats.reset()
                    layer(x)
                    over.append(rt.stats.layer_s - rt.stats.expert_s)
                    calls = int((rt.stats.tokens_per_expert[0] > 0).sum()) + spec.num_shared_experts
                out.append({"router": spec.router.kind, "tokens": n, "calls": calls,
                            "bytes": dispatch_bytes(n, spec.top_k, spec.hidden_size), "seconds": float(np.min(over))})


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


def fit_dispatch(rows: list[dict]) -> dict:
    """Dispatcher time = fixed[router kind] + per_call x expert calls + per_byte x bytes: non-negative least squares
    on relative error."""
    from scipy.optimize import nnls

    kinds = sorted({r["router"] for r in rows})
    A = np.array([[1.0 if r["router"] == k else 0.0 for k in kinds] + [r["calls"], r["bytes"] * 1e-6] for r in rows])
    t = np.array([r["seconds"] for r in rows]) * 1e6  # microseconds
    x, _ = nnls(A / t[:, None], np.ones(len(t)))
    return {"fixed_us": {k: float(v) for k, v in zip(kinds, x[:len(kinds)])}, "per_call_us": float(x[-2]),
            "us_per_mb": float(x[-1])}


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
    the cache level the weights live in depend on the shape), and for the shape with cold-cache samples the
    memory efficiency when weights stream from DRAM. Least squares on log time."""
    from scipy.optimize import least_squares

    rate = max(x.flops / x.seconds for x in samples if not x.cold)
    bw = copy_gbs * 1e9
    shapes = sorted({(x.hidden, x.intermediate) for x in samples}, key=lambda s_: s_[0] * s_[1])
    warm = [x for x in samples if not x.cold]
    cold = [x for x in samples if x.cold]
    k = np.array([shapes.index((x.hidden, x.intermediate)) for x in warm])
    f = np.array([x.flops for x in warm])
    b = np.array([_act_bytes(x) for x in warm])
    t = np.array([x.seconds for x in warm])
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
        cs = [x for x in cold if (x.hidden, x.intermediate) == (d, i)]
        if cs:
            fc = np.array([x.flops for x in cs])
            bc = np.array([_act_bytes(x) for x in cs])
            tc = np.array([x.seconds for x in cs])
            rc = least_squares(lambda m: np.log(host_expert_seconds(fc, bc, rate, bw, v[2 + j], m[0], v[0], v[1]) / tc),
                               [min(1.0, float(v[2 + n + j]))], bounds=([1e-3], [50.0]))
            fit["memory_efficiency_cold"] = float(rc.x[0])
        out.append(fit)
    return out


def build_host_profile(samples: list[Sample], copy_gbs: float, dispatch: dict, note: str = "") -> dict:
    """A deployment profile (plain dict) with one fitted device type per measured (backend, precision).

    The device type holds the fit of the largest calibration shape with weights streaming from DRAM (what a big
    model sees); `extra.calibration.fits` holds every shape's warm-cache fit too, for `predict_moe_layer_seconds`.
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
                            f"{len(ss)} expert timings (largest shape, weights from DRAM)",
                            "tdp_w, idle_w and price_per_hour are editable assumptions"],
                "compute_efficiency": round(big["compute_efficiency"], 4),
                "memory_efficiency": round(min(1.0, big.get("memory_efficiency_cold", big["memory_efficiency"])), 4),
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

    from hetrun.profile import load_profile
    from hetrun.sim.report import write_atomic

    load_profile(profile)  # refuse to write something hetrun cannot read back
    path = Path(path)
    write_atomic(path, yaml.safe_dump(profile, sort_keys=False, width=120))
    return path


def calibrate(out: str | Path, quick: bool = False, backends=BACKENDS, precisions=PRECISIONS,
              threads: int | None = None, progress=None, tokens=None, shapes=None) -> tuple[Path, dict]:
    """Measure, fit, write the host profile to `out`; returns (path, profile dict)."""
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    shapes = shapes or (SHAPES if not quick else SHAPES[1:3])
    samples = measure_experts(backends, precisions, tokens, shapes, reps=3 if quick else 7, threads=threads,
                              progress=progress)
    copy = measure_copy_bandwidth(64 * 2 ** 20 if quick else 256 * 2 ** 20)
    disp_rows = measure_dispatch(backends[0] if backends else "onnxruntime",
                                 tokens=(1, 64, 512) if quick else (1, 4, 16, 64, 256, 1024), reps=3 if quick else 15,
                                 threads=threads)
    dispatch = fit_dispatch(disp_rows)
    dispatch["samples"] = disp_rows
    note = "Quick calibration (fewer token counts and repetitions)." if quick else ""
    prof = build_host_profile(samples, copy, dispatch, note)
    return write_profile(out, prof), prof


# ---- prediction -----------------------------------------------------------------------------------

def _params_for(cal: dict, backend: str, precision: str, hidden: int, intermediate: int, cold: bool) -> dict:
    """Roofline parameters for one expert shape: the calibration shapes' fits interpolated in log(hidden x
    intermediate) (clamped to the measured range); DRAM memory efficiency when `cold`."""
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
    me = mix("memory_efficiency")
    if cold:
        me = next((f["memory_efficiency_cold"] for f in reversed(fs) if "memory_efficiency_cold" in f), me)
    return {"compute_efficiency": mix("compute_efficiency"), "memory_efficiency": me, "launch_us": mix("launch_us"),
            "peak_flops": fs[-1]["peak_gflops"] * 1e9, "overlap": mix("overlap") if "overlap" in lo else 1.0}


def predict_moe_layer_seconds(profile, backend: str, precision: str, hidden: int, intermediate: int,
                              tokens_per_expert, top_k: int, shared: int = 0, shared_intermediate: int = 0,
                              weight_bytes: float | None = None, shared_weight_bytes: float | None = None,
                              router: str = "softmax_topk") -> float:
    """Predicted seconds of one real MoE layer call on this host: the dispatcher's time plus, for each expert
    that receives tokens (and each shared expert), the fitted roofline of the (backend, precision) type."""
    from hetrun.precision import expert_bytes
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
    # weights touched by one call; past the last-level cache they stream from DRAM on every call
    working_set = int((counts > 0).sum()) * wb + shared * swb
    cold = working_set > 0.8 * float(cal.get("cache_bytes", cache_bytes()))

    def call_seconds(n: int, d: int, i: int, w: float) -> float:
        q = _params_for(cal, backend, precision, d, i, cold)
        f, b = expert_flops_bytes(n, d, i, w, 4.0)  # the graphs take and return FP32 activations
        return float(host_expert_seconds(f, b, q["peak_flops"], cal["copy_bandwidth_gbs"] * 1e9,
                                         q["compute_efficiency"], q["memory_efficiency"], q["launch_us"],
                                         q["overlap"]))

    t = sum(call_seconds(int(n), hidden, intermediate, wb) for n in counts if n > 0)
    if shared:
        t += shared * call_seconds(total_tokens, hidden, shared_intermediate, swb)
    d = cal["dispatch"]
    fixed = d["fixed_us"].get(router) if isinstance(d["fixed_us"], dict) else d["fixed_us"]
    if fixed is None:
        raise ProfileError(f"profile '{prof.name}' has no dispatcher calibration for {router} routers; recalibrate")
    calls = int((counts > 0).sum()) + shared
    t += (fixed + d["per_call_us"] * calls + d["us_per_mb"] * dispatch_bytes(total_tokens, top_k, hidden) * 1e-6) * 1e-6
    return float(t)
