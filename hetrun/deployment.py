"""deploy(): swap a transformers model's MoE blocks for hetrun's dispatcher; everything else stays as it was.

The API edge of the deploy path: the profile is resolved once here, the plan made, and the runtime chosen: one
process (hetrun.runtime.dispatch) or, when the profile lays out ranks, torch.distributed (hetrun.distributed).
"""

from __future__ import annotations

import torch

from hetrun.distributed.moe import distributed_runtime
from hetrun.errors import HetrunError, SpecError
from hetrun.placement.plan import Plan
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import Profile, load_profile
from hetrun.runtime.dispatch import ExpertRuntime, swap_moe_blocks
from hetrun.runtime.weights import model_layer_weights
from hetrun.spec import MoESpec


def deploy(model: torch.nn.Module, profile: "str | Profile" = "mixed-demo", precision: str | None = None,
           plan: Plan | None = None, threads: int | None = None, progress: bool = False) -> torch.nn.Module:
    """Run the model's experts on the profile's devices; returns the same model with its MoE blocks replaced.

    `precision=None` lets each device use its best precision; `"fp32"` forces FP32 everywhere.
    The hetrun runtime (plan, statistics) is attached as `model.hetrun`.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise SpecError(f"{type(model).__name__} has no transformers config; deploy() takes a transformers MoE model")
    spec = MoESpec.from_hf_config(config)
    profile = load_profile(profile)
    if plan is None:
        plan = make_plan(spec, profile, precision=precision)
    elif plan.spec.num_experts != spec.num_experts or plan.num_layers != spec.num_moe_layers:
        raise HetrunError(f"plan was made for '{plan.spec.name}', not this model; re-plan with hetrun.plan()")
    layers = model_layer_weights(spec, model)
    weights = [w for _, w in layers]
    runtime = None
    if profile.model.distributed is not None:  # the profile lays out ranks: under torchrun each rank runs its own part
        runtime = distributed_runtime(plan, profile, weights, threads=threads, progress=progress)
    if runtime is None:  # one process runs every device
        runtime = ExpertRuntime(plan, profile, weights, threads=threads, progress=progress)
    swap_moe_blocks(model, [path for path, _ in layers], runtime.layers)
    model.hetrun = runtime
    return model

