"""`hetrun plan`: the per-device table, plan.json, the heatmap, and one-line errors with exit code 2."""

import json

import numpy as np
import pytest

from hetrun.cli import main
from hetrun.placement.plan import Plan


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def zipf_file(tmp_path, L=58, E=256, name="load.npy"):
    rng = np.random.default_rng(0)
    base = 1.0 / np.arange(1, E + 1)
    w = np.stack([rng.permutation(base) for _ in range(L)]) * 4096
    np.save(tmp_path / name, w)
    return tmp_path / name, w


def test_plan_prints_the_table_and_writes_plan_and_heatmap(capsys, tmp_path):
    load, w = zipf_file(tmp_path)
    out_json, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc, out, err = run_cli(capsys, "plan", "--model", "deepseek-r1", "--profile", "mixed-h100-910b-xeon",
                           "--load", load, "--redundant", 32, "-o", out_json, "--heatmap", png)
    assert rc == 0, err
    for words in ("h100:0", "ascend:7", "xeon:3", "fp8", "fp16", "bf16", "slots/layer", "replicas", "memory used GB",
                  "free GB", "time ms", "lower bound", "EPLB on the same devices", f"wrote plan: {out_json}"):
        assert words in out, words
    plan = Plan.from_json(out_json.read_text())
    assert plan.num_slots == 288 and plan.num_layers == 58 and plan.predicted["load"] == "table"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    row = next(line for line in out.splitlines() if "ascend:0" in line)
    assert "fp16" in row


def test_plan_json_summary_with_pins_and_presets(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "plan", "--model", "tiny", "--profile", "mixed-demo", "--redundant", 3,
                           "--pin", "device=xeon,experts=0,1", "-o", "-", "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["plan"] is None and s["slots_per_layer"] == 15 and s["pins"] == [{"device": "xeon", "experts": "0,1"}]
    assert set(s["devices"]) == {"h100:0", "ascend:0", "xeon:0"}
    assert s["step_time_s"] >= s["lower_bound_s"] > 0 and s["eplb"]["slots"] == 15
    assert not (tmp_path / "plan.json").exists()


def test_a_model_directory_or_config_plans_and_simulates(capsys, tmp_path):
    """A model's config.json (a directory, or the file) stands for a preset: Kimi K2's model_type read as DeepSeek-V3."""
    from hetrun.tiny_models import FAMILY_SPECS

    cfg = FAMILY_SPECS["glm4_moe"].to_hf_config()  # 10 experts on 3 devices: EPLB rounds its slots up to 12
    cfg.save_pretrained(tmp_path)
    rc, out, err = run_cli(capsys, "plan", "--model", tmp_path, "--profile", "mixed-demo", "-o", "-")
    assert rc == 0, err
    assert "this plan is" in out and "12 equal slots" in out
    # slower than EPLB only through the replicas EPLB's two extra slots hold, and then the line says so
    assert ("slower" in out) == ("--redundant 2 gives this plan as many" in out)
    rc, out, err = run_cli(capsys, "simulate", "--model", tmp_path / "config.json", "--profile", "mixed-demo",
                           "--json")
    assert rc == 0, err
    kimi = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**FAMILY_SPECS["deepseek_v3"].to_hf_config().to_dict(),
                                                      "model_type": "kimi_k2"}))
    rc, out, err = run_cli(capsys, "plan", "--model", tmp_path, "--profile", "mixed-demo", "-o", "-", "--json")
    assert rc == 0, err
    assert json.loads(out)["experts"] == 12
    (tmp_path / "config.json").write_text(json.dumps({**kimi, "model_type": "llama"}))
    rc, out, err = run_cli(capsys, "simulate", "--model", tmp_path, "--profile", "mixed-demo")
    assert rc == 2 and "model family 'llama' is not supported" in err and err.count("\n") == 1


