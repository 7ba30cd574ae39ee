"""hetrun's routers pick the same experts with the same weights as transformers' own routers."""

import copy
import inspect

import pytest
import torch
import transformers

from hetrun.checkpoint.writer import save_checkpoint
from hetrun.runtime.dispatch import MoELayer
from hetrun.runtime.routing import route, router_logits
from hetrun.runtime.weights import find_moe_blocks, layer_weights_from_block, router_module, router_tensors
from hetrun.spec import MoESpec
from hetrun.tiny_models import tiny_model
from tests.conftest import FAMILIES


def their_route(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own routing of x [T, D] by an MoE block's router: weights [T, K], ids [T, K]."""
    router = router_module(block)
    if "e_score_correction_bias" in inspect.signature(router.forward).parameters:  # MiniMax-M2: the block's bias
        _, w, ids = router(x, block.e_score_correction_bias)
        return w, ids
    out = router(x)
    if len(out) == 2:  # Llama 4: scores [T, E], zero but for the chosen experts' sigmoids
        return out[0].topk(block.top_k, dim=-1)
    _, w, ids = out
    return w, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_transformers(family, family_models):
    model = family_models[family]
    spec = MoESpec.from_hf_config(model.config)
    _, _, block = find_moe_blocks(model)[0]
    x = torch.randn(257, spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, D]
    with torch.no_grad():
        want_w, want_ids = their_route(block, x)
        gate, bias, _, gate_bias = router_tensors(block)
        ids, w = route(router_logits(x, gate, spec.router, gate_bias), spec.router, bias)
    # Same experts per token (order may differ with sorted=False), same weights within FP32 rounding.
    want_sorted, wi = want_ids.sort(-1)
    got_sorted, gi = ids.sort(-1)
    assert torch.equal(want_sorted, got_sorted)
    torch.testing.assert_close(w.gather(1, gi), want_w.float().gather(1, wi), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_deployed_bf16_router_matches_transformers(family, tmp_path):
    """A 16-bit checkpoint as from_pretrained loads it (DeepSeek's and GLM's gate weights kept in FP32): the
    deployed layer routes BF16 hidden states to the experts transformers' own gate picks, with its weights."""
    fp32 = tiny_model(family)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for (_, _, full), (_, _, half) in zip(find_moe_blocks(fp32), find_moe_blocks(bf16)):
        linear = lambda block: getattr(router_module(block), "wg", router_module(block))  # noqa: E731 (Hunyuan's wg)
        linear(half).weight = linear(full).weight  # stored in FP32, as some checkpoints keep routers
    save_checkpoint(bf16, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    spec = MoESpec.from_hf_config(model.config)
    _, _, block = find_moe_blocks(model)[0]
    layer = MoELayer.__new__(MoELayer)  # only its router: the weights read from the block, no expert compiled
    layer.weights, layer.router, layer._router_cache = layer_weights_from_block(spec, 0, block), spec.router, {}
    x = torch.randn(257, spec.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()  # [T, D]
    with torch.no_grad():
        want_w, want_ids = their_route(block, x)
        gate, bias, _, gate_bias = layer._router_as(x.dtype, x.device)
        ids, w = route(router_logits(x, gate, spec.router, gate_bias), spec.router, bias)
    want_sorted, wi = want_ids.sort(-1)
    got_sorted, gi = ids.sort(-1)
    assert torch.equal(want_sorted, got_sorted)
    # Qwen's and OLMoE's routers hand their weights back rounded to the model's dtype; hetrun keeps them in FP32
    torch.testing.assert_close(w.gather(1, gi).to(want_w.dtype), want_w.gather(1, wi), rtol=1e-6, atol=1e-7)


def test_grouped_router_respects_groups_and_bias():
    spec = MoESpec.from_preset("deepseek-r1")
    logits = torch.randn(64, spec.num_experts, generator=torch.Generator().manual_seed(1))  # [T, E]
    bias = torch.zeros(spec.num_experts)
    bias[:32] = 5.0  # the first group's experts win every choice
    ids, w = route(logits, spec.router, bias)
    assert ids.shape == (64, 8) and (ids < 32).all()
    assert torch.allclose(w.sum(-1), torch.full((64,), spec.router.routed_scaling_factor))
    ids, _ = route(logits, spec.router, torch.zeros(spec.num_experts))
    groups = ids // (spec.num_experts // spec.router.n_group)  # [T, K]
    assert max(len(set(row)) for row in groups.tolist()) <= spec.router.topk_group
