"""`hetrun bench precision`: one expert at every precision on this CPU, against the BF16 graph in the same run.

For each real CPU runtime (onnxruntime, OpenVINO) and each precision: the expert graph's output error against
FP32, its weight bytes, and at 1 token and a few larger token counts the time per call, the speed against the
BF16 graph of the same runtime, and the achieved read bandwidth (weight bytes / time) against the machine's.
Timings interleave all graphs round by round and keep each one's best round, so that load from other
processes hits every precision alike; compare ratios within one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from rich.table import Table

from hetrun.backends.onnxruntime import session_options
from hetrun.backends.registry import probe_backend, require_backend
from hetrun.bench import Benchmark, comma_list
from hetrun.errors import HetrunError
from hetrun.files import print_json, table_console
from hetrun.formats import FORMATS
from hetrun.profile import device_catalog, load_profile
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.weights import ExpertWeights

RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_TOKENS = (1, 16, 128, 512)


def gaussian_expert(hidden: int, intermediate: int, seed: int = 0):
    """A SwiGLU expert with Gaussian weights scaled by 1/sqrt(fan-in)."""
    rng = np.random.default_rng(seed)
    return ExpertWeights((rng.standard_normal((intermediate, hidden)) / np.sqrt(hidden)).astype(np.float32),
                         (rng.standard_normal((intermediate, hidden)) / np.sqrt(hidden)).astype(np.float32),
                         (rng.standard_normal((hidden, intermediate)) / np.sqrt(intermediate)).astype(np.float32))


def cpu_backend(runtime: str, precision: str, threads: int | None):
    """A backend instance for this machine's CPU (catalog type host-cpu) through `runtime`."""
    prof = load_profile({"name": "bench", "devices": [{"id": "cpu", "type": "host-cpu", "backend": runtime}]})
    return require_backend(runtime)(prof.devices[0], precision, threads)


