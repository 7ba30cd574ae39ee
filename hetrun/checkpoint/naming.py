"""Tensor names on disk, per model family, against the names of transformers 5's modules in memory.

On disk (the hub layout, which save_pretrained writes by default) each routed expert has its own tensors:
  model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight      DeepSeek, GLM, dots1, Qwen, OLMoE
  model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight            Mixtral, MiniMax-M2 (w1 gate, w3 up, w2 down)
save_pretrained(save_original_format=False) and some hub repos keep them stacked, as transformers 5 holds them:
  model.layers.N.mlp.experts.gate_up_proj [E, 2I, D] (gate rows first), ...experts.down_proj [E, D, I]
(optionally with a `.weight` suffix). gpt-oss has a layout of its own (hetrun.checkpoint.gpt_oss); Llama 4 stacks its
experts transposed under `feed_forward`. In memory every other family's MoE block is `model.layers.N.mlp`; Mixtral's
router is `block_sparse_moe.gate` on disk. Quantized linears replace `X.weight` by `X.weight` + `X.weight_scale_inv`
(FP8) or `X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx` (GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrun.checkpoint.shards import Shards

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class FamilyNames:
    """How one family names its MoE tensors on disk."""

    moe: tuple[str, ...]  # the MoE block under model.layers.N on disk, in the order tried
    projections: tuple[str, str, str]  # one expert's gate, up, down
    shared: str | None = None  # the shared-expert MLP under the MoE block
    shared_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    renamed: tuple[tuple[str, str], ...] = ()  # (in memory, on disk) parts of names that differ beyond `moe`
    module: str = "mlp"  # the MoE block's name in memory
    transposed: bool = False  # stacked experts stored [E, D, 2I] and [E, I, D], applied as x @ W (Llama 4)


FAMILY_NAMES: dict[str, FamilyNames] = {
    "mixtral": FamilyNames(("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "minimax_m2": FamilyNames(("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "deepseek_v2": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "deepseek_v3": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "glm4_moe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "dots1": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "qwen2_moe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj")),
    "qwen3_next": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "olmoe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj")),
    # stacked only, interleaved and biased: read by hetrun.checkpoint.gpt_oss
    "gpt_oss": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), transposed=True),
    "ernie4_5_moe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_experts",
                                renamed=((".mlp.gate.moe_statics.", ".mlp.moe_statics."),)),
    "hunyuan_v1_moe": FamilyNames(("mlp",), ("gate_proj", "up_proj", "down_proj"), "shared_mlp"),
    "llama4_text": FamilyNames(("feed_forward",), ("gate_proj", "up_proj", "down_proj"), "shared_expert",
                               module="feed_forward", transposed=True),
}


def linear_stored(shards: Shards, base: str) -> str | None:
    """How the Linear whose weight is `base`.weight is stored: "weight" (float or FP8), "gptq", or None (absent)."""
    if f"{base}.weight" in shards:
        return "weight"
    if f"{base}.qweight" in shards:
        return "gptq"
    return None


def expert_bases(shards: Shards, family: str, layer: int, expert: int) -> tuple[str, str, str] | None:
    """The on-disk names (without .weight / .qweight) of routed expert `expert`'s gate, up and down, when stored one
    expert at a time; None when the layer keeps its experts stacked (or lacks them)."""
    names = FAMILY_NAMES[family]
    for moe in names.moe:
        bases = tuple(f"model.layers.{layer}.{moe}.experts.{expert}.{p}" for p in names.projections)
        if linear_stored(shards, bases[0]) is not None:
            return bases  # type: ignore[return-value]
    return None


def stacked_names(shards: Shards, family: str, layer: int) -> tuple[str, str] | None:
    """(gate_up [E, 2I, D], down [E, D, I]; FamilyNames.transposed: [E, D, 2I], [E, I, D]) names of a layer whose
    experts are stored stacked, else None."""
    for moe in dict.fromkeys((FAMILY_NAMES[family].module, *FAMILY_NAMES[family].moe)):
        for suffix in ("", ".weight"):
            gate_up = f"model.layers.{layer}.{moe}.experts.gate_up_proj{suffix}"
            if gate_up in shards:
                return gate_up, f"model.layers.{layer}.{moe}.experts.down_proj{suffix}"
    return None


def shared_base(family: str, layer: int, shards: Shards) -> tuple[str, str, str] | None:
    """The on-disk names of a layer's shared-expert MLP projections, or None when the family or layer has none."""
    names = FAMILY_NAMES[family]
    if names.shared is None:
        return None
    for moe in names.moe:
        bases = tuple(f"model.layers.{layer}.{moe}.{names.shared}.{p}" for p in names.shared_projections)
        if linear_stored(shards, bases[0]) is not None:
            return bases  # type: ignore[return-value]
    return None


def disk_name(module_key: str, family: str) -> str:
    """The hub name of a module's state-dict key outside the experts: Mixtral's block_sparse_moe for mlp, ERNIE's
    correction bias beside its gate."""
    return disk_candidates(module_key, family)[0]


def disk_candidates(module_key: str, family: str) -> list[str]:
    """On-disk names that may hold a module's state-dict key, the hub's first (Mixtral's block_sparse_moe before
    mlp; ERNIE's correction bias beside its gate, not in it)."""
    names = FAMILY_NAMES[family]
    for memory, disk in names.renamed:
        module_key = module_key.replace(memory, disk, 1)
    out = []
    for moe in names.moe:
        out.append(module_key.replace(f".{names.module}.", f".{moe}.", 1) if f".{names.module}." in module_key
                   else module_key)
    return list(dict.fromkeys(out + [module_key]))


def is_expert_module_key(key: str, family: str) -> bool:
    """Whether a module state-dict key belongs to routed or shared experts (hetrun reads those lazily)."""
    names = FAMILY_NAMES[family]
    shared = names.shared is not None and f".{names.module}.{names.shared}." in key
    return f".{names.module}.experts." in key or shared
