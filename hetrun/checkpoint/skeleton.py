"""The transformers model of a checkpoint with only its dense part in memory; its experts stay on disk.

transformers builds the model on the meta device (no memory, no initialisation). Every MoE block's stacked experts
become a LazyExperts of CheckpointExperts and every shared-expert MLP a LazyMLP (hetrun.runtime.weights), so expert
weights never exist as torch tensors. The dense tensors -- embeddings, attention, norms, routers, dense MLPs --
are read from the shards (FP8 and GPTQ ones dequantized) in the dtype transformers' from_pretrained would give
each (config.json's dtype; FP32 where the model keeps a module in FP32) and assigned into the model. Non-persistent
buffers (rotary frequencies) are rebuilt on the CPU.
"""

from __future__ import annotations

import torch
import transformers

from hetrun.checkpoint.directory import Checkpoint
from hetrun.checkpoint.experts import layer_sources
from hetrun.checkpoint.linears import dense_tensor
from hetrun.checkpoint.naming import FAMILY_NAMES, disk_candidates, is_expert_module_key, linear_stored
from hetrun.checkpoint.shards import DTYPES, FLOATS
from hetrun.errors import CheckpointError
from hetrun.runtime.weights import LazyExperts, LazyMLP, find_moe_blocks


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") loads the model in: config.json's, else the first float tensor's."""
    dtype = getattr(ckpt.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:
        return dtype
    first = next((i.dtype for i in ckpt.shards.infos.values() if i.dtype in FLOATS), "F32")
    return DTYPES[first][0]


def load_model(ckpt: Checkpoint, dense: bool = True) -> torch.nn.Module:
    """The model of `ckpt`, in eval mode: dense tensors read and assigned, experts left on disk (see module doc).

    `dense=False` (a torchrun rank that runs experts only) reads the routers alone; the other dense parameters stay
    on the meta device. The checkpoint is attached as `model.hetrun_checkpoint`.
    """
    config, family, shards = ckpt.config, ckpt.family, ckpt.shards
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=model_dtype(ckpt))
    shared_attr = FAMILY_NAMES[family].shared
    for layer, path, block in find_moe_blocks(model):
        routed, shared = layer_sources(ckpt, layer)
        act = getattr(block.experts, "act_fn", None)
        block.experts = LazyExperts(routed, act)
        if shared_attr is not None and getattr(block, shared_attr, None) is not None:
            if not shared:
                raise CheckpointError(f"{ckpt.root}: has no shared-expert weights for layer {layer} ({path}."
                                      f"{shared_attr}), which config.json describes")
            setattr(block, shared_attr, LazyMLP(shared, getattr(getattr(block, shared_attr), "act_fn", None)))

    wanted = model.state_dict()  # meta tensors: names, shapes and dtypes to fill
    lookup = _lookup_table_key(model, config)
    tensors = {}
    for key, meta in wanted.items():
        if is_expert_module_key(key, family) or (not dense and not _router_key(key)):
            continue
        name = next((c for c in disk_candidates(key, family) if c in shards or
                     (c.endswith(".weight") and linear_stored(shards, c.removesuffix(".weight")) == "gptq")), None)
        if name is None:
            continue  # tied (lm_head) or missing: told apart after tie_weights below
        # the input embeddings as stored are looked up a few rows a step: mapped, only the rows touched are resident
        mapped = key == lookup and name in shards and DTYPES.get(shards.info(name).dtype, (None,))[0] == meta.dtype
        value = shards.mapped(name) if mapped else dense_tensor(shards, ckpt.quant, name)
        if tuple(value.shape) != tuple(meta.shape):
            raise CheckpointError(f"{ckpt.root}: tensor '{name}' has shape {list(value.shape)}; the model of "
                                  f"config.json needs {list(meta.shape)} (config.json and weights disagree)")
        tensors[key] = value.to(meta.dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_buffers(model, config)
    if dense:
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise CheckpointError(f"{ckpt.root}: lacks tensor '{missing[0]}' ({len(missing)} missing); the checkpoint "
                                  "is incomplete")
    model.requires_grad_(False)
    model.eval()
    if (ckpt.root / "generation_config.json").is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(ckpt.root)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.root / 'generation_config.json'}: not a valid generation config "
                                  f"({' '.join(str(e).split())[:120]})") from None
    model.hetrun_checkpoint = ckpt
    return model


def _lookup_table_key(model: torch.nn.Module, config) -> str | None:
    """The state-dict key of the input embeddings' table, unless tied to the LM head (read whole every step)."""
    if getattr(config, "tie_word_embeddings", False):
        return None
    table = getattr(model.get_input_embeddings(), "weight", None)
    return next((k for k, p in model.named_parameters() if p is table), None)


def _router_key(key: str) -> bool:
    # what an expert-only rank still reads: the routers (gpt-oss's and Llama 4's `router`, MiniMax-M2's correction
    # bias beside its gate) and the Qwen2-MoE shared-expert gate (small)
    return ".mlp.gate." in key or ".mlp.router." in key or ".feed_forward.router." in key \
        or ".mlp.shared_expert_gate." in key \
        or key.endswith(".mlp.e_score_correction_bias")


def _rebuild_buffers(model: torch.nn.Module, config) -> None:
    """Modules whose buffers are still on the meta device (non-persistent ones, such as rotary frequencies, are not
    in checkpoints) built anew on the CPU from the config."""
    for name, mod in list(model.named_modules()):
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        if list(mod.parameters(recurse=False)) or list(mod.children()):
            missing = next(n for n, b in mod.named_buffers(recurse=False) if b.is_meta)
            raise CheckpointError(f"checkpoint lacks tensor '{name}.{missing}'; the checkpoint is incomplete")
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=config)
        except TypeError as e:
            raise CheckpointError(f"module '{name}' ({type(mod).__name__}) has buffers no checkpoint holds and cannot "
                                  f"be rebuilt from the config ({e})") from None
        model.set_submodule(name, fresh)
