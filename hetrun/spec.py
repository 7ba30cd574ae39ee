"""MoESpec: a frozen description of an MoE model's shape, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from hetrun.errors import SpecError

RouterKind = Literal["softmax_topk", "softmax_biased", "sigmoid_grouped", "sigmoid_topk"]
AttentionKind = Literal["gqa", "mla"]

# Families hetrun deploys (every one has a tiny model that the equivalence suite runs on each backend).
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3",
                      "glm4_moe", "dots1", "minimax_m2", "gpt_oss", "ernie4_5_moe", "hunyuan_v1_moe", "llama4_text")
# What the simulator's model of a family leaves out (plan and simulate say it once).
MODELED_APPROXIMATELY = {
    "gpt_oss": "its sliding-window layers (every other one, 128 tokens) are modeled with a full KV cache, so KV "
               "memory and attention traffic are upper bounds",
    "llama4_text": "its chunked-attention layers (3 of every 4, 8192-token chunks) are modeled with a full KV cache, "
                   "so KV memory and attention traffic are upper bounds",
}
ACTIVATIONS = ("silu", "clamped_swiglu")  # clamped_swiglu: gpt-oss's (ExpertActivation)
# Ceilings far above every published MoE model (DeepSeek-V3: 61 layers, 256 experts, hidden 7168, vocab 129,280).
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_SHARED_EXPERTS = 64
MAX_WIDTH = 2**18  # hidden and intermediate sizes
MAX_VOCAB = 2**22


@dataclass(frozen=True)
class RouterSpec:
    """How a token picks its experts.

    softmax_topk     softmax over the gate logits, top-k (Mixtral, Qwen, OLMoE); with n_group > 1 only the
                     topk_group groups of highest maximum score compete (DeepSeek-V2's group_limited_greedy).
    softmax_biased   softmax scores plus a correction bias choose, the chosen softmax scores weigh (ERNIE 4.5).
    sigmoid_grouped  sigmoid scores plus a correction bias choose, groups ranked by their two best scores
                     (DeepSeek-V3, GLM-4.5, dots.llm1; MiniMax-M2 with one group).
    sigmoid_topk     top-k of the gate logits, each chosen one's sigmoid scaling the expert's input (Llama 4).
    The chosen scores are normalised when norm_topk_prob, then multiplied by routed_scaling_factor. The gate's
    logits are computed in FP32 when fp32_logits, else in the hidden states' dtype; None takes the kind's own:
    FP32 for softmax_biased and sigmoid_grouped (ERNIE, DeepSeek, GLM), the hidden states' dtype for softmax_topk.
    """

    kind: RouterKind = "softmax_topk"
    top_k: int = 2
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    fp32_logits: bool | None = None

    @property
    def scales_input(self) -> bool:
        """Whether a pair's weight scales the expert's input (Llama 4) instead of its output."""
        return self.kind == "sigmoid_topk"


@dataclass(frozen=True)
class ExpertActivation:
    """How an expert combines its gate projection g and up projection u (after their biases, where it has them):

    silu            silu(g) * u: SwiGLU, every family but gpt-oss.
    clamped_swiglu  g' * sigmoid(alpha * g') * (u' + 1) with g' = min(g, limit), u' = clip(u, -limit, limit):
                    gpt-oss's (alpha 1.702, limit 7).
    """

    kind: str = "silu"
    alpha: float = 1.0
    limit: float = float("inf")

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise SpecError(f"expert activation {self.kind!r} is not one of {', '.join(ACTIVATIONS)}")

    def apply(self, g, u):
        """The combination of g and u [N, I]: torch tensors (in their dtype, as transformers computes it) or numpy
        arrays."""
        if not hasattr(g, "sigmoid"):  # numpy
            import numpy as np

            if self.kind == "silu":
                return g / (1.0 + np.exp(-g)) * u
            g, u = np.minimum(g, self.limit), np.clip(u, -self.limit, self.limit)
            return g / (1.0 + np.exp(-self.alpha * g)) * (u + 1.0)
        import torch  # a tensor came: torch is loaded

        if self.kind == "silu":
            return torch.nn.functional.silu(g) * u
        g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return g * torch.sigmoid(g * self.alpha) * (u + 1)


SILU = ExpertActivation()


@dataclass(frozen=True)
class AttentionSpec:
    kind: AttentionKind = "gqa"
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 128
    # MLA (DeepSeek-V2/V3) low-rank dimensions; zero when unused.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def kv_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """KV-cache bytes one token occupies in one layer."""
        if self.kind == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_elem
        return 2 * self.num_kv_heads * self.head_dim * bytes_per_elem

    def params(self, hidden: int) -> int:
        """Attention weight count of one layer."""
        if self.kind == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (hidden * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk) if self.q_lora_rank \
                else hidden * self.num_heads * qk
            kv = hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + \
                self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.num_heads * self.v_head_dim * hidden
        return hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)


@dataclass(frozen=True)
class MoESpec:
    name: str
    family: str
    num_layers: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    router: RouterSpec
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # per shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert
    first_dense_layers: int = 0  # leading layers with a dense MLP instead of MoE
    dense_intermediate_size: int = 0
    moe_layer_step: int = 1  # past first_dense_layers, layer i is MoE when (i + 1) % step == 0, else dense
    activation: str = "silu"
    swiglu_alpha: float = 1.702  # clamped_swiglu only (gpt-oss's)
    swiglu_limit: float = 7.0  # clamped_swiglu only
    expert_bias: bool = False  # experts' projections add biases (gpt-oss)
    vocab_size: int = 32000
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_experts < 1 or self.router.top_k < 1 or self.router.top_k > self.num_experts:
            raise SpecError(f"model '{self.name}': top_k={self.router.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.num_experts % max(self.router.n_group, 1):
            raise SpecError(f"model '{self.name}': num_experts={self.num_experts} must divide into n_group={self.router.n_group} groups")
        if self.hidden_size < 1 or self.moe_intermediate_size < 1 or self.num_layers < 1:
            raise SpecError(f"model '{self.name}': sizes must be positive")
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"model '{self.name}': activation '{self.activation}' is not supported; hetrun runs SwiGLU (silu) experts")
        if not 1 <= self.moe_layer_step <= max(self.num_layers, 1) or not self.moe_layer_ids:
            raise SpecError(f"model '{self.name}': moe_layer_step={self.moe_layer_step} and first_dense_layers="
                            f"{self.first_dense_layers} leave no MoE layer among {self.num_layers}")
        limits = {"num_layers": MAX_LAYERS, "num_experts": MAX_EXPERTS, "num_shared_experts": MAX_SHARED_EXPERTS,
                  "hidden_size": MAX_WIDTH, "moe_intermediate_size": MAX_WIDTH, "shared_intermediate_size": MAX_WIDTH,
                  "dense_intermediate_size": MAX_WIDTH, "vocab_size": MAX_VOCAB}
        for what, limit in limits.items():
            value = getattr(self, what)
            if not 0 <= value <= limit:  # ceilings no real model reaches: a typo or a hostile config fails at once
                raise SpecError(f"model '{self.name}': {what}={value} is outside 0..{limit}, the sizes hetrun handles")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def expert_activation(self) -> ExpertActivation:
        return SILU if self.activation == "silu" else ExpertActivation(self.activation, self.swiglu_alpha,
                                                                       self.swiglu_limit)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.first_dense_layers, self.num_layers) if (i + 1) % self.moe_layer_step == 0)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense MLP instead of MoE: the leading ones and those between MoE layers."""
        return self.num_layers - self.num_moe_layers

    @property
    def expert_params(self) -> int:
        """Weights in one routed expert (gate, up, down, and their biases where the experts have them: gpt-oss)."""
        biases = 2 * self.moe_intermediate_size + self.hidden_size if self.expert_bias else 0
        return 3 * self.hidden_size * self.moe_intermediate_size + biases

    @property
    def shared_expert_params(self) -> int:
        return 3 * self.hidden_size * self.shared_intermediate_size

    def expert_flops_per_token(self) -> int:
        """Multiply-adds x2 for one token through one routed expert."""
        return 2 * self.expert_params

    def total_params(self) -> int:
        """All weights of the model, embeddings included."""
        h = self.hidden_size
        attn = self.attention.params(h) * self.num_layers
        dense = 3 * h * self.dense_intermediate_size * self.num_dense_layers
        moe = self.num_moe_layers * (self.num_experts * self.expert_params
                                     + self.num_shared_experts * self.shared_expert_params
                                     + self.num_experts * h)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return attn + dense + moe + emb

    def active_params(self) -> int:
        """Weights one token uses: all but the routed experts it does not pick; both embeddings counted, as
        Mixtral, Qwen and DeepSeek count them (OpenAI's figures for gpt-oss leave out the input embedding)."""
        return self.total_params() - self.num_moe_layers * (self.num_experts - self.top_k) * self.expert_params

    def replace(self, **changes: Any) -> "MoESpec":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoESpec":
        try:
            d = dict(d)
            d["router"] = RouterSpec(**d["router"])
            d["attention"] = AttentionSpec(**d.get("attention", {}))
            return cls(**d)
        except (TypeError, KeyError) as e:
            raise SpecError(f"malformed model spec: {e}; write it with MoESpec.to_dict()") from None

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> "MoESpec":
        """A named preset: tiny, tiny-mixtral, mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite, deepseek-r1, ..."""
        key = name.lower()
        if key not in PRESETS:
            raise SpecError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_hf_config(cls, config: Any) -> "MoESpec":
        """Read a transformers config of a supported family (SUPPORTED_FAMILIES: Mixtral, Qwen2-MoE, Qwen3-MoE,
        Qwen3-Next, OLMoE, DeepSeek-V2, DeepSeek-V3, GLM-4.5, dots.llm1, MiniMax-M2, gpt-oss, ERNIE 4.5 MoE,
        Hunyuan-A13B, Llama 4 (its multimodal config through its text_config))."""
        if getattr(config, "model_type", None) == "llama4":  # the multimodal wrapper: its language model's config
            config = config.get_text_config()
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_FAMILIES:
            raise SpecError(f"model family '{mt}' is not supported; hetrun supports: {', '.join(SUPPORTED_FAMILIES)}")
        g = lambda k, default=None: getattr(config, k, default)  # noqa: E731
        heads = g("num_attention_heads")
        head_dim = g("head_dim") or config.hidden_size // heads
        attn = AttentionSpec("gqa", heads, g("num_key_value_heads", heads) or heads, head_dim)
        common = dict(name=g("name_or_path") or mt, family=mt, num_layers=config.num_hidden_layers,
                      hidden_size=config.hidden_size, vocab_size=config.vocab_size, activation=g("hidden_act", "silu"),
                      attention=attn, tie_word_embeddings=bool(g("tie_word_embeddings", False)))
        if mt in ("mixtral", "gpt_oss"):  # gpt-oss: softmax over the top-k logits is Mixtral's routing
            if mt == "gpt_oss":  # biases after each projection and a clamped SwiGLU; a bias on the router too
                common.update(activation="clamped_swiglu", swiglu_alpha=float(config.swiglu_alpha),
                              swiglu_limit=float(config.swiglu_limit), expert_bias=True)
            return cls(moe_intermediate_size=config.intermediate_size, num_experts=config.num_local_experts,
                       router=RouterSpec("softmax_topk", config.num_experts_per_tok, True), **common)
        if mt == "hunyuan_v1_moe":  # Hunyuan-A13B: an FP32 gate (`wg`), a shared MLP as wide as each expert
            if not isinstance(config.num_experts, int) or not isinstance(config.moe_topk, int):
                raise SpecError("hunyuan_v1_moe configs with per-layer num_experts or moe_topk lists are not "
                                "supported yet")
            return cls(moe_intermediate_size=config.intermediate_size, num_experts=config.num_experts,
                       num_shared_experts=1, shared_intermediate_size=config.intermediate_size,
                       router=RouterSpec("softmax_topk", config.moe_topk, True, fp32_logits=True), **common)
        if mt == "minimax_m2":  # sigmoid scores plus a correction bias, over all experts; the gate in the model's dtype
            return cls(moe_intermediate_size=config.intermediate_size, num_experts=config.num_local_experts,
                       router=RouterSpec("sigmoid_grouped", config.num_experts_per_tok, True, fp32_logits=False),
                       **common)
        if mt == "llama4_text":  # a shared expert in every MoE layer; dense MLP layers between them
            step = int(g("interleave_moe_layer_step", 1) or 1)
            listed = g("moe_layers")
            if listed is not None and list(listed) != list(range(step - 1, config.num_hidden_layers, step)):
                raise SpecError("llama4 configs whose moe_layers are not every interleave_moe_layer_step-th layer "
                                "are not supported yet")
            return cls(moe_intermediate_size=config.intermediate_size, num_experts=config.num_local_experts,
                       num_shared_experts=1, shared_intermediate_size=config.intermediate_size,
                       dense_intermediate_size=config.intermediate_size_mlp, moe_layer_step=step,
                       router=RouterSpec("sigmoid_topk", config.num_experts_per_tok, False), **common)
        if mt == "ernie4_5_moe":  # softmax scores, a correction bias that only chooses, normalised; in FP32
            start, step = int(g("moe_layer_start_index", 1) or 0), int(g("moe_layer_interval", 1) or 1)
            end = g("moe_layer_end_index", -1)
            if end not in (-1, None, config.num_hidden_layers - 1):
                raise SpecError("ernie4_5_moe configs whose MoE layers end before the last layer are not supported yet")
            shared = int(g("moe_num_shared_experts", 0) or 0)
            return cls(moe_intermediate_size=config.moe_intermediate_size, num_experts=config.moe_num_experts,
                       num_shared_experts=shared,
                       shared_intermediate_size=config.moe_intermediate_size if shared else 0,
                       first_dense_layers=start, dense_intermediate_size=config.intermediate_size, moe_layer_step=step,
                       router=RouterSpec("softmax_biased", config.moe_k, True, fp32_logits=True), **common)
        if mt in ("qwen3_moe", "olmoe", "qwen2_moe", "qwen3_next"):
            sparse_step = g("decoder_sparse_step", 1) or 1
            mlp_only = list(g("mlp_only_layers", []) or [])
            if mlp_only:
                raise SpecError(f"{mt} configs with mlp_only_layers are not supported yet")
            moe_i = g("moe_intermediate_size") or config.intermediate_size
            shared = dict(num_shared_experts=0)
            if mt in ("qwen2_moe", "qwen3_next") and g("shared_expert_intermediate_size", 0):
                shared = dict(num_shared_experts=1, shared_intermediate_size=config.shared_expert_intermediate_size,
                              shared_expert_gate=True)
            return cls(moe_intermediate_size=moe_i, num_experts=config.num_experts, moe_layer_step=int(sparse_step),
                       dense_intermediate_size=config.intermediate_size if sparse_step != 1 else 0,
                       router=RouterSpec("softmax_topk", config.num_experts_per_tok, bool(g("norm_topk_prob", False))),
                       **shared, **common)
        if mt in ("glm4_moe", "dots1"):  # DeepSeek-V3's MoE layers beneath grouped-query attention
            return cls(**cls._deepseek_moe(config), **common)
        attn = AttentionSpec("mla", heads, heads, config.qk_nope_head_dim + config.qk_rope_head_dim,
                             g("q_lora_rank") or 0, config.kv_lora_rank, config.qk_nope_head_dim,
                             config.qk_rope_head_dim, config.v_head_dim)
        common["attention"] = attn
        return cls(**cls._deepseek_moe(config), **common)

    @staticmethod
    def _deepseek_moe(config: Any) -> dict:
        # the MoE fields of DeepSeek-V2, DeepSeek-V3, GLM-4.5 and dots.llm1 configs, which name them alike
        g = lambda k, default=None: getattr(config, k, default)  # noqa: E731
        groups, topk_groups = g("n_group", 1) or 1, g("topk_group", 1) or 1
        if config.model_type == "deepseek_v2":
            method = g("topk_method", "greedy")
            if method not in ("greedy", "group_limited_greedy"):
                raise SpecError(f"deepseek_v2 topk_method {str(method)[:40]!r} is not supported; hetrun routes "
                                "greedy and group_limited_greedy")
            if method == "greedy":
                groups = topk_groups = 1
            # transformers' DeepSeek-V2 router never normalises its top-k scores, whatever norm_topk_prob says
            router = RouterSpec("softmax_topk", config.num_experts_per_tok, False, groups, topk_groups,
                                float(g("routed_scaling_factor", 1.0)), fp32_logits=True)
        else:
            router = RouterSpec("sigmoid_grouped", config.num_experts_per_tok, bool(g("norm_topk_prob", True)),
                                groups, topk_groups, float(g("routed_scaling_factor", 1.0)))
        return dict(moe_intermediate_size=config.moe_intermediate_size, num_experts=config.n_routed_experts,
                    num_shared_experts=g("n_shared_experts", 0) or 0,
                    shared_intermediate_size=config.moe_intermediate_size,
                    first_dense_layers=g("first_k_dense_replace", 0) or 0,
                    dense_intermediate_size=config.intermediate_size, router=router)

    def to_hf_config(self, **overrides: Any):
        """A transformers config of this shape (for building small random models to test against)."""
        import transformers as tf  # heavy: spec is imported by every command; only tests build configs

        a = self.attention
        base = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=a.num_heads, hidden_act=self.activation,
                    tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=4096)
        if self.family == "llama4_text":  # chunked attention on 3 of every 4 layers, as Llama 4 has it
            cfg = tf.Llama4TextConfig(intermediate_size=self.moe_intermediate_size,
                                      intermediate_size_mlp=self.dense_intermediate_size or self.moe_intermediate_size,
                                      num_local_experts=self.num_experts, num_experts_per_tok=self.top_k,
                                      interleave_moe_layer_step=self.moe_layer_step, num_key_value_heads=a.num_kv_heads,
                                      head_dim=a.head_dim, attention_chunk_size=8, **base)
        elif self.family == "hunyuan_v1_moe":
            cfg = tf.HunYuanMoEV1Config(intermediate_size=self.moe_intermediate_size, num_experts=self.num_experts,
                                        moe_topk=self.top_k, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                                        **base)
        elif self.family == "ernie4_5_moe":
            cfg = tf.Ernie4_5_MoeConfig(
                intermediate_size=self.dense_intermediate_size or self.moe_intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size, moe_num_experts=self.num_experts, moe_k=self.top_k,
                moe_num_shared_experts=self.num_shared_experts, moe_layer_start_index=self.first_dense_layers,
                moe_layer_interval=self.moe_layer_step, num_key_value_heads=a.num_kv_heads, **base)
            cfg.head_dim = a.head_dim
        elif self.family == "gpt_oss":  # every other layer attends through a sliding window, with sinks
            cfg = tf.GptOssConfig(intermediate_size=self.moe_intermediate_size, num_local_experts=self.num_experts,
                                  num_experts_per_tok=self.top_k, num_key_value_heads=a.num_kv_heads,
                                  head_dim=a.head_dim, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                                  **{k: v for k, v in base.items() if k != "hidden_act"})
        elif self.family in ("mixtral", "minimax_m2"):
            cls = tf.MixtralConfig if self.family == "mixtral" else tf.MiniMaxM2Config
            cfg = cls(intermediate_size=self.moe_intermediate_size, num_local_experts=self.num_experts,
                      num_experts_per_tok=self.top_k, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, **base)
        elif self.family in ("qwen3_moe", "olmoe", "qwen2_moe", "qwen3_next"):
            cls = {"qwen3_moe": tf.Qwen3MoeConfig, "olmoe": tf.OlmoeConfig, "qwen2_moe": tf.Qwen2MoeConfig,
                   "qwen3_next": tf.Qwen3NextConfig}[self.family]
            extra = {}
            if self.family in ("qwen2_moe", "qwen3_next"):
                extra["shared_expert_intermediate_size"] = self.shared_intermediate_size
            if self.family == "qwen3_next":  # its linear-attention layers sized like the full-attention ones
                extra.update(linear_num_key_heads=a.num_kv_heads, linear_num_value_heads=a.num_heads,
                             linear_key_head_dim=a.head_dim, linear_value_head_dim=a.head_dim)
                # every 4th layer full attention, as Qwen3-Next has it; at least one (transformers needs one)
                types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(self.num_layers)]
                extra["layer_types"] = types[:-1] + ["full_attention"] if "full_attention" not in types else types
            if self.family != "olmoe":
                extra["head_dim"] = a.head_dim
            if self.moe_layer_step != 1:  # dense MLP layers between the MoE ones, of intermediate_size
                extra["decoder_sparse_step"] = self.moe_layer_step
            cfg = cls(intermediate_size=self.dense_intermediate_size or self.moe_intermediate_size,
                      moe_intermediate_size=self.moe_intermediate_size,
                      num_experts=self.num_experts, num_experts_per_tok=self.top_k,
                      norm_topk_prob=self.router.norm_topk_prob, num_key_value_heads=a.num_kv_heads, **extra, **base)
        elif self.family in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1"):
            r = self.router
            moe = dict(intermediate_size=self.dense_intermediate_size or self.moe_intermediate_size,
                       moe_intermediate_size=self.moe_intermediate_size, n_routed_experts=self.num_experts,
                       n_shared_experts=self.num_shared_experts, num_experts_per_tok=r.top_k, n_group=r.n_group,
                       topk_group=r.topk_group, routed_scaling_factor=r.routed_scaling_factor,
                       norm_topk_prob=r.norm_topk_prob, first_k_dense_replace=self.first_dense_layers)
            mla = dict(num_key_value_heads=a.num_heads, q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
                       qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                       v_head_dim=a.v_head_dim)
            if self.family == "deepseek_v3":
                cfg = tf.DeepseekV3Config(**moe, **mla, **base)
            elif self.family == "deepseek_v2":
                method = "group_limited_greedy" if r.n_group > 1 else "greedy"
                cfg = tf.DeepseekV2Config(**moe, **mla, topk_method=method, **base)
            elif self.family == "dots1":
                cfg = tf.Dots1Config(**moe, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, **base)
            else:
                # q, k and v with biases, as every published GLM-4.5 and 4.6 config has them
                cfg = tf.Glm4MoeConfig(**moe, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                                       attention_bias=True, **base)
        else:
            raise SpecError(f"model family '{self.family}' has no transformers config; supported: {', '.join(SUPPORTED_FAMILIES)}")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg


