"""Fit the measured timings and build the host profile from the fits.

Per (backend, precision) the CPU roofline t = launch + max(C, M) + (1 - overlap) x min(C, M), C = FLOPs / (peak x
ce), M = bytes / (bandwidth x me) (`hetrun.roofline.roofline`) is fitted in log space; `peak` is the best FLOP rate
measured for that pair, `bandwidth` the copy bandwidth. The dispatcher's own time is fitted as fixed per router
kind + per call + per MB routed + per MB through shared experts + per router score
(`hetrun.calibrate.dispatcher_terms`). The result is a deployment profile with one device type per (backend,
precision) (`host-<backend>-<precision>`) and the measured calls and the dispatcher model under
`extra.calibration`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from typing import TYPE_CHECKING

import numpy as np

from hetrun.calibrate.dispatcher_terms import DISPATCH_TERMS
from hetrun.errors import HetrunError
from hetrun.roofline import roofline

if TYPE_CHECKING:
    from hetrun.calibrate.measure import Sample

WARM_MEMORY_MAX = 10.0  # weights in cache read at most this many times faster than the DRAM copy bandwidth


def fit_roofline(flops, bytes_, seconds, peak_flops: float, bandwidth: float,
                 max_memory_efficiency: float = 1.0, launch_us: float | None = None) -> tuple[float, float, float, float]:
    """(compute_efficiency, memory_efficiency, launch_us, rms log error) of t = launch + max(F/(P ce), B/(BW me)).

    The launch overhead cannot exceed the shortest time measured; give `launch_us` to hold it fixed.
    `max_memory_efficiency` above 1 lets weights that stay in cache read faster than the DRAM `bandwidth`."""
    from scipy.optimize import least_squares  # heavy: only when fitting

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
    """Dispatcher time = fixed[router kind] + per_call x expert calls + per MB routed + per MB through shared
    experts + per 1000 token x expert router scores: non-negative least squares on relative error."""
    from scipy.optimize import nnls  # heavy: only when fitting

    kinds = sorted({r["router"] for r in rows})
    A = np.array([[1.0 if r["router"] == k else 0.0 for k in kinds] + [r.get(f, 0.0) * u for f, _, u in DISPATCH_TERMS]
                  for r in rows])
    t = np.array([r["seconds"] for r in rows]) * 1e6  # microseconds
    x, _ = nnls(A / t[:, None], np.ones(len(t)))
    out = {"fixed_us": {k: float(v) for k, v in zip(kinds, x[:len(kinds)])}}
    out.update({name: float(v) for (_, name, _), v in zip(DISPATCH_TERMS, x[len(kinds):])})
    return out


def type_name(backend: str, precision: str) -> str:
    return f"host-{backend}-{precision}"


def fit_pair(samples: list[Sample], copy_gbs: float) -> list[dict]:
    """Fits of one (backend, precision) on its calibration shapes, jointly: one launch overhead and one
    compute/memory overlap for the runtime, a compute and a memory efficiency per shape (GEMM efficiency and
    the cache level the weights live in depend on the shape). Least squares on log time."""
    from scipy.optimize import least_squares  # heavy: only when fitting

    rate = max(x.flops / x.seconds for x in samples)
    bw = copy_gbs * 1e9
    shapes = sorted({(x.hidden, x.intermediate) for x in samples}, key=lambda s_: s_[0] * s_[1])
    k = np.array([shapes.index((x.hidden, x.intermediate)) for x in samples])
    f = np.array([x.flops for x in samples])
    b = np.array([x.bytes_moved for x in samples])
    t = np.array([x.seconds for x in samples])
    tmin = float(t.min() * 1e6)
    n = len(shapes)

    def model(v):
        lat, ov = v[0], v[1]
        ce, me = v[2:2 + n][k], v[2 + n:2 + 2 * n][k]
        return roofline(f, b, rate, bw, ce, me, lat, overlap=ov)

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


def build_host_profile(samples: list[Sample], copy_gbs: float, dispatch: dict, cache_bytes: float, memory_gb: float,
                       note: str = "") -> dict:
    """A deployment profile (plain dict) with one fitted device type per measured (backend, precision).

    The device type holds the fit of the largest calibration shape, whose layer streams its weights from DRAM (what a
    big model sees); `extra.calibration.fits` holds every shape's fit, for `predict_moe_layer_seconds`'s fallback.
    `cache_bytes` and `memory_gb` are this machine's last-level cache and memory, as measured.
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
                "tflops": {p: big["peak_gflops"] / 1e3}, "precisions": [p], "memory_gb": round(memory_gb, 1),
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
            "copy_bandwidth_gbs": copy_gbs, "cache_bytes": cache_bytes, "dispatch": dispatch, "fits": fits,
            "samples": [s.__dict__ for s in samples],
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()}}},
    }
