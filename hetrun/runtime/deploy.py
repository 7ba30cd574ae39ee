"""deploy(): swap a transformers model's MoE blocks for hetrun's dispatcher; everything else stays as it was."""

from __future__ import annotations

import torch

from hetrun.errors import HetrunError, SpecError
from hetrun.placement.plan import Plan
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import Profile, load_profile
from hetrun.runtime.dispatch import ExpertRuntime, MoELayer
from hetrun.runtime.weights import model_layer_weights
from hetrun.spec import MoESpec


class HetrunMoEBlock(torch.nn.Module):
    """Stands where a transformers MoE block stood: hidden [B, S, D] -> [B, S, D] through hetrun's dispatcher."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        return self.layer(hidden_states.reshape(-1, shape[-1])).reshape(shape)


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
        from hetrun.distributed.moe import distributed_runtime
        runtime = distributed_runtime(plan, profile, weights, threads=threads, progress=progress)
    if runtime is None:  # one process runs every device
        runtime = ExpertRuntime(plan, profile, weights, threads=threads, progress=progress)
    for (path, _), layer in zip(layers, runtime.layers):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, HetrunMoEBlock(layer))
    model.hetrun = runtime
    return model

