"""Simulation settings a deployment profile carries under `extra: {sim: {...}}`, validated strictly.

They say which device groups run attention, dense layers and embeddings and which hold routed experts, how
experts are laid out (redundant slots, slots per device), how the all-to-all is sent (dtypes, dedup), how
attention kernels perform, and the runtime's fixed costs; how the deployment serves (prefill and decode on
separate deployments, or aggregated: chunked prefill beside decode in every step), tensor-parallel attention, and
multi-token prediction / speculative decoding. Every number should carry its source under `sources`; nothing here
is fitted to the results it is meant to predict.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetrun.errors import ProfileError
from hetrun.profile import DeviceType, Profile, StrictModel, validate_model
from hetrun.roofline import Efficiency


class EfficiencySpec(StrictModel):
    compute: float = Field(gt=0, le=1)
    memory: float = Field(gt=0, le=1)
    launch_us: float | None = Field(default=None, ge=0)


class MtpSpec(StrictModel):
    """Multi-token prediction (DeepSeek's MTP module) or any speculative decoding with a small draft.

    Each decode step drafts `draft_tokens` tokens (each a pass of `draft_layers` transformer layers of the model's
    own shape plus the LM head), then the main model verifies them with 1 + draft_tokens query tokens per request.
    `acceptance`: probability that a draft token is accepted given the ones before it were; a step then yields
    1 + a + a^2 + ... + a^k tokens per request on average.
    """

    draft_tokens: int = Field(default=1, ge=1, le=16)
    acceptance: float = Field(ge=0, le=1)
    draft_layers: int = Field(default=1, ge=0, le=8)

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a request gains per decode step."""
        return float(sum(self.acceptance ** i for i in range(self.draft_tokens + 1)))


class SimSettings(StrictModel):
    # Roles: device group ids. None: every group.
    attention_devices: list[str] | None = None  # run attention, dense layers, embeddings and LM head (data parallel)
    expert_devices: list[str] | None = None  # hold routed experts
    shared_experts: Literal["local", "plan"] = "local"  # local: a replica beside each attention device (DeepSeek DP)
    # Expert layout.
    redundant_experts: int = Field(default=0, ge=0)
    slots_per_device: dict[str, int] = {}  # group id -> routed-expert slots per MoE layer on each of its devices
    # Precisions and transfer formats.
    kv_cache_dtype: Literal["bf16", "fp16", "fp8", "int8", "fp32"] = "bf16"
    dispatch_dtype: Literal["bf16", "fp16", "fp8", "int8", "fp32", "nvfp4", "mxfp4"] = "bf16"
    combine_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # one copy per routed pair, per device, per node; all: every token to every expert device (allgather before the
    # experts, reduce-scatter after, as TensorRT-LLM runs attention-DP MoE)
    dispatch_dedup: Literal["expert", "device", "node", "all"] = "device"
    # fused: dispatch kernels read each token in place and write it straight into the experts' buffers (DeepEP,
    # TensorRT-LLM); permute: tokens are first copied out once per routed expert and sorted by expert, sent with a
    # plain all-to-all, sorted again by local expert on arrival and put back in order before the combine (two
    # extra gathers of every routed row, as the CANN recipes' Double-Routing and Megatron's token permutation)
    expert_routing: Literal["fused", "permute"] = "fused"
    attention_precision: dict[str, str] = {}  # group id -> matmul precision of projections (default: the device's)
    # Execution.
    micro_batches: Literal[1, 2] = 2  # two: DeepSeek's dual micro-batch overlap of compute and all-to-all
    # disaggregated: prefill and decode on separate deployments (DeepSeek, SGLang PD); aggregated: every step
    # runs the decode batch plus a chunk of waiting prompts (vLLM, SGLang and TensorRT-LLM's default)
    serving: Literal["disaggregated", "aggregated"] = "disaggregated"
    max_num_tokens: int | None = Field(default=None, ge=1)  # aggregated: tokens per attention device and step
    # aggregated: each prompt piece lands on one attention-DP rank independently of the others (every rank waits for
    # the busiest), or a scheduler aligns them so every rank prefills in the same steps (TensorRT-LLM's ADP balance)
    aggregated_prefill: Literal["independent", "aligned"] = "independent"
    attention_tp: int = Field(default=1, ge=1)  # tensor-parallel attention inside each node (1: data parallel)
    mtp: MtpSpec | None = None  # multi-token prediction / speculative decoding
    prefill_tokens_per_device: int = Field(default=16384, ge=1)  # prefill chunk each attention device computes per step
    max_batch_per_device: int = Field(default=1024, ge=1)  # decode requests per attention device, upper bound
    step_overhead_us: float = Field(default=0.0, ge=0)  # host work between steps (scheduling, sampling)
    comm_sm_fraction: float = Field(default=0.0, ge=0, lt=1)  # compute units the all-to-all kernels occupy
    routing_overdispersion: float = Field(default=1.0, ge=0)  # variance/mean of per-step expert loads (1: Poisson)
    balance_attention: bool = True  # a load balancer evens KV length across attention devices
    # Kernel classes other than GEMMs (GEMMs use the device type's own efficiencies unless gemm_efficiency says).
    gemm_efficiency: dict[str, EfficiencySpec] = {}  # device type name -> efficiency of FP8/BF16 GEMMs
    attention_efficiency: dict[str, EfficiencySpec] = {}  # device type name -> attention kernels
    elementwise_kernels_per_layer: int = Field(default=10, ge=0)  # norms, RoPE, layouts, quantize, residual adds
    workspace_gb: float = Field(default=2.0, ge=0)  # activations, comm buffers, graphs kept on every device
    kv_load_gbs: float | None = Field(default=None, gt=0)  # prefix-cache read bandwidth per device (None: inter-node link)
    sources: dict[str, str] = {}  # setting -> where its value comes from


def sim_settings(profile: Profile) -> SimSettings:
    """The profile's `extra.sim` block, validated, with group ids checked against the profile."""
    raw = profile.model.extra.get("sim", {}) or {}
    s = validate_model(SimSettings, raw, f"profile '{profile.name}'", "extra.sim.")
    groups = {d.group for d in profile.devices}
    for field_name in ("attention_devices", "expert_devices"):
        for g in getattr(s, field_name) or []:
            if g not in groups:
                raise ProfileError(f"profile '{profile.name}': extra.sim.{field_name} names '{g}', which is not a "
                                   f"device group; groups are: {', '.join(sorted(groups))}")
    for g in list(s.slots_per_device) + list(s.attention_precision):
        if g not in groups:
            raise ProfileError(f"profile '{profile.name}': extra.sim names device group '{g}', which the profile lacks; "
                               f"groups are: {', '.join(sorted(groups))}")
    if any(v < 0 for v in s.slots_per_device.values()):
        raise ProfileError(f"profile '{profile.name}': extra.sim.slots_per_device must be >= 0")
    if s.attention_tp > 1:
        _check_tp(profile, s)
    return s


def _check_tp(profile: Profile, s: SimSettings) -> None:
    """Tensor-parallel attention groups are `attention_tp` consecutive devices of one type inside one node."""
    tp = s.attention_tp
    att = [d for d in profile.devices if s.attention_devices is None or d.group in s.attention_devices]
    by_node: dict[tuple[str, int], int] = {}
    for d in att:
        by_node[(d.group, d.node)] = by_node.get((d.group, d.node), 0) + 1
    for (group, node), n in by_node.items():
        if n % tp:
            raise ProfileError(f"profile '{profile.name}': extra.sim.attention_tp={tp} does not divide the {n} "
                               f"attention devices of group '{group}' in node {node}; tensor-parallel groups stay "
                               "inside a node, so use a divisor of the devices per node")


def gemm_eff(s: SimSettings, dt: DeviceType) -> Efficiency:
    spec = s.gemm_efficiency.get(dt.name)
    if spec is None:
        return Efficiency.of(dt)
    return Efficiency(spec.compute, spec.memory, dt.launch_overhead_us if spec.launch_us is None else spec.launch_us)


def attention_eff(s: SimSettings, dt: DeviceType) -> Efficiency:
    spec = s.attention_efficiency.get(dt.name)
    base = gemm_eff(s, dt)
    if spec is None:
        return base
    return Efficiency(spec.compute, spec.memory, base.launch_us if spec.launch_us is None else spec.launch_us)
