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

from hetrun.costmodel import expert_cost
from hetrun.errors import HetrunError, ProfileError

log = logging.getLogger("hetrun")

TOKENS = (1, 4, 16, 64, 256, 1024, 2048)
QUICK_TOKENS = (1, 16, 256)
PRECISIONS = ("fp32", "bf16", "int8", "int4")
SHAPES = ((128, 384), (1536, 2048))  # (hidden, intermediate): launch-bound and bandwidth/compute-bound
BACKENDS = ("onnxruntime", "openvino")
ROTATE_BYTES = 96e6  # expert copies rotated per measurement: about this many bytes of weights


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


def _host_device(backend: str):
    from hetrun.profile import load_profile

    prof = load_profile({"name": "calibration", "devices": [{"id": "host", "type": "host-cpu", "backend": backend}]})
    return prof.devices[0]


def _median_time(fn, reps: int, budget_s: float) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return float(np.median(times))


def measure_experts(backends=BACKENDS, precisions=PRECISIONS, tokens=TOKENS, shapes=SHAPES, reps: int = 7,
                    threads: int | None = None, progress=None) -> list[Sample]:
    """Median seconds of one expert call per (backend, precision, shape, token count)."""
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

                    sec = _median_time(call, max(reps, copies), budget_s=3.0)
                    out.append(Sample(b, p, d, i, n, sec, float(g.weight_bytes)))
                    if progress:
                        progress(out[-1])
    return out


