"""Predict a real MoE layer on this host from a profile `hetrun calibrate` wrote.

`predict_moe_layer_seconds` adds the dispatcher's time and, per expert that receives tokens, one call of its shape
and row count, interpolated from the measured calls (log-log, between the two measured shapes around it), or the
fitted roofline outside the measured shapes.
"""

from __future__ import annotations

import math

import numpy as np

from hetrun.calibrate.dispatcher_terms import DISPATCH_TERMS, dispatch_features
from hetrun.calibrate.fit import type_name
from hetrun.errors import ProfileError
from hetrun.formats import activation_bytes, expert_bytes
from hetrun.profile import load_profile
from hetrun.roofline import roofline, swiglu_flops_bytes


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
    from scipy.optimize import isotonic_regression  # heavy: only when a measured shape is interpolated

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


def dispatch_seconds(fit: dict, features: dict) -> float:
    """Seconds of the dispatcher's own work for one layer call, from a `fit_dispatch` result."""
    fixed = fit["fixed_us"].get(features["router"]) if isinstance(fit["fixed_us"], dict) else fit["fixed_us"]
    if fixed is None:
        raise ProfileError(f"the calibration has no dispatcher fit for {features['router']} routers; recalibrate")
    return (fixed + sum(fit.get(name, 0.0) * features.get(f, 0.0) * u for f, name, u in DISPATCH_TERMS)) * 1e-6


def predict_moe_layer_seconds(profile, backend: str, precision: str, hidden: int, intermediate: int,
                              tokens_per_expert, top_k: int, shared: int = 0, shared_intermediate: int = 0,
                              weight_bytes: float | None = None, shared_weight_bytes: float | None = None,
                              router: str = "softmax_topk", num_experts: int | None = None) -> float:
    """Predicted seconds of one real MoE layer call on this host: the dispatcher's time plus, for each expert
    that receives tokens (and each shared expert), the time of one call of that shape and token count: the
    calibration's measured calls interpolated where the shape lies among the measured ones, else the fitted
    roofline of the (backend, precision) type."""
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
        f, b = swiglu_flops_bytes(n, d, i, w, activation_bytes("fp32"))  # the graphs take and return FP32 activations
        return roofline(f, b, q["peak_flops"], cal["copy_bandwidth_gbs"] * 1e9, q["compute_efficiency"],
                        q["memory_efficiency"], q["launch_us"], overlap=q["overlap"])

    t = sum(call_seconds(int(n), hidden, intermediate, wb) for n in counts if n > 0)
    if shared:
        t += shared * call_seconds(total_tokens, hidden, shared_intermediate, swb)
    calls = int((counts > 0).sum()) + shared
    feats = dispatch_features(router, total_tokens, calls, top_k, hidden, num_experts or len(counts), shared)
    return float(t + dispatch_seconds(cal["dispatch"], feats))
