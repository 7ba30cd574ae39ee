"""Placement solver at DeepSeek-R1 scale: 58 MoE layers, 256 experts, 288 slots per layer.

Deployments: EP32 (4 nodes x 8, DeepSeek's prefill shape) and EP144 (18 nodes x 8, decode),
each on identical GPUs and on a half-H100, half-Ascend-910B mix (cost ratio 989 / 354 BF16
TFLOPS). Load: Zipf-shaped per layer, shuffled, with noise. Reports solve time (wall and CPU,
best of --repeat), step time against the lower bound and against EPLB (even split, as EPLB
routes), and the time of a 32-slot rebalance after the load drifts.

    python benchmarks/bench_placement_solver.py [--repeat 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hetrun.placement import eplb_policy, gpu_loads, rebalance, rebalance_experts, solve_placement

L, E, R, GROUPS = 58, 256, 288, 8


def zipf_load(rng, s=1.0):
    base = 1.0 / np.arange(1, E + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(L)]) * rng.uniform(0.7, 1.3, (L, E)) * 4096


def timed(fn, repeat):
    best_wall = best_cpu = np.inf
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return out, best_wall, best_cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    load = zipf_load(rng)
    drifted = load * rng.uniform(0.5, 2.0, load.shape)
    print(f"L={L} E={E} R={R}; times are best of {args.repeat}")
    print(f"{'devices':>26} {'solve s':>8} {'cpu s':>6} {'step/bound':>11} {'step/EPLB':>10} {'rebalance32 s':>14}")
    for D, nodes in [(32, 4), (144, 18)]:
        node_of = np.repeat(np.arange(nodes), D // nodes)
        for name, cost in [("identical", np.ones(D)), ("H100 + 910B", np.where(np.arange(D) < D // 2, 1.0, 989 / 354))]:
            p, wall, cpu = timed(lambda: solve_placement(load, cost, np.full(D, R // D), node_of=node_of,
                                                         num_groups=GROUPS), args.repeat)
            eplb = gpu_loads(load, rebalance_experts(load, R, GROUPS, nodes, D)[0], D, cost).max(1)
            glob = gpu_loads(load, eplb_policy(load, R, GROUPS, nodes, D, policy="global")[0], D, cost).max(1)
            _, rb_wall, _ = timed(lambda: rebalance(p, drifted, cost, max_moves=32), 1)
            print(f"{f'EP{D} {name}':>26} {wall:8.2f} {cpu:6.2f} {np.mean(p.step_time / p.lower_bound):11.4f}"
                  f" {np.mean(p.step_time / np.minimum(eplb, glob)):10.4f} {rb_wall:14.2f}")


if __name__ == "__main__":
    main()