def _mla(heads: int, q_lora: int, kv_lora: int = 512) -> AttentionSpec:
    return AttentionSpec("mla", heads, heads, 192, q_lora, kv_lora, 128, 64, 128)


# Published shapes (config.json of each model on its hub page).
PRESETS: dict[str, MoESpec] = {
    # A tiny DeepSeek-V3-style model: grouped sigmoid routing, 2 shared experts, one dense layer first.
    # Hidden size 72 is deliberately not a multiple of 64.
    "tiny": MoESpec(
        name="tiny", family="deepseek_v3", num_layers=3, hidden_size=72, moe_intermediate_size=48,
        num_experts=12, num_shared_experts=2, shared_intermediate_size=48, first_dense_layers=1,
        dense_intermediate_size=96, vocab_size=256,
        router=RouterSpec("sigmoid_grouped", top_k=4, norm_topk_prob=True, n_group=4, topk_group=2,
                          routed_scaling_factor=2.5),
        attention=AttentionSpec("mla", 4, 4, 24, 32, 32, 16, 8, 16)),
    "tiny-mixtral": MoESpec(
        name="tiny-mixtral", family="mixtral", num_layers=2, hidden_size=64, moe_intermediate_size=96,
        num_experts=8, vocab_size=256, router=RouterSpec("softmax_topk", 2, True),
        attention=AttentionSpec("gqa", 4, 2, 16)),
    "mixtral-8x7b": MoESpec(
        name="mixtral-8x7b", family="mixtral", num_layers=32, hidden_size=4096, moe_intermediate_size=14336,
        num_experts=8, vocab_size=32000, router=RouterSpec("softmax_topk", 2, True),
        attention=AttentionSpec("gqa", 32, 8, 128)),
    # The layer hetrun bench moe measures: Mixtral-shaped but small enough for a CPU.
    "mixtral-bench": MoESpec(
        name="mixtral-bench", family="mixtral", num_layers=1, hidden_size=1024, moe_intermediate_size=2816,
        num_experts=8, vocab_size=32000, router=RouterSpec("softmax_topk", 2, True),
        attention=AttentionSpec("gqa", 8, 8, 128)),
    "mixtral-8x22b": MoESpec(
        name="mixtral-8x22b", family="mixtral", num_layers=56, hidden_size=6144, moe_intermediate_size=16384,
        num_experts=8, vocab_size=32768, router=RouterSpec("softmax_topk", 2, True),
        attention=AttentionSpec("gqa", 48, 8, 128)),
    "qwen3-235b-a22b": MoESpec(
        name="qwen3-235b-a22b", family="qwen3_moe", num_layers=94, hidden_size=4096, moe_intermediate_size=1536,
        num_experts=128, vocab_size=151936, router=RouterSpec("softmax_topk", 8, True),
        attention=AttentionSpec("gqa", 64, 4, 128)),
    "qwen3-30b-a3b": MoESpec(
        name="qwen3-30b-a3b", family="qwen3_moe", num_layers=48, hidden_size=2048, moe_intermediate_size=768,
        num_experts=128, vocab_size=151936, router=RouterSpec("softmax_topk", 8, True),
        attention=AttentionSpec("gqa", 32, 4, 128)),
    "deepseek-v2-lite": MoESpec(
        name="deepseek-v2-lite", family="deepseek_v2", num_layers=27, hidden_size=2048,
        moe_intermediate_size=1408, num_experts=64, num_shared_experts=2, shared_intermediate_size=1408,
        first_dense_layers=1, dense_intermediate_size=10944, vocab_size=102400,
        router=RouterSpec("softmax_topk", 6, False, 1, 1, 1.0, fp32_logits=True), attention=_mla(16, 0)),
    "deepseek-v2": MoESpec(
        name="deepseek-v2", family="deepseek_v2", num_layers=60, hidden_size=5120, moe_intermediate_size=1536,
        num_experts=160, num_shared_experts=2, shared_intermediate_size=1536, first_dense_layers=1,
        dense_intermediate_size=12288, vocab_size=102400,
        router=RouterSpec("softmax_topk", 6, False, 8, 3, 16.0, fp32_logits=True), attention=_mla(128, 1536)),
    "deepseek-v3": MoESpec(
        name="deepseek-v3", family="deepseek_v3", num_layers=61, hidden_size=7168, moe_intermediate_size=2048,
        num_experts=256, num_shared_experts=1, shared_intermediate_size=2048, first_dense_layers=3,
        dense_intermediate_size=18432, vocab_size=129280,
        router=RouterSpec("sigmoid_grouped", 8, True, 8, 4, 2.5), attention=_mla(128, 1536)),
    "glm-4.5-air": MoESpec(
        name="glm-4.5-air", family="glm4_moe", num_layers=46, hidden_size=4096, moe_intermediate_size=1408,
        num_experts=128, num_shared_experts=1, shared_intermediate_size=1408, first_dense_layers=1,
        dense_intermediate_size=10944, vocab_size=151552, router=RouterSpec("sigmoid_grouped", 8, True, 1, 1, 1.0),
        attention=AttentionSpec("gqa", 96, 8, 128)),
    "minimax-m2": MoESpec(
        name="minimax-m2", family="minimax_m2", num_layers=62, hidden_size=3072, moe_intermediate_size=1536,
        num_experts=256, vocab_size=200064, router=RouterSpec("sigmoid_grouped", 8, True, fp32_logits=False),
        attention=AttentionSpec("gqa", 48, 8, 128)),
    "gpt-oss-120b": MoESpec(
        name="gpt-oss-120b", family="gpt_oss", num_layers=36, hidden_size=2880, moe_intermediate_size=2880,
        num_experts=128, vocab_size=201088, activation="clamped_swiglu", expert_bias=True,
        router=RouterSpec("softmax_topk", 4, True), attention=AttentionSpec("gqa", 64, 8, 64)),
    # 64 experts beside a shared one as wide, top-8; tied embeddings assumed (80.4B, untied 80.9B: the card says 80B)
    "hunyuan-a13b": MoESpec(
        name="hunyuan-a13b", family="hunyuan_v1_moe", num_layers=32, hidden_size=4096, moe_intermediate_size=3072,
        num_experts=64, num_shared_experts=1, shared_intermediate_size=3072, vocab_size=128167,
        tie_word_embeddings=True, router=RouterSpec("softmax_topk", 8, True, fp32_logits=True),
        attention=AttentionSpec("gqa", 32, 8, 128)),
    "ernie-4.5-300b-a47b": MoESpec(
        name="ernie-4.5-300b-a47b", family="ernie4_5_moe", num_layers=54, hidden_size=8192,
        moe_intermediate_size=3584, num_experts=64, first_dense_layers=3, dense_intermediate_size=28672,
        vocab_size=103424, router=RouterSpec("softmax_biased", 8, True, fp32_logits=True),
        attention=AttentionSpec("gqa", 64, 8, 128)),
    "llama-4-scout": MoESpec(
        name="llama-4-scout", family="llama4_text", num_layers=48, hidden_size=5120, moe_intermediate_size=8192,
        num_experts=16, num_shared_experts=1, shared_intermediate_size=8192, dense_intermediate_size=16384,
        vocab_size=202048, router=RouterSpec("sigmoid_topk", 1, False), attention=AttentionSpec("gqa", 40, 8, 128)),
}
PRESETS["gpt-oss-20b"] = PRESETS["gpt-oss-120b"].replace(name="gpt-oss-20b", num_layers=24, num_experts=32)
PRESETS["llama-4-maverick"] = PRESETS["llama-4-scout"].replace(  # MoE every other layer, 128 experts
    name="llama-4-maverick", num_experts=128, moe_layer_step=2)
PRESETS["ernie-4.5-21b-a3b"] = PRESETS["ernie-4.5-300b-a47b"].replace(
    name="ernie-4.5-21b-a3b", num_layers=28, hidden_size=2560, moe_intermediate_size=1536, first_dense_layers=1,
    dense_intermediate_size=12288, num_shared_experts=2, shared_intermediate_size=1536, tie_word_embeddings=True,
    router=RouterSpec("softmax_biased", 6, True, fp32_logits=True), attention=AttentionSpec("gqa", 20, 4, 128))
PRESETS["deepseek-r1"] = PRESETS["deepseek-v3"].replace(name="deepseek-r1")
PRESETS["kimi-k2"] = PRESETS["deepseek-v3"].replace(  # DeepSeek-V3's architecture: 384 experts, 64 heads, no groups
    name="kimi-k2", num_experts=384, first_dense_layers=1, vocab_size=163840,
    router=RouterSpec("sigmoid_grouped", 8, True, 1, 1, 2.827), attention=_mla(64, 1536))
