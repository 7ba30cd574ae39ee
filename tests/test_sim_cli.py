"""`hetrun simulate`, `hetrun compare` and `hetrun calibrate` end to end: outputs, files, errors."""

import base64
import csv
import io
import json
import math
import re

import numpy as np
import pytest
import yaml

from hetrun.cli import main


def _json(text: str):
    def bad(c):
        raise ValueError(f"non-finite {c}")
    return json.loads(text, parse_constant=bad)


def test_compare_defaults_show_four_kinds_and_state_the_difference(capsys):
    assert main(["compare", "--model", "deepseek-r1", "--workload", "chat", "--json"]) == 0
    out = _json(capsys.readouterr().out)
    names = [r["profile"] for r in out["profiles"]]
    assert names == ["all-h800", "all-ascend-910b", "mixed-h800-910b", "gpu-xeon"]
    kinds = [set(r["device_types"].split(", ")) for r in out["profiles"]]
    assert kinds[2] == {"h800", "ascend-910b2"} and kinds[3] == {"h800", "xeon-8480"}
    assert any(s.startswith("Mélange-style") for s in out["statements"])
    assert any(s.startswith("HexGen-style") for s in out["statements"])
    assert out["melange"]["best_homogeneous"] in ("all-h800", "all-ascend-910b")
    assert set(out["hexgen"]["requests_per_s"]) == set(names)
    mixed = out["profiles"][2]
    assert mixed["planner"].endswith(("solve_placement", "plan"))
    for r in out["profiles"]:
        assert r["prefill_tokens_per_s_per_node"] is None or r["prefill_tokens_per_s_per_node"] > 0
        assert r["memory"] and all(m["total_gb"] <= m["capacity_gb"] for m in r["memory"].values())


