"""The simulator's parts: workloads, operators, all-to-all from the plan, overlap, batch growth, memory, errors."""

import json
import math

import numpy as np
import pytest

from hetrun.errors import HetrunError, PlacementError, ProfileError, WorkloadError
from hetrun.profile import load_profile
from hetrun.roofline import Efficiency, expert_seconds, op_seconds, transfer_seconds
from hetrun.sim import simulate
from hetrun.sim.comm import token_bytes
from hetrun.sim.economics import kg_co2_per_million, usd_per_million
from hetrun.sim.engine import KV_SAMPLES, StepModel, StepWork, _schedule, busiest_rank_pieces
from hetrun.sim.operators import attention_decode_ops, kv_bytes_per_token
from hetrun.sim.report import csv_text, report_dict
from hetrun.sim.roles import attention_line
from hetrun.sim.workload import LengthDist, Workload, load_workload
from hetrun.spec import MoESpec

R1 = MoESpec.from_preset("deepseek-r1")
SMALL = MoESpec.from_preset("qwen3-30b-a3b")


def _profile(**sim):
    """8 H800 in one node, simulated; `sim` overrides extra.sim."""
    base = {"redundant_experts": 0, "step_overhead_us": 0.0}
    base.update(sim)
    return load_profile({"name": "t8", "devices": [{"id": "g", "type": "h800", "count": 8, "per_node": 8,
                                                    "precision": "fp8"}], "extra": {"sim": base}})


def _two_nodes(**sim):
    base = {"redundant_experts": 0}
    base.update(sim)
    return load_profile({"name": "t16", "devices": [{"id": "g", "type": "h800", "count": 16, "per_node": 8,
                                                     "precision": "fp8"}],
                         "links": {"inter_node": {"bandwidth_gbs": 50, "latency_us": 5, "efficiency": 0.8}},
                         "extra": {"sim": base}})


CHAT = load_workload("chat")


# ---- cost model ---------------------------------------------------------------------------------------

def test_roofline_takes_the_larger_of_compute_and_memory():
    dt = load_profile("all-h800").devices[0].type
    flops, nbytes = 1e12, 1e6
    want = dt.launch_overhead_us * 1e-6 + flops / (dt.peak_flops("fp8") * dt.compute_efficiency)
    assert op_seconds(dt, "fp8", flops, nbytes) == pytest.approx(want)
    e = Efficiency(0.5, 0.5, 0.0)
    assert op_seconds(dt, "fp8", 0.0, 3350e9 * 0.5, e) == pytest.approx(1.0)
    assert expert_seconds(dt, "fp8", 0, 7168, 2048, 44e6) == 0.0


def test_transfer_seconds_and_bad_link():
    assert transfer_seconds(50e9 * 0.8, 50, 0.8, 0.0) == pytest.approx(1.0)
    assert transfer_seconds(0, 50, 0.8, 10.0) == 0.0
    with pytest.raises(ProfileError):
        transfer_seconds(1, 0, 0.8, 1.0)


# ---- workloads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("prompt", -5), ("prompt", 0), ("output", 0), ("output", float("nan")),
                                         ("output", float("inf"))])
def test_bad_lengths_are_one_line_errors(field, value):
    with pytest.raises(WorkloadError) as e:
        load_workload({"prompt": 100, "output": 10, field: value})
    assert "\n" not in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("kw", [{"cache_hit_ratio": 1.0}, {"per_user_tps": 0}, {"ttft_s": -1}, {"requests": 0},
                                {"requests": 1.5}, {"expert_skew": -1}])
def test_bad_workload_fields(kw):
    with pytest.raises(WorkloadError):
        Workload("w", LengthDist(100), LengthDist(10), **kw)


