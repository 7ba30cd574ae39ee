"""`hetrun bench rebalance`: the drifting trace, trace files in EPLB's per-window layout, and the modeled replays at
a small scale (the benchmark itself runs at DeepSeek-R1 scale)."""

import json

import numpy as np
import pytest

from hetrun.bench.rebalance import drifting_trace, read_trace, replay_cache, replay_rebalance
from hetrun.cli import main
from hetrun.errors import HetrunError
from hetrun.spec import MoESpec

TINY = MoESpec.from_preset("tiny")  # 2 MoE layers x 12 experts


def test_drifting_trace_is_seeded_and_its_hot_experts_move():
    a = drifting_trace(2, 12, windows=8, window_steps=10, period_steps=20, tokens=64, seed=3)
    assert a.shape == (8, 2, 12) and np.array_equal(a, drifting_trace(2, 12, 8, 10, 20, 64, seed=3))
    assert (a.sum(2) == 10 * 64).all()  # every window: steps x (token, expert) pairs per layer
    assert not np.array_equal(a, drifting_trace(2, 12, 8, 10, 20, 64, seed=4))
    hot = [set(np.argsort(-w[0])[:3].tolist()) for w in a[::2]]  # one window per phase
    assert len({frozenset(h) for h in hot}) > 1  # the head moves between phases


def test_trace_files_in_eplbs_per_window_layout(tmp_path):
    a = drifting_trace(2, 12, 3, 5, 10, 32, seed=0)
    np.save(tmp_path / "t.npy", a)
    (tmp_path / "t.json").write_text(json.dumps(a.tolist()))
    (tmp_path / "w.json").write_text(json.dumps({"windows": a.tolist()}))
    for name in ("t.npy", "t.json", "w.json"):
        assert np.array_equal(read_trace(str(tmp_path / name), TINY), a)
    (tmp_path / "bad.json").write_text(json.dumps([np.ones((3, 12)).tolist()]))
    with pytest.raises(HetrunError, match=r"window 0 has shape \[3, 12\].*2 MoE layers x 12 experts"):
        read_trace(str(tmp_path / "bad.json"), TINY)
    (tmp_path / "nan.json").write_text("[[[1, 2]]]".replace("2", "NaN"))
    with pytest.raises(HetrunError):
        read_trace(str(tmp_path / "nan.json"), TINY)
    with pytest.raises(HetrunError, match="not found"):
        read_trace(str(tmp_path / "none.npy"), TINY)


def test_modeled_rebalancing_replay_keeps_its_budget_and_follows_the_drift():
    trace = drifting_trace(2, 12, windows=8, window_steps=20, period_steps=40, tokens=4096 * 4, seed=1, zipf=1.2)
    out = replay_rebalance(TINY, "mixed-demo", trace, 20, budget_fraction=0.25, ema=0.8, threshold=0.0, redundant=3)
    m = out["mean_step_s"]
    assert set(m) == {"static", "eplb", "live", "oracle"} and len(out["per_window_s"]["live"]) == 8
    assert out["moved_fraction_max"] <= 0.25 + 1e-12 and max(out["moved_bytes"]) <= out["budget_bytes"]
    assert out["per_window_s"]["live"][0] == out["per_window_s"]["static"][0]  # nothing known before the first window
    assert m["oracle"] <= m["live"] < m["static"] and out["switches"]
    assert 0 < out["gap_closed"] <= 1


def test_modeled_cache_replay_ranks_the_policies():
    trace = drifting_trace(2, 12, windows=6, window_steps=20, period_steps=40, tokens=4096 * 4, seed=2, zipf=1.2)
    out = replay_cache(TINY, trace, 20, slots=6)
    pol = out["policies"]
    assert out["slots"] == 6 and set(pol) >= {"none", "static top-C", "decay", "lfu", "lru"}
    assert pol["none"]["hit_rate"] == 0 and 0 < pol["decay"]["hit_rate"] < 1
    assert pol["decay"]["mean_step_s"] < pol["none"]["mean_step_s"]
    assert pol["decay"]["mean_step_s"] <= pol["lru"]["mean_step_s"]
    assert pol["oracle: window's top-C, free"]["hit_rate"] >= pol["static top-C"]["hit_rate"]


def test_bench_command_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "rebalance", "--help"])
    assert e.value.code == 0 and "hetrun bench rebalance --real" in capsys.readouterr().out
    assert main(["bench", "rebalance", "--budget", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget must be a number in [0, 1]" in err
