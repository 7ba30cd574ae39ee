"""Tiny random transformers MoE models, one per supported family, built from MoESpec presets in seconds."""

from __future__ import annotations

import torch
import transformers

from hetrun.spec import AttentionSpec, MoESpec, RouterSpec

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
    "qwen3_next": MoESpec.from_preset("tiny-mixtral").replace(  # 3 linear-attention layers, then a full one
        name="tiny-qwen3-next", family="qwen3_next", num_layers=4, hidden_size=48, moe_intermediate_size=40,
        num_experts=6, num_shared_experts=1, shared_intermediate_size=56, shared_expert_gate=True,
        router=RouterSpec("softmax_topk", 2, True)),
    "olmoe": MoESpec.from_preset("tiny-mixtral").replace(
        name="tiny-olmoe", family="olmoe", hidden_size=56, moe_intermediate_size=32, num_experts=7,
        router=RouterSpec("softmax_topk", 2, False)),
    "deepseek_v2": MoESpec.from_preset("tiny").replace(
        name="tiny-deepseek-v2", family="deepseek_v2", hidden_size=56, moe_intermediate_size=40,
        shared_intermediate_size=40,
        router=RouterSpec("softmax_topk", 3, False, 4, 2, 1.5, fp32_logits=True),
        attention=AttentionSpec("mla", 4, 4, 24, 0, 32, 16, 8, 16)),  # no q LoRA, as DeepSeek-V2-Lite
    "deepseek_v3": MoESpec.from_preset("tiny"),
    "glm4_moe": MoESpec.from_preset("tiny").replace(
        name="tiny-glm4-moe", family="glm4_moe", hidden_size=80, moe_intermediate_size=24, num_experts=10,
        num_shared_experts=1, shared_intermediate_size=24, router=RouterSpec("sigmoid_grouped", 3, True, 2, 1, 1.8),
        attention=AttentionSpec("gqa", 4, 2, 16)),
    "dots1": MoESpec.from_preset("tiny").replace(  # per-head q/k norms, a shared expert, no correction-bias groups
        name="tiny-dots1", family="dots1", hidden_size=48, moe_intermediate_size=40, num_experts=8,
        num_shared_experts=2, shared_intermediate_size=40, router=RouterSpec("sigmoid_grouped", 2, False, 1, 1, 2.0),
        attention=AttentionSpec("gqa", 4, 4, 16)),
    "minimax_m2": MoESpec.from_preset("tiny-mixtral").replace(
        name="tiny-minimax-m2", family="minimax_m2", hidden_size=64, moe_intermediate_size=24, num_experts=12,
        router=RouterSpec("sigmoid_grouped", 3, True, fp32_logits=False), attention=AttentionSpec("gqa", 4, 2, 16)),
    "gpt_oss": MoESpec.from_preset("tiny-mixtral").replace(  # a clamp at 1.5 that the tiny model's values reach
        name="tiny-gpt-oss", family="gpt_oss", num_layers=2, hidden_size=48, moe_intermediate_size=40, num_experts=10,
        activation="clamped_swiglu", swiglu_limit=1.5, expert_bias=True, router=RouterSpec("softmax_topk", 3, True),
        attention=AttentionSpec("gqa", 4, 2, 16)),
    "ernie4_5_moe": MoESpec.from_preset("tiny").replace(  # a dense first layer, two shared experts in one MLP
        name="tiny-ernie4.5-moe", family="ernie4_5_moe", hidden_size=56, moe_intermediate_size=24, num_experts=9,
        num_shared_experts=2, shared_intermediate_size=24, dense_intermediate_size=80,
        router=RouterSpec("softmax_biased", 3, True, fp32_logits=True), attention=AttentionSpec("gqa", 4, 2, 16)),
    "hunyuan_v1_moe": MoESpec.from_preset("tiny-mixtral").replace(  # a shared MLP as wide as an expert, q/k norms
        name="tiny-hunyuan-moe", family="hunyuan_v1_moe", hidden_size=48, moe_intermediate_size=32, num_experts=8,
        num_shared_experts=1, shared_intermediate_size=32, router=RouterSpec("softmax_topk", 2, True, fp32_logits=True),
        attention=AttentionSpec("gqa", 4, 2, 16)),
    "llama4_text": MoESpec.from_preset("tiny-mixtral").replace(  # MoE every other layer, top-1, a shared expert
        name="tiny-llama4", family="llama4_text", num_layers=4, hidden_size=48, moe_intermediate_size=32,
        num_experts=6, num_shared_experts=1, shared_intermediate_size=32, dense_intermediate_size=64, moe_layer_step=2,
        router=RouterSpec("sigmoid_topk", 1, False), attention=AttentionSpec("gqa", 4, 2, 16)),
}


def random_config(spec: MoESpec):
    """The transformers config hetrun builds random models of `spec` from."""
    cfg = spec.to_hf_config()
    cfg.initializer_range = 0.2  # a wide init keeps the logits of a random model far from ties
    return cfg


def random_model(spec: MoESpec, seed: int = 0, bias_scale: float = 0.1) -> torch.nn.Module:
    """A random transformers model of `spec`, in eval mode, the same for the same seed in every process.

    DeepSeek-V3 models get a non-zero e_score_correction_bias, gpt-oss ones non-zero expert biases (transformers
    starts both at zero). The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = random_config(spec)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for mod in model.modules():
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.normal_(0.0, bias_scale)
                for name in ("gate_up_proj_bias", "down_proj_bias"):
                    if hasattr(mod, name):
                        getattr(mod, name).normal_(0.0, cfg.initializer_range)
    return model


def tiny_model(family: str = "deepseek_v3", seed: int = 0, bias_scale: float = 0.1) -> torch.nn.Module:
    """A small random transformers model of `family` (see FAMILY_SPECS)."""
    return random_model(FAMILY_SPECS[family], seed, bias_scale)


def markov_tokens(vocab: int, sequences: int, length: int, seed: int = 0, branching: int = 3) -> torch.Tensor:
    """Token ids [sequences, length] from a fixed sparse Markov chain: each token has `branching` likely successors.

    A tiny "language" with structure, so a model trained on it predicts with the confidence of a real one.
    """
    g = torch.Generator().manual_seed(10_000 + vocab)  # the chain depends on the vocabulary only
    successors = torch.randint(0, vocab, (vocab, branching), generator=g)  # [V, B]
    probs = torch.softmax(torch.arange(branching, 0, -1).float(), 0)  # most likely successor first
    g.manual_seed(seed)
    ids = torch.empty(sequences, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (sequences,), generator=g)
    for t in range(1, length):
        pick = torch.multinomial(probs.expand(sequences, branching), 1, generator=g)[:, 0]  # [S]
        ids[:, t] = successors[ids[:, t - 1], pick]
    return ids


def trained_tiny_model(family: str = "deepseek_v3", seed: int = 0, steps: int = 60) -> torch.nn.Module:
    """tiny_model(family) after a short, deterministic training run on markov_tokens (about 60 Adam steps).

    Random models have near-tied logits, so any perturbation flips their top-1 token; a trained one has the margins
    of a real model, which is what an accuracy figure for low-precision experts should be measured on.
    """
    model = tiny_model(family, seed)
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = markov_tokens(vocab, 16, 32, seed=step)  # [16, 32]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()