def test_workload_from_yaml(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("prompt: {mean: 500, cv: 0.5}\noutput: 100\ncache_hit_ratio: 0.25\nper_user_tps: 30\n")
    w = load_workload(str(p))
    assert w.name == "w" and w.sample.prompt.mean() == pytest.approx(500, rel=0.02)
    assert w.sample.cached.sum() / w.sample.prompt.sum() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(WorkloadError):
        load_workload(str(tmp_path / "missing.yaml"))
    p.write_text("prompt: 10\noutput: 10\nbogus: 1\n")
    with pytest.raises(WorkloadError, match="bogus"):
        load_workload(str(p))


def test_presets_exist_and_sample_deterministically():
    for name in ("chat", "long-context", "deepseek-prod"):
        w = load_workload(name)
        assert (w.sample.prompt >= 1).all() and (w.sample.output >= 1).all()
        assert (w.sample.cached < w.sample.prompt).all()
    a, b = load_workload("chat").replace(seed=3), load_workload("chat").replace(seed=3)
    assert (a.sample.prompt == b.sample.prompt).all()


def test_expert_popularity():
    w = CHAT.replace(expert_skew=1.0)
    p = w.expert_popularity(4, 16)
    assert p.shape == (4, 16) and np.allclose(p.sum(1), 1) and p.max() > 4 * p.min()
    assert np.allclose(CHAT.expert_popularity(2, 8), 1 / 8)


# ---- operators ----------------------------------------------------------------------------------------

def test_mla_kv_cache_bytes_and_8bit_option():
    assert kv_bytes_per_token(R1, 2.0) == 61 * (512 + 64) * 2
    assert kv_bytes_per_token(R1, 1.0) == kv_bytes_per_token(R1, 2.0) / 2


def test_mla_decode_core_attention_flops():
    ops = {o.name: o for o in attention_decode_ops(R1, "fp8", 10, 10 * 4000, 2.0)}
    core = ops["core_attention"]
    assert core.flops == pytest.approx(2 * 128 * 40000 * (2 * 512 + 64))
    assert core.bytes >= 40000 * 576 * 2  # the latent KV is read once per request


def test_fp8_dispatch_is_about_half_of_bf16():
    assert token_bytes(7168, "fp8") == 7168 + 4 * 56
    assert token_bytes(7168, "bf16") == 2 * 7168


# ---- schedule and overlap -----------------------------------------------------------------------------

def test_two_micro_batches_hide_communication_behind_compute():
    L = 4
    st = {k: np.full(L, v) for k, v in (("attention", 3.0), ("dispatch", 1.0), ("experts", 2.0), ("combine", 1.0))}
    moe = np.ones(L, dtype=bool)
    one, _ = _schedule(st, moe, 1, False)
    assert one == pytest.approx(L * 7.0)  # sequential
    two, tasks = _schedule({k: v / 2 for k, v in st.items()}, moe, 2, True)
    assert two < one
    assert two >= L * 5.0 - 1e-9  # compute alone is a lower bound
    assert {t[0] for t in tasks} == {"compute", "comm"}


def test_step_prefers_one_batch_when_splitting_does_not_pay():
    m = StepModel(SMALL, _profile(micro_batches=2), CHAT)
    n = np.ones(8)
    assert m.step(StepWork.decode(n, n * 2000)).micro_batches == 1  # one request: splitting reads every weight twice
    big = np.full(8, 4000.0)
    assert m.step(StepWork.decode(big, big * 2000)).micro_batches in (1, 2)


# ---- communication from the plan ----------------------------------------------------------------------

def test_single_node_has_no_inter_node_traffic():
    m = StepModel(SMALL, _profile(dispatch_dedup="expert"), CHAT)
    tr = m.traffic
    assert np.allclose(tr.send_inter, 0) and np.allclose(tr.recv_inter, 0)
    # every routed pick that leaves its device arrives somewhere: sends equal receives
    assert np.allclose(tr.send_intra.sum(1), tr.recv_intra.sum(1))
    assert np.allclose(tr.routed_rows.sum(1), SMALL.top_k)


def test_dedup_modes_order_traffic():
    vol = {}
    for mode in ("expert", "device", "node"):
        m = StepModel(SMALL, _two_nodes(dispatch_dedup=mode), CHAT)
        vol[mode] = float(m.traffic.send_inter.sum())
        assert m.links.inter is not None
    assert vol["node"] < vol["device"] < vol["expert"]


def test_multi_node_profile_needs_inter_node_link():
    p = load_profile({"name": "x", "devices": [{"id": "g", "type": "h800", "count": 16, "per_node": 8}]})
    with pytest.raises(ProfileError, match="inter_node"):
        StepModel(SMALL, p, CHAT)


# ---- decode batch growth, memory, KV ------------------------------------------------------------------

def test_decode_batch_grows_until_the_target_is_violated():
    m = StepModel(SMALL, _profile(max_batch_per_device=4096), CHAT)
    r = m.decode()
    assert r.feasible and r.per_user_tps >= CHAT.per_user_tps
    assert r.limit in ("target", "memory")
    if r.limit == "target":  # one more request per device would be too slow
        m2 = StepModel(SMALL, _profile(max_batch_per_device=int(r.batch_per_device) + 1), CHAT)
        st = m2.decode()
        assert st.batch_per_device == r.batch_per_device


def test_8bit_kv_cache_halves_kv_and_admits_a_larger_batch():
    wl = load_workload("long-context").replace(per_user_tps=1.0)
    a = StepModel(R1, load_profile("all-h800"), wl)
    p8 = load_profile("all-h800").model.model_dump()
    p8["extra"]["sim"]["kv_cache_dtype"] = "fp8"
    b = StepModel(R1, load_profile(p8), wl)
    assert b.kv_per_token == a.kv_per_token / 2
    ra, rb = a.decode(), b.decode()
    assert ra.limit == "memory" and rb.batch_per_device > 1.5 * ra.batch_per_device


def test_model_that_does_not_fit_is_a_one_line_error():
    p = load_profile({"name": "one", "devices": [{"id": "g", "type": "h800", "count": 1, "precision": "fp8"}]})
    with pytest.raises(PlacementError) as e:
        simulate("deepseek-r1", p, "chat")
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)


