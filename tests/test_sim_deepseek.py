"""DeepSeek's published serving, reproduced from sourced kernel figures; cost and revenue arithmetic."""

import json
from pathlib import Path

import numpy as np
import pytest

from hetrun.calibrate.fit import fit_roofline
from hetrun.profile import load_profile
from hetrun.sim import simulate
from hetrun.sim.economics import DEEPSEEK_R1_PRICE, daily_revenue, fleet_cost_per_day, fleet_for_volume
from hetrun.sim.settings import sim_settings
from hetrun.sim.workload import DEEPSEEK_DAY, load_workload

DATA = Path(__file__).parent / "data" / "deepgemm_h800.json"


def _deepgemm_rows():
    d = json.loads(DATA.read_text())
    rows = [[1] + r for r in d["normal"]] + d["grouped"]
    f = np.array([2.0 * g * m * n * k for g, m, n, k, _ in rows])
    b = np.array([g * (m * k + n * k + 2.0 * m * n) for g, m, n, k, _ in rows])  # FP8 in, BF16 out
    t = f / (np.array([r[4] for r in rows]) * 1e12)
    return f, b, t


@pytest.mark.parametrize("name", ["deepseek-decode-h800", "deepseek-prefill-h800"])
def test_gemm_efficiencies_are_the_deepgemm_fit(name):
    """The profiles' H800 GEMM efficiencies are what the calibration fitter gets from DeepGEMM's own table."""
    f, b, t = _deepgemm_rows()
    ce, me, lat, err = fit_roofline(f, b, t, 1979e12, 3350e9)
    eff = sim_settings(load_profile(name)).gemm_efficiency["h800"]
    assert eff.compute == pytest.approx(ce, abs=0.01)
    assert eff.memory == pytest.approx(me, abs=0.01)
    assert eff.launch_us == pytest.approx(lat, abs=0.2)
    assert err < 0.25  # the roofline describes the table to about 20% rms


@pytest.mark.parametrize("name", ["deepseek-decode-h800", "deepseek-prefill-h800"])
def test_every_deepseek_constant_has_a_source(name):
    s = sim_settings(load_profile(name))
    for key in ("gemm_efficiency", "attention_efficiency", "links.inter_node", "comm_sm_fraction", "step_overhead_us",
                "topology"):
        assert key in s.sources and len(s.sources[key]) > 20, key


def test_decode_reproduces_published_within_25_percent():
    r = simulate("deepseek-r1", "deepseek-decode-h800", "deepseek-prod", phases=("decode",))
    row = r.row
    assert r.num_devices == 144 and r.num_nodes == 18
    assert row["per_user_tps"] >= 20.0  # the batch grew only while the per-user target held
    assert 0.75 * 14800 <= row["decode_tokens_per_s_per_node"] <= 1.25 * 14800
    plan = r.model.layout.plan
    assert plan.num_slots == 288 and (np.bincount(plan.device_of[0], minlength=144) == 2).all()


def test_prefill_reproduces_published_within_25_percent():
    r = simulate("deepseek-r1", "deepseek-prefill-h800", "deepseek-prod", phases=("prefill",))
    row = r.row
    assert r.num_devices == 32 and r.num_nodes == 4
    assert row["ttft_s"] <= 2.0 + 1e-9
    assert 0.75 * 73700 <= row["prefill_tokens_per_s_per_node"] <= 1.25 * 73700
    # cache hits count in the input rate but are not computed
    assert row["prefill_tokens_per_s"] > 2 * row["prefill_computed_tokens_per_s"]


def test_deepseek_prod_workload_matches_the_published_day():
    w = load_workload("deepseek-prod")
    s = w.sample
    assert s.avg_kv_per_output_token == pytest.approx(4989, rel=0.005)
    assert s.cached.sum() / s.prompt.sum() == pytest.approx(0.563, abs=0.003)
    assert s.prompt.sum() / s.output.sum() == pytest.approx(608 / 168, rel=0.01)
    assert w.per_user_tps == 20.0


def test_fleet_cost_is_exact():
    assert fleet_cost_per_day(226.75, 8, 2.0) == 87072.0


def test_daily_revenue_matches_published():
    rev = daily_revenue(608e9, 342e9, 168e9, DEEPSEEK_R1_PRICE)
    assert rev["input_cache_hit_usd"] == pytest.approx(342e3 * 0.14)
    assert rev["input_cache_miss_usd"] == pytest.approx(266e3 * 0.55)
    assert rev["output_usd"] == pytest.approx(168e3 * 2.19)
    assert rev["total_usd"] == pytest.approx(562027, rel=0.001)  # DeepSeek's $562,027 from unrounded volumes


def test_fleet_sizing_from_published_rates_gives_published_node_count():
    f = fleet_for_volume(DEEPSEEK_DAY["input_tokens"], DEEPSEEK_DAY["output_tokens"], 73.7e3, 14.8e3)
    assert f["nodes"] == pytest.approx(226.75, rel=0.01)
