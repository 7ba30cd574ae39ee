"""Request-level simulation: arrivals, the continuous-batching scheduler, latency metrics, SLOs, the CLI."""

import base64
import json
import re

import numpy as np
import pytest
import yaml

from hetrun.cli import main
from hetrun.errors import HetrunError, WorkloadError
from hetrun.profile import load_profile
from hetrun.sim.engine import StepModel, StepWork
from hetrun.sim.requests import StepTimes, parse_slo, poisson_or_bursty, read_trace, simulate_requests
from hetrun.sim.workload import load_workload
from hetrun.spec import MoESpec

SMALL = MoESpec.from_preset("qwen3-30b-a3b")
CHAT = load_workload("chat").replace(requests=200)


def _profile(**sim):
    base = {"redundant_experts": 0, "step_overhead_us": 0.0}
    base.update(sim)
    return load_profile({"name": "t8", "devices": [{"id": "g", "type": "h800", "count": 8, "per_node": 8,
                                                    "precision": "fp8"}], "extra": {"sim": base}})


def test_parse_slo_units_defaults_and_errors():
    assert parse_slo("ttft=2s,tpot=50ms") == {"ttft": 2.0, "tpot": 0.05}
    assert parse_slo("tpot=0.04", CHAT) == {"ttft": CHAT.ttft_s, "tpot": 0.04}
    assert parse_slo(None, CHAT) == {"ttft": 2.0, "tpot": 0.05}
    assert parse_slo("e2e=60s,ttft=1s,tpot=20ms")["e2e"] == 60.0
    for bad in ("ttft", "ttfb=2s", "ttft=fast", "tpot=-5ms", "ttft=0s"):
        with pytest.raises(HetrunError):
            parse_slo(bad)


def test_poisson_and_bursty_arrivals_have_the_rate_and_spread():
    wl = CHAT.replace(requests=4000)
    p = poisson_or_bursty(wl, 4000, 10.0, "poisson")
    gaps = np.diff(p.time)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)
    b = poisson_or_bursty(wl, 4000, 10.0, "bursty", 3.0)
    g = np.diff(b.time)
    assert g.mean() == pytest.approx(0.1, rel=0.25) and g.std() / g.mean() > 2.0
    assert (p.prompt >= 1).all() and (p.cached < p.prompt).all()
    with pytest.raises(HetrunError):
        poisson_or_bursty(wl, 10, 0.0, "poisson")
    with pytest.raises(HetrunError):
        poisson_or_bursty(wl, 10, 1.0, "weekly")


def test_jsonl_trace_with_vidur_names_and_bad_lines(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text('{"arrived_at": 2.0, "num_prefill_tokens": 100, "num_decode_tokens": 5}\n\n'
                 '{"arrival_s": 1.0, "prompt_tokens": 50, "output_tokens": 3, "cached_tokens": 10}\n')
    a = read_trace(t)
    assert a.time.tolist() == [0.0, 1.0] and a.prompt.tolist() == [50, 100] and a.cached.tolist() == [10, 0]
    for body, msg in (('{"arrival_s": 1}\n', "prompt"), ("not json\n", "not JSON"), ("[1,2]\n", "object"),
                      ('{"arrival_s": 1, "prompt_tokens": 0, "output_tokens": 1}\n', "at least 1"), ("", "no requests")):
        t.write_text(body)
        with pytest.raises(WorkloadError, match=msg):
            read_trace(t)
    with pytest.raises(WorkloadError, match="not found"):
        read_trace(tmp_path / "missing.jsonl")


def test_step_times_interpolate_the_step_model():
    sm = StepModel(SMALL, _profile(), CHAT)
    st = StepTimes(sm)
    n = sm._decode_counts(st.mean_kv)[0](st.b_grid[6])  # a grid point
    exact = sm.step(StepWork.decode(n, n * 1024.0)).seconds
    assert st.seconds(float(n.sum()), 1024.0, 0.0) == pytest.approx(exact, rel=1e-6)  # on the grid: exact
    mid = st.seconds(float(n.sum()), 1500.0, 0.0)
    assert st.seconds(float(n.sum()), 1024.0, 0.0) <= mid <= st.seconds(float(n.sum()), 2048.0, 0.0)
    assert st.seconds(0, 0.0, 3000.0) > st.seconds(0, 0.0, 500.0) > 0


@pytest.mark.parametrize("serving", ["aggregated", "disaggregated"])
def test_every_request_finishes_in_order_of_its_own_events(serving):
    r = simulate_requests(SMALL, _profile(serving=serving, max_num_tokens=4096), CHAT, requests=150, rate=20.0)
    a = r.arrivals
    assert np.isfinite(r.first_token).all() and np.isfinite(r.finish).all()
    assert (r.first_token > a.time).all() and (r.finish >= r.first_token).all()
    assert (r.ttft > 0).all() and (r.tpot[a.output > 1] > 0).all()
    s = r.summary
    assert s["requests"] == 150 and s["serving"] == serving
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"] <= s["ttft_s"]["max"]
    assert 0 <= s["slo_attainment"] <= min(s["ttft_attainment"], s["tpot_attainment"]) <= 1
    assert s["goodput_rps"] <= s["throughput_rps"] + 1e-9
    assert s["output_tokens_per_s"] == pytest.approx(a.output.sum() / s["span_s"])


def test_overload_builds_a_queue_and_misses_the_slo():
    light = simulate_requests(SMALL, _profile(serving="aggregated", max_num_tokens=4096), CHAT, requests=200, rate=2.0)
    heavy = simulate_requests(SMALL, _profile(serving="aggregated", max_num_tokens=4096, max_batch_per_device=4),
                              CHAT, requests=200, rate=200.0)
    assert heavy.summary["ttft_s"]["p99"] > 10 * light.summary["ttft_s"]["p99"]
    assert heavy.summary["slo_attainment"] < light.summary["slo_attainment"]
    assert heavy.summary["max_waiting"] > 10
    assert heavy.summary["mean_running"] <= 8 * 4 + 1e-9  # never more than the batch limit


def test_default_rate_is_below_capacity_and_prefill_instances_are_sized():
    r = simulate_requests(SMALL, _profile(), CHAT, requests=300)
    assert "poisson" in r.summary["arrivals"] and r.settings["prefill_instances"] >= 1
    assert r.summary["slo_attainment"] > 0.5  # 80% of the modeled capacity: most requests meet the targets


def test_simulate_requests_cli_writes_plots_and_per_request(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(_profile().model.model_dump()))
    html, per = tmp_path / "lat.html", tmp_path / "r.jsonl"
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--profile", str(p), "--serving", "aggregated",
                 "--requests", "80", "--rate", "5", "--slo", "ttft=1s,tpot=40ms", "--html", str(html),
                 "--per-request", str(per)]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "SLO attainment" in out and "wrote html" in out
    page = html.read_text()
    pngs = re.findall(r"base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 3 and base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert len(rows) == 80 and all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in rows)
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--profile", str(p), "--requests", "40", "--rate", "5",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["requests"] == 40 and set(got["tpot_s"]) >= {"p50", "p90", "p99"}
    assert main(["simulate", "--profile", str(p), "--requests", "0"]) == 2
    assert main(["simulate", "--profile", str(p), "--requests", "5", "--slo", "ttft=soon"]) == 2
    assert main(["simulate", "--profile", str(p), "--arrival", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("hetrun: error:") == 3 and "Traceback" not in err