def test_gpt_oss_120b_fits_one_80gb_gpu_as_published(caplog):
    """OpenAI: gpt-oss-120b, 4-bit experts (MXFP4, 61 GB), runs within one 80 GB GPU. Its experts do not fit the
    share of memory an attention device keeps its KV cache from by default; they take it, the KV cache gets the rest."""
    p = load_profile({"name": "one", "devices": [{"id": "g", "type": "h100-sxm", "count": 1, "precision": "int4"}]})
    decode = simulate("gpt-oss-120b", p, "chat").phases["decode"]
    memory = decode.memory["g"]
    assert 60 < memory["weights_gb"] < 70 and memory["kv_gb"] > 0 and memory["total_gb"] <= 80
    assert decode.feasible and decode.batch_per_device >= 1
    assert "only with its experts taking the memory" in caplog.text
    with pytest.raises(PlacementError, match="does not fit"):  # 8-bit experts, 122 GB, do not
        simulate("gpt-oss-120b", load_profile({"name": "one", "devices": [
            {"id": "g", "type": "h100-sxm", "count": 1, "precision": "fp8"}]}), "chat")


def test_missing_or_zero_prices_and_zero_bandwidth_are_errors():
    with pytest.raises(ProfileError):  # a device type without a price does not validate
        load_profile({"name": "p", "devices": [{"id": "x", "type": "cheap"}], "device_types": {"cheap": {
            "name": "cheap", "vendor": "other", "kind": "gpu", "tflops": {"bf16": 1}, "precisions": ["bf16"],
            "memory_gb": 1, "memory_bw_gbs": 1, "scale_up": {"bandwidth_gbs": 1}, "tdp_w": 1, "sources": ["x"]}}})
    free = {"name": "free", "devices": [{"id": "g", "type": "h800", "count": 8, "per_node": 8, "price_per_hour": 0}]}
    with pytest.raises(ProfileError, match="price"):
        simulate(SMALL, free, "chat")
    with pytest.raises(ProfileError):
        load_profile({"name": "z", "devices": [{"id": "g", "type": "h800", "count": 16, "per_node": 8}],
                      "links": {"inter_node": {"bandwidth_gbs": 0}}})


