"""Benchmarks of the simulator: its speed at full scale, and its accuracy against real CPU runs and published
deployments.

    hetrun bench simulate scale                 # DeepSeek-R1 decode on 144 H800s, 1,000 requests
    hetrun bench simulate requests              # 10,000 requests through 144 + 3 x 32 H800s, request level
    hetrun bench simulate accuracy HOST.yaml    # predicted vs measured MoE layers (after calibrate)
    hetrun bench simulate deepseek              # simulated vs published DeepSeek serving
    hetrun bench simulate published             # every profiles/published case: published vs simulated

`scale` must finish in under 10 s, `requests` in under 30 s (it also reports its time as a multiple of one step-model
decode simulation of the same deployment, measured in the same run). `accuracy` runs the tiny and Mixtral-shaped (mixtral-bench) MoE layers
through the real dispatcher on onnxruntime and OpenVINO for 1 to 2048 tokens and compares each wall time
with `hetrun.calibrate.predict.predict_moe_layer_seconds` on the calibrated host profile; the targets are 15%
geometric-mean error and 30% worst case. It needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hetrun.backends.registry import probe_backend
from hetrun.bench import Benchmark
from hetrun.calibrate.measure import (
    BATCHES,
    SWEEPS,
    fastest_of_sweeps,
    graph_weight_bytes,
    in_turn,
    torch_threads,
    typical_time,
)
from hetrun.calibrate.predict import predict_moe_layer_seconds
from hetrun.errors import HetrunError
from hetrun.files import write_atomic
from hetrun.placement.planner import simple_plan
from hetrun.profile import load_profile
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.weights import random_layer_weights
from hetrun.sim import simulate
from hetrun.sim.requests import simulate_requests
from hetrun.sim.validation import markdown_table, validate
from hetrun.sim.workload import load_workload
from hetrun.spec import MoESpec

ACCURACY_TOKENS = (1, 4, 16, 64, 256, 1024, 2048)
ACCURACY_SPECS = ("tiny", "mixtral-bench")
ACCURACY_PRECISIONS = ("fp32", "bf16")


def scale(requests: int = 1000) -> dict:
    """Wall time of the DeepSeek-R1 decode simulation on 144 devices with a `requests`-request workload."""
    wl = load_workload("deepseek-prod").replace(requests=requests)
    t0 = time.perf_counter()
    r = simulate("deepseek-r1", "deepseek-decode-h800", wl, phases=("decode",))
    sec = time.perf_counter() - t0
    return {"seconds": sec, "devices": r.num_devices, "requests": requests,
            "decode_tokens_per_s_per_node": r.row["decode_tokens_per_s_per_node"], "target_s": 10.0,
            "ok": sec < 10.0}


def requests_scale(n: int = 10_000) -> dict:
    """Wall time of the request-level simulation of `n` requests through DeepSeek's PD-disaggregated deployment
    (144 decode H800s, prefill instances of 32 H800s), and the same run's step-model decode simulation as the
    reference."""
    t0 = time.perf_counter()
    ref = simulate("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", phases=("decode",))
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = simulate_requests("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", requests=n,
                          prefill_profile="deepseek-prefill-h800")
    sec = time.perf_counter() - t0
    s = r.summary
    return {"seconds": sec, "requests": n, "devices": ref.num_devices, "reference_s": ref_s, "ratio": sec / ref_s,
            "target_s": 30.0, "ok": sec < 30.0, "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p99_s": s["tpot_s"]["p99"],
            "slo_attainment": s["slo_attainment"], "prefill_instances": r.settings.get("prefill_instances")}


def deepseek() -> dict:
    """Simulated DeepSeek prefill and decode per node against the published figures."""
    pre = simulate("deepseek-r1", "deepseek-prefill-h800", "deepseek-prod", phases=("prefill",)).row
    dec = simulate("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", phases=("decode",)).row
    p, d = pre["prefill_tokens_per_s_per_node"], dec["decode_tokens_per_s_per_node"]
    return {"prefill_per_node": p, "prefill_published": 73700.0, "prefill_ratio": p / 73700.0,
            "decode_per_node": d, "decode_published": 14800.0, "decode_ratio": d / 14800.0,
            "decode_per_user_tps": dec["per_user_tps"], "decode_batch_per_device": dec["decode_batch_per_device"],
            "prefill_ttft_s": pre["ttft_s"], "prefill_chunk_tokens": pre["prefill_chunk_tokens"],
            "prefill_utilization": pre["prefill_utilization"]}


def _layer_runtime(spec, backend: str, precision: str, threads):
    prof = load_profile({"name": f"bench-{backend}", "devices": [
        {"id": "host", "type": "host-cpu", "backend": backend, "precision": precision}]})
    plan = simple_plan(spec, prof, precision)
    w = random_layer_weights(spec, spec.moe_layer_ids[0])
    rt = ExpertRuntime(plan, prof, [w], threads=threads)
    return rt, w


def _weight_bytes(w, precision: str, backend: str) -> tuple[float, float | None]:
    shared = graph_weight_bytes(w.shared[0], precision, backend) if w.shared else None
    return graph_weight_bytes(w.experts[0], precision, backend), shared


def accuracy_table(host_profile, threads: int | None = None, quick: bool = False, specs=ACCURACY_SPECS,
                   backends=("onnxruntime", "openvino"), precisions=ACCURACY_PRECISIONS, tokens=ACCURACY_TOKENS,
                   reps: int = 7) -> list[dict]:
    """Measured and predicted seconds of real MoE layer calls, one row per case. Each case is measured in
    sweeps over all cases, as calibration measures (`hetrun.calibrate.measure.sweeps_for`); its fastest sweep counts."""
    host_profile = load_profile(host_profile)  # once: every case's prediction reads it
    sweeps = SWEEPS
    if quick:  # as `hetrun calibrate --quick`: one sweep
        tokens, reps, sweeps = (1, 64, 1024), 3, 1
    with torch_threads(threads):
        return _accuracy_rows(host_profile, threads, specs, backends, precisions, tokens, reps, sweeps)


def _accuracy_rows(host_profile, threads, specs, backends, precisions, tokens, reps, sweeps) -> list[dict]:
    runs = [(MoESpec.from_preset(name), b, p) for name in specs for b in backends if probe_backend(b).ok
            for p in precisions]
    best = fastest_of_sweeps(runs, lambda u: tokens,
                             lambda u, todo: _measure_layer(*u, todo, reps, threads, host_profile),
                             lambda c: c["seconds"], lambda c: c["seconds"], sweeps)
    return [{"model": spec.name, "backend": b, "precision": p, "tokens": n, "measured_ms": c["seconds"] * 1e3,
             "predicted_ms": c["predicted"] * 1e3, "error_pct": (c["predicted"] / c["seconds"] - 1) * 100,
             "tokens_per_expert": c["counts"]} for ((spec, b, p), n), c in best.items()]


def _measure_layer(spec, b: str, p: str, tokens, reps: int, threads, host_profile) -> dict[int, dict]:
    """Per token count: the layer's median wall time on its batches in turn, the prediction, the routing."""
    rt, w = _layer_runtime(spec, b, p, threads)
    wb, swb = _weight_bytes(w, p, b)
    layer = rt.layers[0]
    out = {}
    with torch.no_grad():
        for n in tokens:
            g = torch.Generator().manual_seed(n)  # the same batches in every sweep and on every runtime
            case = _layer_case(layer, rt, spec, n, g, predict_args=(host_profile, b, p, wb, swb))
            case["seconds"] = typical_time(case.pop("call"), max(reps, BATCHES), budget_s=0.2)
            out[n] = case
    return out


