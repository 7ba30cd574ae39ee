"""Benchmark: one Mixtral-shaped MoE layer (preset mixtral-bench, random weights) at 512 tokens, on 2 and 4 ranks of
this host against one process; the all-to-all share of step time and the bytes moved, against the prediction for
the same plan on the calibrated loopback link (profiles/loopback-2.yaml, loopback-4.yaml).

    hetrun bench distributed                 # 1 process vs 2 and 4 ranks, both dense layouts
    hetrun bench distributed --calibrate     # first fit the loopback link (gloo over 127.0.0.1)

Ranks start with torchrun (torch.distributed.run), each running `hetrun bench distributed --worker`. Every rank
routes the same hidden states: with dense parts on every rank (DP-attention + EP) rank r takes tokens
[r*T/W, (r+1)*T/W); with dense parts on rank 0 it takes them all.
The prediction routes the same tokens, counts the rows each rank sends and receives, and charges
  count exchange: link latency;  dispatch, combine: latency + max(sent, received) bytes / (bandwidth x efficiency)
  (hetrun.sim.comm.alltoall_seconds);
  experts: hetrun.roofline.expert_seconds on the profile's device type per local slot, summed per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from hetrun.backends.registry import require_backend
from hetrun.bench import Benchmark, comma_list
from hetrun.distributed.moe import distributed_runtime
from hetrun.distributed.ranks import resolve_layout
from hetrun.distributed.world import current_world, join_world
from hetrun.errors import HetrunError
from hetrun.files import write_atomic
from hetrun.placement.planner import simple_plan
from hetrun.profile import Profile, load_profile
from hetrun.roofline import expert_seconds, swiglu_flops_bytes
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.routing import route, router_logits
from hetrun.runtime.weights import random_layer_weights
from hetrun.sim.comm import Links, alltoall_seconds
from hetrun.spec import MoESpec

SPEC = "mixtral-bench"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _profile(name, dense: str | None = None):
    prof = load_profile(name)
    if prof.model.distributed is None:
        raise HetrunError(f"profile '{prof.name}' has no distributed: section; use loopback-2 or loopback-4")
    if dense is not None:
        d = prof.model.distributed.model_copy(update={"dense": dense})
        prof = Profile(prof.model.model_copy(update={"distributed": d}), prof.devices, prof.source)
    return prof


def _setup(profile, tokens: int, precision: str):
    """Spec, plan (round robin over the profile's devices), layer weights and hidden states [T, D]."""
    spec = MoESpec.from_preset(SPEC)
    weights = random_layer_weights(spec, 0, seed=0)
    hidden = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(1))  # [T, D]
    return spec, simple_plan(spec, profile, precision), weights, hidden


def _token_slice(tokens: int, world: int, rank: int, dense: str) -> slice:
    if dense == "rank0":
        return slice(0, tokens) if rank == 0 else slice(0, 0)
    per = tokens // world
    return slice(rank * per, tokens if rank == world - 1 else (rank + 1) * per)


# ---- one process --------------------------------------------------------------------------------------------------

def one_process(profile_name: str, tokens: int, reps: int, warmup: int, precision: str, threads: int) -> dict:
    """Median step time of the whole layer in one process (every device here), and its expert share."""
    profile = _profile(profile_name)
    spec, plan, weights, hidden = _setup(profile, tokens, precision)
    rt = ExpertRuntime(plan, profile, [weights], threads=threads)
    layer = rt.layers[0]
    with torch.no_grad():
        for _ in range(warmup):
            layer(hidden)
        rt.stats.reset()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(hidden)
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.mean(times), "expert_s": rt.stats.expert_s / reps}


# ---- ranks (run under torchrun) -----------------------------------------------------------------------------------