def test_bad_sim_settings_name_the_field():
    with pytest.raises(ProfileError, match="extra.sim.kv_cache_dtype"):
        StepModel(SMALL, _profile(kv_cache_dtype="fp4"), CHAT)
    with pytest.raises(ProfileError, match="attention_devices"):
        StepModel(SMALL, _profile(attention_devices=["nope"]), CHAT)
    with pytest.raises(ProfileError, match="slots"):
        StepModel(SMALL, _profile(slots_per_device={"g": 3}), CHAT)


# ---- economics and reports ----------------------------------------------------------------------------

def test_usd_and_co2_arithmetic():
    assert usd_per_million(3.6, 1.0) == pytest.approx(1e6 / 1000)
    assert usd_per_million(3.6, 0.0) is None
    assert kg_co2_per_million(3.6, 0.5) == pytest.approx(0.5)


def _no_nan(text: str):
    def bad(c):
        raise ValueError(f"non-finite {c} in report")
    return json.loads(text, parse_constant=bad)


def test_infeasible_profile_reports_without_nan_or_inf():
    r = simulate("deepseek-r1", "gpu-xeon", "chat")
    assert r.row["decode_ok"] is False and r.row["usd_per_m_output"] is None
    assert "tokens/s per user" in r.row["decode_note"]
    _no_nan(json.dumps(report_dict([r])))
    text = csv_text([r.row])
    assert "nan" not in text.lower() and "inf," not in text.lower()
    for v in r.row.values():
        if isinstance(v, float):
            assert math.isfinite(v)


def test_unknown_phase_is_an_error():
    with pytest.raises(HetrunError):
        simulate(SMALL, _profile(), "chat", phases=("training",))


# ---- heterogeneous deployments -----------------------------------------------------------------------

def test_mixed_h800_910b_decodes_at_least_as_fast_per_node_as_all_910b():
    # Two of mixed's four nodes are the same 910B nodes and two are faster, larger H800 nodes, so per node it
    # must do at least as well as all-910B when requests and experts follow each device's speed.
    mixed = simulate("deepseek-r1", "mixed-h800-910b", CHAT, phases=("decode",))
    npu = simulate("deepseek-r1", "all-ascend-910b", CHAT, phases=("decode",))
    dm, dn = mixed.phases["decode"], npu.phases["decode"]
    assert dm.feasible and dn.feasible
    assert dm.tokens_per_s / mixed.num_nodes >= dn.tokens_per_s / npu.num_nodes
    sm = mixed.model
    h800 = np.array([d.type.name == "h800" for d in sm.layout.devices])
    slots = np.bincount(sm.layout.plan.device_of.ravel(), minlength=sm.layout.num_devices)
    assert slots[h800].min() > slots[~h800].max()  # faster devices with more memory hold more experts
    n = sm._decode_counts(float(CHAT.sample.decode_kv_samples(KV_SAMPLES, CHAT.seed + 1).mean()))[0](64)
    assert n[h800].min() > n[~h800].max()  # and more requests
    att = dm.step.stages["attention"][-1]  # [D] one MoE layer's attention per device
    assert att[~h800].max() <= att[h800].max() * (1 + 1e-9)  # the attention stage is not set by the 910Bs


def test_decode_counts_are_even_on_identical_devices_and_capped_by_memory():
    sm = StepModel(SMALL, _profile(), CHAT)
    counts, b_full, cap = sm._decode_counts(2000.0)
    assert (counts(37) == 37).all() and (counts(b_full) == cap).all()
    mixed = StepModel(R1, load_profile("mixed-h800-910b"), CHAT)
    counts, b_full, cap = mixed._decode_counts(4096.0)
    n = counts(5000)  # far past what any device's memory holds beside its weights: every device, the fastest too
    assert (n == cap).all() and (n > 0).all()
    need = mixed.fixed + mixed.expert_weights + n * 4096.0 * mixed.kv_per_token + mixed._activation_bytes(n)
    assert (need <= mixed.capacity).all()


