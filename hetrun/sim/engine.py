"""The step simulator: one prefill chunk, one decode step or one aggregated step of a whole deployment, layer by layer.

Per layer and micro-batch there are four stages: attention (and dense MLP) on the attention devices, the
dispatch all-to-all, the experts on the expert devices (shared experts beside attention when they run data
parallel), and the combine all-to-all. Devices synchronize at every all-to-all, so each stage lasts as long as
its slowest device. With two micro-batches the stages run on a compute stream and a communication stream,
micro-batch 1's communication behind micro-batch 2's compute (DeepSeek's dual micro-batch overlap).

Decode grows the batch per attention device until the per-user tokens/s target or memory is violated (or runs the
workload's fixed `decode_batch`). On mixed hardware every attention device gets as many requests as it serves in
the attention time the fastest one takes for its own, within its memory, and none where its fixed attention cost
alone exceeds that time (`equal_time_requests`); all-to-all traffic follows where the step's tokens actually sit.
Prefill takes a chunk of prompt tokens per attention device and shrinks it until the TTFT target holds.
Aggregated serving (`extra.sim.serving: aggregated`) runs the decode batch and, in the same step, the chunk of
prompts that keeps the batch full in steady state (each finished request is replaced by a new one), within
`max_num_tokens` per device.

Tensor-parallel attention (`attention_tp`): a group of tp devices in a node computes its requests' attention
together, each device 1/tp of the heads, with one all-reduce of the hidden states per layer (two in dense
layers); each device then dispatches its 1/tp share of the tokens to the experts. MTP / speculative decoding
(`mtp`): each step verifies 1 + draft tokens per request and drafts them with `draft_layers` extra layers each,
and yields 1 + a + ... + a^k tokens per request (`MtpSpec.tokens_per_step`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from hetrun.errors import HetrunError, PlacementError
from hetrun.formats import DTYPE_BYTES
from hetrun.placement.precisions import resident_expert_bytes
from hetrun.profile import Profile
from hetrun.roofline import op_seconds
from hetrun.sim.comm import Links, alltoall_seconds, device_links, token_bytes, traffic
from hetrun.sim.operators import (
    attention_ops,
    embedding_ops,
    expert_elementwise_op,
    grouped_expert_op,
    kv_bytes_per_token,
    kv_replication,
    layer_misc_ops,
    permute_ops,
    stage_seconds,
    swiglu_ops,
    tp_allreduce_seconds,
)
from hetrun.sim.roles import Layout, attention_line, attention_speed, build_layout, equal_time_requests, fixed_bytes
from hetrun.sim.settings import SimSettings, attention_eff, gemm_eff, sim_settings
from hetrun.sim.workload import Workload
from hetrun.spec import MoESpec

KV_SAMPLES = 8192
ACTIVATION_TENSORS = 24  # live BF16 hidden-size tensors per token in flight (activations, buffers)


@dataclass
class Step:
    """One simulated step: its time, each stage per layer and device, and the schedule of both streams."""

    seconds: float
    stages: dict[str, np.ndarray]  # name -> [L, D] seconds of one micro-batch on each device
    stage_max: dict[str, np.ndarray]  # name -> [L] slowest device
    tasks: list[tuple[str, str, int, int, float, float]]  # (stream, stage, layer, micro-batch, start, duration)
    busy: np.ndarray  # [D] compute seconds per step on each device
    tail: float  # LM head and host overhead after the last layer
    micro_batches: int = 1
    draft_s: float = 0.0  # MTP / speculative drafting before the step (included in seconds)


@dataclass(frozen=True)
class StepWork:
    """What each device computes in one step, all micro-batches together ([D] arrays, the device's own share; a
    tensor-parallel attention group computes attention for tp times as much)."""

    requests: np.ndarray  # [D] decode requests
    kv: np.ndarray  # [D] KV tokens summed over those requests (each read once per step)
    prefill: np.ndarray  # [D] prompt tokens computed
    ctx: np.ndarray  # [D] context tokens of that prefill (cached prefix + new tokens, re-expanded by MLA)
    pairs: np.ndarray  # [D] causal attention pairs of that prefill
    head: np.ndarray  # [D] LM-head rows
    queries: float = 1.0  # query tokens per decode request (1 + draft tokens when verifying)

    @property
    def tokens(self) -> np.ndarray:
        """[D] tokens each device sends through the MoE layers."""
        return self.requests * self.queries + self.prefill

    @classmethod
    def decode(cls, requests: np.ndarray, kv: np.ndarray, queries: float = 1.0) -> "StepWork":
        z = np.zeros_like(requests, dtype=np.float64)
        return cls(requests, kv, z, z, z, requests * queries, queries)

    @classmethod
    def prefill_only(cls, tokens: np.ndarray, ctx: np.ndarray, pairs: np.ndarray, head: np.ndarray) -> "StepWork":
        z = np.zeros_like(tokens, dtype=np.float64)
        return cls(z, z, tokens, ctx, pairs, head)


@dataclass
class PhaseResult:
    phase: str
    feasible: bool
    reason: str = ""
    tokens_per_s: float = 0.0  # prefill: input tokens incl. cache hits; decode, aggregated: output tokens
    computed_tokens_per_s: float = 0.0  # prefill, aggregated: prompt tokens actually computed
    capacity_tokens_per_s: float = 0.0  # prefill: back-to-back steps, before queueing for the TTFT target
    utilization: float = 1.0  # prefill: share of capacity the TTFT target allows
    input_tokens_per_s: float = 0.0  # aggregated: input tokens incl. cache hits
    step_s: float = 0.0
    batch_per_device: float = 0.0  # decode, aggregated: requests per attention device; prefill: chunk tokens
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    per_user_tps: float = 0.0
    tokens_per_step: float = 1.0  # decode, aggregated: tokens a request gains per step (MTP: > 1)
    joules_per_token: float = 0.0
    memory: dict = field(default_factory=dict)  # group -> {weights_gb, kv_gb, workspace_gb, total_gb, capacity_gb}
    busy_fraction: float = 0.0  # mean over devices of compute-busy time per step
    limit: str = ""  # what stopped the batch from growing: target, memory, max_batch, concurrency, fixed, ...
    step: Step | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "step"}
        if self.step is not None:
            d["stage_ms_per_layer"] = {k: float(v.mean() * 1e3) for k, v in self.step.stage_max.items()}
        return d


class StepModel:
    """A deployment ready to simulate: layout, links and routing traffic computed once."""

    def __init__(self, spec: MoESpec, profile: Profile, workload: Workload, settings: SimSettings | None = None):
        self.spec = spec
        self.profile = profile
        self.workload = workload
        self.settings = settings or sim_settings(profile)
        s = self.settings
        self.tp = s.attention_tp
        self.mtp = s.mtp
        self.queries = 1.0 + (s.mtp.draft_tokens if s.mtp else 0)  # query tokens per decode request and step
        self.tokens_per_step = s.mtp.tokens_per_step if s.mtp else 1.0
        popularity = workload.expert_popularity(spec.num_moe_layers, spec.num_experts)
        self.layout: Layout = build_layout(spec, profile, s, popularity, self.tokens_per_step / workload.per_user_tps)
        self.links: Links = device_links(self.layout)
        lay = self.layout
        D = lay.num_devices
        self.att = lay.is_attention
        self.att_share = self._attention_shares()  # [D] share of requests per attention device (sums to 1)
        self.traffic = traffic(lay, self.att_share)
        self._traffic_cache: dict = {}
        self._steps: dict = {}  # steps already simulated, by their work
        self.kv_elem = DTYPE_BYTES[s.kv_cache_dtype]
        self.kv_per_token = kv_bytes_per_token(spec, self.kv_elem)
        # KV bytes a device stores per token of its own share: TP groups replicate MLA's latent; MTP layers add theirs
        draft_layers = s.mtp.draft_layers if s.mtp else 0
        self.kv_stored_per_token = self.kv_per_token * kv_replication(spec, self.tp) \
            * (spec.num_layers + draft_layers) / spec.num_layers
        self.dispatch_bytes = token_bytes(spec.hidden_size, s.dispatch_dtype)
        self.combine_bytes = token_bytes(spec.hidden_size, s.combine_dtype)
        plan = lay.plan
        # distinct experts with traffic per device and layer [L, D]
        L = plan.num_layers
        self.slot_pick = np.take_along_axis(lay.popularity, plan.phy2log, 1) * plan.share  # [L, R] pick chance
        held = np.zeros((L, D, spec.num_experts), dtype=bool)
        held[np.repeat(np.arange(L), plan.num_slots), plan.device_of.ravel(), plan.phy2log.ravel()] = True
        self.experts_held = held.sum(-1)  # [L, D] distinct experts stored per device
        self.moe_layer = np.isin(np.arange(spec.num_layers), spec.moe_layer_ids)  # [num_layers]
        self._eff = [{"gemm": gemm_eff(s, d.type), "attention": attention_eff(s, d.type),
                      "elementwise": gemm_eff(s, d.type)} for d in lay.devices]
        # devices that compute alike: same type and precisions (their stage times are computed once)
        kinds = [(d.type.name, p, ap) for d, p, ap in zip(lay.devices, lay.precision, lay.attention_precision)]
        self._expert_groups: dict[tuple, np.ndarray] = {}
        for i in lay.expert_ids:
            self._expert_groups.setdefault(kinds[i], []).append(int(i))
        self._expert_groups = {k: np.array(v) for k, v in self._expert_groups.items()}
        self._kind = kinds
        n_exp = int((self.layout.is_expert).sum())
        self.z_straggler = math.sqrt(2 * math.log(n_exp)) if n_exp > 1 else 0.0
        self.fixed = np.array([fixed_bytes(spec, d, p, ap, bool(a), s)
                               for d, p, ap, a in zip(lay.devices, lay.precision, lay.attention_precision, self.att)])
        mtp_layers = (spec.num_moe_layers + draft_layers) / max(spec.num_moe_layers, 1)  # the MTP layer's experts
        self.expert_weights = np.array([self.experts_held[:, i].sum() * mtp_layers * resident_expert_bytes(
            lay.devices[i], lay.precision[i], spec.hidden_size, spec.moe_intermediate_size) for i in range(D)])
        self.capacity = np.array([d.memory_bytes for d in lay.devices])
        over = (self.fixed + self.expert_weights) > self.capacity
        if over.any():
            i = int(np.argmax(over))
            dev = lay.devices[i]
            raise PlacementError(
                f"model '{spec.name}' does not fit profile '{profile.name}': device '{dev.id}' needs "
                f"{(self.fixed[i] + self.expert_weights[i]) / 1e9:,.1f} GB of weights and workspace but has "
                f"{dev.memory_bytes / 1e9:,.0f} GB; add devices, lower the precision or move roles elsewhere")

    def active_slots(self, picks: float) -> np.ndarray:
        """[L, D] expected expert slots that receive at least one of `picks` routed picks (their weights are read)."""
        return self.layout.plan.per_device(-np.expm1(-picks * self.slot_pick))  # [L, R] 1 - exp(-n p) -> [L, D]

    # ---- roles -----------------------------------------------------------------------------------
    def _attention_shares(self) -> np.ndarray:
        """Requests go to attention devices in proportion to their attention speed (a load balancer)."""
        lay = self.layout
        ids = lay.attention_ids
        if not len(ids):
            raise HetrunError(f"profile '{self.profile.name}': extra.sim.attention_devices leaves no device for attention")
        speed = attention_speed(self.spec, lay.devices, lay.attention_precision, self.settings, self.att)
        return speed / speed.sum()

    def _activation_bytes(self, tokens) -> np.ndarray:
        return np.asarray(tokens, dtype=np.float64) * self.spec.hidden_size * 2.0 * ACTIVATION_TENSORS

    def _decode_counts(self, mean_kv: float, extra_tokens_per_request: float = 0.0):
        """(b -> [D] decode requests per attention device, the b at which every device is full, [D] caps).

        The attention stage lasts as long as the fastest device takes for b requests; every device gets as many
        as it serves in that time (each device's one-layer attention time is a fixed part, mostly weights re-read
        every step, plus a part per request, both from the cost model at the workload's mean KV length), no more
        than its memory holds beside its weights or max_batch_per_device, and none where its fixed part alone
        exceeds that time. On identical devices every device gets b until memory caps them."""
        lay = self.layout
        ref = int(np.argmax(self.att_share))
        a0, a1 = attention_line(self.spec, lay.devices, lay.attention_precision, self.settings, self.att, mean_kv)
        per_request = (mean_kv + extra_tokens_per_request) * self.kv_stored_per_token \
            + float(self._activation_bytes(self.queries + extra_tokens_per_request))
        room = self.capacity - self.fixed - self.expert_weights
        cap = np.minimum(np.maximum(np.floor(room / per_request), 0.0), float(self.settings.max_batch_per_device))
        cap = np.where(self.att, cap, 0.0)
        full = np.where(self.att, a0 + a1 * cap, 0.0)  # [D] attention time when each is full
        b_full = max(1, int(math.ceil((full.max() - a0[ref]) / a1[ref])))
        return (lambda b: equal_time_requests(a0, a1, self.att, ref, b, cap)), b_full, cap

    def _traffic_for(self, tokens: np.ndarray):
        """All-to-all traffic per token when the step's tokens sit on the devices as `tokens` [D] says (the
        precomputed speed-proportional one where they match)."""
        w = tokens / tokens.sum()
        if np.allclose(w, self.att_share, rtol=1e-9, atol=1e-12):
            return self.traffic
        key = tuple(np.round(w, 12).tolist())
        if key not in self._traffic_cache:
            if len(self._traffic_cache) > 64:
                self._traffic_cache.clear()
            self._traffic_cache[key] = traffic(self.layout, w)
        return self._traffic_cache[key]

    # ---- one step --------------------------------------------------------------------------------
    def step(self, work: StepWork, trace: bool = False) -> Step:
        """Simulate one step of `work`. With micro_batches 2 the runtime may also run the step as one batch; the
        faster wins (splitting a small batch reads every weight twice for little overlap)."""
        if not work.tokens.sum() > 0:
            raise HetrunError("a step needs at least one token on some device")
        key = None if trace else (work.queries, *(np.asarray(x, dtype=np.float64).tobytes() for x in (
            work.requests, work.kv, work.prefill, work.ctx, work.pairs, work.head)))
        if key is not None and key in self._steps:
            hit = self._steps[key]
            return dataclasses.replace(hit, seconds=hit.seconds - hit.draft_s, draft_s=0.0)
        best = None
        for mb in sorted({1, self.settings.micro_batches}):
            st = self._step(work, trace, mb)
            if best is None or st.seconds < best.seconds:
                best = st
        if key is not None:
            if len(self._steps) > 4096:
                self._steps.clear()
            self._steps[key] = best
        return dataclasses.replace(best)

    def _attention_stage(self, i: int, work: StepWork, mb: int) -> tuple[float, float, float]:
        """(MoE-layer attention, dense-layer attention + MLP, local shared experts) seconds of device i for one
        micro-batch; with tensor-parallel attention for its group's tokens, 1/tp of the heads and the all-reduce."""
        spec, lay, s = self.spec, self.layout, self.settings
        tp, q = self.tp, work.queries
        g = tp / mb  # micro-batch share of the group's work
        n_req, kv, pre = work.requests[i] * g, work.kv[i] * g, work.prefill[i] * g
        ctx, pairs = work.ctx[i] * g, work.pairs[i] * g
        dt, eff = lay.devices[i].type, self._eff[i]
        ap, p = lay.attention_precision[i], lay.precision[i]
        base = attention_ops(spec, ap, self.kv_elem, (n_req, kv, q), (pre, ctx, pairs), tp)
        k = s.elementwise_kernels_per_layer
        dec_tokens = n_req * q
        group_tokens = dec_tokens + pre

        def misc(moe: bool) -> list:
            ops = []
            if dec_tokens:
                ops += layer_misc_ops(spec, ap, dec_tokens, moe, k, 0.0, True, tp)
            if pre:
                ops += layer_misc_ops(spec, ap, pre, moe, 0 if dec_tokens else k, ctx, False, tp)
            return ops

        allreduce = tp_allreduce_seconds(spec, group_tokens, tp, self.links.intra[i])
        permute = [permute_ops(spec.top_k, spec.hidden_size, group_tokens / tp, 0.0)[0]] \
            if s.expert_routing == "permute" else []
        a_moe = stage_seconds(base + misc(True) + permute, dt, eff) + allreduce
        dense = swiglu_ops("dense_mlp", p, group_tokens, spec.hidden_size, -(-spec.dense_intermediate_size // tp)) \
            if spec.num_dense_layers else []
        a_dense = stage_seconds(base + dense + misc(False), dt, eff) + 2 * allreduce
        shared = 0.0
        if s.shared_experts == "local" and spec.num_shared_experts:
            shared = stage_seconds(swiglu_ops("shared", p, group_tokens, spec.hidden_size,
                                              -(-spec.shared_intermediate_size // tp), spec.num_shared_experts),
                                   dt, eff)
        return a_moe, a_dense, shared

    def _step(self, work: StepWork, trace: bool, mb: int) -> Step:
        spec, lay, s = self.spec, self.layout, self.settings
        L, D = spec.num_layers, lay.num_devices
        tokens = work.tokens  # [D] tokens each device dispatches, all micro-batches
        t_mb = tokens / mb  # [D]
        total = float(t_mb.sum())
        A_moe = np.zeros(D)
        A_dense = np.zeros(D)
        shared_local = np.zeros(D)
        seen: dict = {}
        for i in np.nonzero(t_mb > 0)[0]:  # devices that compute alike are computed once
            key = (self._kind[i], work.requests[i], work.kv[i], work.prefill[i], work.ctx[i], work.pairs[i],
                   self.links.intra[i].name, self.links.intra[i].bandwidth_gbs)
            if key not in seen:
                seen[key] = self._attention_stage(int(i), work, mb)
            A_moe[i], A_dense[i], shared_local[i] = seen[key]
        Lm = spec.num_moe_layers
        tr = self._traffic_for(tokens)
        rows = total * tr.routed_rows  # [Lm, D] routed pairs per micro-batch
        active = self.active_slots(total * spec.top_k)  # [Lm, D] expert weight sets read
        noisy = rows + self.z_straggler * np.sqrt(s.routing_overdispersion * rows)
        bump = np.where(rows > 0, noisy / np.maximum(rows, 1e-300), 1.0)  # [Lm, D] slowest-device inflation
        E = np.zeros((Lm, D))
        for (_, prec, _), ids in self._expert_groups.items():  # one vectorized roofline per kind of device
            i = int(ids[0])
            dt = lay.devices[i].type
            op = grouped_expert_op(prec, noisy[:, ids], active[:, ids], spec.hidden_size, spec.moe_intermediate_size)
            t = op_seconds(dt, op.precision, op.flops, op.bytes, self._eff[i]["gemm"], op.kernels)
            ew = expert_elementwise_op(prec, noisy[:, ids], spec.hidden_size, spec.moe_intermediate_size,
                                       DTYPE_BYTES[s.dispatch_dtype])
            t = t + op_seconds(dt, "bf16", 0.0, ew.bytes, self._eff[i]["elementwise"], ew.kernels)
            if s.expert_routing == "permute":
                un = permute_ops(spec.top_k, spec.hidden_size, 0.0, noisy[:, ids])[1]
                t = t + op_seconds(dt, "bf16", 0.0, un.bytes, self._eff[i]["elementwise"], un.kernels)
            E[:, ids] = np.where(rows[:, ids] > 0, t, 0.0)
        E += shared_local[None, :]
        if s.shared_experts == "plan" and spec.num_shared_experts:
            for li in range(Lm):
                for i in lay.plan.shared_device_of[li]:
                    E[li, i] += stage_seconds(swiglu_ops("shared", lay.precision[i], total, spec.hidden_size,
                                                         spec.shared_intermediate_size), lay.devices[i].type, self._eff[i])
        disp = alltoall_seconds(self.links, total * tr.send_inter, total * tr.recv_inter * bump,
                                total * tr.send_intra, total * tr.recv_intra * bump, self.dispatch_bytes)
        comb = alltoall_seconds(self.links, total * tr.recv_inter * bump, total * tr.send_inter,
                                total * tr.recv_intra * bump, total * tr.send_intra, self.combine_bytes)
        if s.shared_experts == "plan" and spec.num_shared_experts:
            extra = np.zeros((Lm, D))  # every token also goes to the shared experts' devices
            for li in range(Lm):
                for i in lay.plan.shared_device_of[li]:
                    extra[li, i] += total
            disp = np.maximum(disp, alltoall_seconds(self.links, 0 * extra, extra, 0 * extra, extra, self.dispatch_bytes))
        if s.comm_sm_fraction and mb > 1:  # overlapped all-to-all kernels hold some of the compute units
            A_moe = A_moe / (1.0 - s.comm_sm_fraction)
            E = E / (1.0 - s.comm_sm_fraction)
        A = np.where(self.moe_layer[:, None], A_moe[None, :], A_dense[None, :])  # [L, D]
        full = lambda x: np.vstack([np.zeros((L - Lm, D)), x])  # noqa: E731 -- MoE-layer arrays to all layers
        stages = {"attention": A, "dispatch": full(disp), "experts": full(E), "combine": full(comb)}
        stage_max = {k: v.max(1) for k, v in stages.items()}
        # embedding before the first layer, LM head after the last
        emb = np.zeros(D)
        head = np.zeros(D)
        heads: dict = {}
        for i in np.nonzero(tokens > 0)[0]:
            key = (self._kind[i], tokens[i], work.head[i])
            if key not in heads:
                ops = embedding_ops(spec, tokens[i] * self.tp, work.head[i] * self.tp, self.tp)
                heads[key] = (stage_seconds(ops[:1], lay.devices[i].type, self._eff[i]),
                              stage_seconds(ops[1:], lay.devices[i].type, self._eff[i]))
            emb[i], head[i] = heads[key]
        stage_max["attention"] = stage_max["attention"].copy()
        stage_max["attention"][0] += emb.max()
        makespan, tasks = _schedule(stage_max, self.moe_layer, mb, trace)
        tail = float(head.max()) + s.step_overhead_us * 1e-6
        busy = mb * (A.sum(0) + E.sum(0)) + emb + head
        return Step(makespan + tail, stages, stage_max, tasks, busy, tail, mb)

    def draft_seconds(self, requests: np.ndarray, kv: np.ndarray) -> float:
        """Seconds to draft the MTP / speculative tokens of a decode batch: per draft token, `draft_layers` layers
        of the model's own shape (the mean layer of a one-token-per-request step) and the LM head; 0 without MTP."""
        m = self.mtp
        if m is None or not requests.sum() > 0:
            return 0.0
        st = self.step(StepWork.decode(requests, kv))
        per_layer = (st.seconds - st.tail) / self.spec.num_layers
        head = st.tail - self.settings.step_overhead_us * 1e-6
        return m.draft_tokens * (m.draft_layers * per_layer + head)

    def decode_step(self, requests: np.ndarray, kv: np.ndarray, trace: bool = False) -> Step:
        """One decode step of `requests` [D] with `kv` [D] KV tokens: verification of the drafts (if MTP) plus
        their drafting."""
        st = self.step(StepWork.decode(requests, kv, self.queries), trace)
        if self.mtp is not None:
            st.draft_s = self.draft_seconds(requests, kv)
            st.seconds += st.draft_s
        return st

    # ---- memory ----------------------------------------------------------------------------------
    def memory(self, kv_tokens: np.ndarray, act_tokens: np.ndarray) -> dict:
        """Per device group: weights, KV cache, workspace+activations and capacity in GB (the fullest device).
        `kv_tokens` [D]: KV tokens of each device's own share of requests."""
        lay = self.layout
        act = self._activation_bytes(act_tokens)
        out: dict = {}
        for i, d in enumerate(lay.devices):
            weights = self.fixed[i] - self.settings.workspace_gb * 1e9 - d.reserved_bytes + self.expert_weights[i]
            kv = kv_tokens[i] * self.kv_stored_per_token
            work = self.settings.workspace_gb * 1e9 + d.reserved_bytes + act[i]
            tot = weights + kv + work
            cur = out.get(d.group)
            if cur is None or tot / 1e9 > cur["total_gb"]:
                out[d.group] = {"device_type": d.type.name, "weights_gb": weights / 1e9, "kv_gb": kv / 1e9,
                                "workspace_gb": work / 1e9, "total_gb": tot / 1e9, "capacity_gb": d.memory_bytes / 1e9,
                                "devices": sum(1 for x in lay.devices if x.group == d.group)}
        return out

    def fits(self, kv_tokens: np.ndarray, act_tokens: np.ndarray) -> bool:
        need = self.fixed + self.expert_weights + kv_tokens * self.kv_stored_per_token \
            + self._activation_bytes(act_tokens)
        return bool((need <= self.capacity).all())

    def kv_capacity_tokens(self, act_tokens_per_device: float = 0.0) -> np.ndarray:
        """[D] KV tokens each attention device's memory holds for its own share of requests."""
        room = self.capacity - self.fixed - self.expert_weights - self._activation_bytes(act_tokens_per_device)
        return np.where(self.att, np.maximum(room, 0.0) / self.kv_stored_per_token, 0.0)

    # ---- energy ----------------------------------------------------------------------------------
    def joules(self, step: Step, rho: float = 1.0) -> float:
        """Energy per step-length of wall time over all devices: idle power plus (TDP - idle) while busy, when the
        deployment is busy a fraction `rho` of the time."""
        devs = self.layout.devices
        idle = np.array([d.type.idle_w for d in devs])
        tdp = np.array([d.type.tdp_w for d in devs])
        busy = np.minimum(step.busy, step.seconds)
        return float((idle * step.seconds + rho * (tdp - idle) * busy).sum())

    def _busy(self, st: Step, rho: float = 1.0) -> float:
        return float(rho * np.minimum(st.busy / st.seconds, 1.0).mean())

    # ---- phases ----------------------------------------------------------------------------------
    def _decode_kv(self):
        """(KV samples over all (request, output position) pairs, their order without balancing, mean)."""
        wl = self.workload
        kv_samples = wl.sample.decode_kv_samples(KV_SAMPLES, wl.seed + 1).astype(np.float64)
        perm = np.random.default_rng(wl.seed + 2).permutation(KV_SAMPLES)
        return kv_samples, perm, float(kv_samples.mean())

    def _kv_of(self, n: np.ndarray, kv_samples, perm, mean_kv: float) -> np.ndarray:
        """[D] KV tokens of n [D] requests: n x the mean when a balancer evens them, else drawn requests."""
        if self.settings.balance_attention:
            return n * mean_kv
        kv = np.zeros(len(n))
        for j, i in enumerate(self.layout.attention_ids):
            start = (j * 7919) % KV_SAMPLES
            idx = (start + np.arange(int(n[i]))) % KV_SAMPLES
            kv[i] = kv_samples[perm[idx]].sum() if len(idx) else 0.0
        return kv

    def _fixed_batch(self, counts, b_full: int, per_device: int) -> int | None:
        """The reference count b whose requests add up to `per_device` x attention devices (None: memory holds
        fewer)."""
        want = per_device * int(self.att.sum())
        if counts(b_full).sum() < want:
            return None
        lo, hi = 1, b_full
        while lo < hi:
            mid = (lo + hi) // 2
            if counts(mid).sum() >= want:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def decode(self, trace: bool = False) -> PhaseResult:
        """Largest decode batch that keeps the per-user target and fits memory (or the workload's fixed batch);
        its throughput."""
        wl = self.workload
        kv_samples, perm, mean_kv = self._decode_kv()
        counts, b_full, cap = self._decode_counts(mean_kv)
        E = self.tokens_per_step

        def run(b: float, tr: bool = False) -> tuple[Step, np.ndarray, np.ndarray]:
            n = counts(b)
            kv = self._kv_of(n, kv_samples, perm, mean_kv)
            return self.decode_step(n, kv, tr), n, kv

        def result(st, n, kv, feasible: bool, limit: str, reason: str = "") -> PhaseResult:
            tps = float(n.sum()) * E / st.seconds
            return PhaseResult("decode", feasible, reason, tokens_per_s=tps, computed_tokens_per_s=tps,
                               step_s=st.seconds, batch_per_device=float(n[self.att].mean()), tpot_s=st.seconds / E,
                               per_user_tps=E / st.seconds, tokens_per_step=E,
                               joules_per_token=self.joules(st) / (float(n.sum()) * E), memory=self.memory(kv, n),
                               busy_fraction=self._busy(st), limit=limit, step=st)

        if counts(b_full).sum() < 1:
            n = np.where(self.att, 1.0, 0.0)
            kv = n * mean_kv
            return PhaseResult("decode", False, "one request per attention device does not fit in memory beside the "
                               f"weights ({self.memory(kv, n)}); add devices or lower the precision",
                               memory=self.memory(kv, n), limit="memory")
        if wl.decode_batch is not None:
            b = self._fixed_batch(counts, b_full, int(wl.decode_batch))
            if b is None:
                st, n, kv = run(b_full, trace)
                return result(st, n, kv, False, "memory",
                              f"a decode batch of {wl.decode_batch} requests per attention device does not fit in "
                              f"memory; at most {n.sum() / self.att.sum():.0f} do")
            st, n, kv = run(b, trace)
            return result(st, n, kv, True, "fixed")

        def ok(b: int) -> tuple[bool, str]:
            n = counts(b)
            if wl.max_concurrency is not None and n.sum() > wl.max_concurrency:
                return False, "concurrency"
            st, _, _ = run(b)
            return (E / st.seconds >= wl.per_user_tps), "target"

        lo = 1
        while counts(lo).sum() < 1:  # the fastest device's fixed cost may leave the others nothing at b = 1
            lo += 1
        good, why = ok(lo)
        if not good:
            st, n, kv = run(lo, trace)
            if why == "concurrency":
                reason = "max_concurrency is below one request per attention device"
            else:
                reason = (f"cannot reach {wl.per_user_tps:g} tokens/s per user even with one request per device "
                          f"(a step takes {st.seconds * 1e3:.1f} ms)")
            return result(st, n, kv, False, why, reason)
        at_cap = cap[self.att] <= counts(b_full)[self.att]
        full = "max_batch" if (cap[self.att] >= self.settings.max_batch_per_device)[at_cap].all() else "memory"
        lo, limit = _largest_ok(ok, lo, b_full, full)
        st, n, kv = run(lo, trace)
        return result(st, n, kv, True, limit)

    def _prompt_stats(self) -> dict:
        """Per computed prompt token: causal pairs, input tokens incl. cache hits; mean new tokens."""
        smp = self.workload.sample
        new = smp.new.astype(np.float64)
        p = smp.cached.astype(np.float64)
        return {"new": new, "cached": p,
                "pairs": float((new * p + new * (new + 1) / 2).sum() / new.sum()),  # causal attention pairs
                "in_per_new": float(smp.prompt.sum() / new.sum()),  # input tokens (incl. cache hits) per computed
                "mean_new": float(new.mean())}

    @staticmethod
    def _ctx_per_new(new: np.ndarray, cached: np.ndarray, c: float) -> float:
        """Context tokens per computed token when prompts are split into chunks of c: each piece re-expands the
        whole context before it (MLA)."""
        m = np.ceil(new / c)  # [N] pieces per request
        full = np.floor(new / c)
        # sum over pieces j=1..m of (cached + min(j*c, new))
        s_ = m * cached + c * full * (full + 1) / 2 + np.where(m > full, new, 0.0)
        return float(s_.sum() / new.sum())

    @staticmethod
    def _step_residual(new: np.ndarray, c: float) -> float:
        """Mean residual of prefill service, in steps, that an arrival waits for per unit of utilization when
        each step computes a chunk of c prompt tokens as one batch: the step in progress (half a step: a
        request cannot join a step already running) plus, per token, the steps its own request still holds
        before reaching it (a prompt of n tokens spans ceil(n / c) steps; token j waits ceil(j / c) - 1 of
        them). Equal prompts of at most c tokens give M/D/1's S/2; prompts far longer than c give the fluid
        Pollaczek-Khinchine residual E[n^2] / (2 c E[n])."""
        m = np.ceil(new / c)  # [N] steps each request spans
        held = c * (m - 1) * (m - 2) / 2 + (m - 1) * (new - c * (m - 1))  # [N] sum over tokens of steps before
        return 0.5 + float(held.sum() / new.sum())

    def _kv_load_seconds(self, cached: np.ndarray) -> float:
        """Mean seconds to read a request's cached prefix (prefix cache on another node, or `kv_load_gbs`)."""
        s = self.settings
        kv_bw = s.kv_load_gbs or (self.links.inter.bandwidth_gbs * self.links.inter.efficiency if self.links.inter
                                  else min(x.bandwidth_gbs * x.efficiency for x in self.links.intra))
        return float(np.mean(cached * self.kv_per_token / (kv_bw * 1e9)))

    def prefill(self, trace: bool = False) -> PhaseResult:
        """Input tokens/s that keep the mean TTFT within the target.

        Each attention device computes a chunk of C prompt tokens per step of S seconds (halved from the
        profile's chunk while that helps). Requests arrive at random and each goes to one attention device,
        so every device is an M/G/1 queue (DistServe models prefill as a queue too, M/D/1 for equal lengths).
        By Pollaczek-Khinchine the mean wait at utilization rho is rho/(1 - rho) x R, R the mean residual work
        an arrival finds ahead of it per unit of utilization (`_step_residual`): a step is one batch, so an
        arrival first waits out the step in progress (S/2), and a prompt longer than C holds the device for
        its later chunks too. TTFT = wait + S x E[ceil(n / C)] + time to read the cached prefix. The chunk and
        the utilization are the largest that keep the mean TTFT on target; throughput = rho x capacity.
        """
        wl = self.workload
        ps = self._prompt_stats()
        new, p = ps["new"], ps["cached"]
        load_s = self._kv_load_seconds(p)
        rel = self.att_share / self.att_share.max()

        def tokens(c: float) -> np.ndarray:
            return np.where(self.att, np.maximum(np.rint(c * rel), 1.0), 0.0)

        def run(c: float, tr: bool = False) -> Step:
            n = tokens(c)
            ctx = self._ctx_per_new(new, p, c)
            # one LM-head row per finished request
            return self.step(StepWork.prefill_only(n, n * ctx, n * ps["pairs"], n / max(ps["mean_new"], 1.0)), tr)

        best = None
        c = float(self.settings.prefill_tokens_per_device)
        while True:
            n = tokens(c)
            if self.fits(n * self._ctx_per_new(new, p, c), n):
                st = run(c)
                service = st.seconds * float(np.mean(np.ceil(new / c)))
                wait = wl.ttft_s - service - load_s  # time left for queueing
                residual = st.seconds * self._step_residual(new, c)  # P-K: wait = rho / (1 - rho) x residual
                rho = wait / (residual + wait) if wait > 0 else 0.0
                cap = float(n.sum()) / st.seconds
                if best is None or rho * cap > best[0] or (best[0] == 0 and service < best[4]):
                    best = (rho * cap, c, st, rho, service)
            if c <= 256:
                break
            c = max(256.0, math.floor(c / 2))
        if best is None:
            n = tokens(256.0)
            return PhaseResult("prefill", False, "even a 256-token prefill chunk does not fit in memory",
                               memory=self.memory(n * self._ctx_per_new(new, p, 256.0), n), limit="memory")
        served, c, st, rho, service = best
        if trace:
            st = run(c, True)
        n = tokens(c)
        cap = float(n.sum()) / st.seconds
        mem = self.memory(n * self._ctx_per_new(new, p, c), n)
        if rho <= 0:
            return PhaseResult("prefill", False, f"TTFT {service + load_s:.2f} s misses the {wl.ttft_s:g} s target "
                               "even at the best chunk size and no queueing", step_s=st.seconds, batch_per_device=c,
                               capacity_tokens_per_s=cap * ps["in_per_new"], ttft_s=service + load_s, memory=mem,
                               step=st, limit="ttft")
        return PhaseResult("prefill", True, tokens_per_s=served * ps["in_per_new"], computed_tokens_per_s=served,
                           capacity_tokens_per_s=cap * ps["in_per_new"], utilization=rho, step_s=st.seconds,
                           batch_per_device=c, ttft_s=wl.ttft_s if rho < 1 else service + load_s,
                           joules_per_token=self.joules(st, rho) / (float(n.sum()) * rho), memory=mem,
                           busy_fraction=self._busy(st, rho), limit="ttft", step=st)

    def aggregated(self, trace: bool = False) -> PhaseResult:
        """Aggregated serving: every step decodes the batch and prefills, in the same kernels, the prompt tokens
        that keep the batch full in steady state -- each request finished is replaced by a new one, so a
        device with n requests computes n x (tokens per step) x E[new prompt] / E[output] prompt tokens per step,
        within `max_num_tokens` (default: prefill_tokens_per_device) per device. The batch grows until the
        per-user target, memory, the token budget or the TTFT target stops it (or is the workload's fixed
        `decode_batch`). TTFT here is the steps a prompt takes through the chunk budget left beside the decode
        batch, without queueing (`hetrun simulate --requests` replays queueing too).

        A prompt piece (a whole prompt, or the chunk the budget leaves beside the batch) is computed on one
        attention device, and every device waits for the busiest at each all-to-all: the step is the expectation
        over how many pieces the busiest device gets (`busiest_rank_pieces`), or, with `aggregated_prefill:
        aligned`, over how many every device gets at once (`aligned_pieces`)."""
        wl, s = self.workload, self.settings
        kv_samples, perm, mean_kv = self._decode_kv()
        ps = self._prompt_stats()
        smp = wl.sample
        E, q = self.tokens_per_step, self.queries
        budget = float(s.max_num_tokens or s.prefill_tokens_per_device)
        ratio = ps["mean_new"] / float(smp.output.mean())  # prompt tokens to compute per output token
        ctx = self._ctx_per_new(ps["new"], ps["cached"], budget)
        load_s = self._kv_load_seconds(ps["cached"])
        # a request in flight also holds part of its prompt's KV while prefilling: counted as its prompt share
        counts, b_full, cap = self._decode_counts(mean_kv, extra_tokens_per_request=E * ratio)

        def work(n: np.ndarray, kv: np.ndarray, pre: np.ndarray | None = None) -> StepWork:
            pre = n * E * ratio if pre is None else pre
            return StepWork(n, kv, pre, pre * ctx, pre * ps["pairs"], n * q + pre / max(ps["mean_new"], 1.0), q)

        def run(b: float, tr: bool = False):
            """The step at b, its prompt pieces landing on whichever attention devices they land on: the expected
            step over how many pieces the busiest device gets (every device waits for it at the all-to-all)."""
            n = counts(b)
            kv = self._kv_of(n, kv_samples, perm, mean_kv)
            w = work(n, kv)
            mean_pre = w.prefill  # [D] prompt tokens per step, on average
            piece = float(np.clip(min(ps["mean_new"], budget - float(n.max()) * q), 1.0, None))
            att = self.att & (n > 0)
            lam = float(mean_pre[att].mean() / piece) if att.any() else 0.0
            busiest = int(np.argmax(np.where(att, n, -1)))
            aligned = s.aggregated_prefill == "aligned"
            mix, expected, shown = [], 0.0, None
            for k, pk in (aligned_pieces(lam) if aligned else busiest_rank_pieces(lam, int(att.sum()))):
                pre = np.where(att, k * piece if aligned else np.minimum(mean_pre, k * piece), 0.0)
                pre[busiest] = k * piece
                st_k = self.step(work(n, kv, pre), tr and shown is None)
                expected += pk * st_k.seconds
                mix.append((pk, st_k))
            shown = max(mix, key=lambda x: x[0])[1]
            st = dataclasses.replace(shown, seconds=expected)
            if self.mtp is not None:
                st.draft_s = self.draft_seconds(n, kv)
                st.seconds += st.draft_s
            return st, n, kv, w

        def ttft(st: Step, n: np.ndarray) -> float:
            left = budget - float(n[self.att].max()) * q  # prompt tokens a step has room for beside the batch
            if left <= 0:
                return math.inf
            return st.seconds * float(np.mean(np.ceil(ps["new"] / left))) + load_s

        def result(st, n, kv, w, feasible, limit, reason="") -> PhaseResult:
            out = float(n.sum()) * E / st.seconds
            computed = float(w.prefill.sum()) / st.seconds
            return PhaseResult("aggregated", feasible, reason, tokens_per_s=out, computed_tokens_per_s=computed,
                               input_tokens_per_s=computed * ps["in_per_new"], step_s=st.seconds,
                               batch_per_device=float(n[self.att].mean()), ttft_s=ttft(st, n), tpot_s=st.seconds / E,
                               per_user_tps=E / st.seconds, tokens_per_step=E,
                               joules_per_token=self.joules(st) / (float(n.sum()) * E),
                               memory=self.memory(kv + w.ctx, w.tokens), busy_fraction=self._busy(st), limit=limit,
                               step=st)

        def over_budget(n: np.ndarray) -> bool:
            return bool((n * q + n * E * ratio).max() > budget)

        if counts(b_full).sum() < 1:
            n = np.where(self.att, 1.0, 0.0)
            return PhaseResult("aggregated", False, "one request per attention device does not fit in memory",
                               memory=self.memory(n * mean_kv, n), limit="memory")
        if wl.decode_batch is not None:
            b = self._fixed_batch(counts, b_full, int(wl.decode_batch))
            st, n, kv, w = run(b if b is not None else b_full, trace)
            if b is None:
                return result(st, n, kv, w, False, "memory", f"a batch of {wl.decode_batch} requests per attention "
                              f"device does not fit in memory; at most {n.sum() / self.att.sum():.0f} do")
            if over_budget(n):
                return result(st, n, kv, w, False, "max_num_tokens", f"{wl.decode_batch} requests per device and their "
                              f"prompts need more than max_num_tokens={budget:.0f} tokens per step")
            return result(st, n, kv, w, True, "fixed")

        def ok(b: int) -> tuple[bool, str]:
            n = counts(b)
            if over_budget(n):
                return False, "max_num_tokens"
            if wl.max_concurrency is not None and n.sum() > wl.max_concurrency:
                return False, "concurrency"
            st, n, _, _ = run(b)
            if E / st.seconds < wl.per_user_tps:
                return False, "target"
            return (ttft(st, n) <= wl.ttft_s), "ttft"

        lo = 1
        while counts(lo).sum() < 1:
            lo += 1
        good, why = ok(lo)
        if not good:
            st, n, kv, w = run(lo, trace)
            return result(st, n, kv, w, False, why, f"even one request per device misses the {why} limit "
                          f"({wl.per_user_tps:g} tokens/s per user, TTFT {wl.ttft_s:g} s, "
                          f"max_num_tokens {budget:.0f}); a step takes {st.seconds * 1e3:.1f} ms")
        lo, limit = _largest_ok(ok, lo, b_full, "memory")
        st, n, kv, w = run(lo, trace)
        return result(st, n, kv, w, True, limit)


def _largest_ok(ok, lo: int, hi: int, full: str) -> tuple[int, str]:
    """(largest b in [lo, hi] with ok(b), what stopped it): binary search, ok(lo) already true; `full` when even hi
    passes (the devices are full)."""
    if ok(hi)[0]:
        return hi, full
    limit = "target"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        good, why = ok(mid)
        if good:
            lo = mid
        else:
            hi, limit = mid, why
    return lo, limit


def busiest_rank_pieces(lam: float, ranks: int, tail: float = 1e-4) -> list[tuple[int, float]]:
    """[(k, probability)] that the busiest of `ranks` attention devices gets k prompt pieces in a step, each getting
    Poisson(lam) of them (requests land on ranks independently); the tail beyond `tail` probability is folded into
    the last k."""
    if lam <= 0 or ranks < 1:
        return [(0, 1.0)]
    out, cdf_prev, k, term = [], 0.0, 0, math.exp(-lam)
    cdf = term
    while True:
        p_max = cdf ** ranks - cdf_prev ** ranks  # P(max = k)
        out.append((k, p_max))
        if 1.0 - cdf ** ranks < tail or k > 200:
            break
        cdf_prev = cdf
        k += 1
        term *= lam / k
        cdf += term
    total = sum(p for _, p in out)
    return [(k, p / total) for k, p in out if p > 0]


def aligned_pieces(lam: float, tail: float = 1e-4) -> list[tuple[int, float]]:
    """[(k, probability)] of k prompt pieces per attention device in a step when a scheduler puts the same number
    on every device in the same steps (Poisson(lam) of them)."""
    out, k, term, cdf = [], 0, math.exp(-lam), 0.0
    while True:
        out.append((k, term))
        cdf += term
        if 1.0 - cdf < tail or k > 200:
            break
        k += 1
        term *= lam / k
    return [(k, p / cdf) for k, p in out]


def _schedule(stage: dict[str, np.ndarray], moe: np.ndarray, mb: int, trace: bool):
    """Makespan of all layers for `mb` micro-batches on one compute and one communication stream.

    Compute order per layer: attention of each micro-batch, then experts of each; communication order:
    dispatch of each, then combine of each. A micro-batch's next layer starts after its combine.
    """
    A, Dp, E, C = stage["attention"], stage["dispatch"], stage["experts"], stage["combine"]
    comp = comm = 0.0
    ready = [0.0] * mb
    tasks: list = []

    def put(stream, name, layer, m, start, dur):
        if trace:
            tasks.append((stream, name, layer, m, start, dur))
        return start + dur

    for l in range(len(A)):
        if not moe[l]:
            for m in range(mb):
                comp = ready[m] = put("compute", "attention+mlp", l, m, max(comp, ready[m]), A[l])
            continue
        a_end, d_end, e_end = [], [], []
        for m in range(mb):
            comp = put("compute", "attention", l, m, max(comp, ready[m]), A[l])
            a_end.append(comp)
        for m in range(mb):
            comm = put("comm", "dispatch", l, m, max(comm, a_end[m]), Dp[l])
            d_end.append(comm)
        for m in range(mb):
            comp = put("compute", "experts", l, m, max(comp, d_end[m]), E[l])
            e_end.append(comp)
        for m in range(mb):
            comm = ready[m] = put("comm", "combine", l, m, max(comm, e_end[m]), C[l])
    return max(ready + [comp]), tasks
