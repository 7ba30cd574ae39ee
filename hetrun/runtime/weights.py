"""Expert and MoE-layer weights in hetrun's layout: read from a transformers model, or drawn at random for a spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetrun.errors import SpecError
from hetrun.spec import MoESpec


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as the model stores them (nn.Linear layout: [out, in])."""

    gate: np.ndarray  # [I, D]
    up: np.ndarray  # [I, D]
    down: np.ndarray  # [D, I]

    @property
    def hidden(self) -> int:
        return self.gate.shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[0]

    def reference(self, x: np.ndarray) -> np.ndarray:
        """FP32 numpy reference output [N, D] for x [N, D]."""
        g = x @ self.gate.T  # [N, I]
        u = x @ self.up.T  # [N, I]
        return ((g / (1.0 + np.exp(-g))) * u) @ self.down.T  # [N, D]


@dataclass(frozen=True)
class MoELayerWeights:
    layer: int  # decoder layer index in the model
    gate: torch.Tensor  # [E, D] router weight
    correction_bias: torch.Tensor | None  # [E] DeepSeek-V3 e_score_correction_bias
    experts: tuple[ExpertWeights, ...]  # E routed experts
    shared: tuple[ExpertWeights, ...]  # shared experts, always applied
    shared_gate: torch.Tensor | None  # [1, D] Qwen2-MoE sigmoid gate on the shared expert


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, module path, module) of every MoE block: a module with a router `gate` and stacked `experts`."""
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if experts is not None and hasattr(mod, "gate") and hasattr(experts, "gate_up_proj"):
            parts = name.split(".")
            layer = next((int(p) for p in reversed(parts) if p.isdigit()), len(found))
            found.append((layer, name, mod))
    return found


def _mlp_weights(mlp: torch.nn.Module, splits: int = 1) -> tuple[ExpertWeights, ...]:
    """Split one gated MLP of intermediate n*I into n experts of intermediate I (their outputs sum to the MLP's)."""
    g = mlp.gate_proj.weight.detach().float().numpy()  # [n*I, D]
    u = mlp.up_proj.weight.detach().float().numpy()  # [n*I, D]
    d = mlp.down_proj.weight.detach().float().numpy()  # [D, n*I]
    i = g.shape[0] // splits
    return tuple(ExpertWeights(g[k * i:(k + 1) * i], u[k * i:(k + 1) * i], np.ascontiguousarray(d[:, k * i:(k + 1) * i]))
                 for k in range(splits))


def layer_weights_from_block(spec: MoESpec, layer: int, block: torch.nn.Module) -> MoELayerWeights:
    """Copy one transformers MoE block's weights into hetrun's layout."""
    ex = block.experts
    gate_up = ex.gate_up_proj.detach().float().numpy()  # [E, 2I, D]
    down = ex.down_proj.detach().float().numpy()  # [E, D, I]
    i = gate_up.shape[1] // 2
    experts = tuple(ExpertWeights(np.ascontiguousarray(gate_up[e, :i]), np.ascontiguousarray(gate_up[e, i:]),
                                  np.ascontiguousarray(down[e])) for e in range(gate_up.shape[0]))
    shared: tuple[ExpertWeights, ...] = ()
    shared_gate = None
    if getattr(block, "shared_experts", None) is not None:  # DeepSeek: n shared experts fused in one MLP
        shared = _mlp_weights(block.shared_experts, max(spec.num_shared_experts, 1))
    elif getattr(block, "shared_expert", None) is not None:  # Qwen2-MoE
        shared = _mlp_weights(block.shared_expert)
        shared_gate = block.shared_expert_gate.weight.detach().float().clone()
    router = block.gate
    bias = getattr(router, "e_score_correction_bias", None)
    return MoELayerWeights(layer, router.weight.detach().float().clone(),
                           None if bias is None else bias.detach().float().clone(), experts, shared, shared_gate)


def random_layer_weights(spec: MoESpec, layer: int, seed: int = 0, scale: float | None = None) -> MoELayerWeights:
    """Gaussian weights of the spec's shape, for benchmarks and simulation without a checkpoint."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    d, i = spec.hidden_size, spec.moe_intermediate_size
    s_in = scale or d ** -0.5

    def expert(inter: int) -> ExpertWeights:
        return ExpertWeights((torch.randn(inter, d, generator=g) * s_in).numpy(),
                             (torch.randn(inter, d, generator=g) * s_in).numpy(),
                             (torch.randn(d, inter, generator=g) * (scale or inter ** -0.5)).numpy())

    experts = tuple(expert(i) for _ in range(spec.num_experts))
    shared = tuple(expert(spec.shared_intermediate_size) for _ in range(spec.num_shared_experts))
    gate = torch.randn(spec.num_experts, d, generator=g) * s_in
    bias = torch.randn(spec.num_experts, generator=g) * 0.1 if spec.router.kind == "sigmoid_grouped" else None
    shared_gate = torch.randn(1, d, generator=g) * s_in if spec.shared_expert_gate else None
    return MoELayerWeights(layer, gate, bias, experts, shared, shared_gate)


def model_layer_weights(spec: MoESpec, model: torch.nn.Module) -> list[tuple[str, MoELayerWeights]]:
    """(module path, weights) for every MoE block of a transformers model."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise SpecError(f"found no MoE block in {type(model).__name__}; hetrun needs blocks with a router `gate` "
                        "and stacked `experts` (transformers 5 MoE models)")
    return [(name, layer_weights_from_block(spec, layer, mod)) for layer, name, mod in blocks]