def test_mixed_h800_910b_split_gives_slow_devices_no_requests_rather_than_a_longer_attention_stage():
    # The defect issue 18 reported: each 910B got one request (the floor of the old split) while its fixed attention
    # cost -- 204 MB of attention weights read per layer at 1.6 TB/s -- already exceeded an H800's whole attention
    # stage, so every device waited for the 910Bs and the H800s were held to the 910Bs' equal-time count.
    mixed = StepModel(R1, load_profile("mixed-h800-910b"), CHAT)
    _, _, mean_kv = mixed._decode_kv()
    counts, _, _ = mixed._decode_counts(mean_kv)
    slow = np.array([d.type.name != "h800" for d in mixed.layout.devices])
    a0, a1 = attention_line(R1, mixed.layout.devices, mixed.layout.attention_precision, mixed.settings, mixed.att,
                            mean_kv)
    b = 48
    n = counts(b)
    T = a0[~slow][0] + a1[~slow][0] * b  # the H800s' attention time at b requests
    if a0[slow][0] > T:
        assert (n[slow] == 0).all()  # an idle DP rank: its experts still work
    stage = np.where(n > 0, a0 + a1 * n, 0.0)
    assert stage.max() <= T * (1 + 1e-9)  # nobody stretches the H800s' attention stage
    # with a looser target the 910Bs take requests too and hold KV
    loose = simulate("deepseek-r1", "mixed-h800-910b", CHAT.replace(per_user_tps=5.0), phases=("decode",))
    assert loose.row["memory"]["ascend"]["kv_gb"] > 5.0


def test_expert_budget_leaves_attention_devices_less_of_the_step():
    from hetrun.sim.roles import expert_budget
    from hetrun.sim.settings import sim_settings

    prof = load_profile("gpu-xeon")
    s = sim_settings(prof)
    att = np.array([d.group == "h800" for d in prof.devices])
    prec = tuple(d.precision or d.type.precisions[0] for d in prof.devices)
    assert (expert_budget(R1, prof.devices, prec, s, att, None) == 1.0).all()
    b = expert_budget(R1, prof.devices, prec, s, att, 0.05)
    assert (b[~att] == 1.0).all() and (b[att] < 1.0).all() and (b[att] > 0).all()


def test_a_planner_bug_falls_back_to_eplb_where_the_slots_are_equal(monkeypatch):
    import hetrun.placement.planner as planner

    def bug(*args, **kwargs):
        raise RuntimeError("solver bug")

    monkeypatch.setattr(planner, "solve_placement", bug)
    m = StepModel(SMALL, _profile(slots_per_device={"g": 16}), CHAT)
    assert m.layout.planner.endswith("rebalance_experts")
    assert (np.bincount(m.layout.plan.device_of[0], minlength=8) == 16).all()
    p = load_profile({"name": "uneven", "devices": [{"id": "a", "type": "h800", "count": 4, "precision": "fp8"},
                                                    {"id": "b", "type": "h800", "count": 4, "precision": "fp8"}],
                      "extra": {"sim": {"slots_per_device": {"a": 20, "b": 12}}}})
    with pytest.raises(HetrunError, match="placement solver failed for profile 'uneven': RuntimeError: solver bug"):
        StepModel(SMALL, p, CHAT)


# ---- second generation: FP4, MTP, TP attention, aggregated serving, fixed batch, load traces ----------------