def worker(args) -> int:
    """One rank of the timed run; rank 0 writes the merged result to --result."""
    torch.set_num_threads(1)
    profile = _profile(args.profile, args.dense)
    spec, plan, weights, hidden = _setup(profile, args.tokens, args.precision)
    rt = distributed_runtime(plan, profile, [weights], threads=args.threads)  # expert-only ranks serve in here
    world = current_world()
    payload = None
    if rt.holds_dense:
        x = hidden[_token_slice(args.tokens, world.size, world.rank, args.dense)]
        layer = rt.layers[0]
        lockstep = args.dense == "every_rank"
        with torch.no_grad():
            for _ in range(args.warmup):
                layer(x)
            before = rt.rank_stats.to_dict()
            times = []
            for _ in range(args.reps):
                if lockstep:  # start every rank's step together, so the slowest rank sets the step time
                    world.run("bench barrier", dist.barrier, group=world.control_group)
                t0 = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - t0)
        payload = {"step_s": times, "before": before}
    gathered = rt.finish(payload)
    if world.rank == 0:
        write_atomic(args.result, json.dumps(_merge(gathered, args)))
    world.close()
    return 0


def _per_step(g: dict, steps: int, warmup: int) -> dict:
    """A rank's statistics per timed step: after minus before on ranks that timed, the mean over all otherwise."""
    s = g["stats"]
    keys = ("tokens_sent", "tokens_received", "tokens_computed", "bytes_sent", "bytes_received", "header_s", "a2a_s",
            "expert_s", "step_s")
    if g["payload"]:
        b = g["payload"]["before"]
        return {k: (s[k] - b[k]) / steps for k in keys}
    return {k: s[k] / (steps + warmup) for k in keys}


def _merge(gathered: list[dict], args) -> dict:
    reps = args.reps
    times = np.array([g["payload"]["step_s"] for g in gathered if g["payload"]])  # [dense ranks, reps]
    step = float(times.max(axis=0).mean())  # a step ends when its slowest rank is done; means, like the stats
    ranks = [_per_step(g, reps, args.warmup) for g in gathered]
    # The rank with the most expert work sets the pace; its peers wait for it inside their collectives, so its own
    # all-to-all time is the transfer, and the others' the transfer plus that wait.
    crit = max(range(len(ranks)), key=lambda r: ranks[r]["expert_s"])
    return {"world": len(gathered), "dense": args.dense, "step_s": step, "ranks": ranks, "critical_rank": crit,
            "bytes_per_step": sum(r["bytes_sent"] for r in ranks),
            "a2a_s": ranks[crit]["a2a_s"], "a2a_max_s": max(r["a2a_s"] for r in ranks),
            "header_s": ranks[crit]["header_s"], "expert_s": ranks[crit]["expert_s"]}


