"""Analytic simulation of an MoE deployment at full scale from shapes, the plan and the profiles.

    from hetrun.sim import simulate, compare
    r = simulate("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", phases=("decode",))
    r.row["decode_tokens_per_s_per_node"]

No weights are loaded. Modules: settings (the profile's extra.sim), workload (requests and targets), operators
(FLOPs/bytes per operator), roles (who does what; the expert Plan from hetrun.placement's planner), comm
(all-to-all from the plan), engine (steps, batch growth, prefill queueing), economics ($, J, CO2), run
(simulate/compare), report (table, JSON, CSV, HTML, Chrome trace).
"""

from hetrun.sim.run import Comparison, SimResult, compare, simulate
from hetrun.sim.workload import PRESETS as WORKLOADS
from hetrun.sim.workload import LengthDist, Workload, load_workload

__all__ = ["Comparison", "LengthDist", "SimResult", "WORKLOADS", "Workload", "compare", "load_workload", "simulate"]
