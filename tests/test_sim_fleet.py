"""Fleet search: candidates, the step model as cost oracle, the integer program, single-type comparison, Pareto."""

import json

import numpy as np
import pytest

from hetrun.cli import main
from hetrun.errors import HetrunError
from hetrun.placement.plan import Plan
from hetrun.sim.fleet import Candidate, buckets_of, candidates, search_fleet, solve
from hetrun.sim.workload import load_workload
from hetrun.spec import MoESpec

SMALL = MoESpec.from_preset("qwen3-30b-a3b")
CHAT = load_workload("chat").replace(requests=200)


def _cand(name, role, price, cap, t="x"):
    c = Candidate(name, role, ((t, 1),), {}, price)
    c.capacity = {1.0: np.array(cap, dtype=float)}
    return c


def test_integer_program_picks_the_cheapest_cover_and_honours_roles_and_budget():
    cands = [_cand("p", "prefill", 1.0, [10.0], "a"), _cand("d", "decode", 2.0, [4.0], "a"),
             _cand("agg", "aggregated", 5.0, [5.0], "b")]
    r = solve(cands, 1.0, np.ones(1), rate=8.0, budget=None)
    # prefill 1 x $1 + decode 2 x $2 = $5 beats aggregated 2 x $5 = $10
    assert r["usd_per_hour"] == pytest.approx(5.0) and r["devices"] == {"a": 3}
    assert {i["candidate"]: i["instances"] for i in r["instances"]} == {"p": 1, "d": 2}
    assert solve(cands, 1.0, np.ones(1), rate=8.0, budget=4.0) is None  # over budget
    most = solve(cands, 1.0, np.ones(1), rate=None, budget=10.0)  # the most requests/s within $10/h
    # 2 prefill ($2, 20 req/s) + 4 decode ($8, 16 req/s): 16 req/s for $10
    assert most["rate_rps"] == pytest.approx(16.0, rel=1e-6) and most["usd_per_hour"] <= 10.0 + 1e-9
    assert solve([_cand("z", "decode", 1.0, [0.0])], 1.0, np.ones(1), rate=1.0, budget=None) is None


def test_buckets_split_by_prompt_length():
    bws, share = buckets_of(CHAT, 2)
    assert len(bws) == 2 and share.sum() == pytest.approx(1.0)
    assert bws[0].sample.prompt.mean() < bws[1].sample.prompt.mean()
    with pytest.raises(HetrunError):
        buckets_of(CHAT, 0)


def test_candidates_hold_the_model_and_unknown_types_are_errors():
    cs = candidates(MoESpec.from_preset("deepseek-r1"), ["h800", "xeon-8480"])
    shapes = {c.parts for c in cs}
    assert (("h800", 24),) in shapes and all(c.role in ("prefill", "decode", "aggregated") for c in cs)
    assert any(len(c.parts) == 2 for c in cs)  # an H800 node with Xeon sockets holding cold experts
    with pytest.raises(HetrunError, match="unknown device type"):
        candidates(SMALL, ["h801"])


def test_search_returns_the_mix_its_layout_placement_and_the_best_single_type():
    f = search_fleet(SMALL, CHAT, "ttft=2s,tpot=50ms", ["h100-sxm", "ascend-910b2"], rate=30.0, pareto=False)
    assert f.best is not None and f.best["rate_rps"] == pytest.approx(30.0)
    assert f.single_type is not None and f.best["usd_per_hour"] <= f.single_type["usd_per_hour"] + 1e-6
    assert "single-type" in f.comparison
    inst = f.best["instances"][0]
    assert inst["ep_layout"]["slots"] >= SMALL.num_experts and inst["placement"]["placed_by"]
    d = f.to_dict()
    json.dumps(d)  # JSON-ready
    assert set(d["per_type"]) == {"h100-sxm", "ascend-910b2"}


def test_pareto_front_is_monotone_in_cost(tmp_path, capsys):
    assert main(["fleet", "--model", "qwen3-30b-a3b", "--devices", "h100-sxm", "--rate", "20", "--json",
                 "--plans", str(tmp_path / "plans")]) == 0
    out = json.loads(capsys.readouterr().out)
    costs = [p["usd_per_hour"] for p in sorted(out["pareto"], key=lambda p: p["tpot_s"]) if p["usd_per_hour"]]
    assert costs == sorted(costs, reverse=True)  # a looser SLO never costs more
    assert any(p["pareto"] for p in out["pareto"])
    plans = list((tmp_path / "plans").glob("*.plan.json"))
    assert plans and Plan.from_json(plans[0].read_text()).spec.num_experts == SMALL.num_experts


def test_fleet_cli_errors_are_one_line(capsys):
    assert main(["fleet", "--devices", "h801", "--rate", "1"]) == 2
    assert main(["fleet", "--devices", "h800"]) == 2  # neither a rate nor a budget
    assert main(["fleet", "--devices", "h800", "--rate", "1", "--slo", "tpot=quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("hetrun: error:") == 3 and "Traceback" not in err
