"""Expert placement: DeepSeek's EPLB for identical GPUs, and a solver for mixed devices."""

from hetrun.placement.eplb import eplb_policy, gpu_loads, rebalance_experts
from hetrun.placement.solver import (
    Placement,
    choose_slots,
    evaluate_placement,
    lower_bound,
    rebalance,
    solve_placement,
)

__all__ = [
    "Placement",
    "choose_slots",
    "eplb_policy",
    "evaluate_placement",
    "gpu_loads",
    "lower_bound",
    "rebalance",
    "rebalance_experts",
    "solve_placement",
]
