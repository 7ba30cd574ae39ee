"""Expert and MoE-layer weights in hetrun's layout, and where they come from.

An expert reaches the graph builders (hetrun.runtime.graphs) in one of three forms:
  ExpertWeights     FP32 numpy matrices (nn.Linear layout [out, in]);
  QuantizedExpert   a checkpoint's quantized matrices as stored: E4M3 codes with block scales (DeepSeek-V3 FP8), or
                    GPTQ-packed INT4 (qweight, qzeros, scales, g_idx);
  ExpertSource      an expert that is read on demand and dropped after use: from a checkpoint on disk
                    (hetrun.checkpoint) or from a transformers module's stacked tensors (ModuleExpert). The runtime
                    compiles one expert at a time, so no FP32 copy of the whole model ever exists.

A transformers MoE block's stacked experts can also be replaced by LazyExperts (and a shared expert MLP by LazyMLP):
modules that hold sources instead of tensors, so a model built from a checkpoint never materialises its experts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import torch

from hetrun.errors import HetrunError, SpecError
from hetrun.kernels.fp8 import expand_block_scale
from hetrun.kernels.gptq import gptq_dequantize
from hetrun.spec import SILU, ExpertActivation, MoESpec


class _SwiGLUShape:
    """hidden (D) and intermediate (I) of an expert whose `gate` is [I, D]."""

    @property
    def hidden(self) -> int:
        return self.gate.shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class ExpertWeights(_SwiGLUShape):
    """One expert's weights as the model stores them (nn.Linear layout: [out, in]), with the biases and the
    activation of families whose experts have them (gpt-oss)."""

    gate: np.ndarray  # [I, D]
    up: np.ndarray  # [I, D]
    down: np.ndarray  # [D, I]
    gate_bias: np.ndarray | None = None  # [I]
    up_bias: np.ndarray | None = None  # [I]
    down_bias: np.ndarray | None = None  # [D]
    activation: ExpertActivation = SILU

    def reference(self, x: np.ndarray) -> np.ndarray:
        """FP32 numpy reference output [N, D] for x [N, D]."""
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        g = x @ f32(self.gate).T + (0 if self.gate_bias is None else f32(self.gate_bias))  # [N, I]
        u = x @ f32(self.up).T + (0 if self.up_bias is None else f32(self.up_bias))  # [N, I]
        y = self.activation.apply(g, u) @ f32(self.down).T  # [N, D]
        return y if self.down_bias is None else y + f32(self.down_bias)

    @property
    def gate_up_bias(self) -> np.ndarray | None:
        """[2I] float32: the gate's biases then the up projection's, as the graphs stack the two; None without."""
        return stacked_gate_up_bias(self.gate_bias, self.up_bias, self.intermediate)


def stacked_gate_up_bias(gate: np.ndarray | None, up: np.ndarray | None, intermediate: int) -> np.ndarray | None:
    """The gate's biases [I] then the up projection's [I] as one [2I] float32 (zeros for a missing one), or None
    when neither exists: the fused gate_up matmul's bias."""
    if gate is None and up is None:
        return None
    zeros = np.zeros(intermediate, dtype=np.float32)
    return np.concatenate([zeros if b is None else np.asarray(b, dtype=np.float32) for b in (gate, up)])


# ---- quantized matrices as checkpoints store them ------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Matrix:
    """An E4M3 weight [out, in] with one FP32 scale per block: W[i, j] = codes[i, j] * scale[i // bm, j // bn].

    DeepSeek-V3's `weight_scale_inv` (despite its name, the multiplier); edge blocks are partial and keep their own
    scale.
    """

    codes: np.ndarray  # [N, K] ml_dtypes.float8_e4m3fn
    scale: np.ndarray  # [ceil(N/bm), ceil(K/bn)] float32
    block: tuple[int, int]  # (bm, bn)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def row_scales(self) -> np.ndarray:
        """The block scales repeated per row [N, ceil(K/bn)] (ONNX blocks along one axis only)."""
        return expand_block_scale(self.scale, self.codes.shape[0], self.block[0])

    def dequantize(self) -> np.ndarray:
        """The FP32 matrix [N, K]."""
        n, k = self.codes.shape
        full = np.repeat(self.row_scales(), self.block[1], axis=1)[:, :k]  # [N, K]
        return self.codes.astype(np.float32) * full


