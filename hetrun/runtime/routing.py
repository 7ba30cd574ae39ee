"""Routers: pick top-k experts per token exactly as transformers does for the same weights."""

from __future__ import annotations

from typing import Callable

import torch

from hetrun.spec import RouterSpec


def gate_dtype(router: RouterSpec, hidden_dtype: torch.dtype) -> torch.dtype:
    """The dtype a router's gate computes in for hidden states of `hidden_dtype`: FP32 for DeepSeek's and GLM's
    (transformers keeps their gate weights in FP32 in a 16-bit model), the hidden states' own for the others."""
    fp32 = router.kind in ("softmax_biased", "sigmoid_grouped") if router.fp32_logits is None else router.fp32_logits
    return torch.float32 if fp32 else hidden_dtype


def router_logits(hidden: torch.Tensor, gate_weight: torch.Tensor, router: RouterSpec,
                  gate_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gate logits [T, E] for hidden [T, D], gate weight [E, D] and the gate's own bias [E] (gpt-oss's; None)."""
    dtype = gate_dtype(router, hidden.dtype)  # converted only where it differs: each call is a decode step's
    hidden = hidden if hidden.dtype == dtype else hidden.to(dtype)
    gate_weight = gate_weight if gate_weight.dtype == dtype else gate_weight.to(dtype)
    gate_bias = gate_bias if gate_bias is None or gate_bias.dtype == dtype else gate_bias.to(dtype)
    return torch.nn.functional.linear(hidden, gate_weight, gate_bias)


def route(logits: torch.Tensor, router: RouterSpec,
          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids [T, K] (int64) and their combine weights [T, K] (float32) from gate logits [T, E]."""
    if router.kind == "softmax_topk":
        return _softmax_topk(logits, router)
    if router.kind == "sigmoid_grouped":  # DeepSeek-V3, GLM, dots.llm1, MiniMax-M2
        return _biased_choice(logits.float().sigmoid(), router, correction_bias, lambda s: s + 1e-20)
    if router.kind == "softmax_biased":  # ERNIE 4.5
        return _biased_choice(torch.softmax(logits.float(), dim=-1), router, correction_bias,
                              lambda s: s.clamp(min=1e-12))
    if router.kind == "sigmoid_topk":  # Llama 4: the sigmoid of each chosen logit, unnormalised
        top, ids = torch.topk(logits, router.top_k, dim=-1)  # [T, K]
        return ids, top.float().sigmoid()
    raise ValueError(f"unknown router kind {router.kind!r}")


def _softmax_topk(logits: torch.Tensor, router: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    g = router.n_group
    if g > 1:  # DeepSeek-V2's group_limited_greedy: experts outside the topk_group best groups (by max) score 0
        t, e = probs.shape
        group_scores = probs.view(t, g, e // g).amax(dim=-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [T, G]
        probs = probs.masked_fill(~keep.repeat_interleave(e // g, dim=1), 0.0)  # [T, E]
    weights, ids = torch.topk(probs, router.top_k, dim=-1)  # [T, K]
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights if router.routed_scaling_factor == 1.0 else weights * router.routed_scaling_factor


def _biased_choice(scores: torch.Tensor, router: RouterSpec, bias: torch.Tensor | None,
                   norm: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # FP32 scores [T, E] plus a correction bias choose (groups ranked by their two best), the chosen scores weigh,
    # normalised by norm(their sum) as each family's router guards it
    t, e = scores.shape
    choice = scores if bias is None else scores + bias.float()  # [T, E]
    g = router.n_group
    group_scores = choice.view(t, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
    score_mask = group_mask.unsqueeze(-1).expand(t, g, e // g).reshape(t, e)  # [T, E]
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if router.norm_topk_prob:
        weights = weights / norm(weights.sum(dim=-1, keepdim=True))
    return ids, weights * router.routed_scaling_factor