def calibrate_worker(args) -> int:
    """Time all_to_all_single of growing equal splits and each rank's expert throughput while all ranks compute."""
    torch.set_num_threads(1)
    profile = _profile(args.profile)
    world = join_world(profile, resolve_layout(profile))
    world.start_heartbeat()
    w, d = world.size, 1024
    results = []
    for rows in (0, 1, 4, 16, 64, 256, 1024):  # rows of 4 KiB to every rank
        src = torch.randn(rows * w, d)
        dst = torch.empty_like(src)
        samples = []
        for _ in range(args.reps + 2):
            world.run("bench barrier", dist.barrier, group=world.control_group)
            t0 = time.perf_counter()
            world.run("calibration all-to-all", dist.all_to_all_single, dst, src, group=world.data_group)
            samples.append(time.perf_counter() - t0)
        results.append({"bytes_remote": rows * (w - 1) * d * 4, "s": statistics.median(samples[2:])})
    # Expert rate: this rank's own experts in turn (distinct weights, as in a step: they do not stay in cache),
    # the rows each gets at uniform load, every rank busy at once.
    spec, plan, weights, hidden = _setup(profile, args.tokens, "fp32")
    layout = resolve_layout(profile)
    dev = profile.group(layout.ranks[world.rank][0])[0]
    backend = require_backend(dev.backend if dev.backend != "simulated" else "onnxruntime")(dev, "fp32", args.threads)
    mine_e = sorted({int(plan.phy2log[0][r]) for r in range(plan.num_slots)
                     if layout.rank_of(plan.device_ids[plan.device_of[0][r]]) == world.rank})
    sessions = [backend.load(build_expert_graph(weights.experts[e], "fp32").serialize(), f"E{e}", {}) for e in mine_e]
    x = hidden[:args.tokens * spec.router.top_k // spec.num_experts].numpy()  # [rows, D]
    for sess in sessions:
        sess.run(x)
    world.run("bench barrier", dist.barrier, group=world.control_group)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        for sess in sessions:
            sess.run(x)
    elapsed = time.perf_counter() - t0
    call_flops, _ = swiglu_flops_bytes(x.shape[0], spec.hidden_size, spec.moe_intermediate_size, 0.0, 0.0)
    flops = float(call_flops) * args.reps * len(sessions) / elapsed
    mine = {"a2a": results, "expert_flops": flops}
    out = world.gather_json("gathering calibration", mine, dst=0)  # JSON, never pickle
    if world.rank == 0:
        a2a = [{"bytes_remote": r["bytes_remote"], "s": max(o["a2a"][i]["s"] for o in out)}
               for i, r in enumerate(results)]
        write_atomic(args.result, json.dumps({"a2a": a2a, "expert_flops": [o["expert_flops"] for o in out]}))
    world.close()
    return 0


# ---- prediction ---------------------------------------------------------------------------------------------------

def calibrated_profile(name: str, cal: dict):
    """The loopback profile with its link and each rank's FP32 rate replaced by a fresh calibration.

    Every rank gets a device type of its own (ranks differ: OpenVINO and onnxruntime run the same expert at
    different speeds), scaled from the profile's type by the rate measured on that rank.
    """
    prof = load_profile(name)
    layout = resolve_layout(prof)
    data = prof.model.model_dump()
    link = {"name": "gloo loopback (calibrated)", "bandwidth_gbs": cal["bandwidth_gbs"],
            "latency_us": cal["latency_us"], "efficiency": 1.0}
    data["links"]["intra_node"] = link
    groups = []
    for g in data["devices"]:  # one group per device, so each rank's device can have its own type
        for i in range(g["count"]):
            groups.append({**g, "id": f"{g['id']}-{i}" if g["count"] > 1 else g["id"], "count": 1, "per_node": None})
    for gi, g in enumerate(groups):
        dev_id = prof.devices[gi].id
        base = data["device_types"].get(g["type"]) or prof.devices[gi].type.model_dump()
        rate = cal["expert_flops"][layout.rank_of(dev_id)] / 1e12
        scale = rate / (base["tflops"]["fp32"] * base["compute_efficiency"])
        name_r = f"{base['name']}-{g['id']}"
        data["device_types"][name_r] = {**base, "name": name_r, "scale_up": link,
                                        "tflops": {k: v * scale for k, v in base["tflops"].items()}}
        g["type"] = name_r
    data["devices"] = groups
    data["distributed"]["ranks"] = "per_device"
    return load_profile(data)


def predict(profile_name, dense: str, tokens: int, precision: str) -> dict:
    """Step time, all-to-all share and bytes the cost model gives for this plan, tokens and loopback link."""
    profile = _profile(profile_name, dense)
    layout = resolve_layout(profile)
    spec, plan, weights, hidden = _setup(profile, tokens, precision)
    w = layout.world_size
    ids, _ = route(router_logits(hidden, weights.gate, spec.router, weights.gate_bias), spec.router,
                   weights.correction_bias)  # [T, K]
    slots = plan.log2phy[0][ids.reshape(-1).numpy(), 0]  # [T*K] one slot per expert in the round-robin plan
    src = np.repeat(np.arange(tokens), spec.router.top_k)  # [T*K] token of each pair
    src_rank = np.zeros_like(src)
    for r in range(w):
        sl = _token_slice(tokens, w, r, dense)
        src_rank[(src >= (sl.start or 0)) & (src < sl.stop)] = r
    slot_rank = np.array([layout.rank_of(plan.device_ids[d]) for d in plan.device_of[0]])  # [R]
    rows = np.zeros((w, w), np.int64)  # [source rank, destination rank]
    np.add.at(rows, (src_rank, slot_rank[slots]), 1)
    remote = rows - np.diag(np.diag(rows))
    sent, received = remote.sum(1), remote.sum(0)  # [W]
    token_bytes = spec.hidden_size * 4.0  # fp32 on the wire
    devices = [profile.group(layout.ranks[r][0])[0] for r in range(w)]
    links = [profile.link(devices[r], devices[(r + 1) % w]) for r in range(w)]
    zero = np.zeros(w)
    a2a = np.asarray(alltoall_seconds(Links(None, tuple(links)), zero, zero, sent.astype(float),
                                      received.astype(float), token_bytes))  # [W]
    header = max(x.latency_us for x in links) * 1e-6
    graph = build_expert_graph(weights.experts[0], precision)
    per_slot = np.bincount(slots, minlength=plan.num_slots)  # [R]
    compute = np.zeros(w)
    for r_slot, n in enumerate(per_slot.tolist()):
        dev = profile.group(plan.device_ids[plan.device_of[0][r_slot]])[0]
        compute[slot_rank[r_slot]] += expert_seconds(dev.type, precision, n, spec.hidden_size,
                                                     spec.moe_intermediate_size, graph.weight_bytes,
                                                     4.0 if precision == "fp32" else 2.0)
    step = header + 2 * float(a2a.max()) + float(compute.max())
    return {"step_s": step, "a2a_s": 2 * float(a2a.max()), "header_s": header, "expert_s": float(compute.max()),
            "bytes_per_step": float(2 * sent.sum() * token_bytes), "model": "hetrun.sim.comm.alltoall_seconds"}


# ---- orchestration ------------------------------------------------------------------------------------------------

def _torchrun(world: int, argv: list[str], timeout: float) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "hetrun", "bench", "distributed", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise HetrunError(f"torchrun with {world} ranks failed (exit {proc.returncode}): {tail[-400:]}")


def _fit_link(points: list[dict]) -> tuple[float, float]:
    """(latency_us, bandwidth_gbs) of t = latency + bytes / bandwidth, least squares over the timed sizes."""
    x = np.array([p["bytes_remote"] for p in points], dtype=float)
    y = np.array([p["s"] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    return max(intercept, 0.0) * 1e6, (1.0 / slope / 1e9) if slope > 0 else float("inf")


def run_bench(worlds: list[int], dense_layouts: list[str], tokens: int, reps: int, warmup: int, precision: str,
              calibrate: bool) -> dict:
    """Every measurement and prediction, as a dict (also printed as tables by `hetrun bench distributed`)."""
    out = {"spec": SPEC, "tokens": tokens, "precision": precision, "cores": _cores(), "runs": [], "calibration": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if calibrate:
            for w in worlds:
                res = os.path.join(tmp, f"cal{w}.json")
                _torchrun(w, ["--calibrate-worker", "--profile", f"loopback-{w}", "--reps", str(max(reps, 5)),
                              "--tokens", str(tokens), "--threads", str(max(1, _cores() // w)), "--result", res], 600)
                with open(res) as f:
                    cal = json.load(f)
                lat, bw = _fit_link(cal["a2a"])
                cal.update(latency_us=lat, bandwidth_gbs=bw)
                out["calibration"][w] = cal
        for w in worlds:
            # the faster of one thread and every core per expert session
            base = min((one_process(f"loopback-{w}", tokens, reps, warmup, precision, t) | {"threads": t}
                        for t in sorted({1, _cores()})), key=lambda b: b["step_s"])
            for dense in dense_layouts:
                res = os.path.join(tmp, f"run{w}{dense}.json")
                _torchrun(w, ["--worker", "--profile", f"loopback-{w}", "--dense", dense, "--tokens", str(tokens),
                              "--reps", str(reps), "--warmup", str(warmup), "--precision", precision,
                              "--threads", str(max(1, _cores() // w)), "--result", res], 600)
                with open(res) as f:
                    measured = json.load(f)
                prof = calibrated_profile(f"loopback-{w}", out["calibration"][w]) if calibrate else f"loopback-{w}"
                out["runs"].append({"world": w, "dense": dense, "one_process": base, "measured": measured,
                                    "predicted": predict(prof, dense, tokens, precision)})
    return out


def _print(result: dict) -> None:
    for w, cal in result["calibration"].items():
        print(f"loopback link, {w} ranks: latency {cal['latency_us']:.0f} us, "
              f"bandwidth {cal['bandwidth_gbs']:.2f} GB/s; "
              f"expert fp32 per rank while all compute: "
              f"{', '.join(f'{f / 1e9:.0f}' for f in cal['expert_flops'])} GFLOP/s (predictions below use these)")
    print(f"{result['spec']} layer, {result['tokens']} tokens, {result['precision']}, {result['cores']} cores")
    head = ["ranks", "dense", "1-proc ms", "ranks ms", "speedup", "a2a ms", "a2a %", "(incl. wait)", "counts ms",
            "expert ms", "MB/step", "| pred ms", "a2a ms", "a2a %", "MB/step"]
    rows = []
    for r in result["runs"]:
        m, p, one = r["measured"], r["predicted"], r["one_process"]
        rows.append([str(r["world"]), r["dense"], f"{one['step_s'] * 1e3:.1f}", f"{m['step_s'] * 1e3:.1f}",
                     f"{one['step_s'] / m['step_s']:.2f}", f"{m['a2a_s'] * 1e3:.1f}",
                     f"{100 * m['a2a_s'] / m['step_s']:.1f}", f"{100 * m['a2a_max_s'] / m['step_s']:.1f}",
                     f"{m['header_s'] * 1e3:.1f}", f"{m['expert_s'] * 1e3:.1f}", f"{m['bytes_per_step'] / 1e6:.2f}",
                     f"| {p['step_s'] * 1e3:.1f}", f"{p['a2a_s'] * 1e3:.1f}", f"{100 * p['a2a_s'] / p['step_s']:.1f}",
                     f"{p['bytes_per_step'] / 1e6:.2f}"])
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(wd) for h, wd in zip(head, widths)))
    for x in rows:
        print("  ".join(c.rjust(wd) for c, wd in zip(x, widths)))
    if result["runs"]:
        print("measured on the rank with the most expert work (it sets the pace): a2a = dispatch + combine "
              "all_to_all_single; (incl. wait) = the largest a2a share of any rank, waiting for that rank included; "
              "counts = the per-step token-count all_gather; MB/step = bytes between ranks, both directions.")
        print(f"predicted: {result['runs'][0]['predicted']['model']} on the loopback link, "
              "hetrun.roofline.expert_seconds on its device type, same plan and tokens; 1-proc: every device in one "
              "process, best of 1 and all threads per session.")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", default="2,4", help="world sizes to run, comma-separated")
    p.add_argument("--dense", default="every_rank,rank0", help="dense layouts: every_rank, rank0 or both")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--calibrate", action="store_true", help="fit the loopback link first and print it")
    p.add_argument("--json", default=None, help="also write every number here")
    # what _torchrun passes to each rank
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibrate-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)


def _main(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(args)
    if args.calibrate_worker:
        return calibrate_worker(args)
    try:
        worlds = comma_list(args.ranks, int)
        dense = comma_list(args.dense)
        bad = [w for w in worlds if w not in (2, 4)] + [d for d in dense if d not in ("every_rank", "rank0")]
        if bad or args.tokens < 1 or args.reps < 1:
            raise HetrunError(f"--ranks takes 2 and/or 4 (loopback-2, loopback-4), --dense every_rank and/or rank0, "
                              f"--tokens and --reps at least 1; got {bad or [args.tokens, args.reps]}")
        result = run_bench(worlds, dense, args.tokens, args.reps, args.warmup, args.precision, args.calibrate)
    except ValueError as e:
        raise HetrunError(str(e)) from None
    _print(result)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1))
    return 0


BENCHMARKS = {
    "distributed": Benchmark(
        "one MoE layer on 2 and 4 ranks of this host (torchrun) against one process and the cost model",
        _arguments, _main,
        "  hetrun bench distributed                       # 1 process vs 2 and 4 ranks, both dense layouts\n"
        "  hetrun bench distributed --calibrate           # first fit the loopback link (gloo over 127.0.0.1)\n"
        "  hetrun bench distributed --ranks 2 --dense rank0 --tokens 64 --reps 2 --json distributed.json"),
}