def measure_copy_bandwidth(nbytes: int = 256 * 2 ** 20, reps: int = 5) -> float:
    """GB/s of a large memory copy (bytes read plus bytes written, per second)."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    sec = _median_time(lambda: np.copyto(b, a), reps, budget_s=5.0)
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
                            "bytes": dispatch_bytes(n, spec.top_k, spec.hidden_size), "seconds": float(np.median(over))})


def dispatch_bytes(tokens: int, top_k: int, hidden: int) -> float:
    """Bytes the dispatcher moves for one call: permuted rows in, expert rows out, weighted combine (FP32)."""
    return 3.0 * tokens * top_k * hidden * 4.0


# ---- fitting --------------------------------------------------------------------------------------

def fit_roofline(flops, bytes_, seconds, peak_flops: float, bandwidth: float) -> tuple[float, float, float, float]:
    """(compute_efficiency, memory_efficiency, launch_us, rms log error) of t = launch + max(F/(P ce), B/(BW me))."""
    from scipy.optimize import least_squares

    f, b, t = (np.asarray(v, dtype=np.float64) for v in (flops, bytes_, seconds))
    if len(t) < 3 or (t <= 0).any() or not np.isfinite(t).all():
        raise HetrunError("need at least 3 positive timings to fit a roofline")

    def model(x):
        ce, me, lat = x
        return lat * 1e-6 + np.maximum(f / (peak_flops * ce), b / (bandwidth * me))

    best = None
    tmin = float(t.min() * 1e6)
    starts = [(ce, me, lat) for ce in (0.3, 0.6, 0.9) for me in (0.3, 0.6, 0.9) for lat in (0.0, tmin / 4, tmin * 0.8)]
    for x0 in starts:
        r = least_squares(lambda x: np.log(model(x) / t), x0, bounds=([1e-4, 1e-4, 0.0], [1.0, 1.0, 1e6]))
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


def build_host_profile(samples: list[Sample], copy_gbs: float, dispatch: dict, note: str = "") -> dict:
    """A deployment profile (plain dict) with one fitted device type per measured (backend, precision)."""
    if not samples:
        raise HetrunError("no expert timings to fit; is any CPU backend available? (hetrun devices)")
    if not (copy_gbs > 0 and math.isfinite(copy_gbs)):
        raise HetrunError(f"measured copy bandwidth {copy_gbs} GB/s is not usable")
    types, fits = {}, []
    for b in sorted({s.backend for s in samples}):
        for p in sorted({s.precision for s in samples if s.backend == b}):
            ss = [s for s in samples if s.backend == b and s.precision == p]
            rate = max(s.flops / s.seconds for s in ss)
            ce, me, lat, err = fit_roofline([s.flops for s in ss], [s.weight_bytes + 4.0 * s.tokens * (2 * s.hidden + 3 * s.intermediate)
                                                                    for s in ss], [s.seconds for s in ss],
                                            rate, copy_gbs * 1e9)
            name = type_name(b, p)
            types[name] = {
                "name": name, "vendor": "intel", "kind": "cpu",
                "description": f"this machine's CPU through {b} at {p}, fitted by hetrun calibrate",
                "tflops": {p: rate / 1e12}, "precisions": [p], "memory_gb": round(_memory_gb(), 1),
                "memory_bw_gbs": round(copy_gbs, 3),
                "scale_up": {"name": "shared memory", "bandwidth_gbs": round(copy_gbs / 2, 3), "latency_us": 1.0},
                "tdp_w": 65.0, "idle_w": 10.0, "price_per_hour": 0.1, "real_backends": [b],
                "sources": [f"hetrun calibrate {_dt.date.today().isoformat()}: peak = best measured FLOP rate, "
                            "memory_bw = numpy copy bandwidth; efficiencies and launch fitted to "
                            f"{len(ss)} expert timings (rms log error {err:.3f})",
                            "tdp_w, idle_w and price_per_hour are editable assumptions"],
                "compute_efficiency": round(ce, 4), "memory_efficiency": round(me, 4),
                "launch_overhead_us": round(lat, 2)}
            fits.append({"backend": b, "precision": p, "peak_gflops": rate / 1e9, "compute_efficiency": ce,
                         "memory_efficiency": me, "launch_us": lat, "rms_log_error": err, "samples": len(ss)})
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
            "copy_bandwidth_gbs": copy_gbs, "dispatch": dispatch, "fits": fits,
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
    shapes = shapes or (SHAPES if not quick else SHAPES[:1] + ((512, 1024),))
    samples = measure_experts(backends, precisions, tokens, shapes, reps=3 if quick else 7, threads=threads,
                              progress=progress)
    copy = measure_copy_bandwidth(64 * 2 ** 20 if quick else 256 * 2 ** 20)
    disp_rows = measure_dispatch(backends[0] if backends else "onnxruntime",
                                 tokens=(1, 64, 512) if quick else (1, 4, 16, 64, 256, 1024), reps=3 if quick else 7,
                                 threads=threads)
    dispatch = fit_dispatch(disp_rows)
    dispatch["samples"] = disp_rows
    note = "Quick calibration (fewer token counts and repetitions)." if quick else ""
    prof = build_host_profile(samples, copy, dispatch, note)
    return write_profile(out, prof), prof


# ---- prediction -----------------------------------------------------------------------------------

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
    if not cal or "dispatch" not in cal:
        raise ProfileError(f"profile '{prof.name}' has no calibration; write one with `hetrun calibrate`")
    name = type_name(backend, precision)
    dt = prof.model.device_types.get(name)
    if dt is None:
        raise ProfileError(f"profile '{prof.name}' has no calibrated type {name}; calibrate {backend} at {precision}")
    counts = np.asarray(tokens_per_expert, dtype=np.int64)
    wb = weight_bytes if weight_bytes is not None else expert_bytes(precision, hidden, intermediate)
    total_tokens = int(counts.sum()) // max(top_k, 1)
    t = sum(expert_cost(dt, precision, int(n), hidden, intermediate, wb, 4.0) for n in counts if n > 0)
    if shared:
        swb = shared_weight_bytes if shared_weight_bytes is not None else expert_bytes(precision, hidden,
                                                                                       shared_intermediate)
        t += shared * expert_cost(dt, precision, total_tokens, hidden, shared_intermediate, swb, 4.0)
    d = cal["dispatch"]
    fixed = d["fixed_us"].get(router) if isinstance(d["fixed_us"], dict) else d["fixed_us"]
    if fixed is None:
        raise ProfileError(f"profile '{prof.name}' has no dispatcher calibration for {router} routers; recalibrate")
    calls = int((counts > 0).sum()) + shared
    t += (fixed + d["per_call_us"] * calls + d["us_per_mb"] * dispatch_bytes(total_tokens, top_k, hidden) * 1e-6) * 1e-6
    return float(t)