def ort_resident_bytes(graph: bytes) -> int:
    """Bytes of weights an onnxruntime CPU session holds after its load-time optimizations (hetrun's options)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(None)
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    sizes = [onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer]
    return int(sum(n for n in sizes if n > 4096))  # weights, not shape constants


def _time_call(fn, x: np.ndarray, seconds: float) -> float:
    fn(x)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt / n


def run_bench(hidden: int = 1024, intermediate: int = 2816, tokens=DEFAULT_TOKENS, precisions=None,
              runtimes=RUNTIMES, rounds: int = 5, seconds: float = 0.05, threads: int | None = None,
              progress=None) -> dict:
    """Measure every (runtime, precision) expert graph; see the module docstring. Returns a JSON-able dict."""
    precisions = list(precisions or FORMATS)
    if "bf16" not in precisions:
        precisions = ["bf16"] + precisions  # the baseline
    bad = [p for p in precisions if p not in FORMATS]
    if bad:
        raise HetrunError(f"unknown precision '{bad[0]}'; use some of: {', '.join(FORMATS)}")
    w = gaussian_expert(hidden, intermediate)
    x_err = np.random.default_rng(1).standard_normal((64, hidden)).astype(np.float32)
    ref = w.reference(x_err)
    sessions, results, skipped = {}, {}, {}
    for rt in runtimes:
        avail = probe_backend(rt)
        if not avail.ok:
            skipped[rt] = avail.reason
            continue
        for p in precisions:
            if progress:
                progress(f"compiling {p} for {rt}")
            be = cpu_backend(rt, p, threads)
            g = build_expert_graph(w, p, target=be.graph_target())
            sess = be.load(g.serialize(), f"bench.{p}", g.meta)
            y = sess.run(x_err)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) if np.isfinite(y).all() else None
            sessions[(rt, p)] = sess
            results[(rt, p)] = {"runtime": rt, "precision": p, "rel_err": err, "weight_bytes": g.weight_bytes,
                                "onnx_bytes": g.onnx_bytes, "seconds": {},
                                "resident_bytes": ort_resident_bytes(g.serialize()) if rt == "onnxruntime" else None}
    rng = np.random.default_rng(2)
    for t in tokens:
        if progress:
            progress(f"timing {t} token(s)")
        x = rng.standard_normal((t, hidden)).astype(np.float32)
        best = {k: float("inf") for k in sessions}
        for _ in range(rounds):
            for k, sess in sessions.items():
                best[k] = min(best[k], _time_call(sess.run, x, seconds))
        for k, s in best.items():
            results[k]["seconds"][str(t)] = s  # str keys: the same in JSON
    for (rt, p), r in results.items():
        base = results.get((rt, "bf16"))
        r["vs_bf16"] = {t: base["seconds"][t] / s for t, s in r["seconds"].items()} if base else {}
        r["gbs"] = {t: r["weight_bytes"] / s / 1e9 for t, s in r["seconds"].items()}
    return {"hidden": hidden, "intermediate": intermediate, "tokens": list(tokens), "threads": threads,
            "rounds": rounds, "results": list(results.values()), "skipped": skipped}


def _print(report: dict, bandwidth: float) -> None:
    c = table_console(160)
    toks = report["tokens"]
    for rt in RUNTIMES:
        rows = [r for r in report["results"] if r["runtime"] == rt]
        if not rows:
            continue
        t = Table(title=f"{rt}: one expert D={report['hidden']} I={report['intermediate']} on this CPU "
                        f"({report['threads']} threads); x BF16 = BF16 time / this time")
        held = rt == "onnxruntime"
        cols = ["precision", "err vs FP32", "weight MB"] + (["held MB"] if held else [])
        for col in cols + [f"{n} tok: ms  x BF16" for n in toks] + [f"GB/s @{toks[0]} tok"]:
            t.add_column(col, justify="left" if col == "precision" else "right")
        for r in rows:
            cells = [r["precision"], "n/a" if r["rel_err"] is None else f"{100 * r['rel_err']:.2f}%",
                     f"{r['weight_bytes'] / 1e6:.2f}"] + ([f"{r['resident_bytes'] / 1e6:.2f}"] if held else [])
            cells += [f"{1e3 * r['seconds'][str(n)]:.3f}  {r['vs_bf16'].get(str(n), float('nan')):.2f}x" for n in toks]
            g = r["gbs"][str(toks[0])]
            cells.append(f"{g:.1f} ({100 * g / bandwidth:.0f}%)")
            t.add_row(*cells)
        c.print(t)
    c.print(f"GB/s: the format's weight bytes (scales included) over the time of one call, against this machine's "
            f"{bandwidth:g} GB/s read bandwidth. Best of {report['rounds']} interleaved rounds. held MB: the weights "
            "an onnxruntime session keeps after its load-time optimizations (formats it has no exact CPU kernel "
            "for are expanded to FP32 there).")
    for rt, why in report["skipped"].items():
        c.print(f"{rt}: not measured ({why})")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden size D (default 1024, Mixtral-bench)")
    p.add_argument("--intermediate", type=int, default=2816, help="expert intermediate size I (default 2816)")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="token counts, comma separated")
    p.add_argument("--precisions", default=",".join(FORMATS), help="precisions, comma separated (default all)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="onnxruntime, openvino (default both)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds; each graph keeps its best (default 5)")
    p.add_argument("--seconds", type=float, default=0.05, help="time per graph per round (default 0.05)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per session (default: all cores)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="this machine's read bandwidth in GB/s (default: the host-cpu catalog entry's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _main(args: argparse.Namespace) -> int:
    tokens = comma_list(args.tokens, int)
    runtimes = comma_list(args.runtimes)
    if not tokens or min(tokens) < 1:
        raise HetrunError("--tokens needs positive token counts, e.g. 1,16,128")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise HetrunError(f"unknown runtime '{unknown[0]}'; use onnxruntime and/or openvino")
    if args.rounds < 1 or args.seconds <= 0 or args.hidden < 1 or args.intermediate < 1:
        raise HetrunError("--rounds, --seconds, --hidden and --intermediate must be positive")
    bandwidth = args.bandwidth or device_catalog()["host-cpu"].memory_bw_gbs
    quiet = args.json or not sys.stderr.isatty()
    report = run_bench(args.hidden, args.intermediate, tokens, comma_list(args.precisions), runtimes, args.rounds,
                       args.seconds, args.threads, progress=None if quiet else lambda m: print(m, file=sys.stderr))
    report["bandwidth_gbs"] = bandwidth
    if args.json:
        print_json(report)
    else:
        _print(report, bandwidth)
    return 0


BENCHMARKS = {
    "precision": Benchmark(
        "one expert at every precision on this CPU, against the BF16 graph in the same run",
        _arguments, _main,
        "  hetrun bench precision\n"
        "  hetrun bench precision --tokens 1,64 --runtimes openvino --json\n"
        "  hetrun bench precision --hidden 256 --intermediate 512 --precisions fp8,int4 --rounds 2"),
}