def test_fp4_formats_store_half_a_byte_plus_block_scales_and_run_at_the_fp4_rate():
    from hetrun.formats import expert_bytes, get_format, matrix_bytes

    assert matrix_bytes("nvfp4", 7168, 2048) == 7168 * (1024 + 128) + 4  # E2M1 + E4M3 per 16 + FP32 per tensor
    assert matrix_bytes("mxfp4", 7168, 2048) == 7168 * (1024 + 64)  # E2M1 + E8M0 per 32
    assert not get_format("nvfp4").graph and get_format("fp8").graph
    b200 = load_profile({"name": "b", "devices": [{"id": "g", "type": "b200", "count": 8, "precision": "nvfp4"}],
                         "extra": {"sim": {"step_overhead_us": 0}}})
    fp8 = load_profile({"name": "b8", "devices": [{"id": "g", "type": "b200", "count": 8, "precision": "fp8"}],
                        "extra": {"sim": {"step_overhead_us": 0}}})
    a, b = StepModel(R1, b200, CHAT), StepModel(R1, fp8, CHAT)
    assert a.expert_weights.sum() < 0.6 * b.expert_weights.sum()
    assert expert_bytes("nvfp4", 7168, 2048) < 0.6 * expert_bytes("fp8", 7168, 2048)
    wl = CHAT.replace(decode_batch=64)
    assert StepModel(R1, b200, wl).decode().step_s < StepModel(R1, fp8, wl).decode().step_s


def test_mtp_yields_more_tokens_per_step_and_costs_a_draft():
    from hetrun.sim.settings import MtpSpec

    assert MtpSpec(draft_tokens=1, acceptance=0.8).tokens_per_step == pytest.approx(1.8)
    assert MtpSpec(draft_tokens=3, acceptance=0.5).tokens_per_step == pytest.approx(1.875)
    wl = CHAT.replace(decode_batch=32)
    plain = StepModel(SMALL, _profile(), wl).decode()
    mtp = StepModel(SMALL, _profile(mtp={"draft_tokens": 1, "acceptance": 0.8}), wl).decode()
    assert mtp.tokens_per_step == pytest.approx(1.8)
    assert mtp.step.draft_s > 0 and mtp.step_s > plain.step_s  # verify 2 tokens per request, draft one
    assert mtp.tokens_per_s > plain.tokens_per_s and mtp.per_user_tps > plain.per_user_tps
    assert mtp.tpot_s == pytest.approx(mtp.step_s / 1.8)
    with pytest.raises(ProfileError, match="acceptance"):
        StepModel(SMALL, _profile(mtp={"draft_tokens": 1, "acceptance": 1.5}), wl)


def test_tensor_parallel_attention_replicates_mla_kv_and_splits_heads():
    from hetrun.sim.operators import attention_layer_bytes, kv_replication

    assert kv_replication(R1, 8) == 8.0 and kv_replication(R1, 1) == 1.0
    assert attention_layer_bytes(R1, "fp8", 8) < attention_layer_bytes(R1, "fp8", 1) / 2
    dp = StepModel(R1, load_profile("all-h800"), CHAT)
    p = load_profile("all-h800").model.model_dump()
    p["extra"]["sim"]["attention_tp"] = 8
    tp = StepModel(R1, load_profile(p), CHAT)
    assert tp.kv_stored_per_token == 8 * dp.kv_stored_per_token
    assert tp.fixed[0] < dp.fixed[0]  # 1/8 of the head-split weights
    n = np.full(32, 16.0)
    st_tp, st_dp = tp.step(StepWork.decode(n, n * 2000)), dp.step(StepWork.decode(n, n * 2000))
    assert st_tp.seconds != st_dp.seconds
    p["extra"]["sim"]["attention_tp"] = 3
    with pytest.raises(ProfileError, match="attention_tp=3"):
        StepModel(R1, load_profile(p), CHAT)