@dataclass(frozen=True)
class GptqMatrix:
    """A GPTQ-packed weight of an nn.Linear [out=N, in=K] (AutoGPTQ / GPTQModel / optimum layout).

    qweight packs 32/bits codes per int32 along K (lowest k in the lowest bits), qzeros packs the zero points along
    N the same way, scales is [G, N], g_idx [K] the group of every input column (act-order when not k // group).
    W[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)) with g = g_idx[k]; zero_offset is 1 for the
    `gptq` (v1) checkpoint format, which stores zero - 1, and 0 for `gptq_v2`.
    """

    qweight: np.ndarray  # int32 [K * bits / 32, N]
    qzeros: np.ndarray  # int32 [G, N * bits / 32]
    scales: np.ndarray  # float16 (or float32) [G, N]
    g_idx: np.ndarray  # int32 [K]
    bits: int
    group: int  # input columns per group (K for one group)
    zero_offset: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[1], self.g_idx.shape[0]

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.qzeros.nbytes + self.scales.nbytes + self.g_idx.nbytes

    def dequantize(self) -> np.ndarray:
        """The FP32 matrix [N, K]."""
        return gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset)


@dataclass(frozen=True)
class QuantizedExpert(_SwiGLUShape):
    """One expert as a checkpoint stores it quantized: gate, up [I, D] and down [D, I], all of one kind."""

    gate: Fp8Matrix | GptqMatrix
    up: Fp8Matrix | GptqMatrix
    down: Fp8Matrix | GptqMatrix

    @property
    def kind(self) -> str:
        """"fp8" or "gptq"."""
        return "fp8" if isinstance(self.gate, Fp8Matrix) else "gptq"

    def dequantize(self) -> ExpertWeights:
        """The FP32 expert these codes stand for."""
        return ExpertWeights(self.gate.dequantize(), self.up.dequantize(), self.down.dequantize())


# ---- experts read on demand ------------------------------------------------------------------------------------

