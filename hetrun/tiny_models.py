"""Tiny random transformers MoE models, one per supported family, built from MoESpec presets in seconds."""

from __future__ import annotations

import torch

from hetrun.spec import MoESpec, RouterSpec

# Small shapes for each family; odd sizes on purpose (hidden sizes not multiples of 64, 12 experts on 2 or 3 devices).
FAMILY_SPECS: dict[str, MoESpec] = {
    "mixtral": MoESpec.from_preset("tiny-mixtral"),
    "qwen2_moe": MoESpec.from_preset("tiny-mixtral").replace(
        name="tiny-qwen2-moe", family="qwen2_moe", hidden_size=40, moe_intermediate_size=56, num_experts=6,
        num_shared_experts=1, shared_intermediate_size=88, shared_expert_gate=True,
        router=RouterSpec("softmax_topk", 2, False)),
    "qwen3_moe": MoESpec.from_preset("tiny-mixtral").replace(
        name="tiny-qwen3-moe", family="qwen3_moe", hidden_size=48, moe_intermediate_size=40, num_experts=10,
        router=RouterSpec("softmax_topk", 3, True)),
    "olmoe": MoESpec.from_preset("tiny-mixtral").replace(
        name="tiny-olmoe", family="olmoe", hidden_size=56, moe_intermediate_size=32, num_experts=7,
        router=RouterSpec("softmax_topk", 2, False)),
    "deepseek_v3": MoESpec.from_preset("tiny"),
}


def tiny_model(family: str = "deepseek_v3", seed: int = 0, bias_scale: float = 0.1) -> torch.nn.Module:
    """A small random transformers model of `family`, in eval mode; DeepSeek gets a non-zero correction bias."""
    import transformers

    spec = FAMILY_SPECS[family]
    torch.manual_seed(seed)
    cfg = spec.to_hf_config()
    cfg.initializer_range = 0.2  # a wide init keeps the logits of a random model far from ties
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, bias_scale)
    return model