def _layer_case(layer, rt, spec, n: int, g, predict_args) -> dict:
    """BATCHES inputs of n tokens, a call that runs them in turn, and the mean predicted seconds over them."""
    host_profile, b, p, wb, swb = predict_args
    # several batches in turn, so that a few tokens do not always meet the same experts
    xs = [torch.randn(n, spec.hidden_size, generator=g) * 0.5 for _ in range(BATCHES)]
    preds, counts = [], []
    for x in xs:
        for _ in range(2):  # warm-up: lazy initialization in torch and the runtimes
            layer(x)
        rt.stats.reset()
        layer(x)
        counts.append(rt.stats.tokens_per_expert[0].copy())
        preds.append(predict_moe_layer_seconds(host_profile, b, p, spec.hidden_size, spec.moe_intermediate_size,
                                               counts[-1], spec.top_k, spec.num_shared_experts,
                                               spec.shared_intermediate_size, wb, swb, spec.router.kind,
                                               spec.num_experts))
    return {"call": in_turn(layer, xs), "predicted": float(np.mean(preds)), "counts": np.sum(counts, axis=0).tolist()}


def accuracy_summary(rows: list[dict]) -> dict:
    """Geometric-mean and worst-case error: exp(mean |ln(pred/meas)|) - 1 and exp(max |ln(pred/meas)|) - 1."""
    r = np.array([abs(math.log(x["predicted_ms"] / x["measured_ms"])) for x in rows])
    return {"cases": len(rows), "geomean_error_pct": float(np.expm1(r.mean()) * 100),
            "worst_error_pct": float(np.expm1(r.max()) * 100), "target_geomean_pct": 15.0, "target_worst_pct": 30.0}