class ExpertSource(abc.ABC):
    """An expert whose weights are read when asked for and not kept: the runtime compiles it like ExpertWeights."""

    hidden: int
    intermediate: int
    name: str = ""
    activation: ExpertActivation = SILU

    def biases(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(gate_up bias [2I], down bias [D]) float32 beside stored_readers(), which read the matrices alone: None
        here. A source whose experts have biases returns them (ModuleExpert) or has no stored_readers() and gives
        them with read_stored()'s weights (a gpt-oss CheckpointExpert); reading the expert here would read it twice."""
        return None, None

    @abc.abstractmethod
    def read(self) -> ExpertWeights | QuantizedExpert:
        """The expert as stored: FP32 weights, or the checkpoint's quantized matrices unchanged."""

    def read_stored(self) -> ExpertWeights | QuantizedExpert:
        """read(), with float matrices left in the dtype they are stored in (numpy float16, ml_dtypes bfloat16, ...):
        what the graph builders take, so a 16-bit expert is never held whole in FP32 while its graph is built."""
        return self.read()

    def stored_readers(self) -> "tuple[Callable[[], np.ndarray], ...] | None":
        """Readers of gate, up and down as read_stored() leaves them, each reading its matrix only when called, so a
        graph builder holds one matrix at a time; None where the expert is only read whole (read_stored())."""
        return None

    def weights(self) -> ExpertWeights:
        """FP32 weights (dequantized when stored quantized)."""
        w = self.read()
        return w if isinstance(w, ExpertWeights) else w.dequantize()

    def reference(self, x: np.ndarray) -> np.ndarray:
        """FP32 numpy reference output [N, D] for x [N, D]."""
        return self.weights().reference(x)


class ModuleExpert(ExpertSource):
    """Expert `index` of a transformers module's tensors, converted to FP32 only when read.

    `gate`, `up` [E, I', D] and `down` [E, D, I'] are views of an MoE block's stacked experts (gate_up_proj split in
    two) or, with E = 1, of a gated MLP's weights (shared experts); `part` (k, n) takes the k-th of n equal slices
    of I' (DeepSeek fuses n shared experts into one MLP). `release()` drops the references: the module's memory is
    freed once nothing else holds it, and reading again is an error.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, index: int,
                 part: tuple[int, int] = (0, 1), name: str = "",
                 bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 activation: ExpertActivation = SILU):
        self._tensors: tuple[torch.Tensor, ...] | None = (gate, up, down)
        self._bias = bias  # (gate [E, I], up [E, I], down [E, D]) biases (gpt-oss), or None
        self.index, self.part, self.name, self.activation = index, part, name, activation
        self.hidden = int(gate.shape[2])
        self.intermediate = int(gate.shape[1]) // part[1]

    def read(self) -> ExpertWeights:
        parts = (np.ascontiguousarray(t.to(torch.float32).numpy()) for t in self._parts())
        return ExpertWeights(*parts, *self._bias_parts(), activation=self.activation)

    def read_stored(self) -> ExpertWeights:
        return ExpertWeights(*(stored_numpy(t) for t in self._parts()), *self._bias_parts(),
                             activation=self.activation)

    def biases(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        gate, up, down = self._bias_parts()
        return stacked_gate_up_bias(gate, up, self.intermediate), down

    def _bias_parts(self) -> tuple[np.ndarray | None, ...]:
        if self._tensors is None:
            self._parts()  # released: its error
        if self._bias is None:
            return None, None, None
        return tuple(t[self.index].detach().to("cpu", torch.float32).numpy().copy() for t in self._bias)

    def _parts(self) -> tuple[torch.Tensor, ...]:
        if self._tensors is None:
            raise HetrunError(f"expert {self.name or self.index} was released after deploy (deploy() frees a "
                              "module's experts once compiled); deploy from a checkpoint directory, "
                              "hetrun.deploy('path/to/model-dir', ...), to let hetrun read experts again")
        gate, up, down = self._tensors
        rows = slice(self.part[0] * self.intermediate, (self.part[0] + 1) * self.intermediate)
        parts = (gate[self.index, rows], up[self.index, rows], down[self.index, :, rows])  # [I, D] [I, D] [D, I]
        return tuple(t.detach().to("cpu") for t in parts)

    def release(self) -> None:
        """Drop the references to the module's tensors."""
        self._tensors = self._bias = None


def stored_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU float tensor as a contiguous numpy array: 16-bit ones in their own dtype (BF16 as ml_dtypes.bfloat16,
    same bytes), any other as FP32."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy() if t.dtype in (torch.float16, torch.float32) else t.float().numpy()


class LazyExperts(torch.nn.Module):
    """Stands where a transformers MoE block's stacked experts stood, holding ExpertSources instead of tensors.

    Its forward has the experts module's contract, (hidden [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D],
    or Llama 4's, hidden [E * T, D] (every token's input to every expert, pre-scaled by its score) -> [E * T, D], and
    reads each expert it needs on every call: a model built from a checkpoint runs (slowly) before deploy.
    """

    def __init__(self, sources: tuple[ExpertSource, ...], act_fn=None):
        super().__init__()
        self.sources = tuple(sources)
        self.act_fn = act_fn or torch.nn.functional.silu

    @property
    def num_experts(self) -> int:
        return len(self.sources)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if top_k_index is None:  # Llama 4's: each expert on its own [T, D] slice of hidden
            per_expert = hidden.view(self.num_experts, -1, hidden.shape[-1])  # [E, T, D]
            return torch.cat([_swiglu(x, s.weights(), self.act_fn).to(hidden.dtype)
                              for x, s in zip(per_expert, self.sources)])  # [E * T, D]
        out = torch.zeros_like(hidden)  # [T, D]
        for e in top_k_index.unique().tolist():
            tok, pos = torch.where(top_k_index == e)  # [n], [n]
            y = _swiglu(hidden[tok], self.sources[e].weights(), self.act_fn)  # [n, D]
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


class LazyMLP(torch.nn.Module):
    """Stands where a shared-expert MLP stood: x [..., D] -> [..., D] through the sum of its sources (read per call)."""

    def __init__(self, sources: tuple[ExpertSource, ...], act_fn=None):
        super().__init__()
        self.sources = tuple(sources)
        self.act_fn = act_fn or torch.nn.functional.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        y = sum(_swiglu(flat, s.weights(), self.act_fn) for s in self.sources)  # [T, D]
        return y.to(x.dtype).reshape(x.shape)


def _swiglu(x: torch.Tensor, w: ExpertWeights, act_fn) -> torch.Tensor:
    """x [n, D] through one expert in x's dtype (the model's, as its own experts compute): act_fn(g) * u, or the
    expert's own activation and biases where it has them (gpt-oss)."""
    gate, up, down = (torch.from_numpy(m).to(x.dtype) for m in (w.gate, w.up, w.down))
    gate_b, up_b, down_b = (None if b is None else torch.from_numpy(np.asarray(b)).to(x.dtype)
                            for b in (w.gate_bias, w.up_bias, w.down_bias))
    g, u = torch.nn.functional.linear(x, gate), torch.nn.functional.linear(x, up)  # [n, I]
    if gate_b is not None:  # added after the product, as transformers' gpt-oss experts do (not fused: rounded twice)
        g, u = g + gate_b, u + up_b
    y = torch.nn.functional.linear(act_fn(g) * u if w.activation == SILU else w.activation.apply(g, u), down)
    return y if down_b is None else y + down_b  # [n, D]


# ---- MoE layers ------------------------------------------------------------------------------------------------

Expert = ExpertWeights | QuantizedExpert | ExpertSource


@dataclass(frozen=True)
class MoELayerWeights:
    layer: int  # decoder layer index in the model
    gate: torch.Tensor  # [E, D] router weight
    correction_bias: torch.Tensor | None  # [E] DeepSeek-V3 e_score_correction_bias
    experts: tuple[Expert, ...]  # E routed experts
    shared: tuple[Expert, ...]  # shared experts, always applied
    shared_gate: torch.Tensor | None  # [1, D] Qwen2-MoE sigmoid gate on the shared expert
    gate_bias: torch.Tensor | None = None  # [E] the router's own bias, added to its logits (gpt-oss)


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, module path, module) of every MoE block: a module with a router (`gate`, gpt-oss's `router`)
    and stacked `experts` (or LazyExperts)."""
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if experts is not None and router_module(mod) is not None and (hasattr(experts, "gate_up_proj")
                                                                 or isinstance(experts, LazyExperts)):
            parts = name.split(".")
            layer = next((int(p) for p in reversed(parts) if p.isdigit()), len(found))
            found.append((layer, name, mod))
    return found


def _mlp_sources(mlp: torch.nn.Module, splits: int, name: str) -> tuple[ExpertSource, ...]:
    """A gated MLP of intermediate n*I as n experts of intermediate I (their outputs sum to the MLP's)."""
    if isinstance(mlp, LazyMLP):
        return mlp.sources
    gate, up, down = (m.weight.detach()[None] for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # views
    return tuple(ModuleExpert(gate, up, down, 0, (k, splits), f"{name}.S{k}") for k in range(splits))


def layer_weights_from_block(spec: MoESpec, layer: int, block: torch.nn.Module) -> MoELayerWeights:
    """One transformers MoE block's weights in hetrun's layout: experts as sources read one at a time on demand."""
    ex = block.experts
    name = f"L{layer}"
    if isinstance(ex, LazyExperts):
        experts: tuple[ExpertSource, ...] = ex.sources
    else:
        gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()  # [E, 2I, D], [E, D, I]
        # gpt-oss (transformers' is_transposed flag) and Llama 4 (no flag) store them [E, D, 2I] and [E, I, D]
        if getattr(ex, "is_transposed", spec.family == "llama4_text"):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        gate, up = _gate_and_up(ex, gate_up)  # views [E, I, D]
        bias = None
        if getattr(ex, "has_bias", False):  # [E, 2I] split as the weights are, [E, D]
            bias = (*_gate_and_up(ex, ex.gate_up_proj_bias.detach()), ex.down_proj_bias.detach())
        experts = tuple(ModuleExpert(gate, up, down, e, name=f"{name}.E{e}", bias=bias,
                                     activation=spec.expert_activation) for e in range(gate_up.shape[0]))
    shared: tuple[ExpertSource, ...] = ()
    if getattr(block, "shared_experts", None) is not None:  # DeepSeek: n shared experts fused in one MLP
        shared = _mlp_sources(block.shared_experts, max(spec.num_shared_experts, 1), name)
    elif getattr(block, "shared_expert", None) is not None:  # Qwen2-MoE
        shared = _mlp_sources(block.shared_expert, 1, name)
    elif getattr(block, "shared_mlp", None) is not None:  # Hunyuan
        shared = _mlp_sources(block.shared_mlp, 1, name)
    gate, bias, shared_gate, gate_bias = router_tensors(block)
    return MoELayerWeights(layer, gate, bias, experts, shared, shared_gate, gate_bias)


def _gate_and_up(experts: torch.nn.Module, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the gate and up halves of a stacked gate_up [E, 2I, ...]: concatenated [gate; up], or interleaved (gpt-oss)
    if getattr(experts, "is_concatenated", True):
        return gate_up.chunk(2, dim=1)
    return gate_up[:, 0::2], gate_up[:, 1::2]


ROUTER_NAMES = ("gate", "router")  # what a transformers MoE block calls its router: `gate`, gpt-oss's `router`


def router_name(block: torch.nn.Module) -> str | None:
    """The attribute that holds a transformers MoE block's router (ROUTER_NAMES), or None."""
    return next((n for n in ROUTER_NAMES if getattr(block, n, None) is not None), None)


def router_module(block: torch.nn.Module) -> torch.nn.Module | None:
    """A transformers MoE block's router module (`gate`; gpt-oss's `router`), or None."""
    name = router_name(block)
    return None if name is None else getattr(block, name)


def router_tensors(block: torch.nn.Module) -> tuple:
    """A transformers MoE block's router as FP32 copies: gate weight [E, D] (Hunyuan's `gate.wg`), correction bias [E]
    (DeepSeek's and GLM's on the gate, MiniMax-M2's on the block, ERNIE's in the gate's moe_statics), the Qwen2-MoE
    shared-expert gate [1, D] and the gate's own bias [E] (gpt-oss's router), each or None."""
    gate = router_module(block)
    gate = getattr(gate, "wg", gate)  # Hunyuan's gate module holds its Linear as `wg`
    bias = getattr(gate, "e_score_correction_bias", getattr(block, "e_score_correction_bias", None))
    statics = getattr(gate, "moe_statics", None)  # ERNIE 4.5 keeps it [1, E] in a module of its own
    bias = bias if statics is None else statics.e_score_correction_bias.reshape(-1)
    shared_gate = getattr(block, "shared_expert_gate", None)
    return tuple(None if t is None else t.detach().float().clone()
                 for t in (gate.weight, bias, None if shared_gate is None else shared_gate.weight,
                           getattr(gate, "bias", None)))


def release_sources(layers: list[MoELayerWeights]) -> int:
    """Drop every ModuleExpert's references to its module's tensors; returns how many were released."""
    n = 0
    for w in layers:
        for s in (*w.experts, *w.shared):
            if isinstance(s, ModuleExpert):
                s.release()
                n += 1
    return n


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

