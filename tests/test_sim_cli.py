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
    from hetrun.calibrate import calibrate, predict_moe_layer_seconds
    from hetrun.profile import load_profile

    out = tmp_path / "host.yaml"
    path, prof = calibrate(out, quick=True, backends=("onnxruntime",), precisions=("fp32",), tokens=(1, 8, 64),
                           shapes=((64, 128), (256, 512)))
    assert path == out and out.exists() and not list(tmp_path.glob(".*.tmp"))
    p = load_profile(str(out))
    dt = p.model.device_types["host-onnxruntime-fp32"]
    assert 0 < dt.compute_efficiency <= 1 and 0 < dt.memory_efficiency <= 1 and dt.launch_overhead_us >= 0
    cal = p.model.extra["calibration"]
    assert cal["copy_bandwidth_gbs"] > 0 and len(cal["samples"]) == 9  # 2 shapes x 3 counts, + 3 cold-cache
    assert sum(s["cold"] for s in cal["samples"]) == 3 and cal["cache_bytes"] > 0
    assert [f["hidden"] for f in cal["fits"]] == [64, 256] and "memory_efficiency_cold" in cal["fits"][1]
    small = predict_moe_layer_seconds(str(out), "onnxruntime", "fp32", 64, 128, [1, 0, 1, 0], 1)
    big = predict_moe_layer_seconds(str(out), "onnxruntime", "fp32", 256, 512, [500, 500, 500, 500], 2)
    assert 0 < small < big and math.isfinite(big)
    with pytest.raises(Exception, match="calibrate"):
        predict_moe_layer_seconds(str(out), "openvino", "fp32", 64, 128, [1], 1)


def test_calibrate_cli_quick(tmp_path, capsys):
    out = tmp_path / "h.yaml"
    assert main(["calibrate", "--quick", "--out", str(out), "--backends", "onnxruntime", "--precisions", "fp32",
                 "--json"]) == 0
    got = _json(capsys.readouterr().out)
    assert got["path"] == str(out) and got["fits"][0]["backend"] == "onnxruntime"
    assert np.isfinite([got["fits"][0]["compute_efficiency"], got["copy_bandwidth_gbs"]]).all()
