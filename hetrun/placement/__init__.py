"""Expert placement: which device holds which expert, for identical devices (EPLB) and mixed ones.

Glossary (as vLLM's EPLB): a logical expert is the model's expert e of a layer; a physical expert, or slot, is
one copy of it on a device; a layer with E experts and R >= E slots has R - E redundant slots for replicas of hot
experts. Modules, from data to policy:
  loads        load tables [L, E]          plan          the Plan (plain data)
  eplb         DeepSeek's EPLB             precisions    which precision each device runs
  checks       solver input checks         device_model  seconds, bytes, dollars per device; predictions
  shares       token split over replicas   pins          pin rules
  bounds       step-time lower bounds      planner       plan(): precision, slots, solver, shared experts
  search       the heterogeneous solver    rebalance     moving experts for a new load
"""

from hetrun.placement.bounds import lower_bound
from hetrun.placement.device_model import DeviceOverrides
from hetrun.placement.eplb import eplb_policy, gpu_loads, rebalance_experts
from hetrun.placement.plan import Plan
from hetrun.placement.planner import eplb_baseline, plan, simple_plan
from hetrun.placement.rebalance import rebalance, rebalance_plan
from hetrun.placement.search import Placement, choose_slots, evaluate_placement, solve_placement

__all__ = [
    "DeviceOverrides",
    "Placement",
    "Plan",
    "choose_slots",
    "eplb_baseline",
    "eplb_policy",
    "evaluate_placement",
    "gpu_loads",
    "lower_bound",
    "plan",
    "rebalance",
    "rebalance_experts",
    "rebalance_plan",
    "simple_plan",
    "solve_placement",
]