def test_simulate_writes_html_trace_and_csv(tmp_path, capsys):
    html, trace, csvp = tmp_path / "r.html", tmp_path / "t.json", tmp_path / "r.csv"
    assert main(["simulate", "--profile", "all-h800", "--workload", "chat", "--html", str(html),
                 "--trace", str(trace), "--csv", str(csvp)]) == 0
    printed = capsys.readouterr().out
    assert "decode tok/s/node" in printed and "wrote html" in printed
    page = html.read_text()
    pngs = page.count("data:image/png;base64,")
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)
    assert pngs == 4 and "<table>" in page
    assert not re.search(r"\b(nan|inf|infinity)\b", text, re.IGNORECASE)
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    t = _json(trace.read_text())
    spans = [e for e in t["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] > 0 and e["ts"] >= 0 for e in spans)
    assert {e["tid"] for e in spans} == {0, 1}  # compute and all-to-all threads
    rows = list(csv.DictReader(io.StringIO(csvp.read_text())))
    assert rows[0]["profile"] == "all-h800" and float(rows[0]["decode_tokens_per_s_per_node"]) > 0


def test_fleet_arithmetic(capsys):
    assert main(["simulate", "--profile", "deepseek-decode-h800", "--prefill-profile", "deepseek-prefill-h800",
                 "--phase", "decode", "--workload", "deepseek-prod", "--fleet", "--json"]) == 0
    f = _json(capsys.readouterr().out)["profiles"][0]["fleet"]
    assert f["published"]["cost_per_day"] == 87072.0
    assert f["published"]["revenue_per_day"]["total_usd"] == pytest.approx(562e3, rel=0.002)
    sim = f["simulated"]
    assert sim is not None and 150 < sim["nodes"] < 300  # the simulated rates size a fleet like DeepSeek's


@pytest.mark.parametrize("body,needle", [
    ("prompt: -5\noutput: 10\n", "prompt.mean"),
    ("prompt: 100\noutput: 0\n", "output.mean"),
])
def test_bad_workload_file_is_one_line_exit_2(tmp_path, capsys, body, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    assert main(["simulate", "--profile", "all-h800", "--workload", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hetrun: error:") and needle in err


def test_zero_bandwidth_profile_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "z", "devices": [{"id": "g", "type": "h800", "count": 16, "per_node": 8}],
                                 "links": {"inter_node": {"bandwidth_gbs": 0}}}))
    assert main(["simulate", "--profile", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bandwidth_gbs" in err


def test_model_that_does_not_fit_exit_2(tmp_path, capsys):
    p = tmp_path / "one.yaml"
    p.write_text(yaml.safe_dump({"name": "one", "devices": [{"id": "g", "type": "h800", "precision": "fp8"}]}))
    assert main(["simulate", "--profile", str(p), "--model", "deepseek-r1"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_calibrate_smoke_writes_a_profile_the_simulator_uses(tmp_path):
    from hetrun.calibrate.predict import predict_moe_layer_seconds
    from hetrun.calibrate.run import calibrate
    from hetrun.profile import load_profile

    out = tmp_path / "host.yaml"
    path, prof = calibrate(out, quick=True, backends=("onnxruntime",), precisions=("fp32",), tokens=(1, 8, 64),
                           shapes=((64, 128), (256, 512)))
    assert path == out and out.exists() and not list(tmp_path.glob(".*.tmp"))
    p = load_profile(str(out))
    dt = p.model.device_types["host-onnxruntime-fp32"]
    assert 0 < dt.compute_efficiency <= 1 and 0 < dt.memory_efficiency <= 1 and dt.launch_overhead_us >= 0
    cal = p.model.extra["calibration"]
    assert cal["copy_bandwidth_gbs"] > 0 and len(cal["samples"]) == 6 and cal["cache_bytes"] > 0  # 2 shapes x 3
    assert [s["hidden"] for s in cal["samples"]] == [64] * 3 + [256] * 3
    assert all(abs(s["tokens"] - n) <= n // 4 for s, n in zip(cal["samples"], (1, 8, 64) * 2))  # rows per call
    assert [f["hidden"] for f in cal["fits"]] == [64, 256]
    small = predict_moe_layer_seconds(str(out), "onnxruntime", "fp32", 64, 128, [1, 0, 1, 0], 1)
    big = predict_moe_layer_seconds(str(out), "onnxruntime", "fp32", 256, 512, [500, 500, 500, 500], 2)
    assert 0 < small < big and math.isfinite(big)
    # between the measured shapes the prediction interpolates the measured calls; outside, the roofline answers
    from hetrun.calibrate.predict import measured_call_seconds

    lo, hi = (measured_call_seconds(cal, "onnxruntime", "fp32", d, i, 8) for d, i in ((64, 128), (256, 512)))
    mid = measured_call_seconds(cal, "onnxruntime", "fp32", 128, 256, 8)
    assert min(lo, hi) <= mid <= max(lo, hi)
    assert measured_call_seconds(cal, "onnxruntime", "fp32", 1024, 4096, 8) is None
    with pytest.raises(Exception, match="calibrate"):
        predict_moe_layer_seconds(str(out), "openvino", "fp32", 64, 128, [1], 1)


def test_calibration_sweeps_the_ladder_in_turn_and_keeps_each_points_fastest_sweep(monkeypatch):
    import hetrun.calibrate.measure as c

    built = []
    slow = {(0, 64): 3.0, (1, 32): 2.0}  # (sweep, hidden): a slow spell in sweep 1 for one shape, sweep 2 another

    def fake_shape(b, p, d, i, counts, threads):
        sweep = sum(1 for x in built if x[2] == d)  # each sweep builds the layer anew
        built.append((b, p, d, i, tuple(counts)))
        # a call of n rows: 5n ms; with 8 calls a layer, 1 row is short (40 ms) and 8 rows long (320 ms)
        return {n: c.Sample(b, p, d, i, n, n * 5e-3 * slow.get((sweep, d), 1.0), 1.0) for n in counts}

    monkeypatch.setattr(c, "_measure_shape", fake_shape)
    heard = []
    got = c.measure_experts(("onnxruntime",), ("fp32",), tokens=(1, 8), shapes=((32, 64), (64, 128)), rounds=4,
                            progress=lambda sweep, s: heard.append((sweep, s.hidden, s.tokens)))
    assert c.sweeps_for(8e-3, 4) == 4 and c.sweeps_for(0.2, 4) == 2  # long layer calls: two sweeps do
    assert built == [("onnxruntime", "fp32", 32, 64, (1, 8)), ("onnxruntime", "fp32", 64, 128, (1, 8))] * 2 + \
        [("onnxruntime", "fp32", 32, 64, (1,)), ("onnxruntime", "fp32", 64, 128, (1,))] * 2
    assert [h[0] for h in heard] == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 2
    assert [(s.hidden, s.tokens, s.seconds) for s in got] == [(32, 1, pytest.approx(5e-3)), (32, 8, pytest.approx(40e-3)),
                                                              (64, 1, pytest.approx(5e-3)), (64, 8, pytest.approx(40e-3))]


def test_measured_calls_interpolate_log_log_and_never_fall_with_more_rows():
    from hetrun.calibrate.predict import measured_call_seconds

    def sample(d, i, n, sec):
        return {"backend": "onnxruntime", "precision": "fp32", "hidden": d, "intermediate": i, "tokens": n,
                "seconds": sec, "cold": False}

    cal = {"samples": [sample(64, 64, 1, 10e-6), sample(64, 64, 4, 40e-6), sample(64, 64, 16, 30e-6),
                       sample(64, 64, 64, 120e-6), sample(256, 256, 1, 100e-6), sample(256, 256, 64, 1200e-6)]}
    t = lambda d, n: measured_call_seconds(cal, "onnxruntime", "fp32", d, d, n)  # noqa: E731
    assert t(64, 1) == pytest.approx(10e-6) and t(64, 64) == pytest.approx(120e-6)
    pooled = (40e-6 * 30e-6) ** 0.5  # 40 us at 4 rows above 30 us at 16: noise; both become their log mean
    assert t(64, 4) == pytest.approx(pooled) and t(64, 16) == pytest.approx(pooled)
    assert t(64, 2) == pytest.approx(10e-6 * (pooled / 10e-6) ** 0.5)  # log-log between 1 and 4 rows
    assert t(128, 1) == pytest.approx((10e-6 * 100e-6) ** 0.5)  # halfway in log area
    assert t(64, 128) == pytest.approx(120e-6 + (120e-6 - pooled) / 48 * 64)  # past the last count: linear
    assert t(32, 1) is None and t(512, 1) is None


def test_dispatcher_fit_recovers_its_terms():
    from hetrun.calibrate.dispatcher_terms import dispatch_features
    from hetrun.calibrate.fit import fit_dispatch
    from hetrun.calibrate.predict import dispatch_seconds

    truth = {"fixed_us": {"softmax_topk": 200.0, "sigmoid_grouped": 300.0}, "per_call_us": 5.0, "us_per_mb": 250.0,
             "us_per_shared_mb": 80.0, "us_per_k_router": 20.0}
    rows = []
    for router, d, e, k, sh in (("softmax_topk", 256, 6, 2, 0), ("softmax_topk", 48, 40, 6, 0),
                                ("softmax_topk", 128, 8, 1, 3), ("sigmoid_grouped", 96, 16, 4, 1)):
        for n in (1, 4, 16, 64, 256, 1024, 2048):
            f = dispatch_features(router, n, min(e, n * k) + sh, k, d, e, sh)
            rows.append(dict(f, seconds=dispatch_seconds(truth, f)))
    fit = fit_dispatch(rows)
    for key in ("per_call_us", "us_per_mb", "us_per_shared_mb", "us_per_k_router"):
        assert fit[key] == pytest.approx(truth[key], rel=1e-3)
    assert fit["fixed_us"] == pytest.approx(truth["fixed_us"], rel=1e-3)


def test_calibrate_cli_quick(tmp_path, capsys):
    out = tmp_path / "h.yaml"
    assert main(["calibrate", "--quick", "--out", str(out), "--backends", "onnxruntime", "--precisions", "fp32",
                 "--json"]) == 0
    got = _json(capsys.readouterr().out)
    assert got["path"] == str(out) and got["fits"][0]["backend"] == "onnxruntime"
    assert np.isfinite([got["fits"][0]["compute_efficiency"], got["copy_bandwidth_gbs"]]).all()