def print_accuracy(rows: list[dict]) -> dict:
    t = Table(title="simulator vs real MoE layers on this CPU")
    for c in ("model", "backend", "precision", "tokens", "measured ms", "predicted ms", "error"):
        t.add_column(c, justify="right" if c not in ("model", "backend", "precision") else "left")
    for x in rows:
        t.add_row(x["model"], x["backend"], x["precision"], str(x["tokens"]), f"{x['measured_ms']:.3f}",
                  f"{x['predicted_ms']:.3f}", f"{x['error_pct']:+.1f}%")
    c = Console()
    c.print(t)
    s = accuracy_summary(rows)
    c.print(f"{s['cases']} cases: geometric-mean error {s['geomean_error_pct']:.1f}% (target 15%), "
            f"worst {s['worst_error_pct']:.1f}% (target 30%)")
    return s


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("scale", "requests", "accuracy", "deepseek", "published", "all"), nargs="?",
                   default="scale")
    p.add_argument("host_profile", nargs="?", help="calibrated host profile (for accuracy)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the accuracy or published rows as JSON")


def _main(a: argparse.Namespace) -> int:
    ok = True
    if a.what in ("scale", "all"):
        s = scale()
        print(f"DeepSeek-R1 decode on {s['devices']} devices, {s['requests']} requests: {s['seconds']:.2f} s "
              f"(target < {s['target_s']:.0f} s) -> {'ok' if s['ok'] else 'TOO SLOW'}; "
              f"{s['decode_tokens_per_s_per_node']:,.0f} output tokens/s per node")
        ok &= s["ok"]
    if a.what in ("requests", "all"):
        s = requests_scale()
        print(f"{s['requests']:,} requests, request level, on {s['devices']} decode devices + {s['prefill_instances']} "
              f"prefill instances: {s['seconds']:.2f} s (target < {s['target_s']:.0f} s; {s['ratio']:.1f}x one "
              f"step-model decode simulation, {s['reference_s']:.2f} s) -> {'ok' if s['ok'] else 'TOO SLOW'}; P99 TTFT "
              f"{s['ttft_p99_s']:.2f} s, P99 TPOT {s['tpot_p99_s'] * 1e3:.1f} ms, SLO attainment "
              f"{s['slo_attainment'] * 100:.1f}%")
        ok &= s["ok"]
    if a.what in ("published", "all"):
        rows = validate()
        print(markdown_table(rows))
        if a.json:
            write_atomic(a.json, json.dumps(rows, indent=1))
        ok &= all(r["within"] for r in rows)
    if a.what in ("deepseek", "all"):
        d = deepseek()
        print(f"prefill {d['prefill_per_node']:,.0f} input tokens/s per node vs 73,700 published "
              f"({(d['prefill_ratio'] - 1) * 100:+.1f}%), chunk {d['prefill_chunk_tokens']:.0f}, "
              f"utilization {d['prefill_utilization']:.2f}, TTFT {d['prefill_ttft_s']:.2f} s")
        print(f"decode {d['decode_per_node']:,.0f} output tokens/s per node vs 14,800 published "
              f"({(d['decode_ratio'] - 1) * 100:+.1f}%), {d['decode_per_user_tps']:.1f} tokens/s per user, "
              f"{d['decode_batch_per_device']:.0f} requests per GPU")
        ok &= abs(d["prefill_ratio"] - 1) <= 0.25 and abs(d["decode_ratio"] - 1) <= 0.25
    if a.what == "all" and not a.host_profile:
        print("accuracy skipped: give a host profile (`hetrun calibrate --out host.yaml`, then "
              "`hetrun bench simulate all host.yaml`)")
    elif a.what in ("accuracy", "all"):
        if not a.host_profile:
            raise HetrunError("accuracy needs a host profile: run `hetrun calibrate --out host.yaml` first")
        rows = accuracy_table(a.host_profile, a.threads, a.quick)
        s = print_accuracy(rows)
        if a.json:
            write_atomic(a.json, json.dumps({"rows": rows, "summary": s, "host_profile": a.host_profile,
                                             "threads": a.threads}, indent=1))
        ok &= s["geomean_error_pct"] <= 15 and s["worst_error_pct"] <= 30
    return 0 if ok else 1


BENCHMARKS = {
    "simulate": Benchmark(
        "the simulator's speed at full scale (under 10 s), and its accuracy against real CPU runs",
        _arguments, _main,
        "  hetrun bench simulate scale                 # DeepSeek-R1 decode on 144 H800s, 1,000 requests\n"
        "  hetrun bench simulate deepseek              # simulated vs published DeepSeek serving\n"
        "  hetrun bench simulate requests              # 10,000 requests, request level, 144 + 3 x 32 H800s (< 30 s)\n"
        "  hetrun bench simulate published --json v.json   # every profiles/published case, published vs simulated\n"
        "  hetrun bench simulate accuracy HOST.yaml    # predicted vs measured MoE layers (after calibrate;\n"
        "                                              # needs a quiet machine)\n"
        "  hetrun bench simulate all HOST.yaml --quick --json accuracy.json"),
}
