"""`hetrun bench placement`: plan the DeepSeek-R1 shape at scale, and show the planner's figures against EPLB.

R1: 58 MoE layers, 256 routed experts, 32 redundant, 288 slots per layer. Each case plans through
`hetrun.plan()` (precision, cost model, memory, solver, predictions: the whole planner, not the solver alone) on a
Zipf-shaped load (exponent 1, shuffled per layer, x0.7-1.3 noise) and reports the wall and CPU time of planning
(best of --repeat), the modeled step time against its lower bound and against EPLB on the same devices with the
same cost model (equal slots, even split, as EPLB routes; the better of its hierarchical and global policies),
and optionally a 32-move rebalance after the load drifts. Cases: DeepSeek's own deployments (EP32 prefill on 4
nodes, EP144 decode on 18 nodes of H800), the same sizes half H100 / half Ascend 910B, and the built-in 8 H100 +
8 Ascend 910B + 4 Xeon profile. Shared experts sit on the dense device (the planner's default) in every case.

Then EPLB's README example on identical GPUs (per-layer max/mean per-GPU load, EPLB: 1.208 and 1.242) and random
Zipf tables on identical GPUs against EPLB's hierarchical and global policies.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hetrun.bench import Benchmark
from hetrun.errors import HetrunError
from hetrun.files import print_json
from hetrun.placement.eplb import eplb_policy, gpu_loads
from hetrun.placement.planner import eplb_baseline, plan
from hetrun.placement.rebalance import rebalance_plan
from hetrun.spec import MoESpec, RouterSpec

R1_REDUNDANT = 32

# EPLB README example (DeepSeek's eplb repository): 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes x 4 GPUs.
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_EPLB = (1.2081316553727008, 1.2422145328719723)


def zipf_load(rng, layers: int, experts: int, s: float = 1.0) -> np.ndarray:
    """[layers, experts] Zipf-shaped token counts, shuffled per layer, with +-30% noise."""
    base = 1.0 / np.arange(1, experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(layers)]) * rng.uniform(0.7, 1.3, (layers, experts)) * 4096


def mixed_profile(devices: int, nodes: int) -> dict:
    """Half H100 (FP8), half Ascend 910B2 (FP16), `nodes` equal nodes, H100 nodes first."""
    per = devices // nodes
    half = nodes // 2
    return {"name": f"ep{devices}-h100-910b", "description": "benchmark profile",
            "devices": [{"id": "h100", "type": "h100-sxm", "count": half * per, "per_node": per, "node": 0},
                        {"id": "ascend", "type": "ascend-910b2", "count": (nodes - half) * per, "per_node": per,
                         "node": half}],
            "links": {"inter_node": {"bandwidth_gbs": 50, "efficiency": 0.8}}, "dense_device": "h100"}


def timed(fn, repeat: int):
    best_wall = best_cpu = np.inf
    out = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return out, best_wall, best_cpu


def r1_cases(args) -> list[dict]:
    spec = MoESpec.from_preset("deepseek-r1")
    rng = np.random.default_rng(args.seed)
    load = zipf_load(rng, spec.num_moe_layers, spec.num_experts)
    drifted = load * rng.uniform(0.5, 2.0, load.shape)
    cases = [("EP32 H800 (deepseek-prefill-h800)", "deepseek-prefill-h800"),
             ("EP32 16 H100 + 16 910B", mixed_profile(32, 4)),
             ("EP144 H800 (deepseek-decode-h800)", "deepseek-decode-h800"),
             ("EP144 72 H100 + 72 910B", mixed_profile(144, 18)),
             ("8 H100 + 8 910B + 4 Xeon", "mixed-h100-910b-xeon")]
    rows = []
    for name, profile in cases:
        p, wall, cpu = timed(lambda: plan(spec, profile, load=load, redundant_experts=R1_REDUNDANT), args.repeat)
        pr = p.predicted
        eplb = eplb_baseline(p, load)
        row = {"case": name, "devices": len(p.device_ids), "plan_s": wall, "cpu_s": cpu,
               "step_ms": pr["step_time_s"] * 1e3, "bound_ms": pr["lower_bound_s"] * 1e3,
               "eplb_ms": eplb["step_time_s"] * 1e3, "eplb_slots": eplb["slots"],
               "routed_ms": pr["routed_step_time_s"] * 1e3, "eplb_routed_ms": eplb["routed_step_time_s"] * 1e3}
        if args.rebalance:
            (_, moved), rb, _ = timed(lambda: rebalance_plan(p, drifted, max_moves=32), 1)
            row.update({"rebalance32_s": rb, "rebalance_bytes": moved})
        rows.append(row)
    return rows


def readme_case() -> dict:
    spec = MoESpec.from_preset("tiny").replace(num_shared_experts=0, shared_intermediate_size=0)  # 2 x 12, 4 groups
    prof = {"name": "readme-8gpu", "devices": [{"id": "gpu", "type": "h800", "count": 8, "per_node": 4}],
            "links": {"inter_node": {"bandwidth_gbs": 50}}}
    w = np.array(README_WEIGHT, dtype=np.float64)
    out = {}
    for policy in ("auto", "eplb"):
        p = plan(spec, prof, load=w, redundant_experts=4, policy=policy)
        out[policy] = gpu_max_over_mean(p, w).tolist()
    return {"hetrun": out["auto"], "eplb_through_plan": out["eplb"], "eplb_readme": list(README_EPLB)}


def gpu_max_over_mean(p, w: np.ndarray) -> np.ndarray:
    """[L] max / mean tokens per device of a plan under load w [L, E]."""
    loads = p.per_device(np.take_along_axis(w, p.phy2log, 1) * p.share)  # [L, D]
    return loads.max(1) / loads.mean(1)


def zipf_identical_cases(seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        L, E = int(rng.integers(4, 9)), int(rng.choice([16, 32, 64]))
        G, N, groups = int(rng.choice([4, 8])), 2, int(rng.choice([2, 4, 8]))
        R = E + G * int(rng.integers(0, 4))
        w = zipf_load(rng, L, E, s=rng.uniform(0.6, 1.6))
        spec = MoESpec(name=f"zipf-{seed}", family="deepseek_v3", num_layers=L, hidden_size=256,
                       moe_intermediate_size=128, num_experts=E,
                       router=RouterSpec("sigmoid_grouped", 4, True, groups, 1))
        prof = {"name": "identical", "devices": [{"id": "gpu", "type": "h800", "count": G, "per_node": G // N}],
                "links": {"inter_node": {"bandwidth_gbs": 50}}}
        p = plan(spec, prof, load=w, redundant_experts=R - E)
        ours = gpu_max_over_mean(p, w)
        mean = w.sum(1) / G
        hier = gpu_loads(w, eplb_policy(w, R, groups, N, G, "hierarchical")[0], G).max(1) / mean
        glob = gpu_loads(w, eplb_policy(w, R, groups, N, G, "global")[0], G).max(1) / mean
        rows.append({"seed": seed, "L": L, "E": E, "R": R, "G": G, "hetrun": ours.mean(), "hierarchical": hier.mean(),
                     "global": glob.mean(), "never_worse": bool((ours <= np.minimum(hier, glob) * (1 + 1e-9)).all())})
    return rows


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--repeat", type=int, default=3, help="plan each case this many times; best time counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebalance", action="store_true", help="also time a 32-move Plan.rebalance after load drift")
    ap.add_argument("--seeds", type=int, default=8, help="random Zipf tables on identical GPUs")
    ap.add_argument("--json", action="store_true")


def _main(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.seeds < 0:
        raise HetrunError("hetrun bench placement: --repeat must be >= 1 and --seeds >= 0 (see --help)")
    r1 = r1_cases(args)
    readme = readme_case()
    zipf = zipf_identical_cases(args.seeds)
    if args.json:
        print_json({"r1": r1, "readme": readme, "zipf_identical": zipf})
        return 0
    print("step: modeled MoE time per step of 4096 tokens, shared experts on the dense device included; EPLB: the same "
          "devices, equal slots, even split, same cost model; routed: routed experts alone")
    print(f"DeepSeek-R1 shape: 58 MoE layers x 256 experts + {R1_REDUNDANT} redundant = 288 slots; Zipf load; "
          f"hetrun.plan() best of {args.repeat}")
    head = (f"{'case':>36} {'dev':>4} {'plan s':>7} {'cpu s':>6} {'step ms':>8} {'/bound':>7} {'EPLB ms':>8} "
            f"{'vs EPLB':>8} {'routed vs EPLB':>15}")
    if args.rebalance:
        head += f" {'rebal32 s':>9} {'moved GB':>8}"
    print(head)
    for r in r1:
        line = (f"{r['case']:>36} {r['devices']:>4} {r['plan_s']:7.2f} {r['cpu_s']:6.2f} {r['step_ms']:8.3f} "
                f"{r['step_ms'] / r['bound_ms']:7.4f} {r['eplb_ms']:8.3f} "
                f"{100 * (r['step_ms'] / r['eplb_ms'] - 1):+7.1f}% "
                f"{100 * (r['routed_ms'] / r['eplb_routed_ms'] - 1):+14.1f}%")
        if args.rebalance:
            line += f" {r['rebalance32_s']:9.2f} {r['rebalance_bytes'] / 1e9:8.2f}"
        print(line)
    print(f"EPLB README example, per-layer max/mean GPU load: hetrun {np.round(readme['hetrun'], 4).tolist()}, "
          f"EPLB through plan(policy='eplb') {np.round(readme['eplb_through_plan'], 4).tolist()}, "
          f"EPLB README {np.round(readme['eplb_readme'], 4).tolist()}")
    if zipf:
        print("random Zipf tables on identical GPUs, mean per-layer max/mean GPU load:")
        print(f"{'seed':>5} {'L':>3} {'E':>4} {'R':>4} {'G':>3} {'hetrun':>8} {'EPLB hier':>10} {'EPLB glob':>10} "
              f"{'never worse':>12}")
        for z in zipf:
            print(f"{z['seed']:>5} {z['L']:>3} {z['E']:>4} {z['R']:>4} {z['G']:>3} {z['hetrun']:8.4f} "
                  f"{z['hierarchical']:10.4f} {z['global']:10.4f} {str(z['never_worse']):>12}")
    return 0


BENCHMARKS = {
    "placement": Benchmark(
        "plan the DeepSeek-R1 shape at scale, and show the planner's figures against EPLB",
        _arguments, _main,
        "  hetrun bench placement\n"
        "  hetrun bench placement --repeat 1 --seeds 2 --rebalance\n"
        "  hetrun bench placement --json"),
}