def test_aggregated_serving_prefills_what_keeps_the_batch_full():
    wl = CHAT.replace(decode_batch=32)
    sm = StepModel(SMALL, _profile(serving="aggregated", max_num_tokens=4096), wl)
    agg = sm.aggregated()
    dec = StepModel(SMALL, _profile(), wl).decode()
    assert agg.feasible and agg.limit == "fixed" and agg.batch_per_device == 32
    new, out = float(wl.sample.new.mean()), float(wl.sample.output.mean())
    assert agg.computed_tokens_per_s == pytest.approx(agg.tokens_per_s * new / out, rel=1e-6)  # steady state
    assert agg.step_s > dec.step_s  # the step carries a prompt chunk beside the decode batch
    assert agg.tokens_per_s < dec.tokens_per_s
    tight = StepModel(SMALL, _profile(serving="aggregated", max_num_tokens=40), wl).aggregated()
    assert not tight.feasible and tight.limit == "max_num_tokens"
    grown = StepModel(SMALL, _profile(serving="aggregated", max_num_tokens=8192), CHAT).aggregated()
    assert grown.feasible and grown.per_user_tps >= CHAT.per_user_tps and grown.ttft_s <= CHAT.ttft_s
    r = simulate(SMALL, _profile(serving="aggregated", max_num_tokens=8192), CHAT)
    assert set(r.phases) == {"aggregated"} and r.row["serving"] == "aggregated"
    assert r.row["usd_per_1k_requests"] > 0 and r.row["decode_tokens_per_s"] == pytest.approx(grown.tokens_per_s)


def test_busiest_rank_pieces_is_the_max_of_poisson_counts():
    mix = busiest_rank_pieces(0.0625, 8)
    assert sum(p for _, p in mix) == pytest.approx(1.0)
    assert mix[0][0] == 0 and mix[0][1] == pytest.approx(math.exp(-0.5), rel=1e-4)  # no rank has a piece (tail folded)
    assert busiest_rank_pieces(0.0, 8) == [(0, 1.0)]
    big = dict(busiest_rank_pieces(4.0, 64))
    assert max(big, key=big.get) > 4  # the busiest of 64 ranks gets more than the mean


def test_fixed_decode_batch_runs_that_batch_or_says_it_does_not_fit():
    r = StepModel(SMALL, _profile(), CHAT.replace(decode_batch=10)).decode()
    assert r.feasible and r.batch_per_device == 10 and r.limit == "fixed"
    huge = StepModel(R1, load_profile("all-h800"), load_workload("long-context").replace(decode_batch=5000)).decode()
    assert not huge.feasible and huge.limit == "memory" and "does not fit" in huge.reason
    with pytest.raises(WorkloadError, match="decode_batch"):
        CHAT.replace(decode_batch=0)


def test_allgather_dispatch_sends_every_token_to_every_expert_device():
    dev = StepModel(SMALL, _profile(dispatch_dedup="device"), CHAT).traffic
    allg = StepModel(SMALL, _profile(dispatch_dedup="all"), CHAT).traffic
    assert np.allclose(allg.send_intra, 7.0 / 8)  # each token to the 7 other devices, w = 1/8 each
    assert allg.send_intra.sum() > dev.send_intra.sum()


def test_expert_load_trace_sets_the_popularity(tmp_path):
    L, E = SMALL.num_moe_layers, SMALL.num_experts
    load = np.ones((L, E))
    load[:, 0] = 50.0  # one hot expert in every layer
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"tokens_per_expert": load.tolist()}))  # as DispatchStats.to_dict writes it
    wl = CHAT.replace(expert_load=str(path))
    pop = wl.expert_popularity(L, E)
    assert pop.shape == (L, E) and np.allclose(pop.sum(1), 1) and pop[0, 0] == pytest.approx(50 / (E - 1 + 50))
    hot = simulate(SMALL, _profile(), wl, phases=("decode",))
    flat = simulate(SMALL, _profile(), CHAT, phases=("decode",))
    assert hot.row["decode_tokens_per_s"] != flat.row["decode_tokens_per_s"]
    assert simulate(SMALL, _profile(), CHAT, ("decode",), expert_load=str(path)).row["decode_tokens_per_s"] == \
        pytest.approx(hot.row["decode_tokens_per_s"])
    (tmp_path / "bad.json").write_text(json.dumps({"tokens_per_expert": [[1, 2], [3, 4]]}))
    with pytest.raises(WorkloadError, match="shape"):
        CHAT.replace(expert_load=str(tmp_path / "bad.json")).expert_popularity(L, E)
    with pytest.raises(WorkloadError, match="not found"):
        CHAT.replace(expert_load=str(tmp_path / "missing.json")).expert_popularity(L, E)