def test_plan_and_simulate_say_what_they_model_approximately(capsys, tmp_path, caplog):
    """A Llama 4 config.json (MoE every other layer): plan and simulate read it and say once that its chunked
    attention is modeled with a full KV cache."""
    import transformers

    from hetrun.once import said

    said.clear()
    transformers.Llama4TextConfig(num_hidden_layers=4, num_local_experts=8, hidden_size=64, intermediate_size=64,
                                  intermediate_size_mlp=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                                  interleave_moe_layer_step=2, vocab_size=256).save_pretrained(tmp_path)
    rc, out, err = run_cli(capsys, "plan", "--model", tmp_path, "--profile", "mixed-demo", "-o", "-", "--json")
    assert rc == 0, err
    assert json.loads(out)["experts"] == 8 and json.loads(out)["moe_layers"] == 2  # MoE every other layer
    assert "chunked-attention layers (3 of every 4, 8192-token chunks) are modeled with a full KV cache" in caplog.text
    rc, out, err = run_cli(capsys, "simulate", "--model", tmp_path, "--profile", "mixed-demo", "--json")
    assert rc == 0, err


def test_plan_eplb_policy(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "plan", "--model", "tiny", "--profile", "cpu", "--redundant", 2, "--policy", "eplb",
                           "-o", tmp_path / "p.json", "--json")
    assert rc == 0, err
    assert json.loads(out)["placed_by"].startswith("hetrun.placement.eplb")


def _bad_profile(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text("name: small\ndevices:\n  - {id: h100, type: h100-sxm, count: 2, reserved_gb: 10}\n")
    return p


@pytest.mark.parametrize("make_args,words", [
    (lambda t: ["--load", zipf_file(t, L=3, E=256)[0]], "has shape [3, 256] but model 'deepseek-r1' has 58 MoE layers"),
    (lambda t: ["--load", _save(t, -np.ones((58, 256)))], "negative entries"),
    (lambda t: ["--load", _save(t, np.full((58, 256), np.nan))], "NaN or infinite"),
    (lambda t: ["--load", _save(t, np.zeros((58, 256)))], "zero everywhere"),
    (lambda t: ["--load", t / "missing.npy"], "not found"),
    (lambda t: ["--redundant", -3], "leave 253 slots for 256 experts"),
    (lambda t: ["--redundant", 5, "--policy", "eplb"], "do not split over 20 devices; use redundant_experts=4 or 24"),
    (lambda t: ["--pin", "device=tpu,layers=0-2"], "pin names device 'tpu'"),
    (lambda t: ["--profile", _bad_profile(t), "--redundant", 32], "does not fit: it needs 288 expert slots"),
    (lambda t: ["--precision", "fp8"], "has no fp8"),
    (lambda t: ["--model", "gpt-7"], "unknown model preset 'gpt-7'"),
    (lambda t: ["-o", t / "no" / "dir" / "plan.json"], "does not exist"),
])
def test_plan_bad_input_is_one_line_exit_2(capsys, tmp_path, make_args, words):
    rc, out, err = run_cli(capsys, "plan", *make_args(tmp_path))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hetrun: error:") and words in err, err
    assert "Traceback" not in err


def _save(tmp_path, table):
    path = tmp_path / "bad.npy"
    np.save(path, table)
    return path


def test_a_wide_table_printed_into_a_pipe_keeps_its_cells_whole(capsys, monkeypatch, tmp_path):
    # rich assumes 80 columns for a pipe or a file and would cut the plan table's cells to "…"
    monkeypatch.delenv("COLUMNS", raising=False)
    rc, out, err = run_cli(capsys, "plan", "--model", "mixtral-8x7b", "--profile", "mixed-h100-910b-xeon",
                           "-o", tmp_path / "plan.json")
    assert rc == 0, err
    assert "…" not in out and "memory used GB" in out and "slots/layer" in out
    from hetrun.files import table_console

    assert table_console(200).width == 200
    monkeypatch.setenv("COLUMNS", "260")
    assert table_console(200).width == 260  # a wider setting of the user's stays
