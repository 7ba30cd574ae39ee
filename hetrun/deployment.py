"""deploy(): swap a transformers model's MoE blocks for hetrun's dispatcher; everything else stays as it was.

The API edge of the deploy path: the profile is resolved once here, the plan made, and the runtime chosen: one
process (hetrun.runtime.dispatch) or, when the profile lays out ranks, torch.distributed (hetrun.distributed).

The model is a transformers module or a checkpoint directory. From a directory (hetrun.checkpoint) only the dense
part is read into a model built on the meta device; each expert is read from the shards when its device compiles
it, converted to that device's precision (FP8 and GPTQ checkpoints go onto devices of their own format
unchanged) and dropped. Under torchrun a rank reads only the experts of its own devices, and the dense part only
where the profile runs it.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from hetrun.checkpoint import load_model, open_checkpoint
from hetrun.distributed.moe import distributed_runtime
from hetrun.distributed.ranks import resolve_layout
from hetrun.distributed.world import in_distributed_launch
from hetrun.errors import HetrunError, SpecError
from hetrun.placement.plan import Plan
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import Profile, load_profile
from hetrun.runtime.attention import run_attention
from hetrun.runtime.dense import compute_rest_in_fp32, run_dense_linears
from hetrun.runtime.dispatch import ExpertRuntime, swap_moe_blocks
from hetrun.runtime.memory import release_freed_heap
from hetrun.runtime.model_graph import run_model_graph, why_not
from hetrun.runtime.weights import model_layer_weights, release_sources
from hetrun.spec import MoESpec

log = logging.getLogger("hetrun")


def deploy(model: "torch.nn.Module | str | os.PathLike", profile: "str | Profile" = "mixed-demo",
           precision: str | None = None, plan: Plan | None = None, threads: int | None = None,
           progress: bool = False) -> torch.nn.Module:
    """Run the model's experts on the profile's devices; returns the model with its MoE blocks replaced.

    `model` is a transformers MoE model, or a model directory (config.json and safetensors shards, as
    save_pretrained writes them; DeepSeek-V3 FP8 and GPTQ checkpoints included) read without ever holding the
    whole model. `precision=None` lets each device use its best precision; `"fp32"` forces FP32 everywhere.
    The hetrun runtime (plan, statistics, `memory`: resident bytes per device) is attached as `model.hetrun`.

    A passed-in model is changed only once every expert has compiled (a failure leaves it as it was); a directory's
    model, hetrun's own, has its dense linear layers moved to the dense device first, for less peak memory.

    Afterwards no FP32 or BF16 copy of a routed expert stays alive: a passed-in model's expert tensors are released
    once compiled (kept only when the profile's fallback device may have to compile them on a failure; a directory's
    experts are read again from the files instead).
    """
    profile = load_profile(profile)
    read_here = isinstance(model, (str, os.PathLike))
    if read_here:
        model = checkpoint_model(model, profile)
    config = getattr(model, "config", None)
    if config is None:
        raise SpecError(f"{type(model).__name__} has no transformers config; deploy() takes a transformers MoE model "
                        "or a model directory")
    spec = MoESpec.from_hf_config(config)
    if plan is None:
        plan = make_plan(spec, profile, precision=precision)
    elif plan.spec.num_experts != spec.num_experts or plan.num_layers != spec.num_moe_layers:
        raise HetrunError(f"plan was made for '{plan.spec.name}', not this model; re-plan with hetrun.plan()")
    layers = model_layer_weights(spec, model)
    weights, paths = [w for _, w in layers], [path for path, _ in layers]
    runtime = None
    if profile.model.distributed is not None:  # the profile lays out ranks: under torchrun each rank runs its own part
        runtime = distributed_runtime(plan, profile, weights, threads=threads, progress=progress)
    # A model hetrun read itself has its dense linear layers converted first (an LM head's graph is built and loaded
    # beside its 16-bit weight: then beside the dense part alone, not every expert too); a caller's model is changed
    # only once every expert has compiled, so a failure leaves it as it was.
    dense_first = runtime is None and read_here
    if runtime is None:  # one process runs every device
        runtime = ExpertRuntime(plan, profile, None, threads=threads, progress=progress)
        if _as_one_graph(model, spec, runtime, weights, paths):
            return model
        if not dense_first:
            runtime.compile_layers(weights, progress)
    runtime.dense = run_dense_linears(model, runtime, paths)  # (under torchrun: one-line errors, nothing moves)
    if dense_first:
        runtime.compile_layers(weights, progress)
    swap_moe_blocks(model, paths, runtime.layers)
    compute_rest_in_fp32(model, runtime)
    run_attention(model, runtime)
    fallback = profile.fallback_device
    recompiles = runtime.rebalancer is not None or runtime.cache is not None  # they compile experts again later
    if not recompiles and (fallback is None or fallback.id not in plan.device_ids
                           or not runtime.is_local(plan.device_ids.index(fallback.id))):
        release_sources(weights)  # the replaced blocks' expert tensors are freed with them
    release_freed_heap()  # what compiling freed, back to the OS rather than kept in malloc's arenas
    model.hetrun = runtime
    return model


def _as_one_graph(model: torch.nn.Module, spec: MoESpec, runtime: ExpertRuntime, weights: list, paths: list) -> bool:
    # the profile's model_graph: the whole model as one onnxruntime graph where it can run so (and asked)
    asked = runtime.profile.model.model_graph
    if asked == "off":
        return False
    reason = why_not(model, spec, runtime, weights)
    if reason:
        if asked == "on":
            raise HetrunError(f"model_graph: on, but this deployment cannot run as one graph: {reason}; set "
                              "model_graph: auto or off in the profile")
        log.info("model_graph: auto: the dispatcher runs this deployment: %s", reason)
        return False
    run_model_graph(model, spec, runtime, weights, paths)
    release_sources(weights)  # one device: no fallback compiles them again
    release_freed_heap()
    model.hetrun = runtime
    return True


def checkpoint_model(path: "str | os.PathLike", profile: "str | Profile | None" = None) -> torch.nn.Module:
    """The model of a checkpoint directory as deploy() reads it in this process: experts left on disk, the dense
    part read where `profile` runs it (on every process, or on rank 0 alone with `distributed.dense: rank0`)."""
    return load_model(open_checkpoint(path), dense=profile is None or _holds_dense(load_profile(profile)))


def _holds_dense(profile: Profile) -> bool:
    layout = resolve_layout(profile)
    if layout is None or not in_distributed_launch():
        return True
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return layout.holds_dense(rank)
