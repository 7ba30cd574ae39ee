"""The step simulator: one prefill chunk or one decode step of a whole deployment, layer by layer.

Per layer and micro-batch there are four stages: attention (and dense MLP) on the attention devices, the
dispatch all-to-all, the experts on the expert devices (shared experts beside attention when they run data
parallel), and the combine all-to-all. Devices synchronize at every all-to-all, so each stage lasts as long as
its slowest device. With two micro-batches the stages run on a compute stream and a communication stream,
micro-batch 1's communication behind micro-batch 2's compute (DeepSeek's dual micro-batch overlap).

Decode grows the batch per attention device until the per-user tokens/s target or memory is violated. On
mixed hardware the fastest attention device holds the batch and every other one as many requests as it serves
in the same attention time, within its memory (`equal_time_requests`); all-to-all traffic follows where the
step's tokens actually sit.
Prefill takes a chunk of prompt tokens per attention device and shrinks it until the TTFT target holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetrun.errors import HetrunError, PlacementError
from hetrun.formats import DTYPE_BYTES, expert_bytes
from hetrun.profile import Profile
from hetrun.roofline import op_seconds
from hetrun.sim.comm import Links, alltoall_seconds, device_links, token_bytes, traffic
from hetrun.sim.operators import (
    attention_decode_ops,
    attention_prefill_ops,
    embedding_ops,
    expert_elementwise_op,
    grouped_expert_op,
    kv_bytes_per_token,
    layer_misc_ops,
    stage_seconds,
    swiglu_ops,
)
from hetrun.sim.roles import Layout, attention_line, attention_speed, build_layout, equal_time_requests, fixed_bytes
from hetrun.sim.settings import SimSettings, attention_eff, gemm_eff, sim_settings
from hetrun.sim.workload import Workload
from hetrun.spec import MoESpec

KV_SAMPLES = 8192


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


@dataclass
class PhaseResult:
    phase: str
    feasible: bool
    reason: str = ""
    tokens_per_s: float = 0.0  # prefill: input tokens incl. cache hits; decode: output tokens
    computed_tokens_per_s: float = 0.0  # prefill: tokens actually computed
    capacity_tokens_per_s: float = 0.0  # prefill: back-to-back steps, before queueing for the TTFT target
    utilization: float = 1.0  # prefill: share of capacity the TTFT target allows
    step_s: float = 0.0
    batch_per_device: float = 0.0  # decode: requests per attention device; prefill: chunk tokens
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    per_user_tps: float = 0.0
    joules_per_token: float = 0.0
    memory: dict = field(default_factory=dict)  # group -> {weights_gb, kv_gb, workspace_gb, total_gb, capacity_gb}
    busy_fraction: float = 0.0  # mean over devices of compute-busy time per step
    limit: str = ""  # what stopped the batch from growing: target, memory, max_batch, concurrency
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
        popularity = workload.expert_popularity(spec.num_moe_layers, spec.num_experts)
        self.layout: Layout = build_layout(spec, profile, self.settings, popularity, 1.0 / workload.per_user_tps)
        self.links: Links = device_links(self.layout)
        lay = self.layout
        D = lay.num_devices
        self.att = lay.is_attention
        self.att_share = self._attention_shares()  # [D] share of requests per attention device (sums to 1)
        self.traffic = traffic(lay, self.att_share)
        self._traffic_cache: dict = {}
        self.kv_elem = DTYPE_BYTES[self.settings.kv_cache_dtype]
        self.kv_per_token = kv_bytes_per_token(spec, self.kv_elem)
        self.dispatch_bytes = token_bytes(spec.hidden_size, self.settings.dispatch_dtype)
        self.combine_bytes = token_bytes(spec.hidden_size, self.settings.combine_dtype)
        plan = lay.plan
        # distinct experts with traffic per device and layer [L, D]
        L = plan.num_layers
        self.slot_pick = np.take_along_axis(lay.popularity, plan.phy2log, 1) * plan.share  # [L, R] pick chance
        held = np.zeros((L, D, spec.num_experts), dtype=bool)
        held[np.repeat(np.arange(L), plan.num_slots), plan.device_of.ravel(), plan.phy2log.ravel()] = True
        self.experts_held = held.sum(-1)  # [L, D] distinct experts stored per device
        self.moe_layer = np.array([l >= spec.first_dense_layers for l in range(spec.num_layers)])
        self._eff = [{"gemm": gemm_eff(self.settings, d.type), "attention": attention_eff(self.settings, d.type),
                      "elementwise": gemm_eff(self.settings, d.type)} for d in lay.devices]
        n_exp = int((self.layout.is_expert).sum())
        self.z_straggler = math.sqrt(2 * math.log(n_exp)) if n_exp > 1 else 0.0
        self.fixed = np.array([fixed_bytes(spec, d, p, ap, bool(a), self.settings)
                               for d, p, ap, a in zip(lay.devices, lay.precision, lay.attention_precision, self.att)])
        self.expert_weights = np.array([self.experts_held[:, i].sum() * expert_bytes(
            lay.precision[i], spec.hidden_size, spec.moe_intermediate_size) for i in range(D)])
        over = (self.fixed + self.expert_weights) > np.array([d.memory_bytes for d in lay.devices])
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

    def _decode_counts(self, mean_kv: float):
        """b -> [D] decode requests per attention device when the fastest one holds b.

        The others get as many as they can serve in the same attention time (each device's one-layer attention
        time is a fixed part, mostly weights re-read every step, plus a part per request, both from the cost
        model at the workload's mean KV length), and no more than their memory holds beside their weights
        (the fastest device is left uncapped, so the batch search stops when it runs out). On identical devices
        every device gets b."""
        lay = self.layout
        ref = int(np.argmax(self.att_share))
        a0, a1 = attention_line(self.spec, lay.devices, lay.attention_precision, self.settings, self.att, mean_kv)
        per_request = mean_kv * self.kv_per_token + self.spec.hidden_size * 2.0 * 24
        room = np.array([d.memory_bytes for d in lay.devices]) - self.fixed - self.expert_weights
        cap = np.maximum(np.floor(room / per_request), 1.0)  # [D] requests whose KV fits
        cap[ref] = np.inf

        return lambda b: equal_time_requests(a0, a1, self.att, ref, b, cap)

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
    def step(self, tokens: np.ndarray, attention_ops, head_tokens: np.ndarray, trace: bool = False) -> Step:
        """Simulate one step. `tokens` [D]: tokens each attention device holds this step (all micro-batches);
        `attention_ops(i, t)`: (ops, context tokens, decode?) of device i for t tokens of one micro-batch.
        With micro_batches 2 the runtime may also run the step as one batch; the faster wins (splitting a
        small batch reads every weight twice for little overlap)."""
        best = None
        for mb in sorted({1, self.settings.micro_batches}):
            st = self._step(tokens, attention_ops, head_tokens, trace, mb)
            if best is None or st.seconds < best.seconds:
                best = st
        return best

    def _step(self, tokens, attention_ops, head_tokens, trace: bool, mb: int) -> Step:
        spec, lay, s = self.spec, self.layout, self.settings
        L, D = spec.num_layers, lay.num_devices
        t_mb = tokens / mb  # [D]
        total = float(t_mb.sum())
        A_moe = np.zeros(D)
        A_dense = np.zeros(D)
        shared_local = np.zeros(D)
        for i in np.nonzero(t_mb > 0)[0]:
            dt, eff = lay.devices[i].type, self._eff[i]
            base, ctx, decode = attention_ops(i, t_mb[i])
            ap = lay.attention_precision[i]
            misc = lambda moe: layer_misc_ops(spec, ap, t_mb[i], moe, s.elementwise_kernels_per_layer,  # noqa: E731
                                              ctx, decode)
            A_moe[i] = stage_seconds(base + misc(True), dt, eff)
            dense = swiglu_ops("dense_mlp", lay.precision[i], t_mb[i], spec.hidden_size, spec.dense_intermediate_size) \
                if spec.first_dense_layers else []
            A_dense[i] = stage_seconds(base + dense + misc(False), dt, eff)
            if s.shared_experts == "local" and spec.num_shared_experts:
                shared_local[i] = stage_seconds(swiglu_ops("shared", lay.precision[i], t_mb[i], spec.hidden_size,
                                                           spec.shared_intermediate_size, spec.num_shared_experts), dt, eff)
        Lm = spec.num_moe_layers
        tr = self._traffic_for(tokens)
        rows = total * tr.routed_rows  # [Lm, D] routed pairs per micro-batch
        active = self.active_slots(total * spec.top_k)  # [Lm, D] expert weight sets read
        noisy = rows + self.z_straggler * np.sqrt(s.routing_overdispersion * rows)
        bump = np.where(rows > 0, noisy / np.maximum(rows, 1e-300), 1.0)  # [Lm, D] slowest-device inflation
        E = np.zeros((Lm, D))
        for i in lay.expert_ids:
            op = grouped_expert_op(lay.precision[i], noisy[:, i], active[:, i], spec.hidden_size,
                                   spec.moe_intermediate_size)
            t = op_seconds(lay.devices[i].type, op.precision, op.flops, op.bytes, self._eff[i]["gemm"], op.kernels)
            ew = expert_elementwise_op(lay.precision[i], noisy[:, i], spec.hidden_size, spec.moe_intermediate_size,
                                       DTYPE_BYTES[s.dispatch_dtype])
            t = t + op_seconds(lay.devices[i].type, "bf16", 0.0, ew.bytes, self._eff[i]["elementwise"], ew.kernels)
            E[:, i] = np.where(rows[:, i] > 0, t, 0.0)
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
        for i in np.nonzero(tokens > 0)[0]:
            ops = embedding_ops(spec, tokens[i], head_tokens[i])
            emb[i] = stage_seconds(ops[:1], lay.devices[i].type, self._eff[i])
            head[i] = stage_seconds(ops[1:], lay.devices[i].type, self._eff[i])
        stage_max["attention"] = stage_max["attention"].copy()
        stage_max["attention"][0] += emb.max()
        makespan, tasks = _schedule(stage_max, self.moe_layer, mb, trace)
        tail = float(head.max()) + s.step_overhead_us * 1e-6
        busy = mb * (A.sum(0) + E.sum(0)) + emb + head
        return Step(makespan + tail, stages, stage_max, tasks, busy, tail, mb)

    # ---- memory ----------------------------------------------------------------------------------
    def memory(self, kv_tokens: np.ndarray, act_tokens: np.ndarray) -> dict:
        """Per device group: weights, KV cache, workspace+activations and capacity in GB (the fullest device)."""
        lay = self.layout
        act = act_tokens * self.spec.hidden_size * 2.0 * 24  # live activations per token, BF16, ~24 hidden-size tensors
        out: dict = {}
        for i, d in enumerate(lay.devices):
            weights = self.fixed[i] - self.settings.workspace_gb * 1e9 - d.reserved_bytes + self.expert_weights[i]
            kv = kv_tokens[i] * self.kv_per_token
            work = self.settings.workspace_gb * 1e9 + d.reserved_bytes + act[i]
            tot = weights + kv + work
            cur = out.get(d.group)
            if cur is None or tot / 1e9 > cur["total_gb"]:
                out[d.group] = {"device_type": d.type.name, "weights_gb": weights / 1e9, "kv_gb": kv / 1e9,
                                "workspace_gb": work / 1e9, "total_gb": tot / 1e9, "capacity_gb": d.memory_bytes / 1e9,
                                "devices": sum(1 for x in lay.devices if x.group == d.group)}
        return out

    def fits(self, kv_tokens: np.ndarray, act_tokens: np.ndarray) -> bool:
        lay = self.layout
        act = act_tokens * self.spec.hidden_size * 2.0 * 24
        need = self.fixed + self.expert_weights + kv_tokens * self.kv_per_token + act
        return bool((need <= np.array([d.memory_bytes for d in lay.devices])).all())

    # ---- energy ----------------------------------------------------------------------------------
    def joules(self, step: Step) -> float:
        """Energy of one step over all devices: idle power plus (TDP - idle) while busy."""
        devs = self.layout.devices
        idle = np.array([d.type.idle_w for d in devs])
        tdp = np.array([d.type.tdp_w for d in devs])
        busy = np.minimum(step.busy, step.seconds)
        return float((idle * step.seconds + (tdp - idle) * busy).sum())

    # ---- phases ----------------------------------------------------------------------------------
    def decode(self, trace: bool = False) -> PhaseResult:
        """Largest decode batch that keeps the per-user target and fits memory; its throughput."""
        spec, lay, s, wl = self.spec, self.layout, self.settings, self.workload
        kv_samples = wl.sample.decode_kv_samples(KV_SAMPLES, wl.seed + 1).astype(np.float64)
        perm = np.random.default_rng(wl.seed + 2).permutation(KV_SAMPLES)  # [KV_SAMPLES] order without balancing
        mean_kv = float(kv_samples.mean())
        att_ids = lay.attention_ids
        counts = self._decode_counts(mean_kv)

        def batch(b: float):
            n = counts(b)  # [D] requests per device
            if s.balance_attention:
                kv = n * mean_kv
            else:
                kv = np.zeros(len(n))
                for j, i in enumerate(att_ids):
                    start = (j * 7919) % KV_SAMPLES
                    idx = (start + np.arange(int(n[i]))) % KV_SAMPLES
                    kv[i] = kv_samples[perm[idx]].sum() if len(idx) else 0.0
            return n, kv

        def run(b: float, tr: bool = False) -> tuple[Step, np.ndarray, np.ndarray]:
            n, kv = batch(b)
            # t tokens of a micro-batch carry their share t / n of the device's KV
            fn = lambda i, t: (attention_decode_ops(spec, lay.attention_precision[i], t,  # noqa: E731
                                                    kv[i] * t / max(n[i], 1e-300), self.kv_elem), 0.0, True)
            return self.step(n, fn, n, tr), n, kv

        def ok(b: int) -> tuple[bool, str]:
            n, kv = batch(b)
            if not self.fits(kv, n):
                return False, "memory"
            if wl.max_concurrency is not None and n.sum() > wl.max_concurrency:
                return False, "concurrency"
            st, _, _ = run(b)
            return (1.0 / st.seconds >= wl.per_user_tps), "target"

        good, why = ok(1)
        if not good:
            st, n, kv = run(1, trace)
            if why == "memory":
                reason = (f"one request per attention device does not fit in memory ({self.memory(kv, n)}); "
                          "add devices or lower the precision")
            elif why == "concurrency":
                reason = "max_concurrency is below one request per attention device"
            else:
                reason = (f"cannot reach {wl.per_user_tps:g} tokens/s per user even with one request per device "
                          f"(a step takes {st.seconds * 1e3:.1f} ms)")
            return PhaseResult("decode", False, reason, tokens_per_s=float(n.sum()) / st.seconds,
                               computed_tokens_per_s=float(n.sum()) / st.seconds, step_s=st.seconds,
                               batch_per_device=float(n[self.att].mean()), tpot_s=st.seconds,
                               per_user_tps=1.0 / st.seconds, joules_per_token=self.joules(st) / float(n.sum()),
                               memory=self.memory(kv, n),
                               busy_fraction=float(np.minimum(st.busy / st.seconds, 1.0).mean()), limit=why, step=st)
        lo, hi, limit = 1, s.max_batch_per_device, "max_batch"
        if ok(hi)[0]:
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                good, why = ok(mid)
                if good:
                    lo = mid
                else:
                    hi, limit = mid, why
        st, n, kv = run(lo, trace)
        tps = float(n.sum()) / st.seconds
        return PhaseResult("decode", True, tokens_per_s=tps, computed_tokens_per_s=tps, step_s=st.seconds,
                           batch_per_device=float(n[self.att].mean()), tpot_s=st.seconds, per_user_tps=1.0 / st.seconds,
                           joules_per_token=self.joules(st) / float(n.sum()), memory=self.memory(kv, n),
                           busy_fraction=float(np.minimum(st.busy / st.seconds, 1.0).mean()), limit=limit, step=st)

    def prefill(self, trace: bool = False) -> PhaseResult:
        """Input tokens/s that keep the mean TTFT within the target.

        Each attention device computes a chunk of C prompt tokens per step of S seconds (halved from the
        profile's chunk while that helps). Requests arrive at random and each goes to one attention device,
        so every device is an M/G/1 queue of requests whose service time is their new tokens x S/C
        (DistServe models prefill as a queue too, M/D/1 for equal lengths). By Pollaczek-Khinchine the mean
        wait at utilization rho is rho/(1 - rho) x (S/C) x E[n^2] / (2 E[n]). TTFT = wait + S x
        E[ceil(n / C)] + time to read the cached prefix. The chunk and the utilization are the largest that
        keep the mean TTFT on target; throughput = rho x capacity.
        """
        spec, lay, s, wl = self.spec, self.layout, self.settings, self.workload
        smp = wl.sample
        new = smp.new.astype(np.float64)
        p = smp.cached.astype(np.float64)
        per_new_pairs = float((new * p + new * (new + 1) / 2).sum() / new.sum())  # causal attention pairs
        in_per_new = float(smp.prompt.sum() / new.sum())  # input tokens (incl. cache hits) per computed token
        n2_over_n = float((new ** 2).sum() / new.sum())  # E[n^2] / E[n] of computed tokens per request
        kv_bw = s.kv_load_gbs or (self.links.inter.bandwidth_gbs * self.links.inter.efficiency if self.links.inter
                                  else min(x.bandwidth_gbs * x.efficiency for x in self.links.intra))
        load_s = float(np.mean(p * self.kv_per_token / (kv_bw * 1e9)))  # reading cached prefixes
        rel = self.att_share / self.att_share.max()

        def tokens(c: float) -> np.ndarray:
            return np.where(self.att, np.maximum(np.rint(c * rel), 1.0), 0.0)

        def ctx_per_new(c: float) -> float:
            # A prompt longer than the chunk is split; each piece re-expands the whole context before it (MLA).
            m = np.ceil(new / c)  # [N] pieces per request
            full = np.floor(new / c)
            # sum over pieces j=1..m of (cached + min(j*c, new))
            s_ = m * p + c * full * (full + 1) / 2 + np.where(m > full, new, 0.0)
            return float(s_.sum() / new.sum())

        def run(c: float, tr: bool = False) -> Step:
            ctx = ctx_per_new(c)
            fn = lambda i, t: (attention_prefill_ops(spec, lay.attention_precision[i], t, t * ctx,  # noqa: E731
                                                     t * per_new_pairs, self.kv_elem), t * ctx, False)
            n = tokens(c)
            return self.step(n, fn, n / max(float(new.mean()), 1.0), tr)  # one LM-head row per finished request

        best = None
        c = float(s.prefill_tokens_per_device)
        while True:
            n = tokens(c)
            if self.fits(n * ctx_per_new(c), n):
                st = run(c)
                service = st.seconds * float(np.mean(np.ceil(new / c)))
                wait = wl.ttft_s - service - load_s  # time left for queueing
                residual = st.seconds / c * n2_over_n / 2  # P-K: wait = rho / (1 - rho) x residual
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
                               memory=self.memory(n * ctx_per_new(256.0), n))
        served, c, st, rho, service = best
        if trace:
            st = run(c, True)
        n = tokens(c)
        cap = float(n.sum()) / st.seconds
        if rho <= 0:
            return PhaseResult("prefill", False, f"TTFT {service + load_s:.2f} s misses the {wl.ttft_s:g} s target "
                               "even at the best chunk size and no queueing", step_s=st.seconds, batch_per_device=c,
                               ttft_s=service + load_s, memory=self.memory(n * ctx_per_new(c), n), step=st)
        return PhaseResult("prefill", True, tokens_per_s=served * in_per_new, computed_tokens_per_s=served,
                           capacity_tokens_per_s=cap * in_per_new, utilization=rho, step_s=st.seconds,
                           batch_per_device=c, ttft_s=wl.ttft_s if rho < 1 else service + load_s,
                           joules_per_token=self._joules_at(st, rho) / (float(n.sum()) * rho),
                           memory=self.memory(n * ctx_per_new(c), n),
                           busy_fraction=float(rho * np.minimum(st.busy / st.seconds, 1.0).mean()),
                           limit="ttft", step=st)

    def _joules_at(self, step: Step, rho: float) -> float:
        """Energy per step-length of wall time when the deployment is busy a fraction rho of it."""
        devs = self.layout.devices
        idle = np.array([d.type.idle_w for d in devs])
        tdp = np.array([d.type.tdp_w for d in devs])
        busy = np.minimum(step.busy, step.seconds)
        return float((idle * step.seconds + rho * (tdp - idle) * busy).sum())


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
